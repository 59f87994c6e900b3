"""LB-IPAM: LoadBalancer IPs for Services from ``CiliumLoadBalancerIPPool`` blocks (pure, no I/O).

One call of :func:`allocate` takes every pool and every Service and returns what their status
should say; it is a full recomputation, deterministic in its inputs, so running it again on its own
output changes nothing. The IPs a Service already shows in ``status.loadBalancer.ingress`` are
re-imported first (when still valid), so an IP stays with its Service across recomputations and
restarts of the operator. Cilium's operator keeps the same state in memory and updates it per
event; the rules are its own (``operator/pkg/lbipam``):

- responsibility: ``type: LoadBalancer`` with ``loadBalancerClass`` unset or one of Cilium's
  (:data:`LB_CLASSES`); a Service that stops being eligible loses the IPs and condition given here;
- pools in creation order (``creationTimestamp``, then name); a pool whose blocks overlap each
  other or a block of an earlier, non-conflicting pool is *conflicting* and not used;
- blocks: a ``cidr``, or ``start``..``stop`` (``start`` alone is one IP); ``allowFirstLastIPs: "No"``
  reserves the first and last address of CIDR blocks of at least 3 addresses (so /30, /126 and
  larger); unset behaves as ``"Yes"``;
- ``serviceSelector`` matches the Service's labels plus the virtual labels
  :data:`SERVICE_NAMESPACE_LABEL` and :data:`SERVICE_NAME_LABEL`; no selector selects every Service;
- ``disabled`` pools give no new IPs; IPs they gave are kept;
- requested IPs: ``spec.loadBalancerIP`` and the :data:`IPS_ANNOTATION` list; otherwise one IP per
  requested family (``ipFamilyPolicy``/``ipFamilies``), the first free one in block order;
- sharing: Services with the same :data:`SHARING_KEY_ANNOTATION` share an IP when compatible
  (:func:`sharing_incompatibility`); an IP is free again when its last holder leaves.

Primitives: :func:`allocate` → :class:`Allocation` (:class:`ServiceAllocation` per Service,
:class:`PoolState` per pool); :func:`service_status` and :func:`pool_status` merge a result into an
object's status; :func:`is_responsible`, :func:`service_view`, :func:`requested_ips`, :func:`requested_families`,
:func:`service_labels`, :func:`sharing_incompatibility`, :func:`pool_order`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from membrane.api import k8s
from membrane.api.cilium import CiliumLoadBalancerIPPool, PoolStatus
from membrane.api.meta import Condition

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
ServiceKey = tuple[str, str]  # (namespace, name)

SATISFIED_CONDITION = "cilium.io/IPAMRequestSatisfied"
IPS_TOTAL_CONDITION = "cilium.io/IPsTotal"
IPS_AVAILABLE_CONDITION = "cilium.io/IPsAvailable"
IPS_USED_CONDITION = "cilium.io/IPsUsed"
POOL_CONFLICT_CONDITION = "cilium.io/PoolConflict"
#: The pool conditions, in the order Cilium first sets them.
POOL_CONDITIONS = (POOL_CONFLICT_CONDITION, IPS_TOTAL_CONDITION, IPS_AVAILABLE_CONDITION, IPS_USED_CONDITION)

#: The classes Cilium's LB-IPAM serves besides "no class".
LB_CLASSES = ("io.cilium/bgp-control-plane", "io.cilium/l2-announcer")

IPS_ANNOTATION = "lbipam.cilium.io/ips"
IPS_ANNOTATION_ALIAS = "io.cilium/lb-ipam-ips"
SHARING_KEY_ANNOTATION = "lbipam.cilium.io/sharing-key"
SHARING_KEY_ANNOTATION_ALIAS = "io.cilium/lb-ipam-sharing-key"
SHARING_CROSS_NAMESPACE_ANNOTATION = "lbipam.cilium.io/sharing-cross-namespace"
SHARING_CROSS_NAMESPACE_ANNOTATION_ALIAS = "io.cilium/lb-ipam-sharing-cross-namespace"
ANY_NAMESPACE = "*"

SERVICE_NAMESPACE_LABEL = "io.kubernetes.service.namespace"
SERVICE_NAME_LABEL = "io.kubernetes.service.name"

MSG_NO_POOL = "There are no enabled CiliumLoadBalancerIPPools that match this service"
MSG_OUT_OF_IPS = "All enabled CiliumLoadBalancerIPPools that match this service ran out of allocatable IPs"


# --- service view ----------------------------------------------------------------------------------


def _annotation(service: k8s.Service, key: str, alias: str) -> str:
    annotations = service.metadata.annotations
    return annotations.get(key) or annotations.get(alias) or ""


def is_responsible(service: k8s.Service) -> bool:
    """Whether LB-IPAM gives this Service its IPs (type and class)."""
    spec = service.spec
    return spec.type == "LoadBalancer" and (spec.loadBalancerClass is None or spec.loadBalancerClass in LB_CLASSES)


def service_labels(service: k8s.Service) -> dict[str, str]:
    """The labels pool selectors see: the Service's own plus its namespace and name."""
    return {
        **service.labels,
        SERVICE_NAME_LABEL: service.name,
        SERVICE_NAMESPACE_LABEL: service.namespace or "default",
    }


