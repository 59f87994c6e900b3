"""Per-endpoint policy map state: what the datapath enforces for one endpoint and direction (pure).

For every endpoint and direction the compiler decides

- whether the direction is **default-deny** (Cilium §1.8: in ``default`` mode an endpoint is
  allow-all in a direction until a rule with a section for that direction selects it; a rule's
  ``enableDefaultDeny: false`` adds allows without isolating; ``always`` isolates everything,
  ``never`` enforces nothing), and whether drops are only **audited** (global or per namespace);
- the **entries** ``(remote identity | ANY, protocol | ANY, port range) → allow | deny |
  redirect``, each remembering the rule it came from.

Precedence when entries overlap: **deny** beats everything; a plain **allow** beats an L7
**redirect** for the same traffic (Cilium: a broader L3/L4 allow makes the L7 part moot; the
traffic never reaches the proxy); otherwise the union of allows. A redirect is rendered as a
drop until an L7 proxy exists (fail closed: the L7 rule restricts the traffic it selects). A miss is dropped when the
direction is default-deny and allowed otherwise. Ingress from the local host is allowed on
default-deny endpoints (``allow_localhost``, so kubelet-style probes work); deny rules still win.

Ports: ``ANY`` in a port rule is TCP, UDP and SCTP; a rule without ports (L3-only) covers every IP
protocol (key protocol 0 = ANY). Named ports resolve against the *destination* pod: the endpoint
itself on ingress, the pods behind each peer identity on egress (so a name may map to different
numbers per peer). ICMP rules (``icmps``) use protocol 1/58 with the ICMP type in the port field.

Address entries: a NetworkPolicy ``ipBlock`` matches the peer's *address* (upstream Kubernetes),
not an identity, so its allows are :class:`AddressEntry` s over address ranges (the block minus its
exceptions; an exception is no deny: another allow of that address still wins). They hold allows
only (NetworkPolicy has no deny), and combine with the identity entries under the same
precedence: :meth:`DirectionPolicy.lookup` given the remote address sees both.
:func:`flatten_address_entries` cuts them into disjoint address boxes the same way.

Flattening (:func:`flatten_entries`) splits the identity, protocol and port space into disjoint
boxes, each carrying the winning typed verdict (and the L7 parser of a redirect), and merges
neighbours with the same outcome: what an interval map that refuses overlaps can hold. Rendering
those boxes as nft elements is the datapath's business (its policy renderer).

Primitives: :class:`EnforcementConfig`, :class:`PolicyEndpoint`, :class:`ServiceInfo`,
:class:`Verdict`, :class:`MapEntry`, :class:`AddressEntry`, :class:`Match`, :class:`DirectionPolicy`,
:class:`EndpointPolicy`, :class:`PolicyRepository`, :func:`compute_endpoint_policy`,
:func:`compute_policies`, :class:`FlatEntry`, :func:`flatten_entries`, :class:`FlatAddressEntry`,
:func:`flatten_address_entries`, :func:`named_ports_of`,
:data:`PROTOCOLS` (from :mod:`membrane.core.protocols`).
"""

from __future__ import annotations

import enum
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from ipaddress import IPv4Address
from typing import Literal, TypeVar

from membrane.api import k8s
from membrane.core.protocols import PROTOCOLS
from membrane.identity.labels import POD_NAMESPACE_LABEL, Label
from membrane.identity.reserved import HOST
from membrane.policy.rules import (
    ALLOW_LOCALHOST,
    DIRECTIONS,
    SOURCE_K8S,
    Direction,
    L7Spec,
    PolicyRule,
    PortSpec,
    RuleOrigin,
    ServiceRef,
)
from membrane.policy.selectors import AddressBlock, Requirement, Selector, SelectorCache, match_label

#: What ``ANY`` means in a port rule (Cilium: TCP, UDP and SCTP).
ANY_L4 = (PROTOCOLS["TCP"], PROTOCOLS["UDP"], PROTOCOLS["SCTP"])
PROTO_ANY = 0  # an entry for every IP protocol (L3-only rules)
PROTO_MAX = 255
PORT_MAX = 65535
IDENTITY_MAX = (1 << 32) - 1

