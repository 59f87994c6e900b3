"""A packet tracer over the agent's nft ruleset: what the kernel would do with one packet (pure).

Tests render a ruleset (:func:`membrane.datapath.ruleset.build_ruleset`, or the table a
:class:`~membrane.datapath.nft.fake.FakeNftRunner` holds), describe a packet and ask for its fate::

    tracer = Tracer(ruleset)
    trace = tracer.trace(TracePacket(saddr=..., daddr=..., proto="tcp", dport=80,
                                     iif=Interface("lxc0000000001", 101), oif=Interface("lxc0000000002", 102)))
    assert trace.verdict == "drop" and trace.drop_codes[0].reason is DropReason.POLICY_DENIED

The packet walks the base chains of its path's hooks in priority order, as netfilter runs them:
forwarded (``iif`` and ``oif``) prerouting → forward → postrouting; to this node (``iif`` only)
prerouting → input; from this node (``oif`` only) output → postrouting. Within a base chain the
rules run in order; ``accept`` ends the base chain (the next one of the hook still runs), ``drop``
ends the trace, falling off a base chain applies its policy. ``nat`` base chains see only a
connection's first packet (``ct state new``), as in the kernel. ``iif``/``iifname`` have no value
at output and postrouting, ``oif``/``oifname`` none at prerouting and input: a rule that reads them
there does not match (the kernel's NFT_BREAK).

The vocabulary is exactly what the ruleset renders; every rule of the ruleset is parsed when the
:class:`Tracer` is built, and anything else raises :class:`TracerError`, so a test never passes
because a rule was skipped:

- matches: ``iifname``/``oifname`` (``"lxc*"``: a trailing ``*`` is a prefix), ``iif``/``oif``,
  ``meta nfproto``, ``meta l4proto``, ``ip saddr``/``ip daddr`` (address or prefix), ``th``/``tcp``/
  ``udp`` ``sport``/``dport``, ``ct state`` (comma list), ``ct status & confirmed == 0``,
  ``ct direction``, ``ct label N``, ``ct mark``, ``tcp flags & (a | b) == c``; any of them with
  ``!=``/``==``; concatenations ``a . b . c`` looked up in a set (``@set``) or verdict map
  (``vmap @map``), interval elements included (an element range per component);
- statements: ``counter``, ``log prefix "…" group N snaplen N`` (recorded, decoded with
  :func:`membrane.datapath.flowcodes.parse_prefix`, and the rule goes on), ``ct mark set V`` and
  ``ct mark set <expr> map @map`` (a miss ends the rule), ``ct label set N``, ``masquerade``,
  ``snat to A``, ``dnat to A[:P]`` (recorded; dnat rewrites the destination for later hooks);
- verdicts: ``accept``, ``drop``, ``return``, ``jump C``, ``goto C`` and the verdicts of maps.

Primitives: :class:`Interface`, :class:`TracePacket`, :class:`Tracer`, :class:`Trace` (verdict,
:class:`Step` s, :class:`LogEvent` s, :class:`NatAction` s) and :class:`TracerError`.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from membrane.core.protocols import PROTOCOL_NAMES
from membrane.datapath.flowcodes import EventKind, FlowCode, parse_prefix
from membrane.datapath.nft.objects import Chain, Map, Ruleset, Set

Verdict = Literal["accept", "drop"]
CtState = Literal["new", "established", "related", "invalid", "untracked"]
CtDirection = Literal["original", "reply"]

PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOL_NAMES.items()} | {"icmpv6": 58}
_PORT_PROTOCOLS = frozenset({6, 17, 132, 136})  # tcp, udp, sctp, udplite: ports at offset 0 and 2
_ICMP = 1
_TCP_FLAGS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20, "ecn": 0x40, "cwr": 0x80}
_CT_STATUS = {"expected": 0x1, "seen-reply": 0x2, "assured": 0x4, "confirmed": 0x8, "snat": 0x10, "dnat": 0x20,
              "dying": 0x200}
_CT_STATES = frozenset({"new", "established", "related", "invalid", "untracked"})
_HOOK_ORDER = {
    "forward": ("prerouting", "forward", "postrouting"),
    "input": ("prerouting", "input"),
    "output": ("output", "postrouting"),
}
_NO_IIF = frozenset({"output", "postrouting"})
_NO_OIF = frozenset({"prerouting", "input"})
_MAX_DEPTH = 16  # nft's jump stack limit


class TracerError(Exception):
    """A rule, element or packet the tracer does not understand: never skipped silently."""


@dataclass(frozen=True)
class Interface:
    name: str
    index: int


@dataclass(frozen=True)
class TracePacket:
    """One IPv4 packet and its conntrack context.

    ``proto`` is a name (``tcp``) or number. ``ct_confirmed`` None means "as its state implies"
    (a new connection's first packet is not confirmed yet; a retransmitted SYN is ``new`` but
    confirmed). ``tcp_flags`` None means SYN for a new TCP connection, ACK otherwise. For ICMP the
    type and code take the ports' place (``th sport`` reads them as type * 256 + code).
    """

    saddr: IPv4Address | str
    daddr: IPv4Address | str
    proto: str | int = "tcp"
    sport: int = 40000
    dport: int = 80
    iif: Interface | None = None
    oif: Interface | None = None
    tcp_flags: frozenset[str] | None = None
    ct_state: CtState = "new"
    ct_direction: CtDirection = "original"
    ct_mark: int = 0
    ct_labels: frozenset[int] = frozenset()
    ct_confirmed: bool | None = None
    nfproto: Literal["ipv4", "ipv6"] = "ipv4"
    icmp_type: int = 8
    icmp_code: int = 0

    @property
    def path(self) -> Literal["forward", "input", "output"]:
        if self.iif is not None and self.oif is not None:
            return "forward"
        if self.iif is not None:
            return "input"
        if self.oif is not None:
            return "output"
        raise TracerError("a packet needs an input interface, an output interface or both")

    @property
    def proto_number(self) -> int:
        if isinstance(self.proto, int):
            return self.proto
        if self.proto.isdigit():
            return int(self.proto)
        try:
            return PROTOCOL_NUMBERS[self.proto.lower()]
        except KeyError:
            raise TracerError(f"unknown protocol {self.proto!r}") from None


@dataclass(frozen=True)
class Step:
    """One rule evaluated: where, its text, and what came of it (``match``/``no match`` or a
    verdict such as ``jump pol_egress``, ``accept``, ``policy accept``)."""

    hook: str
    chain: str
    index: int  # the rule's position in its chain; -1 for a base chain's policy
    rule: str
    outcome: str


@dataclass(frozen=True)
class LogEvent:
    """A ``log`` statement that fired: ``code`` is the decoded prefix (None for a foreign one)."""

    chain: str
    rule: int
    prefix: str
    group: int | None
    snaplen: int | None
    code: FlowCode | None


@dataclass(frozen=True)
class NatAction:
    kind: Literal["masquerade", "snat", "dnat"]
    chain: str
    address: IPv4Address | None = None
    port: int | None = None


@dataclass
class Trace:
    """What the ruleset did with one packet."""

    packet: TracePacket
    verdict: Verdict = "accept"
    steps: list[Step] = field(default_factory=list)
    logs: list[LogEvent] = field(default_factory=list)
    nat: list[NatAction] = field(default_factory=list)
    ct_mark: int = 0
    ct_labels: frozenset[int] = frozenset()
    dropped_in: str | None = None  # the chain whose rule (or policy) dropped the packet

    @property
    def accepted(self) -> bool:
        return self.verdict == "accept"

    @property
    def chains(self) -> list[str]:
        """Chains entered, in order (a chain entered twice is listed twice)."""
        out: list[str] = []
        for step in self.steps:
            if not out or out[-1] != step.chain or step.index == 0:
                out.append(step.chain)
        return out

    @property
    def codes(self) -> list[FlowCode]:
        return [e.code for e in self.logs if e.code is not None]

    @property
    def drop_codes(self) -> list[FlowCode]:
        return [c for c in self.codes if c.kind is EventKind.DROP]

    def matched(self) -> list[Step]:
        return [s for s in self.steps if s.outcome != "no match"]

    def explain(self) -> str:
        lines = [f"{s.hook:<12} {s.chain:<22} {s.index:>3}  {s.rule}  => {s.outcome}" for s in self.steps]
        lines += [f"log {e.prefix!r} group {e.group}" for e in self.logs]
        lines += [f"nat {n.kind} {n.address or ''}" for n in self.nat]
        return "\n".join([*lines, f"verdict: {self.verdict}"])


# -- values --------------------------------------------------------------------------------------
# Every expression has an nft datatype; values are integers (addresses as integers, protocols as
# numbers) or strings (interface names), compared against inclusive ranges.

Range = tuple[int, int]


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise TracerError(f"{what}: {text!r} is not a number") from None


def _parse_proto(text: str) -> int:
    if text in PROTOCOL_NUMBERS:
        return PROTOCOL_NUMBERS[text]
    return _parse_int(text, "protocol")


def _scalar(datatype: str, text: str) -> int:
    if datatype == "ipv4_addr":
        try:
            return int(IPv4Address(text))
        except ValueError:
            raise TracerError(f"{text!r} is not an IPv4 address") from None
    if datatype == "inet_proto":
        return _parse_proto(text)
    if datatype in ("iface_index", "mark", "inet_service", "integer"):
        return _parse_int(text, datatype)
    raise TracerError(f"no literal syntax for datatype {datatype}")


def parse_range(datatype: str, text: str, *, interval: bool = True) -> Range:
    """One element component (or literal) as an inclusive range: ``a-b``, ``a.b.c.d/n`` or a value."""
    if datatype == "ipv4_addr" and "/" in text:
        if not interval:
            raise TracerError(f"prefix {text} in a set without the interval flag")
        try:
            net = IPv4Network(text)
        except ValueError:
            raise TracerError(f"{text!r} is not an IPv4 prefix") from None
        return int(net.network_address), int(net.broadcast_address)
    if "-" in text:
        if not interval:
            raise TracerError(f"range {text} in a set without the interval flag")
        low, high = text.split("-", 1)
        first, last = _scalar(datatype, low), _scalar(datatype, high)
        if first > last:
            raise TracerError(f"empty range {text}")
        return first, last
    value = _scalar(datatype, text)
    return value, value


# -- packet state during a trace -----------------------------------------------------------------


@dataclass
class _State:
    packet: TracePacket
    hook: str
    saddr: int
    daddr: int
    ct_mark: int
    ct_labels: frozenset[int]


class _Break(Exception):
    """An expression without a value here (the kernel's NFT_BREAK): the rule does not match."""


# An expression: its datatype and how to read it from the packet state.
@dataclass(frozen=True)
class _Expr:
    text: str
    datatype: str
    read: Callable[[_State], int | str | frozenset[str]]


def _iif(state: _State) -> Interface:
    if state.hook in _NO_IIF or state.packet.iif is None:
        raise _Break
    return state.packet.iif


def _oif(state: _State) -> Interface:
    if state.hook in _NO_OIF or state.packet.oif is None:
        raise _Break
    return state.packet.oif


def _ct_state(state: _State) -> frozenset[str]:
    return frozenset({state.packet.ct_state})


def _confirmed(packet: TracePacket) -> bool:
    return packet.ct_confirmed if packet.ct_confirmed is not None else packet.ct_state != "new"


def _ct_status(state: _State) -> int:
    status = _CT_STATUS["confirmed"] if _confirmed(state.packet) else 0
    if state.packet.ct_state == "established":
        status |= _CT_STATUS["seen-reply"]
    return status


def _tcp_flags(state: _State) -> int:
    packet = state.packet
    if packet.proto_number != 6:
        raise _Break  # tcp flags of a non-TCP packet: the implicit "meta l4proto tcp" fails
    flags = packet.tcp_flags
    if flags is None:
        flags = frozenset({"syn"}) if packet.ct_state == "new" else frozenset({"ack"})
    unknown = set(flags) - set(_TCP_FLAGS)
    if unknown:
        raise TracerError(f"unknown TCP flags {sorted(unknown)}")
    value = 0
    for name in flags:
        value |= _TCP_FLAGS[name]
    return value


def _transport(which: Literal["sport", "dport"], proto: int | None) -> Callable[[_State], int]:
    def read(state: _State) -> int:
        packet = state.packet
        number = packet.proto_number
        if proto is not None and number != proto:
            raise _Break
        if number in _PORT_PROTOCOLS:
            return packet.sport if which == "sport" else packet.dport
        if number == _ICMP and which == "sport":
            return packet.icmp_type * 256 + packet.icmp_code
        raise TracerError(f"th {which} of protocol {number}: the tracer has no value for those header bytes")

    return read


def _primary(tokens: _Tokens) -> _Expr:
    """One selector expression, consuming its tokens."""
    word = tokens.next("an expression")
    if word in ("iifname", "oifname"):
        get_if = _iif if word == "iifname" else _oif
        return _Expr(word, "ifname", lambda s: get_if(s).name)
    if word in ("iif", "oif"):
        get_if = _iif if word == "iif" else _oif
        return _Expr(word, "iface_index", lambda s: get_if(s).index)
    if word == "meta":
        what = tokens.next("meta key")
        if what == "nfproto":
            return _Expr("meta nfproto", "nfproto", lambda s: s.packet.nfproto)
        if what == "l4proto":
            return _Expr("meta l4proto", "inet_proto", lambda s: s.packet.proto_number)
        if what in ("iifname", "oifname", "iif", "oif"):
            tokens.push(what)
            return _primary(tokens)
        raise TracerError(f"unsupported expression: meta {what}")
    if word == "ip":
        what = tokens.next("ip field")
        if what == "saddr":
            return _Expr("ip saddr", "ipv4_addr", lambda s: _ipv4_field(s, "saddr"))
        if what == "daddr":
            return _Expr("ip daddr", "ipv4_addr", lambda s: _ipv4_field(s, "daddr"))
        raise TracerError(f"unsupported expression: ip {what}")
    if word in ("th", "tcp", "udp"):
        what = tokens.next(f"{word} field")
        if word == "tcp" and what == "flags":
            return _Expr("tcp flags", "tcp_flag", _tcp_flags)
        if what in ("sport", "dport"):
            proto = {"th": None, "tcp": 6, "udp": 17}[word]
            return _Expr(f"{word} {what}", "inet_service", _transport(what, proto))  # type: ignore[arg-type]
        raise TracerError(f"unsupported expression: {word} {what}")
    if word == "ct":
        what = tokens.next("ct key")
        if what == "state":
            return _Expr("ct state", "ct_state", _ct_state)
        if what == "status":
            return _Expr("ct status", "ct_status", _ct_status)
        if what == "direction":
            return _Expr("ct direction", "ct_dir", lambda s: s.packet.ct_direction)
        if what == "mark":
            return _Expr("ct mark", "mark", lambda s: s.ct_mark)
        if what == "label":
            return _Expr("ct label", "ct_label", lambda s: frozenset(str(b) for b in s.ct_labels))
        raise TracerError(f"unsupported expression: ct {what}")
    raise TracerError(f"unsupported expression {word!r}")


def _ipv4_field(state: _State, which: str) -> int:
    if state.packet.nfproto != "ipv4":
        raise _Break  # "ip saddr" implies an IPv4 packet
    return state.saddr if which == "saddr" else state.daddr


# -- tokens --------------------------------------------------------------------------------------


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text = text
        try:
            raw = shlex.split(text, posix=True)
        except ValueError as exc:
            raise TracerError(f"rule {text!r}: {exc}") from None
        self._items: list[str] = []
        for item in raw:
            # Parentheses of a flag list stick to their words: "(fin" "rst)".
            while item.startswith("(") and len(item) > 1:
                self._items.append("(")
                item = item[1:]
            closing = 0
            while item.endswith(")") and len(item) > 1:
                item, closing = item[:-1], closing + 1
            self._items.append(item)
            self._items += [")"] * closing
        self._pos = 0

    def peek(self) -> str | None:
        return self._items[self._pos] if self._pos < len(self._items) else None

    def next(self, what: str) -> str:
        item = self.peek()
        if item is None:
            raise TracerError(f"rule {self.text!r}: expected {what}, found the end")
        self._pos += 1
        return item

    def push(self, item: str) -> None:
        self._pos -= 1
        assert self._items[self._pos] == item

    def expect(self, item: str) -> None:
        found = self.next(repr(item))
        if found != item:
            raise TracerError(f"rule {self.text!r}: expected {item!r}, found {found!r}")


# -- rules as parsed operations ------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """What one operation did: go on, stop the rule (no match), or give a verdict."""

    verdict: str | None = None  # accept, drop, return, jump X, goto X
    matched: bool = True


_GO_ON = _Outcome()
_NO_MATCH = _Outcome(matched=False)
_Op = Callable[[_State, "Trace", str, int], _Outcome]


@dataclass(frozen=True)
class _ParsedRule:
    text: str
    ops: tuple[_Op, ...]


_STATEMENT_WORDS = frozenset({"counter", "log", "masquerade", "snat", "dnat", "accept", "drop", "return", "jump",
                              "goto"})
_SYMBOLIC = {
    "nfproto": frozenset({"ipv4", "ipv6"}),
    "ct_dir": frozenset({"original", "reply"}),
}


class Tracer:
    """Evaluates packets against one ruleset. Parses every rule and element up front."""

    def __init__(self, ruleset: Ruleset) -> None:
        self.ruleset = ruleset
        self._sets: dict[str, Set] = {s.name: s for s in ruleset.sets}
        self._maps: dict[str, Map] = {m.name: m for m in ruleset.maps}
        self._chains: dict[str, Chain] = {c.name: c for c in ruleset.chains}
        self._elements: dict[str, list[tuple[tuple[Range | str, ...], str | None]]] = {}
        for s in ruleset.sets:
            self._elements[s.name] = [(self._key(s.name, s.type, s.flags, k), None) for k in s.elements]
        for m in ruleset.maps:
            if m.value_type == "verdict":
                for _, value in m.elements:
                    _check_verdict(value, self._chains, m.name)
            self._elements[m.name] = [(self._key(m.name, m.type, m.flags, k), v) for k, v in m.elements]
        self._rules: dict[str, tuple[_ParsedRule, ...]] = {
            c.name: tuple(self._parse_rule(c.name, r.text) for r in c.rules) for c in ruleset.chains
        }

    @classmethod
    def of_runner(cls, runner: object) -> Tracer:
        """The table a :class:`~membrane.datapath.nft.fake.FakeNftRunner` holds."""
        ruleset = getattr(runner, "ruleset", None)
        if not isinstance(ruleset, Ruleset):
            raise TracerError("the runner holds no table")
        return cls(ruleset)

    @staticmethod
    def _key(name: str, types: Sequence[str], flags: Sequence[str], element: Sequence[str]) -> tuple[Range | str, ...]:
        interval = "interval" in flags
        parts: list[Range | str] = []
        for datatype, text in zip(types, element, strict=True):
            if datatype == "ifname":
                parts.append(text)
            else:
                try:
                    parts.append(parse_range(datatype, text, interval=interval))
                except TracerError as exc:
                    raise TracerError(f"set/map {name}: element {' . '.join(element)}: {exc}") from None
        return tuple(parts)

    # -- parsing --

    def _parse_rule(self, chain: str, text: str) -> _ParsedRule:
        tokens = _Tokens(text)
        ops: list[_Op] = []
        try:
            while tokens.peek() is not None:
                ops.append(self._parse_op(tokens))
        except TracerError as exc:
            raise TracerError(f"chain {chain}: rule {text!r}: {exc}") from None
        return _ParsedRule(text, tuple(ops))

    def _parse_op(self, tokens: _Tokens) -> _Op:
        word = tokens.peek()
        assert word is not None
        if word in _STATEMENT_WORDS:
            return self._statement(tokens)
        if word == "ct":
            tokens.next("ct")
            what = tokens.next("ct key")
            if tokens.peek() == "set":
                tokens.next("set")
                return self._ct_set(what, tokens)
            tokens.push(what)
            tokens.push("ct")
        exprs = [_primary(tokens)]
        while tokens.peek() == ".":
            tokens.next(".")
            exprs.append(_primary(tokens))
        if len(exprs) == 1 and tokens.peek() == "&":
            tokens.next("&")
            return self._masked(exprs[0], tokens)
        follower = tokens.peek()
        if follower == "vmap":
            tokens.next("vmap")
            return self._vmap(exprs, tokens.next("a map"))
        if follower is not None and follower.startswith("@"):
            tokens.next("a set")
            return self._lookup(exprs, follower[1:])
        if len(exprs) != 1:
            raise TracerError("a concatenation must be looked up in a set or map")
        return self._compare(exprs[0], tokens)

    def _table(self, name: str, exprs: Sequence[_Expr], kind: Literal["set", "map"]) -> None:
        declared: Set | Map | None = self._sets.get(name) if kind == "set" else self._maps.get(name)
        if declared is None:
            raise TracerError(f"no {kind} named {name}")
        types = tuple(e.datatype for e in exprs)
        if types != declared.type:
            raise TracerError(f"{' . '.join(e.text for e in exprs)} ({' . '.join(types)}) looked up in "
                              f"{kind} {name} of type {' . '.join(declared.type)}")

    def _find(self, name: str, exprs: Sequence[_Expr], state: _State) -> list[str | None]:
        values = [e.read(state) for e in exprs]
        hits: list[str | None] = []
        for parts, value in self._elements[name]:
            if all(_within(v, p) for v, p in zip(values, parts, strict=True)):
                hits.append(value)
        if len(hits) > 1:
            raise TracerError(f"{name}: {len(hits)} elements cover {values}: nft refuses overlapping elements")
        return hits

    def _lookup(self, exprs: Sequence[_Expr], name: str) -> _Op:
        self._table(name, exprs, "set")

        def op(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
            return _GO_ON if self._find(name, exprs, state) else _NO_MATCH

        return op

    def _vmap(self, exprs: Sequence[_Expr], ref: str) -> _Op:
        if not ref.startswith("@"):
            raise TracerError(f"vmap {ref}: only named maps are rendered")
        name = ref[1:]
        self._table(name, exprs, "map")
        if self._maps[name].value_type != "verdict":
            raise TracerError(f"vmap @{name}: not a verdict map")

        def op(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
            hits = self._find(name, exprs, state)
            return _Outcome(verdict=hits[0]) if hits else _NO_MATCH

        return op

    def _masked(self, expr: _Expr, tokens: _Tokens) -> _Op:
        bits = _bit_names(expr)
        mask = _bit_list(tokens, bits)
        negate = False
        operator = tokens.next("== or !=")
        if operator == "!=":
            negate = True
        elif operator != "==":
            raise TracerError(f"expected == or != after the mask, found {operator!r}")
        word = tokens.peek()
        wanted = 0 if word == "0" else _bit_list(tokens, bits)
        if word == "0":
            tokens.next("0")

        def op(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
            value = expr.read(state)
            assert isinstance(value, int)
            return _GO_ON if ((value & mask) == wanted) != negate else _NO_MATCH

        return op

    def _compare(self, expr: _Expr, tokens: _Tokens) -> _Op:
        negate = False
        if tokens.peek() in ("!=", "=="):
            negate = tokens.next("operator") == "!="
        literal = tokens.next(f"a value for {expr.text}")
        match: Callable[[int | str | frozenset[str]], bool]
        if expr.datatype == "ifname":
            if literal.endswith("*"):
                stem = literal[:-1]
                if "*" in stem:
                    raise TracerError(f"interface name {literal!r}: only a trailing * is a wildcard")
                match = lambda v: isinstance(v, str) and v.startswith(stem)  # noqa: E731
            else:
                match = lambda v: v == literal  # noqa: E731
        elif expr.datatype in _SYMBOLIC:
            if literal not in _SYMBOLIC[expr.datatype]:
                raise TracerError(f"{expr.text}: unknown value {literal!r}")
            match = lambda v: v == literal  # noqa: E731
        elif expr.datatype == "ct_state":
            states = frozenset(literal.split(","))
            if not states <= _CT_STATES:
                raise TracerError(f"ct state: unknown states {sorted(states - _CT_STATES)}")
            match = lambda v: bool(isinstance(v, frozenset) and v & states)  # noqa: E731
        elif expr.datatype == "ct_label":
            bit = _parse_int(literal, "ct label")
            if not 0 <= bit <= 127:
                raise TracerError(f"ct label {bit} out of range")
            match = lambda v: isinstance(v, frozenset) and str(bit) in v  # noqa: E731
        elif expr.datatype in ("ipv4_addr", "inet_proto", "inet_service", "mark", "iface_index"):
            low, high = parse_range(expr.datatype, literal)
            match = lambda v: isinstance(v, int) and low <= v <= high  # noqa: E731
        else:
            raise TracerError(f"{expr.text} cannot be compared with {literal!r}")

        def op(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
            return _GO_ON if match(expr.read(state)) != negate else _NO_MATCH

        return op

    def _ct_set(self, what: str, tokens: _Tokens) -> _Op:
        if what == "label":
            bit = _parse_int(tokens.next("a label bit"), "ct label")

            def set_label(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
                state.ct_labels = state.ct_labels | {bit}
                return _GO_ON

            return set_label
        if what != "mark":
            raise TracerError(f"unsupported statement: ct {what} set")
        word = tokens.peek()
        if word is not None and word[:1].isdigit():
            value = _parse_int(tokens.next("a mark"), "ct mark")

            def set_mark(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
                state.ct_mark = value
                return _GO_ON

            return set_mark
        exprs = [_primary(tokens)]
        while tokens.peek() == ".":
            tokens.next(".")
            exprs.append(_primary(tokens))
        tokens.expect("map")
        ref = tokens.next("a map")
        if not ref.startswith("@"):
            raise TracerError(f"ct mark set … map {ref}: only named maps are rendered")
        name = ref[1:]
        self._table(name, exprs, "map")
        if self._maps[name].value_type != "mark":
            raise TracerError(f"ct mark set … map @{name}: the map's values are not marks")

        def map_mark(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
            hits = self._find(name, exprs, state)
            if not hits:
                return _NO_MATCH  # the lookup breaks the rule; ct mark stays as it was
            assert hits[0] is not None
            state.ct_mark = _parse_int(hits[0], f"map {name} value")
            return _GO_ON

        return map_mark

    def _statement(self, tokens: _Tokens) -> _Op:
        word = tokens.next("a statement")
        if word == "counter":
            if tokens.peek() == "packets":  # a kernel read-back: counter packets N bytes N
                tokens.next("packets")
                _parse_int(tokens.next("a count"), "counter")
                tokens.expect("bytes")
                _parse_int(tokens.next("a count"), "counter")
            return lambda state, trace, chain, index: _GO_ON
        if word == "log":
            return self._log(tokens)
        if word in ("accept", "drop", "return"):
            verdict = word
            return lambda state, trace, chain, index: _Outcome(verdict=verdict)
        if word in ("jump", "goto"):
            target = tokens.next("a chain")
            if target not in self._chains:
                raise TracerError(f"{word} to undeclared chain {target}")
            verdict = f"{word} {target}"
            return lambda state, trace, chain, index: _Outcome(verdict=verdict)
        if word == "masquerade":
            def masq(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
                _nat_hook(state, "masquerade", ("postrouting",))
                trace.nat.append(NatAction("masquerade", chain))
                return _GO_ON

            return masq
        # snat / dnat
        tokens.expect("to")
        target = tokens.next("a NAT address")
        address_text, _, port_text = target.partition(":")
        address = IPv4Address(address_text)
        port = _parse_int(port_text, "NAT port") if port_text else None
        kind: Literal["snat", "dnat"] = "snat" if word == "snat" else "dnat"

        def nat(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
            if kind == "snat":
                _nat_hook(state, kind, ("postrouting", "input"))
            else:
                _nat_hook(state, kind, ("prerouting", "output"))
                state.daddr = int(address)
            trace.nat.append(NatAction(kind, chain, address, port))
            return _GO_ON

        return nat

    def _log(self, tokens: _Tokens) -> _Op:
        prefix, group, snaplen = "", None, None
        while tokens.peek() in ("prefix", "group", "snaplen"):
            option = tokens.next("a log option")
            value = tokens.next(f"the log {option}")
            if option == "prefix":
                prefix = value
            elif option == "group":
                group = _parse_int(value, "log group")
            else:
                snaplen = _parse_int(value, "log snaplen")
        code = parse_prefix(prefix) if prefix else None

        def log(state: _State, trace: Trace, chain: str, index: int) -> _Outcome:
            trace.logs.append(LogEvent(chain, index, prefix, group, snaplen, code))
            return _GO_ON

        return log

    # -- evaluation --

    def trace(self, packet: TracePacket) -> Trace:
        """Run ``packet`` through every base chain of its path; see the module docstring."""
        result = Trace(packet=packet)
        try:
            saddr, daddr = int(IPv4Address(packet.saddr)), int(IPv4Address(packet.daddr))
        except ValueError as exc:
            raise TracerError(f"packet addresses: {exc}") from None
        state = _State(packet, "", saddr, daddr, packet.ct_mark, packet.ct_labels)
        for hook in _HOOK_ORDER[packet.path]:
            state.hook = hook
            for chain in self._base_chains(hook):
                assert chain.base is not None
                if chain.base.type == "nat" and packet.ct_state != "new":
                    continue  # NAT chains see a connection's first packet only
                verdict = self._run(chain.name, state, result, depth=0)
                if verdict is None:
                    verdict = chain.base.policy
                    result.steps.append(Step(hook, chain.name, -1, f"policy {verdict}", verdict))
                if verdict == "drop":
                    result.verdict = "drop"
                    result.dropped_in = result.dropped_in or chain.name
                    break
            if result.verdict == "drop":
                break
        result.ct_mark, result.ct_labels = state.ct_mark, state.ct_labels
        return result

    def _base_chains(self, hook: str) -> list[Chain]:
        chains = [c for c in self.ruleset.chains if c.base is not None and c.base.hook == hook]
        return sorted(chains, key=lambda c: c.base.priority if c.base is not None else 0)

    def _run(self, chain_name: str, state: _State, trace: Trace, depth: int) -> str | None:
        """Evaluate a chain: ``accept``/``drop``, or None when it ran out or returned (the caller
        goes on with its next rule)."""
        if depth > _MAX_DEPTH:
            raise TracerError(f"jump depth over {_MAX_DEPTH} at {chain_name}: a loop?")
        for index, rule in enumerate(self._rules[chain_name]):
            outcome = self._eval(chain_name, index, rule, state, trace)
            if outcome is None:
                continue
            if outcome in ("accept", "drop"):
                if outcome == "drop":
                    trace.dropped_in = chain_name
                return outcome
            if outcome == "return":
                return None
            action, target = outcome.split()
            verdict = self._run(target, state, trace, depth + 1)
            if action == "goto" or verdict is not None:
                return verdict  # a goto target's end returns to our caller, not to us
        return None

    def _eval(self, chain: str, index: int, rule: _ParsedRule, state: _State, trace: Trace) -> str | None:
        """One rule: its verdict, or None (no match, or matched without a verdict)."""
        step = Step(state.hook, chain, index, rule.text, "match")
        for op in rule.ops:
            try:
                outcome = op(state, trace, chain, index)
            except _Break:
                outcome = _NO_MATCH
            if not outcome.matched:
                trace.steps.append(replace(step, outcome="no match"))
                return None
            if outcome.verdict is not None:
                trace.steps.append(replace(step, outcome=outcome.verdict))
                return outcome.verdict
        trace.steps.append(step)
        return None


def _within(value: int | str | frozenset[str], part: Range | str) -> bool:
    if isinstance(part, str):
        return value == part
    if not isinstance(value, int):
        raise TracerError(f"value {value!r} looked up against a range")
    return part[0] <= value <= part[1]


def _bit_names(expr: _Expr) -> dict[str, int]:
    if expr.datatype == "tcp_flag":
        return _TCP_FLAGS
    if expr.datatype == "ct_status":
        return _CT_STATUS
    raise TracerError(f"{expr.text}: no bit mask syntax")


def _bit_list(tokens: _Tokens, bits: dict[str, int]) -> int:
    """``name`` or ``(a | b | c)``."""
    def one(name: str) -> int:
        if name not in bits:
            raise TracerError(f"unknown flag {name!r}")
        return bits[name]

    if tokens.peek() != "(":
        return one(tokens.next("a flag"))
    tokens.next("(")
    value = one(tokens.next("a flag"))
    while tokens.peek() == "|":
        tokens.next("|")
        value |= one(tokens.next("a flag"))
    tokens.expect(")")
    return value


def _check_verdict(value: str, chains: dict[str, Chain], where: str) -> None:
    parts = value.split()
    if parts in (["accept"], ["drop"], ["return"]):
        return
    if len(parts) == 2 and parts[0] in ("jump", "goto") and parts[1] in chains:
        return
    raise TracerError(f"map {where}: verdict {value!r} is not a verdict of this table")


def _nat_hook(state: _State, kind: str, hooks: tuple[str, ...]) -> None:
    if state.hook not in hooks:
        raise TracerError(f"{kind} at hook {state.hook}: nft allows it only at {', '.join(hooks)}")


__all__ = ["Interface", "LogEvent", "NatAction", "Step", "Trace", "TracePacket", "Tracer", "TracerError",
           "parse_range"]