def _parse_ip(text: str) -> IP | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def requested_ips(service: k8s.Service) -> tuple[IP, ...]:
    """``spec.loadBalancerIP`` then the IP annotation's list; unparsable entries are skipped."""
    texts = [service.spec.loadBalancerIP or ""]
    texts += _annotation(service, IPS_ANNOTATION, IPS_ANNOTATION_ALIAS).split(",")
    found: list[IP] = []
    for text in texts:
        ip = _parse_ip(text) if text.strip() else None
        if ip is not None and ip not in found:
            found.append(ip)
    return tuple(found)


def requested_families(service: k8s.Service, *, ipv4: bool = True, ipv6: bool = True) -> frozenset[int]:
    """The IP versions (4, 6) a Service without requested IPs gets one IP of.

    SingleStack (or unset): the first of ``ipFamilies``, else IPv4 if enabled, else IPv6.
    PreferDualStack: every listed (or, none listed, every) family that is enabled.
    RequireDualStack: both, enabled or not (the missing one leaves the Service unsatisfied).
    """
    spec = service.spec
    families = [4 if f == "IPv4" else 6 for f in spec.ipFamilies or ()]
    if spec.ipFamilyPolicy == "RequireDualStack":
        return frozenset((4, 6))
    if spec.ipFamilyPolicy == "PreferDualStack":
        enabled = {4} if ipv4 else set()
        enabled |= {6} if ipv6 else set()
        return frozenset(enabled & set(families)) if families else frozenset(enabled)
    if families:
        return frozenset(families[:1])
    return frozenset((4,)) if ipv4 or not ipv6 else frozenset((6,))


@dataclass(frozen=True)
class ServiceView:
    """What LB-IPAM needs of a Service (:func:`service_view`)."""

    key: ServiceKey
    labels: Mapping[str, str]
    generation: int | None
    requested: tuple[IP, ...]
    families: frozenset[int]
    sharing_key: str
    cross_namespace: frozenset[str]
    traffic_policy: str
    ports: frozenset[int]
    selector: Mapping[str, str]
    current: tuple[str, ...]  # status.loadBalancer.ingress[].ip as found

    @property
    def namespace(self) -> str:
        return self.key[0]


def service_view(service: k8s.Service, *, ipv4: bool = True, ipv6: bool = True) -> ServiceView:
    cross = _annotation(service, SHARING_CROSS_NAMESPACE_ANNOTATION, SHARING_CROSS_NAMESPACE_ANNOTATION_ALIAS)
    return ServiceView(
        key=(service.namespace or "default", service.name),
        labels=service_labels(service),
        generation=service.metadata.generation,
        requested=requested_ips(service),
        families=requested_families(service, ipv4=ipv4, ipv6=ipv6),
        sharing_key=_annotation(service, SHARING_KEY_ANNOTATION, SHARING_KEY_ANNOTATION_ALIAS),
        cross_namespace=frozenset(part.strip() for part in cross.split(",") if part.strip()),
        traffic_policy=service.spec.externalTrafficPolicy or "Cluster",
        ports=frozenset(port.port for port in service.spec.ports or ()),
        selector=dict(service.spec.selector or {}),
        current=tuple(service.ingress_ips),
    )