EnforcementMode = Literal["default", "always", "never"]

#: name → {(protocol number, port)}: the container ports of a pod (or of all pods of an identity).
NamedPorts = Mapping[str, frozenset[tuple[int, int]]]


@dataclass(frozen=True)
class EnforcementConfig:
    """Agent-wide policy settings (Cilium's ``enable-policy``, ``policy-audit-mode``, ...)."""

    mode: EnforcementMode = "default"
    audit: bool = False
    audit_namespaces: frozenset[str] = frozenset()
    allow_localhost: bool = True
    #: ``enable-non-default-deny-policies``; when off, ``enableDefaultDeny: false`` is ignored.
    non_default_deny_policies: bool = True


@dataclass(frozen=True)
class PolicyEndpoint:
    """A local endpoint as policy sees it: its name, identity, namespace and named ports."""

    key: str
    identity: int
    namespace: str
    named_ports: NamedPorts = field(default_factory=dict, hash=False)

    @property
    def named_ports_signature(self) -> tuple[tuple[str, frozenset[tuple[int, int]]], ...]:
        return tuple(sorted(self.named_ports.items()))


@dataclass(frozen=True)
class ServiceInfo:
    """A Service, for ``toServices``: its labels and pod selector (None: no selector)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    selector: Mapping[str, str] | None = field(default=None, hash=False)


def named_ports_of(spec: k8s.PodSpec) -> dict[str, frozenset[tuple[int, int]]]:
    """The named container ports of a pod: name → {(protocol number, port)}."""
    found: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for container in spec.containers:
        for port in container.ports or ():
            if port.name:
                found[port.name.lower()].add((PROTOCOLS[port.protocol], port.containerPort))
    return {name: frozenset(ports) for name, ports in found.items()}


# --- entries -------------------------------------------------------------------------------------------


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    REDIRECT = "redirect"  # for the L7 proxy; none exists yet, so the datapath denies it


_PRECEDENCE = {Verdict.REDIRECT: 1, Verdict.ALLOW: 2, Verdict.DENY: 3}


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One allow/deny/redirect for remote identities (None = every identity), a protocol (0 = every
    protocol) and an inclusive port range, with the rule it comes from."""

    identities: frozenset[int] | None
    proto: int
    port_low: int
    port_high: int
    verdict: Verdict
    origin: RuleOrigin
    l7: L7Spec | None = None

    def matches(self, identity: int, proto: int, port: int) -> bool:
        return (
            (self.identities is None or identity in self.identities)
            and (self.proto == PROTO_ANY or self.proto == proto)
            and self.port_low <= port <= self.port_high
        )


@dataclass(frozen=True, slots=True)
class AddressEntry:
    """An allow for remote *addresses* (disjoint inclusive ranges of integer IPv4 addresses: an
    ``ipBlock`` minus its exceptions), a protocol and a port range, with the rule it comes from
    (its path names the ipBlock)."""

    ranges: tuple[tuple[int, int], ...]
    proto: int
    port_low: int
    port_high: int
    verdict: Verdict
    origin: RuleOrigin
    l7: L7Spec | None = None

    def matches(self, address: int, proto: int, port: int) -> bool:
        return (
            (self.proto == PROTO_ANY or self.proto == proto)
            and self.port_low <= port <= self.port_high
            and any(low <= address <= high for low, high in self.ranges)
        )


@dataclass(frozen=True, slots=True)
class Match:
    """What the entries say about one packet: the winning verdict (None: no entry) and the rules."""

    verdict: Verdict | None
    rules: tuple[RuleOrigin, ...] = ()
    l7: tuple[L7Spec, ...] = ()


