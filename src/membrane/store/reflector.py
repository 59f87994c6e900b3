"""A local, always-current copy of one store prefix.

:class:`Reflector` lists a prefix, then watches it from the next revision, and keeps an immutable
snapshot (key -> :class:`KeyValue`) together with the store revision it reflects. Each change is
published as a :class:`ReflectorBatch`: the events, and the snapshot and revision after them. A
batch never splits a revision, so a consumer never sees half of a transaction.

When the watch falls behind the store's history (:class:`Compacted`) the reflector lists again
and publishes the difference between its old snapshot and the new list as synthetic events
(``relisted=True``): consumers keep working from events and need no special case.

Consumers either read :attr:`Reflector.snapshot` or follow changes with :meth:`subscribe`::

    reflector = Reflector(store, keys.objects_prefix("pods"))
    task = asyncio.create_task(reflector.run(), name="reflector pods")
    await reflector.synced.wait()          # program nothing before this
    changes = reflector.subscribe()        # state as of changes.revision is changes.snapshot
    async for batch in changes: ...

Primitives: :class:`Reflector`, :class:`ReflectorBatch`, :class:`Subscription` and the pure
:func:`diff_snapshots` and :func:`apply_events`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from membrane.store.base import Compacted, EventType, KeyValue, Store, WatchEvent
from membrane.store.memory import tombstone

log = logging.getLogger(__name__)

Snapshot = Mapping[str, KeyValue]
_EMPTY: Snapshot = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ReflectorBatch:
    """Changes of one or more whole revisions, and the state after them."""

    events: tuple[WatchEvent, ...]
    snapshot: Snapshot
    revision: int
    #: True for the initial list and for a re-list after Compacted; the events are then the
    #: difference from the previous snapshot, and DELETE events carry ``revision``.
    relisted: bool = False


def diff_snapshots(old: Snapshot, new: Snapshot, revision: int) -> list[WatchEvent]:
    """Events that turn ``old`` into ``new``, in key order: PUT for new or changed keys and DELETE
    (stamped with ``revision``, since the real one is gone) for keys that disappeared."""
    events: list[WatchEvent] = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if after is None:
            assert before is not None
            events.append(WatchEvent(EventType.DELETE, tombstone(key, revision), before))
        elif before != after:
            events.append(WatchEvent(EventType.PUT, after, before))
    return events


def apply_events(snapshot: Snapshot, events: Iterable[WatchEvent]) -> Snapshot:
    """A new snapshot with ``events`` applied; ``snapshot`` is left untouched."""
    updated = dict(snapshot)
    for ev in events:
        if ev.type is EventType.PUT:
            updated[ev.kv.key] = ev.kv
        else:
            updated.pop(ev.kv.key, None)
    return MappingProxyType(updated)


class _End:
    """Queued by the watch pump when the watch stops (``error`` None: the store closed)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


class Subscription:
    """Batches published after the moment of :meth:`Reflector.subscribe`.

    ``snapshot`` and ``revision`` are the state at that moment; applying every batch to it keeps
    it current. Iteration ends when the reflector stops or :meth:`close` is called.
    """

    def __init__(self, owner: Reflector, snapshot: Snapshot, revision: int) -> None:
        self.snapshot = snapshot
        self.revision = revision
        self._owner = owner
        self._queue: asyncio.Queue[ReflectorBatch | None] = asyncio.Queue()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ReflectorBatch:
        batch = await self._queue.get()
        if batch is None:
            self._queue.put_nowait(None)  # stay ended for any later call
            raise StopAsyncIteration
        return batch

    def close(self) -> None:
        self._owner._subscribers.discard(self)
        self._queue.put_nowait(None)

    def _publish(self, batch: ReflectorBatch | None) -> None:
        self._queue.put_nowait(batch)