def sharing_incompatibility(a: ServiceView, b: ServiceView) -> str | None:
    """Why two Services may not share an IP (Cilium's wording), or None when they may."""
    if a.sharing_key != b.sharing_key:
        return "different sharing key"
    if a.namespace != b.namespace:
        a_allows = b.namespace in a.cross_namespace or ANY_NAMESPACE in a.cross_namespace
        b_allows = a.namespace in b.cross_namespace or ANY_NAMESPACE in b.cross_namespace
        if not (a_allows and b_allows):
            return "different and not permitted namespace"
    # The protocol is ignored: the datapath cannot tell two frontends apart by it.
    if a.ports & b.ports:
        return "same port"
    if a.traffic_policy != b.traffic_policy:
        return "different ExternalTrafficPolicy"
    if a.traffic_policy == "Local" and (not a.selector or not b.selector or a.selector != b.selector):
        return "compatible ExternalTrafficPolicy local but selecting different set of pods"
    return None


# --- pools and ranges ------------------------------------------------------------------------------


def pool_order(pool: CiliumLoadBalancerIPPool) -> tuple[str, str]:
    """Pools are considered oldest first; on a conflict the later one loses."""
    return (pool.metadata.creationTimestamp or "", pool.name)


@dataclass
class _Range:
    pool: CiliumLoadBalancerIPPool
    first: int
    last: int
    version: int
    text: str  # as the conflict message names it
    reserved: frozenset[int]
    #: ip (as int) -> the Services holding it (a sharing group), in the order they joined.
    holders: dict[int, list[ServiceView]] = field(default_factory=dict)
    cursor: int | None = None

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, ip: IP) -> bool:
        return ip.version == self.version and self.first <= int(ip) <= self.last

    def taken(self, value: int) -> bool:
        return value in self.reserved or value in self.holders

    def next_free(self) -> int | None:
        # Within one computation addresses are only ever taken, never freed: every address below
        # the cursor is taken, so each address is stepped over once, whatever the range's size.
        value = self.cursor if self.cursor is not None else self.first
        while value <= self.last and self.taken(value):
            value += 1
        self.cursor = value
        return value if value <= self.last else None


def _ip(value: int, version: int) -> IP:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _ranges_of(pool: CiliumLoadBalancerIPPool) -> list[_Range]:
    found = []
    for block in pool.spec.blocks or ():
        try:
            if block.cidr is not None:
                net = ipaddress.ip_network(block.cidr.strip(), strict=False)
                first, last, version, text = int(net.network_address), int(net.broadcast_address), net.version, str(net)
                from_cidr = True
            elif block.start is not None:
                start = ipaddress.ip_address(block.start.strip())
                stop = ipaddress.ip_address(block.stop.strip()) if block.stop else start
                if stop.version != start.version or int(stop) < int(start):
                    continue
                first, last, version = int(start), int(stop), start.version
                text = f"{start} - {stop}"
                from_cidr = False
            else:
                continue
        except ValueError:
            continue  # validation refuses these; a stored one that slipped through is skipped
        reserved: frozenset[int] = frozenset()
        # Reserving both ends of a /31 or /32 would leave nothing to give.
        if from_cidr and pool.spec.allowFirstLastIPs == "No" and last - first >= 2:
            reserved = frozenset((first, last))
        found.append(_Range(pool, first, last, version, text, reserved))
    return found


def _overlap(a: _Range, b: _Range) -> bool:
    return a.version == b.version and a.first <= b.last and b.first <= a.last


def _conflicts(pools: Sequence[CiliumLoadBalancerIPPool], ranges: Mapping[str, list[_Range]]) -> dict[str, str]:
    """Pool name -> conflict message, for the pools that overlap themselves or an earlier pool."""
    conflicting: dict[str, str] = {}
    accepted: list[CiliumLoadBalancerIPPool] = []
    for pool in pools:
        own = ranges[pool.name]
        message = None
        for i, a in enumerate(own):
            for b in own[i + 1 :]:
                if message is None and _overlap(a, b):
                    message = _conflict_message(a, b, pool.name)
        for other in accepted:
            for a in own:
                for b in ranges[other.name]:
                    if message is None and _overlap(a, b):
                        message = _conflict_message(a, b, other.name)
        if message is None:
            accepted.append(pool)
        else:
            conflicting[pool.name] = message
    return conflicting