@dataclass(frozen=True)
class DirectionPolicy:
    """The policy of one endpoint in one direction."""

    direction: Direction
    mode: EnforcementMode
    selected_by: tuple[RuleOrigin, ...]  # every rule selecting the endpoint in this direction
    default_deny: bool
    audit: bool
    entries: tuple[MapEntry, ...] = ()
    addresses: tuple[AddressEntry, ...] = ()  # ipBlock allows, by the remote address

    @property
    def selected(self) -> bool:
        return bool(self.selected_by)

    @property
    def enforced(self) -> bool:
        """Whether a packet no entry allows is dropped (default-deny and not in audit mode)."""
        return self.default_deny and not self.audit

    def lookup(self, identity: int, proto: int, port: int, address: IPv4Address | int | None = None) -> Match:
        """The verdict the entries give a packet from/to ``identity`` (ICMP: ``port`` = type); with
        the remote ``address``, the address entries (ipBlock) take part under the same precedence."""
        found: list[MapEntry | AddressEntry] = [e for e in self.entries if e.matches(identity, proto, port)]
        if address is not None and self.addresses:
            number = int(address)
            found += [e for e in self.addresses if e.matches(number, proto, port)]
        if not found:
            return Match(None)
        best = max((e.verdict for e in found), key=_PRECEDENCE.__getitem__)
        winners = [e for e in found if e.verdict is best]
        rules = tuple(sorted({e.origin for e in winners}))
        l7 = tuple(e.l7 for e in winners if e.l7 is not None) if best is Verdict.REDIRECT else ()
        return Match(best, rules, l7)

    @cached_property
    def flat(self) -> tuple[FlatEntry, ...]:
        """The entries as disjoint boxes (verdicts only), ready to render."""
        return flatten_entries(self.entries)

    @cached_property
    def flat_addresses(self) -> tuple[FlatAddressEntry, ...]:
        """The address entries as disjoint boxes, ready to render next to :attr:`flat`."""
        return flatten_address_entries(self.addresses)


@dataclass(frozen=True)
class EndpointPolicy:
    endpoint: PolicyEndpoint
    ingress: DirectionPolicy
    egress: DirectionPolicy

    def direction(self, direction: Direction) -> DirectionPolicy:
        return self.ingress if direction == "ingress" else self.egress


# --- compilation -------------------------------------------------------------------------------------------


class PolicyRepository:
    """The normalized rules, indexed by subject so the rules selecting an identity are found fast.
    Immutable once built; host (node selector) rules are kept out of endpoint policy."""

    def __init__(self, rules: Iterable[PolicyRule]) -> None:
        self.rules = tuple(r for r in rules if not r.host)
        self.host_rules = tuple(r for r in rules if r.host)
        by_subject: dict[Selector, list[PolicyRule]] = defaultdict(list)
        for rule in self.rules:
            by_subject[rule.subject].append(rule)
        self._by_subject = {subject: tuple(rules) for subject, rules in by_subject.items()}

    def selecting(self, cache: SelectorCache, identity: int) -> tuple[PolicyRule, ...]:
        """The rules whose subject selects ``identity``, in repository order."""
        return self.selecting_many(cache, (identity,))[identity]

    def selecting_many(self, cache: SelectorCache, identities: Iterable[int]) -> dict[int, tuple[PolicyRule, ...]]:
        wanted = set(identities)
        found: dict[int, list[PolicyRule]] = {i: [] for i in wanted}
        for subject, rules in self._by_subject.items():
            selection = cache.select(subject)
            for identity in wanted & selection:
                found[identity].extend(rules)
        order = {id(rule): i for i, rule in enumerate(self.rules)}
        return {i: tuple(sorted(rules, key=lambda r: order[id(r)])) for i, rules in found.items()}


@dataclass
class _Context:
    cache: SelectorCache
    config: EnforcementConfig
    named_by_name: dict[str, dict[int, frozenset[tuple[int, int]]]]
    services: tuple[ServiceInfo, ...]
    # A rule's entries depend on the rule, the requirements in force and (named ports on
    # ingress) the endpoint's ports: computed once per combination, shared by all endpoints.
    entries: dict[tuple[int, tuple[Requirement, ...], object], tuple[list[MapEntry], list[AddressEntry]]] = field(
        default_factory=dict
    )