class Reflector:
    """Mirrors everything under ``prefix``. Run :meth:`run` in a task owned by a lifecycle.

    :meth:`run` returns when the store is closed (ending every subscription), re-lists on
    Compacted, and raises any other :class:`~membrane.core.errors.StoreError`. Calling it again
    resumes: it lists, publishes the difference from the snapshot it kept, and goes on feeding the
    same subscriptions.
    """

    def __init__(self, store: Store, prefix: str, *, name: str = "") -> None:
        self.store = store
        self.prefix = prefix
        self.name = name or prefix
        self.synced = asyncio.Event()
        self._snapshot: Snapshot = _EMPTY
        self._revision = 0
        self._subscribers: set[Subscription] = set()
        self._revision_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._running = False

    @property
    def snapshot(self) -> Snapshot:
        """Every key under the prefix as of :attr:`revision` (read-only; replaced, never mutated)."""
        return self._snapshot

    @property
    def revision(self) -> int:
        """The store revision the snapshot reflects (0 before the initial list)."""
        return self._revision

    def subscribe(self) -> Subscription:
        """Follow changes from now on; the subscription holds the snapshot it starts from."""
        sub = Subscription(self, self._snapshot, self._revision)
        self._subscribers.add(sub)
        return sub

    async def wait_for_revision(self, revision: int) -> None:
        """Return once the snapshot reflects ``revision`` (e.g. a write this process just made)."""
        if self._revision >= revision:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._revision_waiters.append((revision, future))
        await future

    async def run(self) -> None:
        if self._running:
            raise RuntimeError(f"reflector {self.name} is already running")
        self._running = True
        try:
            while True:
                await self._relist()
                try:
                    if not await self._follow():
                        break
                except Compacted as exc:
                    log.info("reflector %s: %s; listing again", self.name, exc)
        finally:
            self._running = False
        # The store closed: nothing more will come. After an error, subscriptions stay open so
        # that a supervisor restarting run() keeps its consumers fed.
        for sub in list(self._subscribers):
            sub.close()

    async def _relist(self) -> None:
        kvs, revision = await self.store.list(self.prefix)
        new = MappingProxyType({kv.key: kv for kv in kvs})
        events = diff_snapshots(self._snapshot, new, revision)
        self._publish(ReflectorBatch(tuple(events), new, revision, relisted=True))
        self.synced.set()

    async def _follow(self) -> bool:
        """Apply the watch until it ends (False: the store closed) or raises."""
        queue: asyncio.Queue[WatchEvent | _End] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(self._revision + 1, queue), name=f"reflector {self.name} watch")
        try:
            while True:
                batch: list[WatchEvent] = []
                item = await queue.get()
                # Take everything already queued: the store yields one revision's events without
                # suspending, so a revision is always queued whole before we run.
                while True:
                    if isinstance(item, _End):
                        self._apply(batch)
                        if item.error is not None:
                            raise item.error
                        return False
                    batch.append(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                self._apply(batch)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def _pump(self, start: int, queue: asyncio.Queue[WatchEvent | _End]) -> None:
        events = self.store.watch(self.prefix, start)
        try:
            async for ev in events:
                queue.put_nowait(ev)
        except Exception as exc:  # handed to _follow, which raises it in run()
            queue.put_nowait(_End(exc))
            return
        queue.put_nowait(_End(None))

    def _apply(self, events: list[WatchEvent]) -> None:
        if not events:
            return
        snapshot = apply_events(self._snapshot, events)
        self._publish(ReflectorBatch(tuple(events), snapshot, events[-1].revision))

    def _publish(self, batch: ReflectorBatch) -> None:
        self._snapshot = batch.snapshot
        self._revision = max(self._revision, batch.revision)
        for sub in list(self._subscribers):
            sub._publish(batch)
        still_waiting = []
        for revision, future in self._revision_waiters:
            if future.done():
                continue
            if self._revision >= revision:
                future.set_result(None)
            else:
                still_waiting.append((revision, future))
        self._revision_waiters = still_waiting
