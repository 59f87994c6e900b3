"""The datapath's renderer of policy: the engine's typed verdicts → nft map and set elements.

The policy engine (:mod:`membrane.policy`) decides, per endpoint and direction, disjoint boxes of
(remote identity, protocol, port) with a typed :class:`~membrane.policy.Verdict` (allow, deny, or
redirect to an L7 parser), whether misses drop (default deny) and whether drops are only audited,
and the ipcache as disjoint address intervals. This module writes them as the elements the
ruleset's policy section (:mod:`membrane.datapath.ruleset`) loads:

- ``pol_in``/``pol_out``: ``iface_index . mark . inet_proto . inet_service`` → verdict text
  (:class:`VerdictText`; the agent's texts are :data:`INGRESS_VERDICTS`/:data:`EGRESS_VERDICTS`:
  allow ``return``, deny and L7 (no proxy yet: fail closed) to the drop chains, audit to the
  audit chains);
- ``pol_in_addr``/``pol_out_addr``: ``iface_index . ipv4_addr . inet_proto . inet_service`` →
  verdict text, the NetworkPolicy ipBlock allows by remote address (:func:`address_map_elements`);
- ``enforced_*``/``audited_*``: host veth indexes;
- ``ipcache``: address interval → identity.

:class:`PolicyRenderer` re-renders only the endpoints whose policy changed and the ipcache only
when its intervals did; :func:`render_policy` assembles the ruleset's :class:`PolicyDatapath`.
:func:`rendered_probe` answers reachability questions from the rendered elements, looked up the
way the kernel does (tests compare it with the engine).

Primitives: :data:`POLICY_MAP_TYPE`, :class:`VerdictText`, :func:`element_key`,
:func:`policy_map_elements`, :func:`address_map_elements`, :func:`enforced_elements`, :func:`audited_elements`,
:func:`ipcache_elements`, :data:`INGRESS_VERDICTS`, :data:`EGRESS_VERDICTS`,
:class:`PolicyRenderer`, :func:`render_policy`, :func:`rendered_probe`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from membrane.core.protocols import PROTOCOL_NAMES, PROTOCOLS
from membrane.datapath.nft.objects import Key, SortedElements
from membrane.datapath.ruleset import (
    EGRESS_AUDIT,
    EGRESS_DENY,
    EGRESS_L7,
    INGRESS_AUDIT,
    INGRESS_DENY,
    INGRESS_L7,
    POLICY_KEY_TYPE,
    VERDICT_RETURN,
    PolicyDatapath,
)
from membrane.identity.reserved import WORLD
from membrane.policy.engine import CompiledPolicy
from membrane.policy.ipcache import IpcacheInterval, flatten_ipcache
from membrane.policy.mapstate import DirectionPolicy, EndpointPolicy, FlatAddressEntry, FlatEntry, Verdict
from membrane.policy.reachability import NetpolModel, Probe

#: The key of the per-endpoint verdict maps ``pol_in`` / ``pol_out``.
POLICY_MAP_TYPE = POLICY_KEY_TYPE

Element = tuple[Key, str]


@dataclass(frozen=True)
class VerdictText:
    """The nft verdict each outcome renders as. ``audit`` (a deny on an endpoint in audit mode)
    defaults to the allow text. ``redirect`` (traffic an L7 rule selects; may name the parser as
    ``{parser}``) defaults to the deny text: there is no L7 proxy yet, and letting the traffic
    through at L4 would open what the L7 rule restricts, so it fails closed (in audit mode it is
    audited like a deny). An egress map whose allows must not end the chain (the ingress check
    still follows) uses ``allow="continue"``."""

    allow: str = "accept"
    deny: str = "drop"
    audit: str | None = None
    redirect: str | None = None

    def of(self, verdict: Verdict, parser: str, audit: bool) -> str:
        if verdict is Verdict.ALLOW:
            return self.allow
        if audit:
            return self.audit or self.allow
        if verdict is Verdict.REDIRECT:
            return self.redirect.format(parser=parser) if self.redirect else self.deny
        return self.deny


#: The agent's map verdicts: an allow returns to the base chain (so a pod-to-pod packet meets the
#: egress check of its source and then the ingress check of its destination); deny, audit and L7
#: (no proxy yet: dropped) go to the chains that drop or report.
INGRESS_VERDICTS = VerdictText(allow=VERDICT_RETURN, deny=INGRESS_DENY, audit=INGRESS_AUDIT, redirect=INGRESS_L7)
EGRESS_VERDICTS = VerdictText(allow=VERDICT_RETURN, deny=EGRESS_DENY, audit=EGRESS_AUDIT, redirect=EGRESS_L7)


def _range_token(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _proto_token(low: int, high: int) -> str:
    """inet_proto as the datapath's canonical text (names for the common protocols)."""
    first, last = PROTOCOL_NAMES.get(low, str(low)), PROTOCOL_NAMES.get(high, str(high))
    return first if low == high else f"{first}-{last}"


