"""Policy trace: would this source reach this destination on this port, and which rule decides?

A connection passes two independent checks (Cilium §1.9): **egress** at the source, when the
source is an endpoint, and **ingress** at the destination, when the destination is an endpoint.
Each check reports its outcome and the reason — the deciding rules (kind, namespace/name, rule
index, field path), "default deny" with the rules that isolate the endpoint, "not selected",
enforcement disabled, L7 rules (denied: the L7 proxy is not available yet), or AUDIT (would be
denied, audit mode lets it pass).

Peers are named as ``membrane policy trace`` takes them: ``NS/POD`` for an endpoint, an address or
CIDR (resolved through the ipcache, so a pod's address finds the pod's identity), or an entity
name (``world``, ``host``, ``remote-node``, ...). A peer with an address (a pod, an address, a
CIDR's first address) is also checked against the NetworkPolicy ``ipBlock`` entries, which match
addresses, not identities; the deciding rule then names the ipBlock (``spec.egress[0].to[1].ipBlock``).

A Service as the destination (``--to service:NS/NAME``) is traced once per backend: policy is
enforced on the backend, after the service address is translated, as in Cilium (a policy never
sees a ClusterIP; it selects the backend pod, on its target port). Each backend gets its verdict
line and the same rule attribution (:class:`ServiceTrace`, :func:`trace_service`,
:func:`format_service_trace`); which backends a service has is the caller's to say.

Primitives: :class:`TracePeer`, :func:`resolve_peer`, :class:`DirectionTrace`,
:class:`PolicyTrace`, :func:`trace_direction`, :func:`trace`, :func:`format_trace`,
:class:`BackendTrace`, :class:`ServiceTrace`, :func:`trace_service`, :func:`format_service_trace`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_network
from typing import Literal

from membrane.core.errors import InvalidInput
from membrane.core.protocols import PROTOCOLS
from membrane.identity.reserved import RESERVED_BY_NAME, WORLD, identity_name
from membrane.policy.ipcache import IpcacheInterval, lookup_identity
from membrane.policy.mapstate import DirectionPolicy, EndpointPolicy, Verdict
from membrane.policy.rules import Direction, L7Spec, RuleOrigin

Outcome = Literal["allowed", "denied", "audited"]
Reason = Literal[
    "not-an-endpoint", "disabled", "not-selected", "rule", "redirect", "deny-rule", "default-deny", "no-default-deny"
]


@dataclass(frozen=True)
class TracePeer:
    """One end of a traced connection: what the user named, its identity, and its endpoint policy
    when it is an endpoint (None for world, hosts, CIDRs)."""

    name: str
    identity: int
    endpoint: EndpointPolicy | None = None
    address: IPv4Address | None = None  # for ipBlock entries; None: an entity, or a pod without one


def resolve_peer(
    text: str,
    policies: Mapping[str, EndpointPolicy],
    intervals: Sequence[IpcacheInterval] = (),
    endpoint_addresses: Mapping[IPv4Address, str] | None = None,
) -> TracePeer:
    """``NS/POD``, an address or CIDR, or an entity name → the peer with its identity."""
    if text in policies:
        policy = policies[text]
        own = next((a for a, key in (endpoint_addresses or {}).items() if key == text), None)
        return TracePeer(text, policy.endpoint.identity, policy, own)
    if text in RESERVED_BY_NAME and text != "unknown":
        return TracePeer(text, RESERVED_BY_NAME[text].id)
    try:
        network = ip_network(text, strict=False)
    except ValueError:
        raise InvalidInput([f"unknown peer {text!r}: expected NS/POD, an IPv4 address or CIDR, or an entity"]) from None
    if network.version != 4:
        raise InvalidInput([f"{text}: only IPv4 is supported"])
    address = IPv4Address(network.network_address)
    key = (endpoint_addresses or {}).get(address)
    if key is not None and key in policies:
        return TracePeer(text, policies[key].endpoint.identity, policies[key], address)
    identity = lookup_identity(intervals, address)
    return TracePeer(text, WORLD.id if identity is None else identity, None, address)


@dataclass(frozen=True)
class DirectionTrace:
    direction: Direction
    endpoint: str | None  # the endpoint whose policy was checked; None: the peer is no endpoint
    outcome: Outcome
    reason: Reason
    rules: tuple[RuleOrigin, ...] = ()  # the deciding rules, or the isolating ones for default deny
    l7: tuple[L7Spec, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.outcome != "denied"


def trace_direction(
    direction: Direction,
    endpoint: str | None,
    policy: DirectionPolicy | None,
    remote: int,
    proto: int,
    port: int,
    address: IPv4Address | None = None,
) -> DirectionTrace:
    """One check: ``policy`` of ``endpoint`` against the remote identity (and address), protocol and port."""
    if policy is None:
        return DirectionTrace(direction, endpoint, "allowed", "not-an-endpoint")
    if policy.mode == "never":
        return DirectionTrace(direction, endpoint, "allowed", "disabled")
    blocked: Outcome = "audited" if policy.audit else "denied"
    match = policy.lookup(remote, proto, port, address)
    if match.verdict is Verdict.DENY:
        return DirectionTrace(direction, endpoint, blocked, "deny-rule", match.rules)
    if match.verdict is Verdict.ALLOW:
        return DirectionTrace(direction, endpoint, "allowed", "rule", match.rules)
    if match.verdict is Verdict.REDIRECT:  # no L7 proxy yet: fail closed
        return DirectionTrace(direction, endpoint, blocked, "redirect", match.rules, match.l7)
    if policy.default_deny:
        return DirectionTrace(direction, endpoint, blocked, "default-deny", policy.selected_by)
    if policy.selected:
        return DirectionTrace(direction, endpoint, "allowed", "no-default-deny", policy.selected_by)
    return DirectionTrace(direction, endpoint, "allowed", "not-selected")


@dataclass(frozen=True)
class PolicyTrace:
    source: TracePeer
    destination: TracePeer
    protocol: str
    port: int
    egress: DirectionTrace
    ingress: DirectionTrace

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    @property
    def outcome(self) -> Outcome:
        if not self.allowed:
            return "denied"
        if "audited" in (self.egress.outcome, self.ingress.outcome):
            return "audited"
        return "allowed"


def parse_port(text: str) -> tuple[str, int]:
    """``80/TCP``, ``53/udp``, ``8/ICMP`` (an ICMP type) or ``80`` (TCP) → (protocol, port)."""
    port, _, protocol = text.partition("/")
    names = {name.upper(): name for name in PROTOCOLS}
    protocol = names.get((protocol or "TCP").upper(), "")
    if not protocol or not port.isdigit() or int(port) > 65535:
        raise InvalidInput([f"invalid port {text!r}: expected PORT/PROTO, e.g. 80/TCP (TCP, UDP, SCTP, ICMP)"])
    return protocol, int(port)


def trace(source: TracePeer, destination: TracePeer, protocol: str, port: int) -> PolicyTrace:
    """Egress at the source (if an endpoint) and ingress at the destination (if an endpoint)."""
    proto = PROTOCOLS[protocol]
    egress = trace_direction(
        "egress",
        source.name if source.endpoint else None,
        source.endpoint.egress if source.endpoint else None,
        destination.identity,
        proto,
        port,
        destination.address,
    )
    ingress = trace_direction(
        "ingress",
        destination.name if destination.endpoint else None,
        destination.endpoint.ingress if destination.endpoint else None,
        source.identity,
        proto,
        port,
        source.address,
    )
    return PolicyTrace(source, destination, protocol, port, egress, ingress)


# --- text output --------------------------------------------------------------------------------------------

_OUTCOME_TEXT = {"allowed": "ALLOWED", "denied": "DENIED", "audited": "AUDIT (would be DENIED)"}


def _identity(identity: int) -> str:
    name = identity_name(identity)
    return f"{identity} ({name})" if name != str(identity) else name


def _direction_lines(item: DirectionTrace, peer: TracePeer) -> list[str]:
    arrow = "from" if item.direction == "egress" else "to"
    head = f"{item.direction.capitalize()} {arrow} {peer.name}: {_OUTCOME_TEXT[item.outcome]}"
    lines = [head]
    rules = [f"    {rule}" for rule in item.rules]
    if item.reason == "not-an-endpoint":
        lines.append(f"  {peer.name} is not an endpoint: no {item.direction} policy applies")
    elif item.reason == "disabled":
        lines.append("  policy enforcement is disabled (mode never)")
    elif item.reason == "not-selected":
        lines.append(f"  not selected: no policy selects {peer.name} for {item.direction}")
    elif item.reason == "rule":
        lines.append("  allowed by")
        lines.extend(rules)
    elif item.reason == "redirect":
        parsers = ", ".join(sorted({spec.parser for spec in item.l7}))
        lines.append(f"  denied: the L7 proxy is not available yet for the {parsers} rules of")
        lines.extend(rules)
    elif item.reason == "deny-rule":
        lines.append("  denied by")
        lines.extend(rules)
    elif item.reason == "default-deny":
        if item.rules:
            lines.append(f"  default deny: no rule allows it, and {peer.name} is isolated for {item.direction} by")
            lines.extend(rules)
        else:
            lines.append("  default deny: no rule allows it (policy enforcement mode always)")
    else:  # no-default-deny
        lines.append(f"  no rule matches; the rules selecting {peer.name} do not isolate it (enableDefaultDeny: false)")
        lines.extend(rules)
    return lines


def format_trace(result: PolicyTrace) -> str:
    """The text ``membrane policy trace`` prints."""
    src, dst = result.source, result.destination
    lines = [
        f"Tracing {src.name} -> {dst.name} on {result.port}/{result.protocol}",
        f"  source:      {src.name}, identity {_identity(src.identity)}",
        f"  destination: {dst.name}, identity {_identity(dst.identity)}",
        "",
        *_direction_lines(result.egress, src),
        *_direction_lines(result.ingress, dst),
        "",
        f"Final verdict: {_OUTCOME_TEXT[result.outcome]}",
    ]
    return "\n".join(lines) + "\n"


# --- a service as the destination ------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendTrace:
    """One backend of the traced service: the peer (a pod, or an address that is none) on its target port."""

    peer: TracePeer
    address: str
    port: int
    result: PolicyTrace


@dataclass(frozen=True)
class ServiceTrace:
    """``--to service:NS/NAME``: the service port asked about and one trace per backend."""

    service: str  # NS/NAME
    frontend: str  # the ClusterIP and port the clients use (or the service name when headless)
    source: TracePeer
    protocol: str
    port: int
    backends: tuple[BackendTrace, ...]
    terminating: int = 0  # backends that finish their connections but take no new ones

    @property
    def outcome(self) -> Outcome:
        outcomes = {b.result.outcome for b in self.backends}
        if not outcomes or "denied" in outcomes:
            return "denied"
        return "audited" if "audited" in outcomes else "allowed"


def trace_service(service: str, frontend: str, source: TracePeer, backends: Sequence[tuple[TracePeer, str, int]],
                  protocol: str, port: int, *, terminating: int = 0) -> ServiceTrace:
    """A trace from ``source`` to each backend ``(peer, address, target port)`` of a service port."""
    traced = tuple(BackendTrace(peer, address, target, trace(source, peer, protocol, target))
                   for peer, address, target in backends)
    return ServiceTrace(service, frontend, source, protocol, port, traced, terminating)


def format_service_trace(result: ServiceTrace) -> str:
    """The text ``membrane policy trace --to service:NS/NAME`` prints: one verdict line per backend."""
    src = result.source
    count = len(result.backends)
    lines = [
        f"Tracing {src.name} -> service {result.service} ({result.frontend}) on {result.port}/{result.protocol}: "
        f"{count} backend{'' if count == 1 else 's'}",
        "  Policy is enforced on the backend, after the service address is translated (as in Cilium):",
        "  each backend is traced as the destination, on its target port.",
        f"  source:      {src.name}, identity {_identity(src.identity)}",
    ]
    if result.terminating:
        lines.append(f"  {result.terminating} terminating backend(s) left out: they take no new connections")
    for backend in result.backends:
        peer, item = backend.peer, backend.result
        lines += [
            "",
            f"{peer.name} ({backend.address}:{backend.port}/{result.protocol}, identity {_identity(peer.identity)}): "
            f"{_OUTCOME_TEXT[item.outcome]}",
            *(f"  {line}" for line in _direction_lines(item.egress, src)),
            *(f"  {line}" for line in _direction_lines(item.ingress, peer)),
        ]
    lines.append("")
    if not result.backends:
        lines.append(f"Final verdict: DENIED (no backend: the connection is refused, {_NO_BACKEND})")
    else:
        denied = [b.peer.name for b in result.backends if not b.result.allowed]
        if not denied or len(denied) == count:
            lines.append(f"Final verdict: {_OUTCOME_TEXT[result.outcome]} (every backend)")
        else:
            lines.append(f"Final verdict: DENIED to {len(denied)} of {count} backends ({', '.join(denied)})")
    return "\n".join(lines) + "\n"


_NO_BACKEND = "Service backend not found"
