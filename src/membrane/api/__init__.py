"""The resource API: the Kubernetes and Cilium kinds membrane accepts and their validation.

Modules: ``meta`` (model base, name/label syntax, metadata, label selectors), ``k8s`` (Namespace,
Pod, Service, NetworkPolicy), ``cilium`` (Cilium policies, LB-IPAM, L2, BGP, CiliumNode),
``registry`` (kinds and their names, validation with field paths), ``manifest`` (reading files),
``endpoint`` (the endpoint record, a plain value type).

The models know nothing of the store (an import-linter contract keeps it so): the typed client
that reads and writes them is :mod:`membrane.store.objects`.
"""
