"""Services and their endpoints → this node's frontends (pure; the ``frontends`` table's rows).

The rules are Kubernetes' (kube-proxy's ``CategorizeEndpoints``) and Cilium's:

- a service without a cluster IP yet, a headless service (``clusterIP: None``) and an ExternalName
  service get no frontend; IPv6 addresses are skipped (the datapath is IPv4);
- each port of a service gets a ClusterIP frontend; NodePort and LoadBalancer services also one
  node port frontend per port (on every node address); LoadBalancer services one per ingress IP of
  ``status.loadBalancer.ingress``; ``spec.externalIPs`` one each;
- new connections go to *active* backends; only when a frontend has none do they go to its
  *terminating* ones (a pod being deleted that still serves), so a rollout never refuses;
- ``internalTrafficPolicy: Local`` limits the ClusterIP frontend to this node's backends;
  ``externalTrafficPolicy: Local`` limits the node port, LoadBalancer and external IP frontends to
  this node's backends for clients outside the cluster, while this node's pods still reach every
  backend through them (Cilium's behaviour); with none local, outside clients are refused;
- ``loadBalancerSourceRanges`` limits the outside clients of the LoadBalancer frontends (a
  deny-list with ``service.cilium.io/src-ranges-policy: deny``); pods are not checked, as in Cilium;
- a service labelled ``service.kubernetes.io/service-proxy-name`` belongs to another proxy;
- the annotation ``service.cilium.io/lb-algorithm`` (``random`` or ``maglev``) overrides the cluster's
  default algorithm; ``sessionAffinity: ClientIP`` keeps a client on its backend for the timeout.

Frontend ids are stable while a frontend exists (:class:`FrontendIds`), so a backend change
rewrites one service chain, not every chain after it.

Primitives: :func:`compute_frontends`, :func:`service_frontends`, :class:`FrontendIds`,
:class:`LoadBalancerSettings`, :data:`LB_ALGORITHM_ANNOTATION`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from membrane.api import k8s
from membrane.core.ids import stable_ids
from membrane.loadbalancer.model import (
    ANY_ADDRESS,
    Algorithm,
    Backend,
    BackendCandidate,
    Frontend,
    FrontendType,
    L4Addr,
    ServiceRef,
)

LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
#: ``deny`` turns loadBalancerSourceRanges into a deny-list (Cilium's annotation).
SOURCE_RANGES_POLICY_ANNOTATION = "service.cilium.io/src-ranges-policy"
#: A service carrying this label is left to the proxy it names (Kubernetes' convention).
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"


@dataclass(frozen=True)
class LoadBalancerSettings:
    node: str
    algorithm: Algorithm = "random"


class FrontendIds:
    """Numeric frontend ids, kept while a frontend exists; freed ids are reused lowest first."""

    def __init__(self) -> None:
        self._ids: dict[tuple[L4Addr, FrontendType], int] = {}

    def assign(self, keys: Iterable[tuple[L4Addr, FrontendType]]) -> dict[tuple[L4Addr, FrontendType], int]:
        self._ids = stable_ids(sorted(set(keys)), self._ids, first=1)
        return self._ids


def _ipv4(text: str | None) -> IPv4Address | None:
    if not text or text == "None":
        return None
    try:
        address = ip_address(text)
    except ValueError:
        return None
    return address if isinstance(address, IPv4Address) else None


def _ipv4_network(text: str) -> IPv4Network | None:
    try:
        network = ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    return network if isinstance(network, IPv4Network) else None


def _choose(backends: Sequence[Backend]) -> tuple[Backend, ...]:
    """Active backends; terminating ones only when none is active."""
    active = tuple(b for b in backends if b.state == "active")
    return active or tuple(b for b in backends if b.state == "terminating")


def _algorithm(service: k8s.Service, default: Algorithm) -> Algorithm:
    value = service.metadata.annotations.get(LB_ALGORITHM_ANNOTATION) if service.metadata.annotations else None
    if value == "maglev":
        return "maglev"
    if value == "random":
        return "random"
    return default


def service_frontends(
    service: k8s.Service, candidates: Sequence[BackendCandidate], settings: LoadBalancerSettings,
) -> list[tuple[FrontendType, Frontend]]:
    """The frontends of one service, with id 0 (:func:`compute_frontends` numbers them)."""
    spec = service.spec
    cluster_ip = _ipv4(spec.clusterIP)
    if spec.type == "ExternalName" or spec.is_headless or cluster_ip is None:
        return []
    if SERVICE_PROXY_NAME_LABEL in service.labels:
        return []
    ref: ServiceRef = (service.namespace or "default", service.name)
    algorithm = _algorithm(service, settings.algorithm)
    timeout = 0
    if spec.sessionAffinity == "ClientIP":
        config = spec.sessionAffinityConfig.clientIP if spec.sessionAffinityConfig else None
        timeout = config.timeoutSeconds if config is not None else 10800
    internal_local = spec.internalTrafficPolicy == "Local"
    external_local = spec.externalTrafficPolicy == "Local"
    external_ips = [a for a in (_ipv4(ip) for ip in spec.externalIPs or ()) if a is not None]
    ingress_ips = [a for a in (_ipv4(ip) for ip in service.ingress_ips) if a is not None] \
        if spec.type == "LoadBalancer" else []
    ranges = tuple(n for n in (_ipv4_network(c) for c in spec.loadBalancerSourceRanges or ()) if n is not None) \
        if spec.loadBalancerSourceRanges else None
    annotations = service.metadata.annotations or {}
    ranges_deny = annotations.get(SOURCE_RANGES_POLICY_ANNOTATION) == "deny"
    out: list[tuple[FrontendType, Frontend]] = []
    for port in spec.ports or ():
        name = port.name or ""
        # One backend per address and port (the first candidate wins), in address order.
        unique = {(c.address, c.port): c for c in reversed(candidates)
                  if c.port_name == name and c.protocol == port.protocol}
        backends = tuple(Backend(c.address, c.port, c.node, c.state)
                         for _, c in sorted(unique.items(), key=lambda item: (int(item[0][0]), item[0][1])))
        local = tuple(b for b in backends if b.node == settings.node)
        cluster_choice = _choose(backends)
        local_choice = _choose(local)

        addresses: list[tuple[FrontendType, IPv4Address, int]] = [("ClusterIP", cluster_ip, port.port)]
        if spec.type in ("NodePort", "LoadBalancer") and port.nodePort:
            addresses.append(("NodePort", ANY_ADDRESS, port.nodePort))
        addresses += [("LoadBalancer", ip, port.port) for ip in ingress_ips]
        addresses += [("ExternalIP", ip, port.port) for ip in external_ips]
        for kind, address, number in addresses:
            internal: tuple[Backend, ...] | None = None
            if kind == "ClusterIP":
                selected = local_choice if internal_local else cluster_choice
            elif external_local:
                selected, internal = local_choice, cluster_choice
            else:
                selected = cluster_choice
            out.append((kind, Frontend(
                id=0, service=ref, port_name=name, type=kind, address=L4Addr(address, port.protocol, number),
                backends=backends, selected=selected, internal=internal if internal != selected else None,
                algorithm=algorithm, affinity_timeout=timeout, external_local=external_local and kind != "ClusterIP",
                internal_local=internal_local,
                source_ranges=ranges if kind == "LoadBalancer" else None,
                source_ranges_deny=ranges_deny and kind == "LoadBalancer",
            )))
    return out


def compute_frontends(
    services: Iterable[k8s.Service], candidates: Mapping[ServiceRef, Sequence[BackendCandidate]],
    settings: LoadBalancerSettings, ids: FrontendIds,
) -> list[Frontend]:
    """Every frontend of every service, numbered. Two services claiming one address and port (a
    user error the API cannot always catch, e.g. two externalIPs) resolve to the older claim: the
    first by namespace and name."""
    claimed: dict[L4Addr, tuple[FrontendType, Frontend]] = {}
    for service in sorted(services, key=lambda s: (s.namespace or "default", s.name)):
        ref = (service.namespace or "default", service.name)
        for kind, frontend in service_frontends(service, candidates.get(ref, ()), settings):
            claimed.setdefault(frontend.address, (kind, frontend))
    numbers = ids.assign((addr, kind) for addr, (kind, _) in claimed.items())
    return [replace(frontend, id=numbers[(addr, kind)]) for addr, (kind, frontend) in sorted(claimed.items())]
