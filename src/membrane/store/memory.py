"""The in-process store and the revision rules every backend shares.

:class:`MemoryStore` is the reference implementation of :class:`~membrane.store.base.Store`: it
keeps the current keys in a dict, the history in a list of :class:`WatchEvent` and leases in a
dict, and it follows etcd v3 to the letter:

- the store revision starts at 1; every applied write (put, delete of an existing key, txn with
  at least one effect, lease expiry or revoke that deleted keys) bumps it by exactly one, and all
  events of one write share that revision;
- deleting an absent key and a txn whose compares fail change nothing and bump nothing;
- a DELETE event carries ``KeyValue(key, b"", 0, revision, 0, 0)`` and the deleted key as
  ``prev_kv``; a PUT event carries the previous value as ``prev_kv`` when the key existed;
- a txn may name each key at most once (etcd rejects duplicates too);
- ``watch(prefix, 0)`` means "from the next revision on" (etcd's "now").

The pure rules (:func:`prefix_range`, :func:`validate_txn`, :func:`compares_hold`,
:func:`plan_ops`) are shared with the SQLite backend so both compute identical events.
:class:`ManualClock` drives lease expiry in tests without sleeping.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from membrane.core.errors import CompareFailed, InvalidInput, StoreError
from membrane.store.base import (
    Compacted,
    Compare,
    Delete,
    EventType,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    TxnResult,
    WatchEvent,
)

Clock = Callable[[], float]

#: How many revisions of history a store keeps for watchers by default.
DEFAULT_HISTORY = 100_000


# --- pure rules shared by the backends ---------------------------------------------------------


def prefix_range(prefix: str) -> tuple[str, str | None]:
    """The half-open key range ``[lo, hi)`` holding exactly the keys that start with ``prefix``.

    ``hi`` is None when the range is unbounded (empty prefix). Keys compare by code point, which
    is also the byte order of their UTF-8 encoding, so the same range works in SQLite.
    """
    if not prefix:
        return "", None
    last = ord(prefix[-1])
    if last == 0x10FFFF:
        # No successor character: fall back to trimming (only reachable with odd keys).
        _, hi = prefix_range(prefix[:-1])
        return prefix, hi
    nxt = last + 1
    if 0xD800 <= nxt <= 0xDFFF:  # skip the surrogate block, which no valid key contains
        nxt = 0xE000
    return prefix, prefix[:-1] + chr(nxt)


def in_range(key: str, lo: str, hi: str | None) -> bool:
    return key >= lo and (hi is None or key < hi)


def validate_key(key: str) -> None:
    if not key:
        raise InvalidInput(["store key must not be empty"])


def validate_txn(compares: Sequence[Compare], ops: Sequence[Op]) -> None:
    """Reject empty keys and a txn that names one key twice (etcd refuses it as well)."""
    for c in compares:
        validate_key(c.key)
        if c.mod_revision < 0:
            raise InvalidInput([f"compare on {c.key}: mod_revision must be >= 0, got {c.mod_revision}"])
    seen: set[str] = set()
    for op in ops:
        validate_key(op.key)
        if op.key in seen:
            raise InvalidInput([f"txn names key {op.key} more than once"])
        seen.add(op.key)


def compares_hold(compares: Sequence[Compare], lookup: Callable[[str], KeyValue | None]) -> bool:
    for c in compares:
        kv = lookup(c.key)
        current = kv.mod_revision if kv is not None else 0
        if current != c.mod_revision:
            return False
    return True


def describe_failed_compare(compares: Sequence[Compare], lookup: Callable[[str], KeyValue | None]) -> str:
    for c in compares:
        kv = lookup(c.key)
        current = kv.mod_revision if kv is not None else 0
        if current != c.mod_revision:
            want = "absent" if c.mod_revision == 0 else f"mod_revision {c.mod_revision}"
            have = "absent" if kv is None else f"mod_revision {current}"
            return f"{c.key} changed: expected {want}, found {have}"
    return "compare failed"


def plan_ops(ops: Sequence[Op], lookup: Callable[[str], KeyValue | None], revision: int) -> list[WatchEvent]:
    """The events that applying ``ops`` at ``revision`` produces, in op order.

    Deleting an absent key produces nothing; if nothing is produced the caller must not bump the
    revision. Keys are distinct (see :func:`validate_txn`), so each lookup sees the state before
    the txn.
    """
    events: list[WatchEvent] = []
    for op in ops:
        prev = lookup(op.key)
        if isinstance(op, Put):
            kv = KeyValue(
                key=op.key,
                value=bytes(op.value),
                create_revision=prev.create_revision if prev is not None else revision,
                mod_revision=revision,
                version=prev.version + 1 if prev is not None else 1,
                lease=op.lease,
            )
            events.append(WatchEvent(EventType.PUT, kv, prev))
        elif prev is not None:
            events.append(WatchEvent(EventType.DELETE, tombstone(op.key, revision), prev))
    return events


def tombstone(key: str, revision: int) -> KeyValue:
    """The ``kv`` of a DELETE event, as etcd reports it."""
    return KeyValue(key=key, value=b"", create_revision=0, mod_revision=revision, version=0, lease=0)


def check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise InvalidInput([f"lease ttl must be > 0 seconds, got {ttl}"])


def leases_used(ops: Sequence[Op]) -> set[int]:
    return {op.lease for op in ops if isinstance(op, Put) and op.lease}


# --- clock ---------------------------------------------------------------------------------------


class ManualClock:
    """A clock that moves only when told to, for lease tests without sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the in-memory store -------------------------------------------------------------------------