def _conflict_message(own: _Range, other: _Range, other_pool: str) -> str:
    return f"Pool conflicts since CIDR '{own.text}' overlaps CIDR '{other.text}' from IP Pool '{other_pool}'"


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceAllocation:
    """What LB-IPAM says about one Service: its ingress IPs and its request condition.

    ``responsible`` False means LB-IPAM no longer serves it: its IPs and condition are removed.
    """

    ips: tuple[str, ...]
    satisfied: bool
    reason: str
    message: str
    generation: int | None = None
    responsible: bool = True


@dataclass(frozen=True)
class PoolState:
    """One pool's counts (``total = available + used``, reserved addresses counted as used) and conflict."""

    total: int
    available: int
    used: int
    conflict: str | None  # the message, when the pool is conflicting
    generation: int | None = None


@dataclass(frozen=True)
class Allocation:
    services: Mapping[ServiceKey, ServiceAllocation]
    pools: Mapping[str, PoolState]


class _Allocator:
    def __init__(self, pools: Sequence[CiliumLoadBalancerIPPool]) -> None:
        self.pools = sorted(pools, key=pool_order)
        by_pool = {pool.name: _ranges_of(pool) for pool in self.pools}
        self.conflicts = _conflicts(self.pools, by_pool)
        self.ranges = [r for pool in self.pools for r in by_pool[pool.name]]
        self.by_pool = by_pool
        self.allocated: dict[ServiceKey, list[tuple[IP, _Range]]] = {}
        self.failure: dict[ServiceKey, tuple[str, str]] = {}
        #: sharing key -> the IPs given under it, in the order they were given.
        self.sharing: dict[str, list[tuple[IP, _Range]]] = {}

    def _usable(self, r: _Range, *, allow_disabled: bool = False) -> bool:
        return r.pool.name not in self.conflicts and (allow_disabled or not r.pool.spec.disabled)

    @staticmethod
    def _selects(r: _Range, view: ServiceView) -> bool:
        selector = r.pool.spec.serviceSelector
        return selector is None or selector.matches(view.labels)

    def _give(self, view: ServiceView, ip: IP, r: _Range) -> None:
        r.holders.setdefault(int(ip), []).append(view)
        self.allocated.setdefault(view.key, []).append((ip, r))
        if view.sharing_key:
            entries = self.sharing.setdefault(view.sharing_key, [])
            if all(int(e[0]) != int(ip) or e[0].version != ip.version for e in entries):
                entries.append((ip, r))

    def _has(self, view: ServiceView, ip: IP) -> bool:
        return any(held == ip for held, _ in self.allocated.get(view.key, ()))

    def _joinable(self, view: ServiceView, holders: Sequence[ServiceView]) -> str | None:
        """None when ``view`` may join the group ``holders``, else the reason it may not."""
        for holder in holders:
            reason = sharing_incompatibility(holder, view)
            if reason is not None:
                return reason
        return None

    # -- phase 1: keep the IPs a Service already shows, when they are still valid

    def import_current(self, view: ServiceView) -> None:
        for text in view.current:
            ip = _parse_ip(text)
            if ip is None or self._has(view, ip):
                continue
            if view.requested and ip not in view.requested:
                continue
            if not view.requested and ip.version not in view.families:
                continue
            # A disabled pool keeps what it gave; a conflicting pool's ranges are not used at all.
            found = next(
                (r for r in self.ranges
                 if r.contains(ip) and self._usable(r, allow_disabled=True) and self._selects(r, view)),
                None,
            )  # fmt: skip
            if found is None or int(ip) in found.reserved:
                continue
            holders = found.holders.get(int(ip))
            if holders and (not view.sharing_key or self._joinable(view, holders) is not None):
                continue
            self._give(view, ip, found)

    # -- phase 2: give what is still missing

    def satisfied(self, view: ServiceView) -> bool:
        held = [ip for ip, _ in self.allocated.get(view.key, ())]
        if view.requested:
            return all(ip in held for ip in view.requested)
        return all(any(ip.version == family for ip in held) for family in view.families)

    def satisfy(self, view: ServiceView) -> None:
        if self.satisfied(view):
            return
        if view.requested:
            self._satisfy_requested(view)
        else:
            for family in sorted(view.families):
                if not any(ip.version == family for ip, _ in self.allocated.get(view.key, ())):
                    self._satisfy_family(view, family)

    def _fail(self, view: ServiceView, reason: str, message: str) -> None:
        self.failure[view.key] = (reason, message)

    def _satisfy_requested(self, view: ServiceView) -> None:
        for ip in view.requested:
            if self._has(view, ip):
                continue
            found, pool_seen = None, False
            for r in self.ranges:
                if not r.contains(ip) or not self._usable(r):
                    continue
                pool_seen = True
                if self._selects(r, view):
                    found = r
                    break
            if found is None:
                if pool_seen:
                    self._fail(
                        view,
                        "pool_selector_mismatch",
                        f"The pool with the CIDR containing '{ip}', doesn't select this service",
                    )
                else:
                    self._fail(view, "no_pool", f"No pool exists with a CIDR containing '{ip}'")
                continue
            holders = found.holders.get(int(ip))
            if int(ip) in found.reserved or (holders and not view.sharing_key):
                self._fail(view, "already_allocated", f"The IP '{ip}' is already allocated to another service")
                continue
            if holders and (reason := self._joinable(view, holders)) is not None:
                self._fail(
                    view,
                    "already_allocated_incompatible_service",
                    f"The IP '{ip}' is already allocated to an incompatible service. Reason: {reason}",
                )
                continue
            self._give(view, ip, found)

    def _satisfy_family(self, view: ServiceView, family: int) -> None:
        if view.sharing_key:
            for ip, r in self.sharing.get(view.sharing_key, ()):
                holders = r.holders.get(int(ip))
                if ip.version == family and holders and self._joinable(view, holders) is None:
                    self._give(view, ip, r)
                    return
        full = False
        for r in self.ranges:
            if r.version != family or not self._usable(r) or not self._selects(r, view):
                continue
            value = r.next_free()
            if value is None:
                full = True
                continue
            self._give(view, _ip(value, family), r)
            return
        if full:
            self._fail(view, "out_of_ips", MSG_OUT_OF_IPS)
        else:
            self._fail(view, "no_pool", MSG_NO_POOL)

    def result(self, view: ServiceView) -> ServiceAllocation:
        ips = tuple(str(ip) for ip, _ in self.allocated.get(view.key, ()))
        if self.satisfied(view):
            return ServiceAllocation(ips, True, "satisfied", "", view.generation)
        reason, message = self.failure.get(view.key, ("no_pool", MSG_NO_POOL))
        return ServiceAllocation(ips, False, reason, message, view.generation)

    def pool_state(self, pool: CiliumLoadBalancerIPPool) -> PoolState:
        total = used = 0
        for r in self.by_pool[pool.name]:
            total += r.size
            used += len(r.reserved | r.holders.keys())
        return PoolState(total, total - used, used, self.conflicts.get(pool.name), pool.metadata.generation)


