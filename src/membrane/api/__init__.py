"""The resource API: the Kubernetes and Cilium kinds membrane accepts, their validation, and the
typed client over the store.

Modules: ``meta`` (model base, name/label syntax, metadata, label selectors), ``k8s`` (Namespace,
Pod, Service, NetworkPolicy), ``cilium`` (Cilium policies, LB-IPAM, L2, BGP, CiliumNode),
``registry`` (kinds and their names, validation with field paths), ``manifest`` (reading files),
``objects`` (apply/get/list/delete/label/status over the store), ``endpoint`` (the endpoint
record, a plain value type).
"""