@dataclass(slots=True)
class _Lease:
    ttl: float
    deadline: float
    keys: set[str] = field(default_factory=set)


def _lease_wait(deadlines: Sequence[float], now: float) -> float | None:
    """How long an idle watcher sleeps before sweeping leases itself (None: no lease to watch)."""
    if not deadlines:
        return None
    # Bounded both ways: a manual clock in tests does not follow real time at all.
    return min(max(min(deadlines) - now, 0.005), 0.1)


class MemoryStore:
    """An in-process :class:`~membrane.store.base.Store` with etcd semantics.

    ``clock`` (seconds, monotonic) drives lease expiry; inject a :class:`ManualClock` to test it.
    Expired leases are swept by every operation, by idle watchers and by :meth:`expire_leases`.
    ``history`` bounds the revisions kept for watchers; :meth:`compact` drops older ones now.
    """

    def __init__(self, *, clock: Clock = time.monotonic, history: int = DEFAULT_HISTORY) -> None:
        if history < 1:
            raise InvalidInput([f"store history must be >= 1 revision, got {history}"])
        self.url = "memory://"
        self._clock = clock
        self._history = history
        self._kvs: dict[str, KeyValue] = {}
        self._events: list[WatchEvent] = []
        self._revision = 1
        self._compact_revision = 0
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 1
        self._closed = False
        # Replaced on every write: a watcher waits on the one it saw before catching up.
        self._wake = asyncio.Event()

    # -- reads

    async def get(self, key: str) -> KeyValue | None:
        self._begin()
        return self._kvs.get(key)

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._begin()
        lo, hi = prefix_range(prefix)
        kvs = sorted((kv for k, kv in self._kvs.items() if in_range(k, lo, hi)), key=lambda kv: kv.key)
        return kvs, self._revision

    async def revision(self) -> int:
        self._begin()
        return self._revision

    # -- writes

    async def put(
        self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None
    ) -> int:
        compares = [] if expect_mod_revision is None else [Compare(key, expect_mod_revision)]
        result = self._txn(compares, [Put(key, value, lease)])
        if not result.succeeded:
            raise CompareFailed(describe_failed_compare(compares, self._kvs.get))
        return result.revision

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        compares = [] if expect_mod_revision is None else [Compare(key, expect_mod_revision)]
        self._begin()  # sweep first, so an expired key counts as absent
        existed = key in self._kvs
        result = self._txn(compares, [Delete(key)])
        if not result.succeeded:
            raise CompareFailed(describe_failed_compare(compares, self._kvs.get))
        return existed

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        return self._txn(compares, ops)

    def _txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        validate_txn(compares, ops)
        self._begin()
        if not compares_hold(compares, self._kvs.get):
            return TxnResult(False, self._revision)
        for lease in leases_used(ops):
            if lease not in self._leases:
                raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)")
        self._commit(plan_ops(ops, self._kvs.get, self._revision + 1))
        return TxnResult(True, self._revision)

    def _commit(self, events: Sequence[WatchEvent]) -> None:
        """Apply events that share revision ``self._revision + 1``; nothing to do if empty."""
        if not events:
            return
        self._revision += 1
        for ev in events:
            key = ev.kv.key
            if ev.prev_kv is not None and ev.prev_kv.lease in self._leases:
                self._leases[ev.prev_kv.lease].keys.discard(key)
            if ev.type is EventType.PUT:
                self._kvs[key] = ev.kv
                if ev.kv.lease:
                    self._leases[ev.kv.lease].keys.add(key)
            else:
                del self._kvs[key]
        self._events.extend(events)
        self._trim_history()
        self._wake.set()
        self._wake = asyncio.Event()

    def _trim_history(self) -> None:
        # Trim in chunks so that appending stays amortised O(1); at least ``history`` revisions stay.
        floor = self._revision - self._history
        slack = max(1, self._history // 8)
        if floor - self._compact_revision >= slack:
            self._drop_through(floor)

    def _drop_through(self, revision: int) -> None:
        cut = bisect.bisect_right(self._events, revision, key=lambda e: e.kv.mod_revision)
        del self._events[:cut]
        self._compact_revision = max(self._compact_revision, revision)

    async def compact(self, revision: int) -> None:
        """Forget the history up to and including ``revision``; older watches raise Compacted."""
        self._begin()
        self._drop_through(min(revision, self._revision))

    # -- leases

    async def grant_lease(self, ttl: float) -> int:
        check_ttl(ttl)
        self._begin()
        lease = self._next_lease
        self._next_lease += 1
        self._leases[lease] = _Lease(ttl=ttl, deadline=self._clock() + ttl)
        return lease

    async def keepalive(self, lease: int) -> None:
        self._begin()
        entry = self._leases.get(lease)
        if entry is None:
            raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)")
        entry.deadline = self._clock() + entry.ttl

    async def revoke_lease(self, lease: int) -> None:
        self._begin()
        if lease not in self._leases:
            raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)")
        self._drop_lease(lease)

    def expire_leases(self) -> int:
        """Delete every lease past its deadline and the keys attached to it; returns how many."""
        if self._closed:
            return 0
        now = self._clock()
        expired = sorted((e.deadline, lid) for lid, e in self._leases.items() if e.deadline <= now)
        for _, lease in expired:
            self._drop_lease(lease)
        return len(expired)

    def _drop_lease(self, lease: int) -> None:
        # One revision per lease, like etcd's lease revoke.
        entry = self._leases.pop(lease)
        ops = [Delete(k) for k in sorted(entry.keys)]
        self._commit(plan_ops(ops, self._kvs.get, self._revision + 1))

    # -- watch

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        self._begin()
        lo, hi = prefix_range(prefix)
        next_rev = start_revision if start_revision > 0 else self._revision + 1
        while not self._closed:
            if next_rev <= self._compact_revision:
                raise Compacted(
                    f"watch of {prefix!r} from revision {next_rev}: the store has compacted "
                    f"through revision {self._compact_revision}"
                )
            wake = self._wake
            start = bisect.bisect_left(self._events, next_rev, key=lambda e: e.kv.mod_revision)
            pending = [e for e in self._events[start:] if in_range(e.kv.key, lo, hi)]
            next_rev = max(next_rev, self._revision + 1)
            # No await between these yields: a consumer draining without suspending sees every
            # event of one revision together.
            for ev in pending:
                yield ev
            if wake.is_set() or self._closed:
                continue
            timeout = _lease_wait([e.deadline for e in self._leases.values()], self._clock())
            try:
                async with asyncio.timeout(timeout):
                    await wake.wait()
            except TimeoutError:
                self.expire_leases()

    # -- lifecycle

    async def close(self) -> None:
        """Close the store; running watches end (return) and other calls raise StoreError."""
        self._closed = True
        self._wake.set()

    def _begin(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        self.expire_leases()

    # -- introspection for tests and debugging

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    def dump(self) -> Mapping[str, KeyValue]:
        """A copy of every current key (no sweep, no revision)."""
        return dict(self._kvs)