def _service_order(service: k8s.Service) -> tuple[str, str, str]:
    return (service.metadata.creationTimestamp or "", service.namespace or "default", service.name)


def allocate(
    pools: Iterable[CiliumLoadBalancerIPPool],
    services: Iterable[k8s.Service],
    *,
    ipv4: bool = True,
    ipv6: bool = True,
) -> Allocation:
    """Every pool's state and every Service's IPs and condition, from scratch.

    Services LB-IPAM does not serve appear only when they still carry its condition (with
    ``responsible=False``: strip them); other Services are absent (another controller's).
    Services are served oldest first (``creationTimestamp``, namespace, name); IPs they already
    show are kept before any new IP is given, so a new Service never takes an IP in use.
    """
    allocator = _Allocator(list(pools))
    results: dict[ServiceKey, ServiceAllocation] = {}
    ordered = sorted(services, key=_service_order)
    views = []
    for service in ordered:
        if is_responsible(service):
            views.append(service_view(service, ipv4=ipv4, ipv6=ipv6))
            continue
        conditions = service.status.conditions if service.status else None
        if any(c.type == SATISFIED_CONDITION for c in conditions or ()):
            key = (service.namespace or "default", service.name)
            results[key] = ServiceAllocation((), False, "", "", service.metadata.generation, responsible=False)
    for view in views:
        allocator.import_current(view)
    for view in views:
        allocator.satisfy(view)
    for view in views:
        results[view.key] = allocator.result(view)
    states = {pool.name: allocator.pool_state(pool) for pool in allocator.pools}
    return Allocation(results, states)


