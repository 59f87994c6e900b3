"""The behaviour every store backend must show, as a reusable pytest suite.

A backend test module provides a ``backend`` fixture yielding a :class:`StoreBackend` and
subclasses :class:`StoreContract`::

    @pytest.fixture(params=["memory", "sqlite"])
    async def backend(request, tmp_path): ...

    class TestStoreContract(StoreContract):
        pass

Adding a backend is one more fixture parameter and one more :class:`StoreBackend`.

Primitives: :class:`StoreBackend` (with :class:`MemoryBackend`, :class:`SqliteBackend`),
:class:`EventReader`, :func:`watching` and :class:`StoreContract`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from membrane.core.errors import CompareFailed, InvalidInput, StoreError
from membrane.store.base import (
    Compacted,
    Compare,
    Delete,
    EventType,
    KeyValue,
    LeaseNotFound,
    Put,
    Store,
    WatchEvent,
)
from membrane.store.memory import ManualClock, MemoryStore
from membrane.store.sqlite import SqliteStore

#: Upper bound for anything a test awaits; generous, since failing is the only way to reach it.
WAIT = 10.0


class StoreBackend(abc.ABC):
    """One backend under test: opens clients of one store and controls its lease clock."""

    name: str
    #: A lease ttl the tests use; :meth:`advance` moves time in multiples of it.
    ttl: float = 10.0

    def __init__(self) -> None:
        self._opened: list[Store] = []

    @abc.abstractmethod
    async def open(self) -> Store:
        """A new client of the same store: for an embedded store, another instance on the same
        file, which stands for another process."""

    @abc.abstractmethod
    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the lease clock (move a fake clock, or wait)."""

    @abc.abstractmethod
    async def compact(self, store: Store, revision: int) -> None:
        """Drop the history up to and including ``revision``."""

    async def close(self) -> None:
        for store in self._opened:
            with contextlib.suppress(StoreError):
                await store.close()

    def _track(self, store: Store) -> Store:
        self._opened.append(store)
        return store


class MemoryBackend(StoreBackend):
    """One :class:`MemoryStore`; every client is that same instance (it lives in one process)."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.store = MemoryStore(clock=self.clock)

    async def open(self) -> Store:
        return self.store

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def compact(self, store: Store, revision: int) -> None:
        assert isinstance(store, MemoryStore)
        await store.compact(revision)

    async def close(self) -> None:
        await self.store.close()


class SqliteBackend(StoreBackend):
    """:class:`SqliteStore` instances on one file, sharing a manual lease clock."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.clock = ManualClock()

    async def open(self) -> Store:
        return self._track(SqliteStore(self.path, clock=self.clock, poll_interval=0.01))

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def compact(self, store: Store, revision: int) -> None:
        assert isinstance(store, SqliteStore)
        await store.compact(revision)


class EventReader:
    """Reads a watch with a timeout on every step, so a missing event fails instead of hanging."""

    def __init__(self, events: AsyncIterator[WatchEvent]) -> None:
        self._events = events

    async def next(self) -> WatchEvent:
        async with asyncio.timeout(WAIT):
            return await anext(self._events)

    async def take(self, n: int) -> list[WatchEvent]:
        return [await self.next() for _ in range(n)]