def _service_selectors(ref: ServiceRef, services: Sequence[ServiceInfo]) -> list[Selector]:
    selectors = []
    for svc in services:
        if ref.namespace is not None and svc.namespace != ref.namespace:
            continue
        if ref.name is not None and svc.name != ref.name:
            continue
        labels = [Label(SOURCE_K8S, k, v) for k, v in svc.labels.items()]
        if ref.selector is not None and not ref.selector.matches(labels):
            continue
        if not svc.selector:
            continue  # selector-less services have no pods behind them to select
        requirements = [match_label(SOURCE_K8S, k, v) for k, v in svc.selector.items()]
        requirements.append(match_label(SOURCE_K8S, POD_NAMESPACE_LABEL, svc.namespace))
        selectors.append(Selector(tuple(requirements)))
    return selectors


def _peer_identities(rule: PolicyRule, requirements: tuple[Requirement, ...], ctx: _Context) -> frozenset[int] | None:
    """The remote identities a rule's peers select; None = every identity (the wildcard)."""
    found: set[int] = set()
    for selector in rule.endpoints:
        effective = selector.and_(*requirements) if requirements else selector
        if effective.is_wildcard:
            return None
        found |= ctx.cache.select(effective)
    for peer in rule.peers:
        if isinstance(peer, Selector) and peer.is_wildcard:
            return None
        found |= ctx.cache.select(peer)
    for ref in rule.services:
        for selector in _service_selectors(ref, ctx.services):
            found |= ctx.cache.select(selector)
    return frozenset(found)


def _protocols(spec: PortSpec) -> tuple[int, ...]:
    return ANY_L4 if spec.protocol == "ANY" else (PROTOCOLS[spec.protocol],)


def _port_entries(
    spec: PortSpec, identities: frozenset[int] | None, direction: Direction, endpoint: PolicyEndpoint, ctx: _Context
) -> list[tuple[frozenset[int] | None, int, int, int]]:
    """(identities, protocol, low, high) for one port spec, resolving named ports."""
    protocols = _protocols(spec)
    if isinstance(spec.port, int):
        low, high = (0, PORT_MAX) if spec.port == 0 else (spec.port, spec.end_port or spec.port)
        return [(identities, proto, low, high) for proto in protocols]
    if direction == "ingress":  # the destination is this endpoint
        return [
            (identities, proto, port, port)
            for proto, port in sorted(endpoint.named_ports.get(spec.port, ()))
            if proto in protocols
        ]
    # Egress: the destination is the peer; each peer identity resolves the name on its own pods.
    groups: dict[tuple[int, int], set[int]] = defaultdict(set)
    for identity, ports in ctx.named_by_name.get(spec.port, {}).items():
        if identities is not None and identity not in identities:
            continue
        for proto, port in ports:
            if proto in protocols:
                groups[(proto, port)].add(identity)
    return [(frozenset(ids), proto, port, port) for (proto, port), ids in sorted(groups.items())]


def _address_entries(
    rule: PolicyRule, block: AddressBlock, endpoint: PolicyEndpoint, ctx: _Context
) -> list[AddressEntry]:
    """The entries of one ipBlock peer. A named port resolves against the destination pod: on
    ingress that is the endpoint itself; on egress an address names no pod, so the name resolves
    to nothing (fail closed)."""
    ranges = block.ranges()
    if not ranges:
        return []
    origin = replace(rule.origin, path=f"{rule.origin.path}.{block.path}" if block.path else rule.origin.path)
    verdict = Verdict.DENY if rule.action == "deny" else Verdict.ALLOW
    if rule.l4 is None:
        return [AddressEntry(ranges, PROTO_ANY, 0, PORT_MAX, verdict, origin)]
    entries = []
    for l4 in rule.l4:
        for spec in l4.ports:
            if not isinstance(spec.port, int) and rule.direction == "egress":
                continue
            for _, proto, low, high in _port_entries(spec, None, rule.direction, endpoint, ctx):
                entries.append(AddressEntry(ranges, proto, low, high, verdict, origin))
    return entries


def _rule_entries(
    rule: PolicyRule, requirements: tuple[Requirement, ...], endpoint: PolicyEndpoint, ctx: _Context
) -> tuple[list[MapEntry], list[AddressEntry]]:
    addresses = [entry for block in rule.addresses for entry in _address_entries(rule, block, endpoint, ctx)]
    return _identity_entries(rule, requirements, endpoint, ctx), addresses