def element_key(ifindex: int, entry: FlatEntry) -> Key:
    return (str(ifindex), _range_token(*entry.identity), _proto_token(*entry.proto), _range_token(*entry.port))


def policy_map_elements(
    endpoints: Iterable[tuple[int, DirectionPolicy]], verdicts: VerdictText | None = None
) -> tuple[Element, ...]:
    """Elements of ``pol_in``/``pol_out`` for ``(host veth index, policy)`` pairs of one direction.

    Keys never overlap (nft interval maps refuse that). Endpoints whose policy is not enforced at
    all (mode ``never``) contribute nothing; a miss falls through to the ``enforced_*`` check.
    """
    verdicts = verdicts or VerdictText()
    elements: list[Element] = []
    for ifindex, policy in endpoints:
        for entry in policy.flat:
            elements.append((element_key(ifindex, entry), verdicts.of(entry.verdict, entry.parser, policy.audit)))
    return tuple(elements)


def _address_token(low: int, high: int) -> str:
    return str(IPv4Address(low)) if low == high else f"{IPv4Address(low)}-{IPv4Address(high)}"


def address_element_key(ifindex: int, entry: FlatAddressEntry) -> Key:
    return (str(ifindex), _address_token(*entry.addresses), _proto_token(*entry.proto), _range_token(*entry.port))


def address_map_elements(
    endpoints: Iterable[tuple[int, DirectionPolicy]], verdicts: VerdictText | None = None
) -> tuple[Element, ...]:
    """Elements of ``pol_in_addr``/``pol_out_addr`` (the ipBlock allows by remote address) for
    ``(host veth index, policy)`` pairs of one direction; disjoint like :func:`policy_map_elements`."""
    verdicts = verdicts or VerdictText()
    return tuple(
        (address_element_key(ifindex, entry), verdicts.of(entry.verdict, entry.parser, policy.audit))
        for ifindex, policy in endpoints
        for entry in policy.flat_addresses
    )


def enforced_elements(endpoints: Iterable[tuple[int, DirectionPolicy]]) -> frozenset[Key]:
    """Elements of ``enforced_in``/``enforced_out``: endpoints whose misses are dropped."""
    return frozenset((str(ifindex),) for ifindex, policy in endpoints if policy.enforced)


def audited_elements(endpoints: Iterable[tuple[int, DirectionPolicy]]) -> frozenset[Key]:
    """Endpoints in audit mode whose misses would be dropped: log them as AUDIT, then accept."""
    return frozenset((str(ifindex),) for ifindex, policy in endpoints if policy.default_deny and policy.audit)


def ipcache_elements(intervals: Iterable[IpcacheInterval]) -> tuple[Element, ...]:
    """Elements of the nft map ``ipcache`` (``ipv4_addr : mark``, flags interval); disjoint sorted
    intervals give :class:`~membrane.datapath.nft.objects.SortedElements`."""
    return SortedElements(((interval.token(),), str(interval.identity)) for interval in intervals)


# --- the agent's renderer ---------------------------------------------------------------------------