@contextlib.asynccontextmanager
async def watching(store: Store, prefix: str, start_revision: int) -> AsyncIterator[EventReader]:
    events = store.watch(prefix, start_revision)
    try:
        yield EventReader(events)
    finally:
        aclose: Callable[[], Awaitable[None]] | None = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Await ``check()`` becoming true (a store sweeps leases on its own schedule)."""
    async with asyncio.timeout(WAIT):
        while not await check():
            await asyncio.sleep(0.01)
    assert await check(), what


def summary(ev: WatchEvent) -> tuple[str, str, bytes, int]:
    return ev.type.value, ev.kv.key, ev.kv.value, ev.revision


class StoreContract:
    """The contract. Every test gets a fresh, empty store from the ``backend`` fixture."""

    # -- keys

    async def test_get_of_a_missing_key_is_none(self, backend: StoreBackend) -> None:
        store = await backend.open()
        assert await store.get("/a/missing") is None

    async def test_put_then_get_returns_value_and_revisions(self, backend: StoreBackend) -> None:
        store = await backend.open()
        rev1 = await store.put("/a/k", b"one")
        rev2 = await store.put("/a/k", b"two")
        assert rev2 > rev1
        kv = await store.get("/a/k")
        assert kv == KeyValue("/a/k", b"two", create_revision=rev1, mod_revision=rev2, version=2, lease=0)
        assert await store.revision() == rev2

    async def test_every_write_bumps_the_revision_by_one(self, backend: StoreBackend) -> None:
        store = await backend.open()
        start = await store.revision()
        revs = [await store.put(f"/a/{i}", b"x") for i in range(5)]
        assert revs == list(range(start + 1, start + 6))

    async def test_list_is_sorted_and_reports_the_snapshot_revision(self, backend: StoreBackend) -> None:
        store = await backend.open()
        for key in ("/a/c", "/a/a", "/a/b", "/b/a"):
            last = await store.put(key, key.encode())
        kvs, rev = await store.list("/a/")
        assert [kv.key for kv in kvs] == ["/a/a", "/a/b", "/a/c"]
        assert rev == last
        everything, _ = await store.list("")
        assert [kv.key for kv in everything] == ["/a/a", "/a/b", "/a/c", "/b/a"]

    async def test_prefixes_are_isolated(self, backend: StoreBackend) -> None:
        store = await backend.open()
        await store.put("/a/b", b"exact")
        await store.put("/a/b/x", b"child")
        await store.put("/a/bc", b"sibling")
        await store.put("/a/b0", b"sibling")
        kvs, _ = await store.list("/a/b/")
        assert [kv.key for kv in kvs] == ["/a/b/x"]
        start = await store.revision() + 1
        async with watching(store, "/a/b/", start) as events:
            await store.put("/a/bc", b"sibling changed")
            await store.put("/a/b", b"exact changed")
            await store.put("/a/b/y", b"second child")
            assert (await events.next()).kv.key == "/a/b/y"

    async def test_delete_reports_whether_the_key_existed(self, backend: StoreBackend) -> None:
        store = await backend.open()
        await store.put("/a/k", b"v")
        assert await store.delete("/a/k") is True
        assert await store.get("/a/k") is None
        rev = await store.revision()
        assert await store.delete("/a/k") is False
        assert await store.revision() == rev, "deleting an absent key must not bump the revision"

    async def test_a_recreated_key_starts_a_new_life(self, backend: StoreBackend) -> None:
        store = await backend.open()
        await store.put("/a/k", b"1")
        await store.put("/a/k", b"2")
        await store.delete("/a/k")
        rev = await store.put("/a/k", b"3")
        assert await store.get("/a/k") == KeyValue("/a/k", b"3", rev, rev, version=1)

    async def test_empty_key_is_refused(self, backend: StoreBackend) -> None:
        store = await backend.open()
        with pytest.raises(InvalidInput):
            await store.put("", b"v")

    # -- compare and swap

    async def test_put_if_absent(self, backend: StoreBackend) -> None:
        store = await backend.open()
        rev = await store.put("/a/k", b"first", expect_mod_revision=0)
        with pytest.raises(CompareFailed):
            await store.put("/a/k", b"second", expect_mod_revision=0)
        assert await store.get("/a/k") == KeyValue("/a/k", b"first", rev, rev)

    async def test_put_with_a_stale_revision_fails_and_changes_nothing(self, backend: StoreBackend) -> None:
        store = await backend.open()
        rev1 = await store.put("/a/k", b"1")
        rev2 = await store.put("/a/k", b"2", expect_mod_revision=rev1)
        with pytest.raises(CompareFailed):
            await store.put("/a/k", b"lost", expect_mod_revision=rev1)
        kv = await store.get("/a/k")
        assert kv is not None and (kv.value, kv.mod_revision) == (b"2", rev2)
        assert await store.revision() == rev2

    async def test_compare_and_delete(self, backend: StoreBackend) -> None:
        store = await backend.open()
        rev1 = await store.put("/a/k", b"1")
        await store.put("/a/k", b"2")
        with pytest.raises(CompareFailed):
            await store.delete("/a/k", expect_mod_revision=rev1)
        assert await store.get("/a/k") is not None
        with pytest.raises(CompareFailed):
            await store.delete("/a/absent", expect_mod_revision=rev1)
        kv = await store.get("/a/k")
        assert kv is not None
        assert await store.delete("/a/k", expect_mod_revision=kv.mod_revision) is True
        assert await store.delete("/a/k", expect_mod_revision=0) is False

    async def test_put_if_absent_has_exactly_one_winner(self, backend: StoreBackend) -> None:
        first, second = await backend.open(), await backend.open()

        async def claim(store: Store, who: bytes) -> bool:
            try:
                await store.put("/a/claim", who, expect_mod_revision=0)
            except CompareFailed:
                return False
            return True

        results = await asyncio.gather(*(claim(s, b"%d" % i) for i, s in enumerate([first, second] * 4)))
        assert sum(results) == 1
        kv = await first.get("/a/claim")
        assert kv is not None and kv.value == b"%d" % results.index(True)

    # -- transactions

    async def test_txn_applies_every_op_at_one_revision(self, backend: StoreBackend) -> None:
        store = await backend.open()
        await store.put("/a/old", b"x")
        result = await store.txn(
            [Compare("/a/new", 0)], [Put("/a/new", b"n"), Put("/a/other", b"o"), Delete("/a/old")]
        )
        assert result.succeeded
        assert result.revision == await store.revision()
        kvs, _ = await store.list("/a/")
        assert [(kv.key, kv.value, kv.mod_revision) for kv in kvs] == [
            ("/a/new", b"n", result.revision),
            ("/a/other", b"o", result.revision),
        ]

    async def test_txn_with_a_failing_compare_applies_nothing(self, backend: StoreBackend) -> None:
        store = await backend.open()
        rev = await store.put("/a/held", b"x")
        result = await store.txn(
            [Compare("/a/free", 0), Compare("/a/held", rev - 1)],
            [Put("/a/free", b"mine"), Delete("/a/held")],
        )
        assert not result.succeeded
        assert result.revision == rev == await store.revision()
        assert await store.get("/a/free") is None
        assert await store.get("/a/held") is not None

    async def test_txn_naming_a_key_twice_is_refused(self, backend: StoreBackend) -> None:
        store = await backend.open()
        with pytest.raises(InvalidInput):
            await store.txn([], [Put("/a/k", b"1"), Delete("/a/k")])
        assert await store.get("/a/k") is None

    async def test_txn_with_an_unknown_lease_applies_nothing(self, backend: StoreBackend) -> None:
        store = await backend.open()
        lease = await store.grant_lease(backend.ttl)
        await store.revoke_lease(lease)
        with pytest.raises(LeaseNotFound):
            await store.txn([], [Put("/a/plain", b"x"), Put("/a/leased", b"y", lease=lease)])
        assert (await store.list("/a/"))[0] == []

    # -- watch

    async def test_list_then_watch_from_next_revision_misses_nothing(self, backend: StoreBackend) -> None:
        store = await backend.open()
        await store.put("/a/before", b"0")
        kvs, rev = await store.list("/a/")
        assert [kv.key for kv in kvs] == ["/a/before"]
        await store.put("/a/between", b"1")  # after the list, before the watch starts
        async with watching(store, "/a/", rev + 1) as events:
            await store.put("/a/after", b"2")
            await store.delete("/a/before")
            got = [summary(e) for e in await events.take(3)]
        assert got == [
            ("PUT", "/a/between", b"1", rev + 1),
            ("PUT", "/a/after", b"2", rev + 2),
            ("DELETE", "/a/before", b"", rev + 3),
        ]

    async def test_watch_replays_from_start_revision_inclusive(self, backend: StoreBackend) -> None:
        store = await backend.open()
        revs = [await store.put("/a/k", b"%d" % i) for i in range(4)]
        async with watching(store, "/a/", revs[2]) as events:
            got = await events.take(2)
        assert [(e.kv.value, e.revision) for e in got] == [(b"2", revs[2]), (b"3", revs[3])]
        assert got[0].prev_kv is not None and got[0].prev_kv.value == b"1"

    async def test_watch_from_zero_starts_now(self, backend: StoreBackend) -> None:
        store = await backend.open()
        await store.put("/a/old", b"x")
        async with watching(store, "/a/", 0) as events:
            # The watch starts on the first read; write after that from another task.
            first = asyncio.create_task(events.next())
            await asyncio.sleep(0)
            rev = await store.put("/a/new", b"y")
            ev = await first
        assert summary(ev) == ("PUT", "/a/new", b"y", rev)

    async def test_watch_delivers_txn_events_in_op_order_with_one_revision(
        self, backend: StoreBackend
    ) -> None:
        store = await backend.open()
        await store.put("/a/x", b"old")
        start = await store.revision() + 1
        async with watching(store, "/a/", start) as events:
            result = await store.txn([], [Put("/a/z", b"1"), Delete("/a/x"), Put("/a/y", b"2")])
            got = [summary(e) for e in await events.take(3)]
        r = result.revision
        assert got == [("PUT", "/a/z", b"1", r), ("DELETE", "/a/x", b"", r), ("PUT", "/a/y", b"2", r)]

    async def test_delete_event_carries_the_deleted_key(self, backend: StoreBackend) -> None:
        store = await backend.open()
        created = await store.put("/a/k", b"v")
        async with watching(store, "/a/", created + 1) as events:
            await store.delete("/a/k")
            ev = await events.next()
        assert ev.type is EventType.DELETE and ev.kv.value == b""
        assert ev.prev_kv == KeyValue("/a/k", b"v", created, created)

    async def test_failed_writes_emit_nothing(self, backend: StoreBackend) -> None:
        store = await backend.open()
        rev = await store.put("/a/k", b"v")
        async with watching(store, "/a/", rev + 1) as events:
            with pytest.raises(CompareFailed):
                await store.put("/a/k", b"lost", expect_mod_revision=0)
            await store.txn([Compare("/a/k", 0)], [Put("/a/k", b"lost")])
            await store.delete("/a/never")
            marker = await store.put("/a/marker", b"m")
            assert summary(await events.next()) == ("PUT", "/a/marker", b"m", marker)

    async def test_watch_sees_writes_of_another_client(self, backend: StoreBackend) -> None:
        writer, reader = await backend.open(), await backend.open()
        start = await reader.revision() + 1
        async with watching(reader, "/a/", start) as events:
            revs = [await writer.put(f"/a/{i}", b"%d" % i) for i in range(3)]
            await writer.delete("/a/1")
            got = [summary(e) for e in await events.take(4)]
        assert got == [
            ("PUT", "/a/0", b"0", revs[0]),
            ("PUT", "/a/1", b"1", revs[1]),
            ("PUT", "/a/2", b"2", revs[2]),
            ("DELETE", "/a/1", b"", revs[2] + 1),
        ]
        assert (await reader.get("/a/2")) == (await writer.get("/a/2"))

    async def test_revisions_are_shared_by_all_clients(self, backend: StoreBackend) -> None:
        first, second = await backend.open(), await backend.open()
        revs = []
        for i in range(6):
            revs.append(await (first if i % 2 else second).put("/a/k", b"%d" % i))
        assert revs == sorted(set(revs)), "revisions must strictly increase across clients"
        kv = await first.get("/a/k")
        assert kv is not None and kv.version == 6

    async def test_watch_of_compacted_history_raises_compacted(self, backend: StoreBackend) -> None:
        store = await backend.open()
        revs = [await store.put("/a/k", b"%d" % i) for i in range(5)]
        await backend.compact(store, revs[2])
        with pytest.raises(Compacted):
            async with watching(store, "/a/", revs[1]) as events:
                await events.next()
        async with watching(store, "/a/", revs[3]) as events:
            assert (await events.next()).revision == revs[3]

    # -- leases

    async def test_lease_expiry_deletes_its_keys_and_emits_deletes(self, backend: StoreBackend) -> None:
        store, other = await backend.open(), await backend.open()
        lease = await store.grant_lease(backend.ttl)
        await store.put("/a/hb1", b"alive", lease=lease)
        await store.put("/a/hb2", b"alive", lease=lease)
        rev = await store.put("/a/plain", b"stays")
        assert (await store.get("/a/hb1")) is not None
        async with watching(other, "/a/", rev + 1) as events:
            await backend.advance(backend.ttl * 1.5)
            got = await events.take(2)
        assert {(e.type, e.kv.key) for e in got} == {
            (EventType.DELETE, "/a/hb1"),
            (EventType.DELETE, "/a/hb2"),
        }
        assert got[0].prev_kv is not None and got[0].prev_kv.lease == lease
        assert await store.get("/a/hb1") is None
        assert await store.get("/a/plain") is not None
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)

    async def test_keepalive_extends_a_lease(self, backend: StoreBackend) -> None:
        store = await backend.open()
        lease = await store.grant_lease(backend.ttl)
        await store.put("/a/hb", b"alive", lease=lease)
        for _ in range(3):
            await backend.advance(backend.ttl * 0.6)
            await store.keepalive(lease)
        assert await store.get("/a/hb") is not None, "kept alive for 1.8 ttl"
        await backend.advance(backend.ttl * 1.5)

        async def gone() -> bool:
            return await store.get("/a/hb") is None

        await eventually(gone, "the key of an expired lease is deleted")

    async def test_expiry_is_noticed_by_another_client(self, backend: StoreBackend) -> None:
        granter, other = await backend.open(), await backend.open()
        lease = await granter.grant_lease(backend.ttl)
        await granter.put("/a/hb", b"alive", lease=lease)
        await backend.advance(backend.ttl * 1.5)

        async def gone() -> bool:
            return await other.get("/a/hb") is None

        await eventually(gone, "another client deletes the keys of an expired lease")

    async def test_revoke_deletes_keys_at_once(self, backend: StoreBackend) -> None:
        store = await backend.open()
        lease = await store.grant_lease(backend.ttl)
        rev = await store.put("/a/hb", b"alive", lease=lease)
        async with watching(store, "/a/", rev + 1) as events:
            await store.revoke_lease(lease)
            ev = await events.next()
        assert (ev.type, ev.kv.key, ev.revision) == (EventType.DELETE, "/a/hb", rev + 1)
        assert await store.get("/a/hb") is None
        with pytest.raises(LeaseNotFound):
            await store.revoke_lease(lease)
        with pytest.raises(LeaseNotFound):
            await store.put("/a/hb", b"again", lease=lease)

    async def test_put_without_lease_detaches_the_key(self, backend: StoreBackend) -> None:
        store = await backend.open()
        lease = await store.grant_lease(backend.ttl)
        await store.put("/a/k", b"leased", lease=lease)
        await store.put("/a/k", b"plain")
        await store.revoke_lease(lease)
        kv = await store.get("/a/k")
        assert kv is not None and (kv.value, kv.lease) == (b"plain", 0)

    async def test_lease_ttl_must_be_positive(self, backend: StoreBackend) -> None:
        store = await backend.open()
        with pytest.raises(InvalidInput):
            await store.grant_lease(0)

    # -- lifecycle

    async def test_closed_store_refuses_calls_and_ends_watches(self, backend: StoreBackend) -> None:
        store = await backend.open()
        start = await store.put("/a/k", b"v")
        async with watching(store, "/a/", start) as events:
            assert (await events.next()).kv.key == "/a/k"
            pending = asyncio.create_task(events.next())
            await asyncio.sleep(0)
            await store.close()
            with pytest.raises(StopAsyncIteration):
                await pending
        with pytest.raises(StoreError):
            await store.get("/a/k")