def _identity_entries(
    rule: PolicyRule, requirements: tuple[Requirement, ...], endpoint: PolicyEndpoint, ctx: _Context
) -> list[MapEntry]:
    identities = _peer_identities(rule, requirements, ctx)
    if identities is not None and not identities:
        return []
    base = Verdict.DENY if rule.action == "deny" else Verdict.ALLOW
    if rule.l4 is None:
        return [MapEntry(identities, PROTO_ANY, 0, PORT_MAX, base, rule.origin)]
    entries = []
    for l4 in rule.l4:
        verdict = Verdict.REDIRECT if l4.l7 is not None and base is Verdict.ALLOW else base
        for spec in l4.ports:
            for ids, proto, low, high in _port_entries(spec, identities, rule.direction, endpoint, ctx):
                if ids is None or ids:
                    entries.append(MapEntry(ids, proto, low, high, verdict, rule.origin, l4.l7))
    return entries


def _direction_policy(
    endpoint: PolicyEndpoint, direction: Direction, rules: Sequence[PolicyRule], ctx: _Context
) -> DirectionPolicy:
    config = ctx.config
    mine = [r for r in rules if r.direction == direction]
    selected_by = tuple(dict.fromkeys(r.origin for r in mine))
    audit = config.audit or endpoint.namespace in config.audit_namespaces
    if config.mode == "never":
        return DirectionPolicy(direction, config.mode, selected_by, default_deny=False, audit=False)
    default_deny = config.mode == "always" or any(r.default_deny or not config.non_default_deny_policies for r in mine)
    # fromRequires/toRequires of every selecting rule narrow the endpoint selectors of all of them.
    allow_requirements = tuple(req for r in mine if r.action == "allow" for req in r.requires)
    deny_requirements = tuple(req for r in mine if r.action == "deny" for req in r.requires)
    entries: list[MapEntry] = []
    addresses: list[AddressEntry] = []
    ports = endpoint.named_ports_signature if direction == "ingress" else ()
    for rule in mine:
        requirements = deny_requirements if rule.action == "deny" else allow_requirements
        memo_key = (id(rule), requirements, ports)
        found = ctx.entries.get(memo_key)
        if found is None:
            found = ctx.entries[memo_key] = _rule_entries(rule, requirements, endpoint, ctx)
        entries.extend(found[0])
        addresses.extend(found[1])
    if direction == "ingress" and default_deny and config.allow_localhost:
        entries.append(MapEntry(frozenset({HOST.id}), PROTO_ANY, 0, PORT_MAX, Verdict.ALLOW, ALLOW_LOCALHOST))
    return DirectionPolicy(direction, config.mode, selected_by, default_deny, audit, tuple(entries), tuple(addresses))


def _context(
    cache: SelectorCache,
    config: EnforcementConfig,
    named_ports_by_identity: Mapping[int, NamedPorts],
    services: Iterable[ServiceInfo],
) -> _Context:
    by_name: dict[str, dict[int, frozenset[tuple[int, int]]]] = defaultdict(dict)
    for identity, named in named_ports_by_identity.items():
        for name, ports in named.items():
            by_name[name][identity] = ports
    return _Context(cache, config, dict(by_name), tuple(services))


def compute_endpoint_policy(
    endpoint: PolicyEndpoint,
    repository: PolicyRepository,
    cache: SelectorCache,
    config: EnforcementConfig | None = None,
    *,
    named_ports_by_identity: Mapping[int, NamedPorts] | None = None,
    services: Iterable[ServiceInfo] = (),
) -> EndpointPolicy:
    """The ingress and egress policy of one endpoint."""
    ctx = _context(cache, config or EnforcementConfig(), named_ports_by_identity or {}, services)
    rules = repository.selecting(cache, endpoint.identity)
    return EndpointPolicy(endpoint, *(_direction_policy(endpoint, d, rules, ctx) for d in DIRECTIONS))