class PolicyRenderer:
    """Endpoint policies → map elements, re-rendering only the endpoints whose policy changed
    (policies of replicas are shared objects, so an unchanged one is recognised by identity), and
    the ipcache only when its intervals changed (it holds every pod of the cluster)."""

    def __init__(self) -> None:
        self._rendered: dict[tuple[int, str], tuple[DirectionPolicy, tuple[Element, ...], tuple[Element, ...]]] = {}
        self._ipcache: tuple[tuple[IpcacheInterval, ...], tuple[Element, ...]] | None = None
        # By interval object (kept alive here): the ipcache changes by a few intervals at a time,
        # and the policy controller hands back the same objects for the others.
        self._ipcache_elements: dict[int, tuple[IpcacheInterval, Element]] = {}

    def direction(self, ifindex: int, policy: DirectionPolicy) -> tuple[Element, ...]:
        """The identity map elements of one endpoint and direction."""
        return self._render(ifindex, policy)[0]

    def addresses(self, ifindex: int, policy: DirectionPolicy) -> tuple[Element, ...]:
        """The address map (ipBlock) elements of one endpoint and direction."""
        return self._render(ifindex, policy)[1]

    def _render(self, ifindex: int, policy: DirectionPolicy) -> tuple[tuple[Element, ...], tuple[Element, ...]]:
        key = (ifindex, policy.direction)
        cached = self._rendered.get(key)
        if cached is not None and cached[0] is policy:
            return cached[1], cached[2]
        verdicts = INGRESS_VERDICTS if policy.direction == "ingress" else EGRESS_VERDICTS
        pair = [(ifindex, policy)]
        elements = policy_map_elements(pair, verdicts)
        addresses = address_map_elements(pair, verdicts)
        self._rendered[key] = (policy, elements, addresses)
        return elements, addresses

    def ipcache(self, intervals: tuple[IpcacheInterval, ...]) -> tuple[Element, ...]:
        if self._ipcache is None or self._ipcache[0] is not intervals:
            cache = self._ipcache_elements
            fresh: dict[int, tuple[IpcacheInterval, Element]] = {}
            for interval in intervals:
                entry = cache.get(id(interval))
                if entry is None or entry[0] is not interval:
                    entry = (interval, ((interval.token(),), str(interval.identity)))
                fresh[id(interval)] = entry
            self._ipcache_elements = fresh
            self._ipcache = (intervals, SortedElements(entry[1] for entry in fresh.values()))
        return self._ipcache[1]

    def forget(self, ifindexes: set[int]) -> None:
        for key in [k for k in self._rendered if k[0] not in ifindexes]:
            del self._rendered[key]


def render_policy(
    policies: Mapping[int, EndpointPolicy], ipcache: tuple[IpcacheInterval, ...], renderer: PolicyRenderer
) -> PolicyDatapath:
    """The ruleset's policy inputs for endpoints by host veth index and the flattened ipcache."""
    ingress = [(i, p.ingress) for i, p in sorted(policies.items())]
    egress = [(i, p.egress) for i, p in sorted(policies.items())]
    return PolicyDatapath(
        ipcache=renderer.ipcache(ipcache),
        ingress=tuple(e for i, p in ingress for e in renderer.direction(i, p)),
        egress=tuple(e for i, p in egress for e in renderer.direction(i, p)),
        ingress_addresses=tuple(e for i, p in ingress for e in renderer.addresses(i, p)),
        egress_addresses=tuple(e for i, p in egress for e in renderer.addresses(i, p)),
        enforced_ingress=enforced_elements(ingress),
        enforced_egress=enforced_elements(egress),
        audited_ingress=audited_elements(ingress),
        audited_egress=audited_elements(egress),
    )


# --- reachability from the rendered elements --------------------------------------------------------

_PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOL_NAMES.items()}


def _token_range(token: str) -> tuple[int, int]:
    low, _, high = token.partition("-")
    return int(low), int(high or low)


def _proto_range(token: str) -> tuple[int, int]:
    low, _, high = token.partition("-")
    first = _PROTOCOL_NUMBERS.get(low) or int(low)
    return first, (_PROTOCOL_NUMBERS.get(high) or int(high)) if high else first