# --- merging results into status -------------------------------------------------------------------


def _set_condition(conditions: Sequence[Condition], new: Condition) -> tuple[Condition, ...]:
    """``meta.SetStatusCondition``: replace in place (the transition time moves only when the
    status changes), or append."""
    out = list(conditions)
    for index, old in enumerate(out):
        if old.type == new.type:
            if old.status == new.status and old.lastTransitionTime:
                new = new.model_copy(update={"lastTransitionTime": old.lastTransitionTime})
            out[index] = new
            return tuple(out)
    return (*out, new)


def service_status(service: k8s.Service, allocation: ServiceAllocation, now: str) -> k8s.ServiceStatus:
    """The Service's status with the allocation applied; other conditions and the fields of kept
    ingress entries (``ipMode``, ``ports``) stay as they are. ``now`` stamps changed conditions."""
    status = service.status or k8s.ServiceStatus()
    current = {item.ip: item for item in (status.loadBalancer.ingress or ()) if item.ip} if status.loadBalancer else {}
    conditions = tuple(c for c in status.conditions or () if allocation.responsible or c.type != SATISFIED_CONDITION)
    if allocation.responsible:
        ingress = tuple(current.get(ip) or k8s.LoadBalancerIngress(ip=ip) for ip in allocation.ips)
        conditions = _set_condition(
            conditions,
            Condition(
                type=SATISFIED_CONDITION,
                status="True" if allocation.satisfied else "False",
                observedGeneration=allocation.generation,
                lastTransitionTime=now,
                reason=allocation.reason,
                message=allocation.message,
            ),
        )
    else:
        ingress = ()
    lb = k8s.LoadBalancerStatus(ingress=ingress) if ingress else k8s.LoadBalancerStatus()
    return status.model_copy(update={"loadBalancer": lb, "conditions": conditions or None})


def pool_status(pool: CiliumLoadBalancerIPPool, state: PoolState, now: str) -> PoolStatus:
    """The pool's status with its conflict and count conditions set; ``now`` stamps changes."""
    status = pool.status or PoolStatus()
    conditions: tuple[Condition, ...] = tuple(status.conditions or ())
    counts = {
        IPS_TOTAL_CONDITION: state.total,
        IPS_AVAILABLE_CONDITION: state.available,
        IPS_USED_CONDITION: state.used,
    }
    for type_ in POOL_CONDITIONS:
        if type_ == POOL_CONFLICT_CONDITION:
            new = Condition(
                type=type_,
                status="True" if state.conflict else "False",
                observedGeneration=state.generation,
                lastTransitionTime=now,
                reason="cidr_overlap" if state.conflict else "resolved",
                message=state.conflict or "",
            )
        else:
            new = Condition(
                type=type_,
                status="Unknown",
                observedGeneration=state.generation,
                lastTransitionTime=now,
                reason="noreason",
                message=str(counts[type_]),
            )
        conditions = _set_condition(conditions, new)
    return status.model_copy(update={"conditions": conditions})


__all__ = [
    "IPS_ANNOTATION",
    "IPS_ANNOTATION_ALIAS",
    "IPS_AVAILABLE_CONDITION",
    "IPS_TOTAL_CONDITION",
    "IPS_USED_CONDITION",
    "LB_CLASSES",
    "POOL_CONFLICT_CONDITION",
    "SATISFIED_CONDITION",
    "SERVICE_NAMESPACE_LABEL",
    "SERVICE_NAME_LABEL",
    "SHARING_CROSS_NAMESPACE_ANNOTATION",
    "SHARING_KEY_ANNOTATION",
    "Allocation",
    "PoolState",
    "ServiceAllocation",
    "ServiceView",
    "allocate",
    "is_responsible",
    "pool_order",
    "pool_status",
    "requested_families",
    "requested_ips",
    "service_labels",
    "service_status",
    "service_view",
    "sharing_incompatibility",
]