def compute_policies(
    endpoints: Iterable[PolicyEndpoint],
    repository: PolicyRepository,
    cache: SelectorCache,
    config: EnforcementConfig | None = None,
    *,
    named_ports_by_identity: Mapping[int, NamedPorts] | None = None,
    services: Iterable[ServiceInfo] = (),
) -> dict[str, EndpointPolicy]:
    """The policy of every endpoint, keyed by endpoint key. Endpoints that share identity,
    namespace and named ports share the computation (replicas of one workload)."""
    endpoints = list(endpoints)
    ctx = _context(cache, config or EnforcementConfig(), named_ports_by_identity or {}, services)
    selecting = repository.selecting_many(cache, (e.identity for e in endpoints))
    memo: dict[tuple[object, ...], tuple[DirectionPolicy, DirectionPolicy]] = {}
    result: dict[str, EndpointPolicy] = {}
    for endpoint in endpoints:
        signature = (endpoint.identity, endpoint.namespace, endpoint.named_ports_signature)
        directions = memo.get(signature)
        if directions is None:
            rules = selecting[endpoint.identity]
            ingress, egress = (_direction_policy(endpoint, d, rules, ctx) for d in DIRECTIONS)
            directions = memo[signature] = (ingress, egress)
        result[endpoint.key] = EndpointPolicy(endpoint, *directions)
    return result


# --- flattening --------------------------------------------------------------------------------------------

Decision = tuple[Verdict, str, frozenset[RuleOrigin]]  # verdict, L7 parser (redirects), deciding rules


@dataclass(frozen=True, slots=True)
class FlatEntry:
    """A disjoint box of the identity, protocol and port space and its verdict."""

    identity: tuple[int, int]
    proto: tuple[int, int]
    port: tuple[int, int]
    verdict: Verdict
    parser: str = ""  # the L7 parser of a redirect
    rules: frozenset[RuleOrigin] = frozenset()


_Entry = MapEntry | AddressEntry


def _decide(active: Sequence[_Entry], with_rules: bool) -> Decision:
    best = max((e.verdict for e in active), key=_PRECEDENCE.__getitem__)
    winners = [e for e in active if e.verdict is best]
    parser = min((e.l7.parser for e in winners if e.l7 is not None), default="") if best is Verdict.REDIRECT else ""
    rules = frozenset(e.origin for e in winners) if with_rules else frozenset()
    return best, parser, rules


PortCells = tuple[tuple[int, int, Decision], ...]
ProtoCells = tuple[tuple[int, int, PortCells], ...]


def _flatten_ports(entries: Sequence[_Entry], with_rules: bool) -> PortCells:
    if not entries:
        return ()
    points = sorted({e.port_low for e in entries} | {e.port_high + 1 for e in entries})
    cells: list[tuple[int, int, Decision]] = []
    for low, next_low in itertools.pairwise(points):
        high = next_low - 1
        active = [e for e in entries if e.port_low <= low and e.port_high >= high]
        if not active:
            continue
        decision = _decide(active, with_rules)
        if cells and cells[-1][1] == low - 1 and cells[-1][2] == decision:
            cells[-1] = (cells[-1][0], high, decision)
        else:
            cells.append((low, high, decision))
    return tuple(cells)


C = TypeVar("C", bound=tuple[object, ...])


def _merge_cells(cells: Iterable[tuple[int, int, C]]) -> list[tuple[int, int, C]]:
    """Join neighbouring cells with equal content; drop empty ones."""
    merged: list[tuple[int, int, C]] = []
    for low, high, content in cells:
        if not content:
            continue
        if merged and merged[-1][1] == low - 1 and merged[-1][2] == content:
            merged[-1] = (merged[-1][0], high, content)
        else:
            merged.append((low, high, content))
    return merged


def _split(points: Iterable[int], maximum: int) -> list[tuple[int, int, int | None]]:
    """The cells [0, maximum] falls into around the given points: gaps (None) and the points."""
    cells: list[tuple[int, int, int | None]] = []
    cursor = 0
    for point in sorted(points):
        if cursor <= point - 1:
            cells.append((cursor, point - 1, None))
        cells.append((point, point, point))
        cursor = point + 1
    if cursor <= maximum:
        cells.append((cursor, maximum, None))
    return cells


