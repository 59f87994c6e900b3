"""nftables objects as data: one table with its chains, sets, maps and their elements.

Primitives: :class:`BaseChain` (type, hook, priority, policy), :class:`Rule`, :class:`Chain`,
:class:`Set`, :class:`Map` (:class:`SortedElements`), :class:`Ruleset`, element keys (:data:`Key`,
built with :func:`key`) and
:class:`TableContents` (chains and elements: what can be compared with a kernel read-back, plus the
rules, hooks and :class:`Declaration` of sets and maps that drift repair looks at).

Element tokens are canonical nft text so that desired state and kernel read-back compare exactly:
integers in decimal, addresses dotted, prefixes ``a.b.c.d/n``, ranges ``lo-hi``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Literal

Key = tuple[str, ...]
KeyPart = int | str | IPv4Address | IPv4Network | tuple[int, int] | tuple[IPv4Address, IPv4Address]

ChainType = Literal["filter", "nat", "route"]
Hook = Literal["prerouting", "input", "forward", "output", "postrouting"]

# Standard priorities of the inet family (nft(8) "PRIORITY"): rendered by name when exact.
PRIORITY_NAMES = {-300: "raw", -150: "mangle", -100: "dstnat", 0: "filter", 50: "security", 100: "srcnat"}
PRIORITY_RAW = -300
PRIORITY_MANGLE = -150
PRIORITY_DSTNAT = -100
PRIORITY_FILTER = 0
PRIORITY_SRCNAT = 100

# Datatypes a set or map key may use here (the ones the reader knows how to canonicalise).
KEY_TYPES = frozenset({"iface_index", "ipv4_addr", "mark", "inet_proto", "inet_service", "ifname",
                       "integer"})  # "integer": a typeof map keyed by an expression (numgen, jhash)
VALUE_TYPES = frozenset({"verdict", "mark", "ipv4_addr", "inet_service", "iface_index",
                         "ipv4_addr . inet_service"})  # a DNAT target: address . port
SET_FLAGS = frozenset({"interval", "constant", "timeout", "dynamic"})

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Words nft 1.0.6 rejects as set/chain names (measured: "policy", "fwd"); keep the list short and real.
_RESERVED_NAMES = frozenset({"policy", "fwd", "table", "chain", "set", "map", "element", "rule", "counter"})
_SET_REF = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)")
_CHAIN_REF = re.compile(r"\b(?:jump|goto)\s+([A-Za-z_][A-Za-z0-9_]*)")


def referenced_sets(text: str) -> frozenset[str]:
    """Sets and maps a rule refers to (``@name``)."""
    return frozenset(_SET_REF.findall(text))


def referenced_chains(text: str) -> frozenset[str]:
    """Chains a rule, or a verdict map value, jumps or goes to."""
    return frozenset(_CHAIN_REF.findall(text))


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name) or name in _RESERVED_NAMES:
        raise ValueError(f"{what} name {name!r} is not usable in nft")


def token(part: KeyPart) -> str:
    """One element component as canonical nft text. A tuple is an inclusive range; give aligned
    address ranges as IPv4Network (nft prints them as prefixes)."""
    if isinstance(part, bool):
        raise TypeError("booleans are not nft values")
    if isinstance(part, int):
        return str(part)
    if isinstance(part, IPv4Network):
        return str(part.network_address) if part.prefixlen == 32 else str(part)
    if isinstance(part, IPv4Address):
        return str(part)
    if isinstance(part, tuple):
        low, high = part
        return str(low) if low == high else f"{low}-{high}"
    return part


def canonical_key(element_key: Key) -> Key:
    """A key as the kernel reads back: a one-value range ``80-80`` is ``80``. (Policy maps spell
    single ports as ranges on purpose, see :mod:`membrane.datapath.ruleset`; nft prints them as one
    value.)"""
    out = []
    for tok in element_key:
        low, dash, high = tok.partition("-")
        out.append(low if dash and low == high else tok)
    return tuple(out)


def key(*parts: KeyPart) -> Key:
    """An element key: ``key(5, IPv4Address("10.0.0.1"))`` → ``("5", "10.0.0.1")``."""
    return tuple(token(p) for p in parts)


def _natural(tok: str) -> tuple[int, int, str]:
    """Sort integers and addresses numerically so rendered text is stable and readable.

    Runs once per element token of every map built (the ipcache holds one per cluster endpoint), so
    addresses are parsed with ``inet_aton`` (about 5x faster than ``ipaddress``); a dotted quad is
    all that reaches it, and any other text still sorts, only as text."""
    head = tok.split("-", 1)[0].split("/", 1)[0]
    if head.isdigit():
        return (0, int(head), tok)
    if head.count(".") == 3:
        try:
            return (1, int.from_bytes(socket.inet_aton(head), "big"), tok)
        except OSError:
            pass
    return (2, 0, tok)


def sort_keys(keys: Iterable[Key]) -> list[Key]:
    return sorted(keys, key=lambda k: tuple(_natural(t) for t in k))


@dataclass(frozen=True)
class BaseChain:
    """Where a chain hooks into the stack. Base chains only dispatch; features live in regular chains."""

    type: ChainType
    hook: Hook
    priority: int
    policy: Literal["accept", "drop"] = "accept"

    def render_priority(self) -> str:
        name = PRIORITY_NAMES.get(self.priority)
        # nft 1.0.6 accepts the NAT names only at their own hooks (``dstnat`` at output: refused).
        if name is None or (name == "dstnat" and self.hook != "prerouting") or (
                name == "srcnat" and self.hook not in ("postrouting", "input")):
            return str(self.priority)
        return name


@dataclass(frozen=True)
class Rule:
    text: str
    comment: str = ""

    def __post_init__(self) -> None:
        if "\n" in self.text or '"' in self.comment or "\n" in self.comment:
            raise ValueError(f"rule {self.text!r}: no newlines, no quotes in comments")


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()
    base: BaseChain | None = None
    comment: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name, "chain")


def _check_key_types(name: str, types: tuple[str, ...]) -> None:
    if not types:
        raise ValueError(f"set {name}: a key type is required")
    unknown = [t for t in types if t not in KEY_TYPES]
    if unknown:
        raise ValueError(f"set {name}: unsupported key types {unknown}")


def _check_flags(name: str, flags: tuple[str, ...]) -> None:
    unknown = [f for f in flags if f not in SET_FLAGS]
    if unknown:
        raise ValueError(f"set {name}: unsupported flags {unknown}")


@dataclass(frozen=True)
class Set:
    """A named set. ``type`` lists the concatenated datatypes (``("iface_index", "ipv4_addr")``)."""

    name: str
    type: tuple[str, ...]
    flags: tuple[str, ...] = ()
    elements: frozenset[Key] = frozenset()
    comment: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name, "set")
        _check_key_types(self.name, self.type)
        _check_flags(self.name, self.flags)
        object.__setattr__(self, "elements", frozenset(self.elements))
        for element in self.elements:
            if len(element) != len(self.type):
                raise ValueError(f"set {self.name}: element {element} does not match type {self.type}")

    def declaration(self) -> Set:
        return replace(self, elements=frozenset())


class SortedElements(tuple[tuple[Key, str], ...]):
    """Map elements that are already valid, unique and in :func:`sort_keys` order (the ipcache
    renderer's, which holds one element per cluster endpoint): a :class:`Map` takes them as they
    are instead of checking and sorting them again on every change."""

    __slots__ = ()


@dataclass(frozen=True)
class Map:
    """A named map (``value_type`` "verdict" makes it a verdict map). Elements are (key, value) pairs
    with unique keys, kept sorted so equal maps compare equal; build them with ``tuple(d.items())``."""

    name: str
    type: tuple[str, ...]
    value_type: str
    flags: tuple[str, ...] = ()
    elements: tuple[tuple[Key, str], ...] = ()
    comment: str = ""
    #: Declared ``typeof`` this instead of ``type``: a key type only an expression names (the kernel
    #: lists it back as ``integer``, which ``type`` then says). nft 1.0.6 cannot list a map declared
    #: ``typeof jhash …`` (it crashes), so Maglev maps are declared ``typeof numgen random mod M``.
    typeof: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name, "map")
        _check_key_types(self.name, self.type)
        _check_flags(self.name, self.flags)
        if self.value_type not in VALUE_TYPES:
            raise ValueError(f"map {self.name}: unsupported value type {self.value_type!r}")
        if isinstance(self.elements, SortedElements):
            return
        mapping: dict[Key, str] = {}
        for element_key, value in self.elements:
            if element_key in mapping:
                raise ValueError(f"map {self.name}: duplicate key {element_key}")
            if len(element_key) != len(self.type):
                raise ValueError(f"map {self.name}: element {element_key} does not match type {self.type}")
            mapping[element_key] = value
        ordered = tuple((k, mapping[k]) for k in sort_keys(mapping))
        object.__setattr__(self, "elements", ordered)

    def mapping(self) -> dict[Key, str]:
        return dict(self.elements)

    def element_mapping(self) -> Mapping[Key, str]:
        """The elements by key, built once per map (planners compare maps of tens of thousands)."""
        cached: Mapping[Key, str] | None = self.__dict__.get("_element_mapping")
        if cached is None:
            cached = MappingProxyType(dict(self.elements))
            object.__setattr__(self, "_element_mapping", cached)
        return cached

    def declaration(self) -> Map:
        return replace(self, elements=())


@dataclass(frozen=True)
class Declaration:
    """What a set or map is, without its elements: changing any of it means delete and re-add.
    ``value_type`` is None for a set; flags are sorted (the kernel does not keep their order)."""

    type: tuple[str, ...]
    flags: tuple[str, ...] = ()
    value_type: str | None = None
    comment: str = ""

    @property
    def is_map(self) -> bool:
        return self.value_type is not None


def declaration_of(data: Set | Map) -> Declaration:
    value_type = data.value_type if isinstance(data, Map) else None
    return Declaration(data.type, tuple(sorted(data.flags)), value_type, data.comment)


def rule_fingerprint(rule: Rule) -> str:
    """A rule as the fake runner reports it back. The kernel reports its own normal form instead
    (see :func:`~membrane.datapath.nft.runner.parse_table_json`); the two are never compared."""
    return f'{rule.text} comment "{rule.comment}"' if rule.comment else rule.text


@dataclass(frozen=True)
class TableContents:
    """Chains and elements of one table: what the reconciler and tests compare with the kernel.

    Equality covers chain names and elements only. The detail drift repair needs is carried too but
    left out of equality, because rules read back from the kernel are in nft's normal form, not in
    the text that was rendered: ``rules`` (per chain, one fingerprint per rule, in order),
    ``bases`` (per chain, its hook, or None for a regular chain) and ``declarations`` (per set/map).
    """

    chains: frozenset[str] = frozenset()
    sets: Mapping[str, frozenset[Key]] = field(default_factory=dict)
    maps: Mapping[str, Mapping[Key, str]] = field(default_factory=dict)
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    bases: Mapping[str, BaseChain | None] = field(default_factory=dict, compare=False)
    declarations: Mapping[str, Declaration] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Ruleset:
    """The whole table. ``structure()`` is the same table without elements."""

    family: str
    table: str
    chains: tuple[Chain, ...] = ()
    sets: tuple[Set, ...] = ()
    maps: tuple[Map, ...] = ()
    comment: str = ""

    def __post_init__(self) -> None:
        _check_name(self.table, "table")
        chain_names = [c.name for c in self.chains]
        if len(set(chain_names)) != len(chain_names):
            raise ValueError(f"table {self.table}: duplicate chain names")
        # Sets and maps share one namespace in nft.
        data_names = [s.name for s in self.sets] + [m.name for m in self.maps]
        if len(set(data_names)) != len(data_names):
            raise ValueError(f"table {self.table}: duplicate set/map names")
        for chain in self.chains:
            for rule in chain.rules:
                for ref in _SET_REF.findall(rule.text):
                    if ref not in data_names:
                        raise ValueError(f"chain {chain.name}: rule refers to undeclared set/map @{ref}")
                for ref in _CHAIN_REF.findall(rule.text):
                    if ref not in chain_names:
                        raise ValueError(f"chain {chain.name}: rule jumps to undeclared chain {ref}")

    def structure(self) -> Ruleset:
        return replace(
            self,
            sets=tuple(s.declaration() for s in self.sets),
            maps=tuple(m.declaration() for m in self.maps),
        )

    def get_set(self, name: str) -> Set:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)

    def get_map(self, name: str) -> Map:
        for m in self.maps:
            if m.name == name:
                return m
        raise KeyError(name)

    def data(self) -> tuple[Set | Map, ...]:
        """Sets, then maps (one namespace in nft)."""
        return (*self.sets, *self.maps)

    def get_chain(self, name: str) -> Chain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)

    def contents(self) -> TableContents:
        return TableContents(
            chains=frozenset(c.name for c in self.chains),
            sets={s.name: frozenset(canonical_key(k) for k in s.elements) for s in self.sets},
            maps={m.name: {canonical_key(k): v for k, v in m.elements} for m in self.maps},
            rules={c.name: tuple(rule_fingerprint(r) for r in c.rules) for c in self.chains},
            bases={c.name: c.base for c in self.chains},
            declarations={d.name: declaration_of(d) for d in self.data()},
        )
