"""The ipcache as non-overlapping address intervals, for an interval map such as nft's ``ipcache`` (pure).

The ipcache is a longest-prefix-match table (prefix → identity): endpoint /32s, node addresses,
the prefixes policies name (local CIDR identities) and ``0.0.0.0/0`` as world. An nft interval
map refuses overlapping elements, so the table is flattened: every address gets the identity of
the most specific prefix that contains it, and runs of addresses with the same identity become
one element — written as a prefix when aligned, else as a range (``10.0.0.0-10.0.0.9``), the way
nft prints them back.

Primitives: :func:`with_cidr_identities` (adds policy prefixes without overriding endpoints or
nodes), :class:`IpcacheInterval` (with its canonical element text), :func:`flatten_ipcache`,
:func:`lookup_identity`. The nft elements are written by the datapath's policy renderer.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from membrane.identity.ipcache import IpcacheEntry

#: ``cilium-dbg ip list`` SOURCE of prefixes that come from policies.
SOURCE_POLICY = "generated"


@dataclass(frozen=True, slots=True, order=True)
class IpcacheInterval:
    """Addresses ``first``..``last`` (inclusive) all resolve to ``identity``."""

    first: IPv4Address
    last: IPv4Address
    identity: int

    def part(self) -> IPv4Network | tuple[IPv4Address, IPv4Address]:
        """The element key: a prefix when the interval is aligned, else a range."""
        size = int(self.last) - int(self.first) + 1
        if size & (size - 1) == 0 and int(self.first) % size == 0:
            return IPv4Network((self.first, 32 - (size.bit_length() - 1)))
        return (self.first, self.last)

    def token(self) -> str:
        """:meth:`part` as canonical element text (``a.b.c.d``, ``a.b.c.d/n`` or ``a-b``), built
        without the ipaddress module: the ipcache holds every pod, so this is a hot path."""
        first, last = int(self.first), int(self.last)
        size = last - first + 1
        if size & (size - 1) == 0 and first % size == 0:
            length = 32 - (size.bit_length() - 1)
            return _dotted(first) if length == 32 else f"{_dotted(first)}/{length}"
        return f"{_dotted(first)}-{_dotted(last)}"


def _dotted(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def with_cidr_identities(
    entries: Iterable[IpcacheEntry], cidr_identities: Mapping[IPv4Network, int], host_ip: str = ""
) -> list[IpcacheEntry]:
    """The ipcache plus the policy prefixes. An entry already present for the same prefix keeps
    its identity: a pod's /32 stays the pod even when a policy names that /32."""
    merged = {entry.prefix: entry for entry in entries}
    for prefix, identity in cidr_identities.items():
        merged.setdefault(prefix, IpcacheEntry(prefix, identity, SOURCE_POLICY, host_ip))
    return sorted(merged.values())


def flatten_ipcache(entries: Iterable[IpcacheEntry | tuple[IPv4Network, int]]) -> tuple[IpcacheInterval, ...]:
    """Longest-prefix match turned into disjoint intervals, neighbours with one identity merged.

    When two entries name the same prefix the first one wins. Addresses no prefix covers get no
    interval (give ``0.0.0.0/0`` to cover everything).
    """
    table: dict[IPv4Network, int] = {}
    for entry in entries:
        prefix, identity = (entry.prefix, entry.identity) if isinstance(entry, IpcacheEntry) else entry
        table.setdefault(prefix, identity)
    # Prefixes nest or are disjoint, so a walk in (start, length) order with a stack of the
    # enclosing prefixes visits every address range exactly once.
    ordered = sorted(table.items(), key=lambda item: (int(item[0].network_address), item[0].prefixlen))
    out: list[list[int]] = []

    def emit(first: int, last: int, identity: int) -> None:
        if first > last:
            return
        if out and out[-1][1] == first - 1 and out[-1][2] == identity:
            out[-1][1] = last
        else:
            out.append([first, last, identity])

    stack: list[tuple[int, int]] = []  # (last address, identity) of the enclosing prefixes
    cursor = 0
    for prefix, identity in ordered:
        start = int(prefix.network_address)
        end = start + (1 << (32 - prefix.prefixlen)) - 1
        while stack and stack[-1][0] < start:
            last, enclosing = stack.pop()
            emit(cursor, last, enclosing)
            cursor = max(cursor, last + 1)
        if stack:
            emit(cursor, start - 1, stack[-1][1])
        cursor = start
        stack.append((end, identity))
    while stack:
        last, enclosing = stack.pop()
        emit(cursor, last, enclosing)
        cursor = max(cursor, last + 1)
    return tuple(IpcacheInterval(IPv4Address(a), IPv4Address(b), i) for a, b, i in out)


def lookup_identity(intervals: Sequence[IpcacheInterval], address: IPv4Address) -> int | None:
    """The identity of an address in flattened (sorted) intervals, None when no prefix covers it."""
    index = bisect.bisect_right([i.first for i in intervals], address) - 1
    if index >= 0 and intervals[index].last >= address:
        return intervals[index].identity
    return None
