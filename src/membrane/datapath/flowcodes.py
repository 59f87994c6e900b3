"""The flow event code: what the datapath's ``log`` rules say, and what it means (pure, no I/O).

It is the contract between the datapath, which writes the prefixes into its rules
(:mod:`membrane.datapath.ruleset`), and the observer, which reads them back from NFLOG
(:mod:`membrane.observe.enrich`); it lives on the writing side so that the datapath needs
nothing of the observer.

Every nft rule that reports a packet carries a compact log prefix; the NFLOG parser hands it back
with the packet and :func:`parse_prefix` expands it. The prefix is short (NFLOG copies it with
every event) and versioned by its leading tag::

    mb:<event>:<verdict>:<reason>:<rule>[:<direction>]   e.g.  mb:t:F:n:1   mb:d:D:133:22:e

    event    t trace · d drop · p policy verdict (reserved) · x service translation (a
             connection's first packet in a frontend's chain, before DNAT: reason 0)
    verdict  F forwarded · D dropped · A audit · R redirected · T traced (the flow's Verdict)
    reason   trace: n new connection · e established (original direction) · r reply
             drop:  the Cilium drop reason code (132 invalid source IP, 133 policy denied, …)
    rule     which rule logged it: static ids < 1024 are named in :data:`RULES`; sections that
             number their own rules (policy entries) use ids from :data:`DYNAMIC_RULE_BASE` up
    direction (optional) e egress · i ingress: on whose side a drop or verdict was decided, for
             rules that see both pods of a connection (policy); without it the parser infers it

Primitives: :class:`EventKind`, :class:`CodeVerdict`, :class:`TraceReason`, :class:`Direction`,
:class:`DropReason`
(Cilium's codes with the proto enum name and the monitor text), :class:`FlowCode` (one prefix,
:meth:`FlowCode.prefix` / :func:`parse_prefix`), the rule catalogue :data:`RULES` and the codes the
datapath uses today (:data:`TRACE_NEW`, :data:`TRACE_TCP_ORIGINAL`, :data:`TRACE_TCP_REPLY`,
:data:`TRACE_FIRST_REPLY`, :data:`DROP_SPOOFED_SOURCE`, :data:`DROP_IPV6`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PREFIX_TAG = "mb"
DYNAMIC_RULE_BASE = 1024
MAX_PREFIX_LEN = 63  # nft accepts up to 127; NFLOG copies it with each event, so keep it short


class EventKind(enum.Enum):
    TRACE = "t"
    DROP = "d"
    POLICY_VERDICT = "p"
    TRANSLATION = "x"


class CodeVerdict(enum.Enum):
    """The flow verdict a rule implies (names as in flow.proto's Verdict)."""

    FORWARDED = "F"
    DROPPED = "D"
    AUDIT = "A"
    REDIRECTED = "R"
    TRACED = "T"


class TraceReason(enum.Enum):
    """Why a trace event was emitted (names as in flow.proto's TraceReason)."""

    NEW = "n"
    ESTABLISHED = "e"
    REPLY = "r"


class Direction(enum.Enum):
    """The side of the connection a rule decides for (names as flow.proto's TrafficDirection)."""

    EGRESS = "e"
    INGRESS = "i"


class DropReason(enum.IntEnum):
    """Cilium's drop reason codes (the datapath value = flow.proto's DropReason number)."""

    INVALID_SOURCE_IP = 132
    POLICY_DENIED = 133
    INVALID_PACKET_DROPPED = 134
    UNSUPPORTED_L3_PROTOCOL = 139
    STALE_OR_UNROUTABLE_IP = 151
    SERVICE_BACKEND_NOT_FOUND = 158
    NO_MAPPING_FOR_NAT_MASQUERADE = 167
    DENIED_BY_LB_SRC_RANGE_CHECK = 177
    POLICY_DENY = 181

    @property
    def text(self) -> str:
        """The monitor's text for the reason, as ``hubble observe`` prints it."""
        return _DROP_TEXT[self]


_DROP_TEXT = {
    DropReason.INVALID_SOURCE_IP: "Invalid source ip",
    DropReason.POLICY_DENIED: "Policy denied",
    DropReason.INVALID_PACKET_DROPPED: "Invalid packet",
    DropReason.UNSUPPORTED_L3_PROTOCOL: "Unsupported L3 protocol",
    DropReason.STALE_OR_UNROUTABLE_IP: "Stale or unroutable IP",
    DropReason.SERVICE_BACKEND_NOT_FOUND: "Service backend not found",
    DropReason.NO_MAPPING_FOR_NAT_MASQUERADE: "No mapping for NAT masquerade",
    DropReason.DENIED_BY_LB_SRC_RANGE_CHECK: "Denied by LB src range check",
    DropReason.POLICY_DENY: "Policy denied by denylist",
}


class FlowCodeError(ValueError):
    """A prefix that claims to be ours (``mb:``) but does not follow the code."""


@dataclass(frozen=True, slots=True)
class FlowCode:
    """One log rule's meaning. ``reason`` is a :class:`TraceReason` for traces and the numeric
    drop reason (a :class:`DropReason` when known) for drops and policy verdicts."""

    kind: EventKind
    verdict: CodeVerdict
    reason: TraceReason | int
    rule: int
    direction: Direction | None = None

    def __post_init__(self) -> None:
        if self.kind is EventKind.TRACE and not isinstance(self.reason, TraceReason):
            raise ValueError("a trace code needs a TraceReason")
        if self.kind is not EventKind.TRACE and isinstance(self.reason, TraceReason):
            raise ValueError("only trace codes carry a TraceReason")
        if isinstance(self.reason, int) and not 0 <= self.reason <= 255:
            raise ValueError(f"drop reason {self.reason} is not a datapath code (0-255)")
        if not 0 <= self.rule < 1 << 32:
            raise ValueError(f"rule id {self.rule} out of range")

    def prefix(self) -> str:
        reason = self.reason.value if isinstance(self.reason, TraceReason) else str(int(self.reason))
        text = f"{PREFIX_TAG}:{self.kind.value}:{self.verdict.value}:{reason}:{self.rule}"
        if self.direction is not None:
            text += f":{self.direction.value}"
        assert len(text) <= MAX_PREFIX_LEN
        return text

    @property
    def drop_reason(self) -> int:
        """The numeric drop reason (0 for traces)."""
        return 0 if isinstance(self.reason, TraceReason) else int(self.reason)

    @property
    def is_reply(self) -> bool | None:
        """True/False for traces (reply direction or not); None (unknown) otherwise, as Hubble does."""
        if isinstance(self.reason, TraceReason):
            return self.reason is TraceReason.REPLY
        return None

    @property
    def rule_name(self) -> str:
        return RULES.get(self.rule, f"rule {self.rule}")


_KINDS = {k.value: k for k in EventKind}
_VERDICTS = {v.value: v for v in CodeVerdict}
_TRACE_REASONS = {r.value: r for r in TraceReason}
_DIRECTIONS = {d.value: d for d in Direction}
_CACHE: dict[str, FlowCode | None] = {}


def parse_prefix(prefix: str) -> FlowCode | None:
    """Expand a log prefix; None for a prefix that is not ours. FlowCodeError when it is ours but
    malformed (a datapath/parser version mismatch worth reporting, not silently dropping).

    Prefixes repeat (a handful of rules), so results are memoised.
    """
    try:
        return _CACHE[prefix]
    except KeyError:
        pass
    code = _parse(prefix)
    if len(_CACHE) < 4096:  # bounded: foreign prefixes must not grow it without limit
        _CACHE[prefix] = code
    return code


def _parse(prefix: str) -> FlowCode | None:
    parts = prefix.split(":")
    if parts[0] != PREFIX_TAG:
        return None
    if len(parts) not in (5, 6):
        raise FlowCodeError(f"log prefix {prefix!r}: expected mb:<event>:<verdict>:<reason>:<rule>[:<direction>]")
    _, kind_s, verdict_s, reason_s, rule_s = parts[:5]
    direction = _DIRECTIONS.get(parts[5]) if len(parts) == 6 else None
    if len(parts) == 6 and direction is None:
        raise FlowCodeError(f"log prefix {prefix!r}: unknown direction {parts[5]!r}")
    kind = _KINDS.get(kind_s)
    verdict = _VERDICTS.get(verdict_s)
    if kind is None or verdict is None or not rule_s.isdigit():
        raise FlowCodeError(f"log prefix {prefix!r}: unknown event, verdict or rule id")
    reason: TraceReason | int
    if kind is EventKind.TRACE:
        trace = _TRACE_REASONS.get(reason_s)
        if trace is None:
            raise FlowCodeError(f"log prefix {prefix!r}: unknown trace reason {reason_s!r}")
        reason = trace
    else:
        if not reason_s.isdigit():
            raise FlowCodeError(f"log prefix {prefix!r}: drop reason must be a number")
        number = int(reason_s)
        reason = DropReason(number) if number in DropReason._value2member_map_ else number
    try:
        return FlowCode(kind, verdict, reason, int(rule_s), direction)
    except ValueError as exc:
        raise FlowCodeError(f"log prefix {prefix!r}: {exc}") from None


# -- the rules the datapath has today ---------------------------------------------------------------
RULE_NEW = 1
RULE_TCP_ORIGINAL = 2
RULE_TCP_REPLY = 3
RULE_FIRST_REPLY = 4
RULE_SPOOFED_SOURCE = 10
RULE_IPV6 = 11

RULES: dict[int, str] = {
    RULE_NEW: "flow_trace: first packet of a connection",
    RULE_TCP_ORIGINAL: "flow_tcp: SYN/FIN/RST, original direction",
    RULE_TCP_REPLY: "flow_tcp: SYN/FIN/RST, reply direction",
    RULE_FIRST_REPLY: "flow_trace: first reply of a connection (not TCP)",
    RULE_SPOOFED_SOURCE: "from_endpoint: spoofed or unknown source",
    RULE_IPV6: "from_endpoint: pods are IPv4-only",
}

TRACE_NEW = FlowCode(EventKind.TRACE, CodeVerdict.FORWARDED, TraceReason.NEW, RULE_NEW)
TRACE_TCP_ORIGINAL = FlowCode(EventKind.TRACE, CodeVerdict.FORWARDED, TraceReason.ESTABLISHED, RULE_TCP_ORIGINAL)
TRACE_TCP_REPLY = FlowCode(EventKind.TRACE, CodeVerdict.FORWARDED, TraceReason.REPLY, RULE_TCP_REPLY)
TRACE_FIRST_REPLY = FlowCode(EventKind.TRACE, CodeVerdict.FORWARDED, TraceReason.REPLY, RULE_FIRST_REPLY)
#: A connection to a service frontend without a backend (refused with a reset / port unreachable).
RULE_NO_SERVICE_BACKEND = 30
DROP_NO_SERVICE_BACKEND = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.SERVICE_BACKEND_NOT_FOUND,
                                   RULE_NO_SERVICE_BACKEND)
#: A LoadBalancer frontend reached from a source loadBalancerSourceRanges does not allow.
RULE_LB_SOURCE_RANGE = 32
DROP_LB_SOURCE_RANGE = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.DENIED_BY_LB_SRC_RANGE_CHECK,
                                RULE_LB_SOURCE_RANGE)
DROP_SPOOFED_SOURCE = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.INVALID_SOURCE_IP, RULE_SPOOFED_SOURCE)
DROP_IPV6 = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.UNSUPPORTED_L3_PROTOCOL, RULE_IPV6)

# -- service translation ------------------------------------------------------------------------------
#: A connection's first packet in a frontend's chain, before DNAT (NAT chains see nothing else): the
#: observer takes the frontend from it and pairs it with the translated packet's next event.
RULE_SERVICE_TRANSLATION = 31
RULES[RULE_SERVICE_TRANSLATION] = "svc_<id>: a service connection's first packet, before DNAT"
TRACE_SERVICE_TRANSLATION = FlowCode(EventKind.TRANSLATION, CodeVerdict.TRACED, 0, RULE_SERVICE_TRANSLATION)