def _flatten_protos(entries: Sequence[_Entry], with_rules: bool) -> ProtoCells:
    wild = [e for e in entries if e.proto == PROTO_ANY]
    specific: dict[int, list[_Entry]] = defaultdict(list)
    for entry in entries:
        if entry.proto != PROTO_ANY:
            specific[entry.proto].append(entry)
    base = _flatten_ports(wild, with_rules)
    cells = (
        (low, high, base if proto is None else _flatten_ports(wild + specific[proto], with_rules))
        for low, high, proto in _split(specific, PROTO_MAX)
    )
    return tuple(_merge_cells(cells))


def flatten_entries(entries: Sequence[MapEntry], with_rules: bool = False) -> tuple[FlatEntry, ...]:
    """Disjoint boxes covering exactly what ``entries`` cover, each with the winning verdict.

    ``with_rules`` keeps the deciding rules on every box (neighbours then merge only when the
    same rules decide them). Identities sharing the same set of entries are computed once.
    """
    wild = [e for e in entries if e.identities is None]
    # Entries of one selector share one identity set: expand each distinct set once.
    groups: dict[frozenset[int], list[MapEntry]] = {}
    for entry in entries:
        if entry.identities is not None:
            groups.setdefault(entry.identities, []).append(entry)
    members = list(groups.values())
    per_identity: dict[int, list[int]] = defaultdict(list)
    for group, identities in enumerate(groups):
        for identity in identities:
            per_identity[identity].append(group)
    base = _flatten_protos(wild, with_rules)
    memo: dict[tuple[int, ...], ProtoCells] = {}

    def cell(identity: int | None) -> ProtoCells:
        if identity is None:
            return base
        signature = tuple(per_identity[identity])
        if signature not in memo:
            memo[signature] = _flatten_protos(wild + [e for g in signature for e in members[g]], with_rules)
        return memo[signature]

    boxes: list[FlatEntry] = []
    for id_low, id_high, protos in _merge_cells(
        (low, high, cell(identity)) for low, high, identity in _split(per_identity, IDENTITY_MAX)
    ):
        for proto_low, proto_high, ports in protos:
            for port_low, port_high, (verdict, parser, rules) in ports:
                boxes.append(
                    FlatEntry((id_low, id_high), (proto_low, proto_high), (port_low, port_high), verdict, parser, rules)
                )
    return tuple(boxes)


@dataclass(frozen=True, slots=True)
class FlatAddressEntry:
    """A disjoint box of the address, protocol and port space and its verdict (addresses as
    inclusive integer ranges)."""

    addresses: tuple[int, int]
    proto: tuple[int, int]
    port: tuple[int, int]
    verdict: Verdict
    parser: str = ""
    rules: frozenset[RuleOrigin] = frozenset()


def flatten_address_entries(entries: Sequence[AddressEntry], with_rules: bool = False) -> tuple[FlatAddressEntry, ...]:
    """Disjoint boxes covering exactly what the address entries cover, each with the winning verdict.

    A sweep over the range boundaries: between two consecutive boundaries the same entries are
    active, and runs with the same active set share one protocol/port flattening."""
    if not entries:
        return ()
    events: dict[int, list[tuple[int, int]]] = defaultdict(list)  # address -> (entry, +1 | -1)
    for index, entry in enumerate(entries):
        for low, high in entry.ranges:
            events[low].append((index, 1))
            events[high + 1].append((index, -1))
    points = sorted(events)
    depth: dict[int, int] = defaultdict(int)
    memo: dict[frozenset[int], ProtoCells] = {}
    cells: list[tuple[int, int, ProtoCells]] = []
    for point, next_point in itertools.pairwise(points):
        for index, delta in events[point]:
            depth[index] += delta
            if not depth[index]:
                del depth[index]
        if not depth:
            continue
        active = frozenset(depth)
        if active not in memo:
            memo[active] = _flatten_protos([entries[i] for i in sorted(active)], with_rules)
        content = memo[active]
        if cells and cells[-1][1] == point - 1 and cells[-1][2] == content:
            cells[-1] = (cells[-1][0], next_point - 1, content)
        else:
            cells.append((point, next_point - 1, content))
    return tuple(
        FlatAddressEntry((low, high), (proto_low, proto_high), (port_low, port_high), verdict, parser, rules)
        for low, high, protos in cells
        for proto_low, proto_high, ports in protos
        for port_low, port_high, (verdict, parser, rules) in ports
    )
