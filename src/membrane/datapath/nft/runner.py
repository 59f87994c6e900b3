"""Applying transactions and reading the table back: the nft boundary.

Primitives: :class:`NftRunner` (protocol), :class:`NftCommand` (the ``nft`` binary: one
``nft -f -`` process per transaction, ``nft -j list table`` to read back) and
:func:`parse_table_json` (``nft -j`` output → :class:`~membrane.datapath.nft.objects.TableContents`,
pure). The fake lives in :mod:`membrane.datapath.nft.fake`.

Read-back canonicalisation: nft prints ``iface_index`` values as interface names when they exist,
integer intervals as prefixes when aligned (``0x00000000/0``) and protocols as names; all of it is
mapped back to the tokens :func:`~membrane.datapath.nft.objects.token` produces.

Rules are not mapped back to the text that was rendered: nft (1.0.6) prints its own normal form
(``meta mark 0x1`` → ``meta mark 0x00000001``, ``ct status & confirmed == 0`` → ``ct status !
confirmed``, ``tcp flags & (fin | syn | rst) == 0`` → ``tcp flags ! fin,syn,rst``), and re-parsing
that reliably would mean a second nft grammar. Each rule is read back as a fingerprint instead: its
JSON expression list and comment, with counter and quota state left out (traffic changes them). Drift
repair compares a chain's fingerprints with those it saw earlier, never with rendered text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network
from typing import Any, Protocol

from membrane.core.errors import DatapathError
from membrane.core.protocols import PROTOCOL_NAMES
from membrane.datapath.netns import if_nametoindex, netns_path
from membrane.datapath.nft.objects import BaseChain, Declaration, Key, TableContents
from membrane.datapath.nft.render import render_transaction
from membrane.datapath.nft.transaction import Transaction

IFACE_TYPES = frozenset({"iface_index"})
# Bit widths of the integer datatypes, to turn an aligned prefix back into a range.
INTEGER_WIDTHS = {"iface_index": 32, "mark": 32, "inet_service": 16, "inet_proto": 8, "integer": 32}
MAX_ERROR_CHARS = 600


class NftRunner(Protocol):
    async def apply(self, transaction: Transaction) -> None:
        """Apply the whole transaction or nothing; DatapathError carries nft's message."""
        ...

    async def read_table(self, family: str, table: str) -> TableContents | None:
        """The table as the kernel has it (chains, elements, and rule fingerprints, hooks and set
        declarations for drift repair); None when it does not exist."""
        ...