def _address_range(token: str) -> tuple[int, int]:
    if "/" in token:
        network = IPv4Network(token)
        return int(network.network_address), int(network.broadcast_address)
    low, _, high = token.partition("-")
    return int(IPv4Address(low)), int(IPv4Address(high or low))


def rendered_probe(model: NetpolModel, compiled: CompiledPolicy, verdicts: VerdictText | None = None) -> Probe:
    """A reachability probe answered from the rendered nft elements, as the kernel would: the
    source and destination identities from the ``ipcache`` intervals, then ``pol_out`` at the
    source's veth and ``pol_in`` at the destination's, where a miss (or an L7 verdict, when its
    text differs from the deny text) reads the address maps ``pol_out_addr``/``pol_in_addr`` with
    the remote address (a miss there drops only on ``enforced_*`` endpoints). Fails loudly when two
    elements cover the same packet (nft would refuse the map)."""
    ifindex = {pod.key: 100 + index for index, pod in enumerate(model.pods)}
    addresses = {pod.key: pod.ip for pod in model.pods} | dict(model.outside)
    by_direction = {
        direction: [(ifindex[key], policy.direction(direction)) for key, policy in compiled.endpoints.items()]
        for direction in ("ingress", "egress")
    }
    maps = {
        direction: [
            ((int(k[0]), _token_range(k[1]), _proto_range(k[2]), _token_range(k[3])), value)
            for k, value in policy_map_elements(items, verdicts)
        ]
        for direction, items in by_direction.items()
    }
    address_maps = {
        direction: [
            ((int(k[0]), _address_range(k[1]), _proto_range(k[2]), _token_range(k[3])), value)
            for k, value in address_map_elements(items, verdicts)
        ]
        for direction, items in by_direction.items()
    }
    enforced = {direction: enforced_elements(items) for direction, items in by_direction.items()}
    ipcache = [(_address_range(k[0]), int(v)) for k, v in ipcache_elements(flatten_ipcache(model.ipcache(compiled)))]
    text = verdicts or VerdictText()
    passes = {text.allow, text.audit or text.allow}  # deny and redirect (no L7 proxy yet) drop
    # The L7 verdict's chain reads the address map before it drops (a plain allow beats an L7 rule).
    to_address_map = {text.redirect} - {text.deny, None}

    def identity_of(address: IPv4Address) -> int:
        found = [identity for (low, high), identity in ipcache if low <= int(address) <= high]
        assert len(found) <= 1, f"overlapping ipcache elements for {address}"
        return found[0] if found else WORLD.id

    def find(
        elements: list[tuple[tuple[int, tuple[int, int], tuple[int, int], tuple[int, int]], str]],
        endpoint: int, remote: int, proto: int, port: int,
    ) -> str | None:
        found = [
            value
            for (index, ids, protos, ports), value in elements
            if index == endpoint
            and ids[0] <= remote <= ids[1]
            and protos[0] <= proto <= protos[1]
            and ports[0] <= port <= ports[1]
        ]
        assert len(found) <= 1, f"overlapping elements for {endpoint} {remote} {proto} {port}: {found}"
        return found[0] if found else None

    def allowed(direction: str, endpoint: int, remote: int, address: IPv4Address, proto: int, port: int) -> bool:
        value = find(maps[direction], endpoint, remote, proto, port)
        if value is not None and value not in to_address_map:
            return value in passes
        by_address = find(address_maps[direction], endpoint, int(address), proto, port)
        if by_address is not None:
            return by_address in passes
        if value is not None:
            return value in passes  # the L7 verdict: dropped
        return (str(endpoint),) not in enforced[direction]

    def probe(source: str, destination: str, protocol: str, port: int) -> bool:
        proto = PROTOCOLS[protocol]
        src_ip, dst_ip = addresses[source], addresses[destination]
        src, dst = identity_of(src_ip), identity_of(dst_ip)
        if source in ifindex and not allowed("egress", ifindex[source], dst, dst_ip, proto, port):
            return False
        return not (destination in ifindex and not allowed("ingress", ifindex[destination], src, src_ip, proto, port))

    return probe
