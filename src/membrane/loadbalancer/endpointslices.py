"""EndpointSlices of a Service, derived from its pods as Kubernetes' EndpointSlice controller does.

Pure: no store, no kernel. The caller says which pods have a usable address (``ready(pod)``: the
pod's IPv4 address when it has a ready endpoint, else None); everything else comes from the
objects.

Rules (pkg/controller/endpointslice, staging/.../endpointslice/utils.go):

- only a Service with a selector gets slices; the pods are those of its namespace whose labels
  match the selector, bound to a node, not Succeeded/Failed, and with an address;
- each Service port gives an EndpointPort named as the Service port, with the pod's port for
  ``targetPort``: a number as is, a name looked up in the pod's containers (same protocol). A
  name a pod does not declare leaves that port out for that pod, so pods can resolve to
  different port sets, and every (address type, port set) gets slices of its own;
- conditions: ``serving`` = the pod is ready, ``terminating`` = the pod has a
  ``deletionTimestamp``, ``ready`` = serving and not terminating, or always with
  ``publishNotReadyAddresses``;
- at most :data:`MAX_ENDPOINTS_PER_SLICE` endpoints per slice; names are ``<service>-<hash>``,
  stable for a given service, port set and position, so an unchanged input derives identical
  slices and a changed one updates slices in place rather than replacing them.

:func:`slice_backends` reads slices back as (address, port, node, state) for one Service port,
the same way for derived slices and for slices a user applied for a selectorless Service.

Primitives: :func:`derive_endpoint_slices`, :func:`slice_backends`, :class:`SliceBackend`,
:func:`resolve_target_port`, :func:`pod_is_ready`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

from membrane.api import k8s
from membrane.api.meta import ObjectMeta
from membrane.api.podrow import PodRow
from membrane.loadbalancer.model import parse_address

#: The EndpointSlice controller's ``--max-endpoints-per-slice`` default.
MAX_ENDPOINTS_PER_SLICE = 100

#: Characters of generated names (apimachinery's rand.String alphabet: no vowels, no confusables).
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

BackendState = Literal["active", "terminating"]


class SliceBackend(NamedTuple):
    """One address behind one Service port, as a load balancer uses it."""

    address: str
    port: int
    node: str | None
    state: BackendState


PortSet = tuple[k8s.EndpointPort, ...]


def _row(pod: k8s.Pod | PodRow) -> PodRow:
    return pod if isinstance(pod, PodRow) else PodRow.of(pod, keep_model=False)


def pod_is_ready(pod: k8s.Pod | PodRow) -> bool:
    """``podutil.IsPodReady``, lenient where membrane has no kubelet: a pod whose status carries
    no Ready condition (placed by a CNI runtime, whose status nobody writes) counts as ready;
    one whose Ready condition is not True does not (see :attr:`PodRow.ready`)."""
    return _row(pod).ready


def resolve_target_port(pod: k8s.Pod | PodRow, port: k8s.ServicePort) -> int | None:
    """``podutil.FindPort``: the pod's number for the Service port's targetPort (None if the pod
    has no container port of that name and protocol)."""
    target = port.targetPort if port.targetPort is not None else port.port
    if isinstance(target, int):
        return target
    for name, protocol, number in _row(pod).named_ports:
        if name == target and protocol == port.protocol:
            return number
    return None


def _endpoint_ports(service: k8s.Service, pod: PodRow) -> PortSet:
    found = []
    for port in service.spec.ports or ():
        number = resolve_target_port(pod, port)
        if number is None:
            continue  # upstream logs and leaves the port out for this pod
        found.append(k8s.EndpointPort(name=port.name or "", protocol=port.protocol, port=number,
                                      appProtocol=port.appProtocol))
    return tuple(found)


def _address_type(address: str) -> k8s.AddressType:
    return "IPv6" if parse_address(address).version == 6 else "IPv4"


def _in_endpoints(pod: PodRow, namespace: str, selector: dict[str, str]) -> bool:
    """``ShouldPodBeInEndpoints`` and the selector: the service's namespace, matching labels,
    bound to a node and not finished."""
    if pod.namespace != namespace:
        return False
    if any(pod.labels.get(key) != value for key, value in selector.items()):
        return False
    if not pod.node:
        return False
    return pod.phase not in ("Succeeded", "Failed")


def _endpoint(service: k8s.Service, pod: PodRow, address: str) -> k8s.Endpoint:
    serving = pod.ready
    terminating = pod.terminating
    ready = bool(service.spec.publishNotReadyAddresses) or (serving and not terminating)
    hostname = None
    # ShouldSetHostname: a pod that names this service as its subdomain is addressable by hostname.
    if pod.hostname and pod.subdomain == service.name:
        hostname = pod.hostname
    return k8s.Endpoint(
        addresses=(address,),
        conditions=k8s.EndpointConditions(ready=ready, serving=serving, terminating=terminating),
        hostname=hostname,
        nodeName=pod.node,
        targetRef=k8s.ObjectReference(kind="Pod", namespace=pod.namespace, name=pod.name, uid=pod.uid or None),
    )


def _port_key(ports: PortSet) -> str:
    return ";".join(f"{p.name}/{p.protocol}/{p.port}/{p.appProtocol or ''}" for p in ports)


def slice_name(service: k8s.Service, address_type: str, ports: PortSet, index: int, taken: set[str]) -> str:
    """``<service>-<5 chars>``, derived from what the slice is for (not from its endpoints)."""
    base = f"{service.namespace or 'default'}/{service.name}/{address_type}/{_port_key(ports)}/{index}"
    for salt in range(64):
        digest = hashlib.sha256(f"{base}#{salt}".encode()).digest()
        suffix = "".join(_NAME_ALPHABET[b % len(_NAME_ALPHABET)] for b in digest[:5])
        # generateName's rule: the prefix is cut so that prefix + suffix fit a 63-character label.
        name = f"{service.name[:57]}-{suffix}"
        if name not in taken:
            return name
    raise AssertionError("no free slice name")  # 64 collisions of a 27^5 space: not reachable


def derive_endpoint_slices(
    service: k8s.Service, pods: Iterable[k8s.Pod | PodRow], ready: Callable[[PodRow], str | None]
) -> list[k8s.EndpointSlice]:
    """The EndpointSlices Kubernetes' controller keeps for ``service``, sorted by name.

    ``pods`` may hold pods of any namespace; ``ready(pod)`` is the pod's address when it has a
    ready endpoint, else None (such a pod is left out). A Service without a selector gets none:
    its slices are the user's."""
    selector = service.spec.selector
    if not selector:
        return []
    namespace = service.namespace or "default"
    groups: dict[tuple[str, PortSet], list[k8s.Endpoint]] = {}
    for pod in sorted((_row(p) for p in pods), key=lambda p: (p.namespace, p.name)):
        if not _in_endpoints(pod, namespace, selector):
            continue
        address = ready(pod)
        if not address:
            continue
        key = (_address_type(address), _endpoint_ports(service, pod))
        groups.setdefault(key, []).append(_endpoint(service, pod, address))
    labels = {k8s.SERVICE_NAME_LABEL: service.name, k8s.MANAGED_BY_LABEL: k8s.ENDPOINTSLICE_CONTROLLER}
    owner = {"apiVersion": "v1", "kind": "Service", "name": service.name, "uid": service.metadata.uid or "",
             "controller": True, "blockOwnerDeletion": True}
    slices: list[k8s.EndpointSlice] = []
    taken: set[str] = set()
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], _port_key(item[0][1])))
    for (address_type, ports), endpoints in ordered:
        for index in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            name = slice_name(service, address_type, ports, index // MAX_ENDPOINTS_PER_SLICE, taken)
            taken.add(name)
            slices.append(k8s.EndpointSlice(
                apiVersion="discovery.k8s.io/v1",
                metadata=ObjectMeta(name=name, namespace=namespace, labels=dict(labels),
                                    ownerReferences=(owner,) if service.metadata.uid else None),
                addressType=address_type,
                endpoints=tuple(endpoints[index:index + MAX_ENDPOINTS_PER_SLICE]),
                ports=ports,
            ))
    return sorted(slices, key=lambda s: s.name)


def slice_backends(slices: Iterable[k8s.EndpointSlice], port_name: str | None) -> list[SliceBackend]:
    """The backends of one Service port (by name; ``None`` or ``""`` for an unnamed port) in slices.

    As Cilium and kube-proxy read slices: an endpoint that is ready (unset counts as ready) is
    ``active``; one that is serving and terminating is ``terminating`` (a load balancer sends it
    no new connections, except when nothing active is left); anything else is left out, as are
    FQDN slices and slices without a number for the port. An address listed twice (two slices,
    e.g. while a user moves endpoints) counts once, active winning. Sorted by address and port."""
    wanted = port_name or ""
    found: dict[tuple[str, int], SliceBackend] = {}
    for eps in slices:
        if eps.addressType == "FQDN":
            continue
        number = next((p.port for p in eps.ports or () if p.name == wanted), None)
        if number is None:
            continue
        for endpoint in eps.endpoints:
            cond = endpoint.conditions
            ready = cond.ready is None or cond.ready
            serving = cond.serving if cond.serving is not None else ready
            terminating = bool(cond.terminating)
            if terminating and serving:
                state: BackendState = "terminating"
            elif ready and not terminating:
                state = "active"
            else:
                continue
            for address in endpoint.addresses:
                key = (address, number)
                previous = found.get(key)
                if previous is None or (previous.state == "terminating" and state == "active"):
                    found[key] = SliceBackend(address, number, endpoint.nodeName, state)
    return [found[key] for key in sorted(found, key=_address_order)]


def _address_order(key: tuple[str, int]) -> tuple[int, int, int]:
    ip = parse_address(key[0])
    return ip.version, int(ip), key[1]


__all__ = [
    "MAX_ENDPOINTS_PER_SLICE",
    "BackendState",
    "SliceBackend",
    "derive_endpoint_slices",
    "pod_is_ready",
    "resolve_target_port",
    "slice_backends",
    "slice_name",
]