def _nft_error(stderr: str) -> str:
    # nft repeats the offending input line and underlines it with carets; keep the words.
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and set(line.strip()) - {"^", "~"}]
    text = " | ".join(lines) or "nft failed without a message"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class NftCommand:
    """Runs the ``nft`` binary, inside ``netns`` (name or path) via ``nsenter`` when given."""

    def __init__(self, netns: str | None = None, *, nft: str = "nft", timeout: float = 30.0) -> None:
        self._netns = netns_path(netns) if netns is not None else None
        self._nft = nft
        self._timeout = timeout

    def _argv(self, *args: str) -> list[str]:
        prefix = ["nsenter", f"--net={self._netns}"] if self._netns else []
        return [*prefix, self._nft, *args]

    async def _run(self, args: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(*args),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise DatapathError(f"cannot run {self._nft}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), self._timeout
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DatapathError(f"nft did not finish within {self._timeout:g} s") from None
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def apply(self, transaction: Transaction) -> None:
        code, _, err = await self._run(["-f", "-"], stdin=render_transaction(transaction))
        if code != 0:
            raise DatapathError(f"nft: {_nft_error(err)}")

    async def read_table(self, family: str, table: str) -> TableContents | None:
        code, out, err = await self._run(["-j", "list", "table", family, table])
        if code != 0:
            if "No such file or directory" in err:
                return None
            raise DatapathError(f"nft: {_nft_error(err)}")
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise DatapathError(f"nft -j printed something that is not JSON: {exc}") from None
        netns = self._netns
        return parse_table_json(data, family, table, lambda names: if_nametoindex(netns, names))


# -- read-back parsing (pure) --------------------------------------------------------------------

Resolver = Callable[[list[str]], dict[str, int]]


def _types(obj: dict[str, Any]) -> tuple[str, ...]:
    raw = obj.get("type", ())
    return (raw,) if isinstance(raw, str) else tuple(raw)


def _components(raw: Any, arity: int) -> list[Any]:
    if isinstance(raw, dict) and "elem" in raw:  # an element carrying timeout/comment metadata
        raw = raw["elem"]["val"]
    if isinstance(raw, dict) and "concat" in raw:
        parts: list[Any] = raw["concat"]
        return parts
    return [raw] if arity == 1 else list(raw)


def _iface_names(raw_keys: Iterable[list[Any]], types: tuple[str, ...]) -> set[str]:
    names: set[str] = set()
    for parts in raw_keys:
        for typ, part in zip(types, parts, strict=False):
            if typ in IFACE_TYPES and isinstance(part, str) and not part.isdigit():
                names.add(part)
    return names


def _scalar(typ: str, value: Any, ifindex: dict[str, int]) -> str:
    if typ in IFACE_TYPES and isinstance(value, str) and not value.isdigit():
        return str(ifindex.get(value, value))
    if typ == "inet_proto":
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return PROTOCOL_NAMES.get(int(value), str(int(value)))
        return str(value)
    if typ in INTEGER_WIDTHS:
        return str(int(value, 0) if isinstance(value, str) else int(value))
    return str(value)


def _component(typ: str, raw: Any, ifindex: dict[str, int]) -> str:
    if isinstance(raw, dict) and "prefix" in raw:
        addr, length = raw["prefix"]["addr"], int(raw["prefix"]["len"])
        if typ in INTEGER_WIDTHS:
            low = int(addr, 0) if isinstance(addr, str) else int(addr)
            high = low + (1 << (INTEGER_WIDTHS[typ] - length)) - 1
            return str(low) if low == high else f"{low}-{high}"
        network = IPv4Network(f"{addr}/{length}")
        return str(network.network_address) if length == 32 else str(network)
    if isinstance(raw, dict) and "range" in raw:
        first, last = (_scalar(typ, bound, ifindex) for bound in raw["range"])
        return first if first == last else f"{first}-{last}"
    return _scalar(typ, raw, ifindex)


def _verdict(raw: Any) -> str:
    if isinstance(raw, dict) and len(raw) == 1:
        ((verdict, arg),) = raw.items()
        if isinstance(arg, dict) and "target" in arg:
            return f"{verdict} {arg['target']}"
        return str(verdict)
    return str(raw)


def _value(value_type: str, raw: Any, ifindex: dict[str, int]) -> str:
    """A map value as the renderer writes it: a verdict, one datum, or a concatenation (``a . b``)."""
    if value_type == "verdict":
        return _verdict(raw)
    types = value_type.split(" . ")
    if len(types) > 1:
        return " . ".join(_component(t, p, ifindex) for t, p in zip(types, _components(raw, len(types)), strict=True))
    return _component(value_type, raw, ifindex)


def _stateless(expr: Any) -> Any:
    """An expression without the state traffic changes (counter values, quota usage)."""
    if isinstance(expr, list):
        return [_stateless(e) for e in expr]
    if isinstance(expr, dict):
        out: dict[str, Any] = {}
        for k, v in expr.items():
            if k == "counter":
                out[k] = None
            elif k == "quota" and isinstance(v, dict):
                out[k] = {kk: vv for kk, vv in v.items() if kk != "used"}
            else:
                out[k] = _stateless(v)
        return out
    return expr


def rule_fingerprint_json(rule: dict[str, Any]) -> str:
    """One rule of ``nft -j`` output as a comparable string (no handle, no counter values)."""
    return json.dumps({"expr": _stateless(rule.get("expr", [])), "comment": rule.get("comment", "")}, sort_keys=True)


def _base(obj: dict[str, Any]) -> BaseChain | None:
    if "hook" not in obj:
        return None
    return BaseChain(type=obj["type"], hook=obj["hook"], priority=int(obj["prio"]), policy=obj.get("policy", "accept"))


def _declaration(obj: dict[str, Any], value_type: str | None) -> Declaration:
    flags = obj.get("flags", ())
    flags = (flags,) if isinstance(flags, str) else flags
    return Declaration(_types(obj), tuple(sorted(flags)), value_type, str(obj.get("comment", "")))


def parse_table_json(data: dict[str, Any], family: str, table: str, resolve: Resolver) -> TableContents:
    """``nft -j list table`` output → chains and canonical elements of that table.

    ``resolve`` maps interface names to indexes in the namespace nft ran in (called once).
    """
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    bases: dict[str, BaseChain | None] = {}
    declarations: dict[str, Declaration] = {}
    raw_sets: dict[str, tuple[tuple[str, ...], list[list[Any]]]] = {}
    raw_maps: dict[str, tuple[tuple[str, ...], str, list[tuple[list[Any], Any]]]] = {}
    for item in data.get("nftables", []):
        kind, obj = next(iter(item.items()))
        if not isinstance(obj, dict) or obj.get("family") != family or obj.get("table", obj.get("name")) != table:
            continue
        if kind == "chain":
            chains.add(obj["name"])
            rules.setdefault(obj["name"], [])
            bases[obj["name"]] = _base(obj)
        elif kind == "rule":
            # nft lists a chain's rules after the chain, in their order in the chain.
            rules.setdefault(obj["chain"], []).append(rule_fingerprint_json(obj))
        elif kind == "set":
            types = _types(obj)
            raw_sets[obj["name"]] = (types, [_components(e, len(types)) for e in obj.get("elem", [])])
            declarations[obj["name"]] = _declaration(obj, None)
        elif kind == "map":
            types = _types(obj)
            pairs = [(_components(k, len(types)), v) for k, v in obj.get("elem", [])]
            value_type = obj.get("map")
            value_type = " . ".join(value_type) if isinstance(value_type, list) else str(value_type)
            raw_maps[obj["name"]] = (types, value_type, pairs)
            declarations[obj["name"]] = _declaration(obj, value_type)
    names: set[str] = set()
    for types, keys in raw_sets.values():
        names |= _iface_names(keys, types)
    for types, _, pairs in raw_maps.values():
        names |= _iface_names((k for k, _ in pairs), types)
    ifindex = resolve(sorted(names)) if names else {}

    def canonical(types: tuple[str, ...], parts: list[Any]) -> Key:
        return tuple(_component(t, p, ifindex) for t, p in zip(types, parts, strict=True))

    sets = {name: frozenset(canonical(types, k) for k in keys) for name, (types, keys) in raw_sets.items()}
    maps = {
        name: {
            canonical(types, k): _value(value_type, v, ifindex)
            for k, v in pairs
        }
        for name, (types, value_type, pairs) in raw_maps.items()
    }
    return TableContents(
        chains=frozenset(chains),
        sets=sets,
        maps=maps,
        rules={name: tuple(fingerprints) for name, fingerprints in rules.items()},
        bases=bases,
        declarations=declarations,
    )
