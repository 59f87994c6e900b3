"""membrane: container networking in the Cilium mould on the plain Linux kernel.

Kept empty on purpose: the CNI plugin imports ``membrane.cni.plugin`` on every container
start, and every import here would be paid on that path.
"""
