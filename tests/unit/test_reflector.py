"""The reflector: list, then watch; one immutable snapshot per batch; re-list on Compacted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from membrane.core.errors import StoreError
from membrane.store.base import Compare, Delete, EventType, KeyValue, Op, Put, TxnResult, WatchEvent
from membrane.store.memory import MemoryStore
from membrane.store.reflector import Reflector, ReflectorBatch, Subscription, apply_events, diff_snapshots
from membrane.store.sqlite import SqliteStore

WAIT = 10.0


async def next_batch(sub: Subscription) -> ReflectorBatch:
    async with asyncio.timeout(WAIT):
        return await anext(sub)


def values(snapshot: Mapping[str, KeyValue]) -> dict[str, bytes]:
    return {k: kv.value for k, kv in snapshot.items()}


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.close()


class Running:
    def __init__(self, reflector: Reflector) -> None:
        self.reflector = reflector
        self.task = asyncio.create_task(reflector.run(), name="test reflector")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def running() -> AsyncIterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        await r.stop()


def start(reflector: Reflector, running: list[Running]) -> Reflector:
    running.append(Running(reflector))
    return reflector


async def test_synced_after_initial_list_with_the_store_state(
    store: MemoryStore, running: list[Running]
) -> None:
    await store.put("/p/a", b"1")
    await store.put("/p/b", b"2")
    await store.put("/other/c", b"3")
    reflector = Reflector(store, "/p/")
    sub = reflector.subscribe()
    assert not reflector.synced.is_set() and reflector.snapshot == {}
    start(reflector, running)
    async with asyncio.timeout(WAIT):
        await reflector.synced.wait()
    assert values(reflector.snapshot) == {"/p/a": b"1", "/p/b": b"2"}
    assert reflector.revision == await store.revision()
    first = await next_batch(sub)
    assert first.relisted
    assert [(e.type, e.kv.key) for e in first.events] == [(EventType.PUT, "/p/a"), (EventType.PUT, "/p/b")]


async def test_changes_arrive_as_batches_with_their_snapshot(
    store: MemoryStore, running: list[Running]
) -> None:
    await store.put("/p/a", b"1")
    reflector = start(Reflector(store, "/p/"), running)
    await asyncio.wait_for(reflector.synced.wait(), WAIT)
    sub = reflector.subscribe()
    before = sub.snapshot
    rev = await store.put("/p/b", b"2")
    batch = await next_batch(sub)
    assert [e.kv.key for e in batch.events] == ["/p/b"]
    assert batch.revision == rev == reflector.revision
    assert values(batch.snapshot) == {"/p/a": b"1", "/p/b": b"2"}
    assert values(before) == {"/p/a": b"1"}, "a published snapshot never changes"
    await store.delete("/p/a")
    batch = await next_batch(sub)
    assert [(e.type, e.kv.key) for e in batch.events] == [(EventType.DELETE, "/p/a")]
    assert values(reflector.snapshot) == {"/p/b": b"2"}


async def test_a_txn_is_never_split_across_batches(store: MemoryStore, running: list[Running]) -> None:
    reflector = start(Reflector(store, "/p/"), running)
    await asyncio.wait_for(reflector.synced.wait(), WAIT)
    sub = reflector.subscribe()
    result = await store.txn([], [Put(f"/p/{i}", b"x") for i in range(20)])
    batch = await next_batch(sub)
    assert len(batch.events) == 20 and batch.revision == result.revision
    assert len(batch.snapshot) == 20


async def test_keys_outside_the_prefix_are_ignored(store: MemoryStore, running: list[Running]) -> None:
    reflector = start(Reflector(store, "/a/b/"), running)
    await asyncio.wait_for(reflector.synced.wait(), WAIT)
    sub = reflector.subscribe()
    await store.put("/a/bc", b"no")
    rev = await store.put("/a/b/x", b"yes")
    batch = await next_batch(sub)
    assert [e.kv.key for e in batch.events] == ["/a/b/x"] and batch.revision == rev


async def test_wait_for_revision_returns_once_reflected(store: MemoryStore, running: list[Running]) -> None:
    reflector = start(Reflector(store, "/p/"), running)
    rev = await store.put("/p/a", b"1")
    await asyncio.wait_for(reflector.wait_for_revision(rev), WAIT)
    assert "/p/a" in reflector.snapshot


class CompactingStore:
    """A store whose first watch finds the history gone (or fails with ``error``), after changes
    it never saw."""

    def __init__(self, inner: MemoryStore, changes: Sequence[Op], error: StoreError | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self._changes = changes
        self._error = error
        self.watches = 0

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self.inner.list(prefix)

    async def put(
        self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None
    ) -> int:
        return await self.inner.put(key, value, lease=lease, expect_mod_revision=expect_mod_revision)

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        return await self.inner.delete(key, expect_mod_revision=expect_mod_revision)

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        return await self.inner.txn(compares, ops)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        self.watches += 1
        if self.watches == 1:
            await self.inner.txn([], self._changes)
            await self.inner.compact(await self.inner.revision())
            if self._error is not None:
                raise self._error
        async for ev in self.inner.watch(prefix, start_revision):
            yield ev

    async def revision(self) -> int:
        return await self.inner.revision()

    async def grant_lease(self, ttl: float) -> int:
        return await self.inner.grant_lease(ttl)

    async def keepalive(self, lease: int) -> None:
        await self.inner.keepalive(lease)

    async def revoke_lease(self, lease: int) -> None:
        await self.inner.revoke_lease(lease)

    async def close(self) -> None:
        await self.inner.close()


async def test_compacted_watch_relists_and_emits_the_difference(
    store: MemoryStore, running: list[Running]
) -> None:
    await store.put("/p/kept", b"same")
    await store.put("/p/changed", b"old")
    await store.put("/p/removed", b"bye")
    flaky = CompactingStore(store, [Put("/p/changed", b"new"), Delete("/p/removed"), Put("/p/added", b"hi")])
    reflector = Reflector(flaky, "/p/")
    sub = reflector.subscribe()
    start(reflector, running)
    initial = await next_batch(sub)
    assert values(initial.snapshot) == {"/p/kept": b"same", "/p/changed": b"old", "/p/removed": b"bye"}
    resync = await next_batch(sub)
    assert resync.relisted
    assert [(e.type, e.kv.key) for e in resync.events] == [
        (EventType.PUT, "/p/added"),
        (EventType.PUT, "/p/changed"),
        (EventType.DELETE, "/p/removed"),
    ]
    removed = resync.events[2]
    assert removed.prev_kv is not None and removed.prev_kv.value == b"bye"
    assert values(resync.snapshot) == {"/p/kept": b"same", "/p/changed": b"new", "/p/added": b"hi"}
    # And it keeps following after the re-list.
    await store.put("/p/later", b"l")
    assert [e.kv.key for e in (await next_batch(sub)).events] == ["/p/later"]
    assert flaky.watches == 2


async def test_a_restarted_run_resumes_the_same_subscriptions(store: MemoryStore) -> None:
    await store.put("/p/a", b"1")
    flaky = CompactingStore(store, [Put("/p/b", b"2")], error=StoreError("store went away"))
    reflector = Reflector(flaky, "/p/")
    sub = reflector.subscribe()
    with pytest.raises(StoreError):
        await asyncio.wait_for(reflector.run(), WAIT)
    assert values((await next_batch(sub)).snapshot) == {"/p/a": b"1"}
    task = asyncio.create_task(reflector.run(), name="test reflector, restarted")
    try:
        resumed = await next_batch(sub)
        assert resumed.relisted and [e.kv.key for e in resumed.events] == ["/p/b"]
        await store.put("/p/c", b"3")
        assert [e.kv.key for e in (await next_batch(sub)).events] == ["/p/c"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_run_ends_and_subscriptions_end_when_the_store_closes(store: MemoryStore) -> None:
    reflector = Reflector(store, "/p/")
    task = asyncio.create_task(reflector.run(), name="test reflector")
    await asyncio.wait_for(reflector.synced.wait(), WAIT)
    sub = reflector.subscribe()
    await store.close()
    await asyncio.wait_for(task, WAIT)
    with pytest.raises(StopAsyncIteration):
        await next_batch(sub)


async def test_run_raises_store_errors(store: MemoryStore) -> None:
    reflector = Reflector(store, "/p/")
    await store.close()
    with pytest.raises(StoreError):
        await asyncio.wait_for(reflector.run(), WAIT)
    assert not reflector.synced.is_set()


async def test_reflector_follows_another_sqlite_client(tmp_path: Path, running: list[Running]) -> None:
    writer, reader = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    try:
        await writer.put("/p/a", b"1")
        reflector = start(Reflector(reader, "/p/"), running)
        await asyncio.wait_for(reflector.synced.wait(), WAIT)
        rev = (await writer.txn([], [Put("/p/b", b"2"), Delete("/p/a")])).revision
        await asyncio.wait_for(reflector.wait_for_revision(rev), WAIT)
        assert values(reflector.snapshot) == {"/p/b": b"2"}
    finally:
        for r in running:
            await r.stop()
        await writer.close()
        await reader.close()


def test_diff_and_apply_round_trip() -> None:
    a = KeyValue("/k/a", b"1", 2, 2)
    b1, b2 = KeyValue("/k/b", b"1", 3, 3), KeyValue("/k/b", b"2", 3, 5)
    c = KeyValue("/k/c", b"1", 6, 6)
    old = {"/k/a": a, "/k/b": b1}
    new = {"/k/b": b2, "/k/c": c}
    events = diff_snapshots(old, new, 7)
    assert [(e.type, e.kv.key, e.revision) for e in events] == [
        (EventType.DELETE, "/k/a", 7),
        (EventType.PUT, "/k/b", 5),
        (EventType.PUT, "/k/c", 6),
    ]
    assert dict(apply_events(old, events)) == new
    assert old == {"/k/a": a, "/k/b": b1}
    assert diff_snapshots(new, new, 8) == []
