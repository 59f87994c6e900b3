"""One generic reconciler: a desired-state table → a target (the kernel, the store, a peer).

In the spirit of Cilium's StateDB reconciler (``pkg/statedb/reconciler``). A controller writes the
desired rows; the reconciler is the only code that acts on them::

    desired table ──(changed rows since the last pass)──▶ ops.update(row) / ops.delete(row)
                  ──(every resync_interval: every row)──▶ ops.update(row)… then ops.prune(rows)
                  ──(per row)──────────────────────────▶ status table: pending · done · error

- **Incremental**: a pass hands the target only rows whose revision changed since they were last
  reconciled, and deletes for rows that disappeared.
- **Per-object retry**: a failed row is retried on its own with exponential backoff
  (``retry_initial`` doubling up to ``retry_max``); the others are not held back.
- **Full resync**: the first pass and then one every ``resync_interval`` seconds updates every row
  again and calls ``prune`` with the whole desired set — targets read the world back there and
  repair drift (a hand-deleted route, nft element or chain) and remove what they own but nobody
  wants.
- **Status**: each reconciler owns a status table (``<name>/status``) with one :class:`RowStatus`
  per desired row; ``membrane status --verbose`` shows :meth:`Reconciler.health`, and callers that
  need a row realized before they answer (a CNI ADD) wait with :meth:`Reconciler.wait_done`.

Targets implement :class:`Operations` (one object at a time) or :class:`BatchOperations` (every
change of a pass at once: an nft table is one atomic transaction, not one per element).

Primitives: :class:`Operations`, :class:`BatchOperations`, :class:`RowStatus`, :class:`Reconciler`,
:class:`ReconcileFailed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from membrane.core.errors import MembraneError
from membrane.core.statedb import Snapshot, StateDB, Table, wait_any

log = logging.getLogger(__name__)

Row = TypeVar("Row")
Row_contra = TypeVar("Row_contra", contravariant=True)

DEFAULT_RESYNC_INTERVAL = 60.0


class Operations(Protocol[Row_contra]):
    """A target reconciled one object at a time. Every method is idempotent."""

    async def update(self, row: Row_contra) -> None:
        """Make the target hold ``row`` (create it or repair it)."""
        ...

    async def delete(self, row: Row_contra) -> None:
        """Remove what ``row`` made; fine when it is gone already."""
        ...

    async def prune(self, rows: Sequence[Row_contra]) -> None:
        """Remove every object the target owns that ``rows`` does not name (a full resync)."""
        ...


class BatchOperations(Protocol[Row_contra]):
    """A target reconciled a whole pass at a time (one transaction). ``desired`` is every row."""

    async def apply(self, desired: Sequence[Row_contra], updated: Sequence[Row_contra],
                    deleted: Sequence[Row_contra]) -> None:
        """Bring the target to ``desired``; ``updated``/``deleted`` say what changed since last time."""
        ...

    async def repair(self, desired: Sequence[Row_contra]) -> None:
        """Read the target back and make it hold exactly ``desired`` (a full resync)."""
        ...


State = Literal["pending", "done", "error"]


@dataclass(frozen=True)
class RowStatus:
    """How far one desired row got: ``revision`` is the desired row's revision it speaks of."""

    key: Hashable
    state: State
    revision: int
    message: str = ""
    retries: int = 0
    since: float = 0.0  # wall-clock time of the last change of state or message


class ReconcileFailed(MembraneError):
    """A row the caller waits for could not be realized; the message is the target's."""


@dataclass
class _Failure:
    revision: int
    retries: int
    due: float  # monotonic time of the next attempt
    message: str


class Reconciler(Generic[Row]):
    """Reconciles ``table`` into ``ops``; run :meth:`run` as a lifecycle task."""

    def __init__(
        self,
        name: str,
        db: StateDB,
        table: Table[Row],
        ops: Operations[Row] | BatchOperations[Row],
        *,
        resync_interval: float = DEFAULT_RESYNC_INTERVAL,
        retry_initial: float = 0.1,
        retry_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.table = table
        self.ops = ops
        self.resync_interval = resync_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._clock = clock
        self._batch = hasattr(ops, "repair")
        self.status_table: Table[RowStatus] = db.table(f"{name}/status", primary=lambda s: s.key)
        self._status = self.status_table.writer(f"reconciler {name}")
        self._done: dict[Hashable, int] = {}  # key -> row revision last realized
        self._known: dict[Hashable, Row] = {}  # key -> row last handed to the target
        self._failures: dict[Hashable, _Failure] = {}
        self._next_full = 0.0
        self._full_failures = 0
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self.passes = 0
        #: The desired table's revision the target fully holds (every row of that snapshot done).
        self.realized_revision = -1
        self._pass_done = asyncio.Event()
        self.full_syncs = 0
        self.last_full: float = 0.0  # wall-clock
        self.last_error = ""
        self.last_error_time = 0.0

    # -- control ------------------------------------------------------------------------------------

    def request_full_sync(self) -> None:
        """Make the next pass a full resync (and run it now)."""
        self._next_full = 0.0
        self._kick.set()

    async def run(self) -> None:
        await self.table.initialized.wait()  # pruning before the writer restored its rows would destroy them
        while True:
            snap = self.table.snapshot()
            await self.reconcile_once(snap)
            timeout = self._next_wakeup() - self._clock()
            self._kick.clear()
            await wait_any([snap.changed, self._kick], max(timeout, 0.0))

    def _next_wakeup(self) -> float:
        due = [f.due for f in self._failures.values()]
        return min([self._next_full, *due])

    # -- one pass -------------------------------------------------------------------------------------

    async def reconcile_once(self, snap: Snapshot[Row] | None = None) -> None:
        """One pass over ``snap`` (default: the table now); full when the resync is due. Passes
        never overlap (a test or a first sync may call this while :meth:`run` is running)."""
        if not self.table.initialized.is_set():
            return  # nothing is known to be desired yet: a pass would prune what is merely not loaded
        async with self._lock:
            await self._reconcile(snap if snap is not None else self.table.snapshot())

    async def _reconcile(self, snap: Snapshot[Row]) -> None:
        now = self._clock()
        full = now >= self._next_full
        revisions = snap.revisions()
        deleted = [self._known[k] for k in self._known if k not in revisions]
        if full:
            changed = list(revisions)
        else:
            changed = [k for k, rev in revisions.items() if self._done.get(k) != rev and self._due(k, rev, now)]
        if full:
            self._next_full = now + self.resync_interval  # a failing pass brings it forward
        if self._batch:
            await self._pass_batch(snap, revisions, changed, deleted, full)
        else:
            await self._pass_each(snap, revisions, changed, deleted, full)
        for row in deleted:
            key = self.table.primary_key(row)
            self._known.pop(key, None)
            self._done.pop(key, None)
            self._failures.pop(key, None)
        if full:
            self.full_syncs += 1
            self.last_full = time.time()
        self.passes += 1
        if not self._failures:
            self.realized_revision = snap.revision
        self._write_status(revisions)
        done, self._pass_done = self._pass_done, asyncio.Event()
        done.set()

    async def wait_deleted(self, key: Hashable, timeout: float | None = None) -> None:
        """Return once the target no longer holds what the row under ``key`` made; raise
        :class:`ReconcileFailed` when the delete failed."""
        async with asyncio.timeout(timeout):
            while key in self._known:
                failure = self._failures.get(key)
                if failure is not None and failure.revision == 0:
                    raise ReconcileFailed(failure.message)
                await self.wait_pass()

    @property
    def next_pass(self) -> asyncio.Event:
        """Set when the next pass (successful or not) has finished."""
        return self._pass_done

    async def wait_pass(self) -> None:
        """Return after the next pass (successful or not)."""
        await self._pass_done.wait()

    def _due(self, key: Hashable, revision: int, now: float) -> bool:
        failure = self._failures.get(key)
        return failure is None or failure.revision != revision or failure.due <= now

    async def _pass_each(self, snap: Snapshot[Row], revisions: Mapping[Hashable, int], changed: list[Hashable],
                         deleted: list[Row], full: bool) -> None:
        for row in list(deleted):
            try:
                await self.ops.delete(row)  # type: ignore[union-attr]
            except Exception as exc:  # retried: the row stays known until its delete succeeds
                self._fail(self.table.primary_key(row), 0, exc)
                deleted.remove(row)
        for key in changed:
            row = _row(snap, key)
            self._known[key] = row
            try:
                await self.ops.update(row)  # type: ignore[union-attr]
            except Exception as exc:
                self._fail(key, revisions[key], exc)
                continue
            self._succeed(key, revisions[key])
        if full:
            try:
                await self.ops.prune(list(snap))  # type: ignore[union-attr]
            except Exception as exc:
                self._full_failed(exc)
            else:
                self._full_failures = 0

    async def _pass_batch(self, snap: Snapshot[Row], revisions: Mapping[Hashable, int], changed: list[Hashable],
                          deleted: list[Row], full: bool) -> None:
        if not changed and not deleted and not full:
            return
        rows = list(snap)
        updated = [row for key in changed if (row := snap.get(key)) is not None]
        try:
            if full:
                await self.ops.repair(rows)  # type: ignore[union-attr]
            else:
                await self.ops.apply(rows, updated, deleted)  # type: ignore[union-attr]
        except Exception as exc:
            # One transaction: every row it carried failed with it. The next attempt (after the
            # backoff) is a full repair, since the target's state is unknown now.
            for key in changed:
                self._known[key] = _row(snap, key)
                self._fail(key, revisions[key], exc)
            self._full_failed(exc, log_it=not changed)
            deleted.clear()  # keep them known: the repair removes them
            return
        self._full_failures = 0
        for key in changed:
            self._known[key] = _row(snap, key)
            self._succeed(key, revisions[key])
        if full:  # a repair realizes every row, failed ones included
            for key, rev in revisions.items():
                self._known[key] = _row(snap, key)
                self._succeed(key, rev)

    def _full_failed(self, exc: Exception, *, log_it: bool = True) -> None:
        """The next pass is a full resync, after a backoff of its own."""
        self._full_failures += 1
        delay = min(self.retry_initial * 2 ** (self._full_failures - 1), self.retry_max)
        self._next_full = self._clock() + delay
        if log_it:
            self._note_error(exc)

    def _succeed(self, key: Hashable, revision: int) -> None:
        self._done[key] = revision
        self._failures.pop(key, None)

    def _fail(self, key: Hashable, revision: int, exc: Exception) -> None:
        previous = self._failures.get(key)
        retries = previous.retries + 1 if previous is not None else 1
        delay = min(self.retry_initial * 2 ** (retries - 1), self.retry_max)
        message = _message(exc)
        self._failures[key] = _Failure(revision, retries, self._clock() + delay, message)
        self._done.pop(key, None)
        if previous is None or previous.message != message:
            self._note_error(exc, key)

    def _note_error(self, exc: Exception, key: Hashable | None = None) -> None:
        self.last_error = _message(exc)
        self.last_error_time = time.time()
        what = f"{self.name} {key}" if key is not None else self.name
        if isinstance(exc, MembraneError):
            log.warning("reconciling %s failed (retrying): %s", what, exc)
        else:
            log.exception("reconciling %s failed (retrying)", what)

    def _write_status(self, revisions: Mapping[Hashable, int]) -> None:
        current = self.status_table.snapshot()
        now = time.time()
        with self._status.txn() as txn:
            for key, rev in revisions.items():
                failure = self._failures.get(key)
                if failure is not None:
                    row = RowStatus(key, "error", failure.revision, failure.message, failure.retries)
                elif self._done.get(key) == rev:
                    row = RowStatus(key, "done", rev)
                else:
                    row = RowStatus(key, "pending", rev)
                old = current.get(key)
                same = old is not None and (old.state, old.revision, old.message, old.retries) == (
                    row.state, row.revision, row.message, row.retries)
                txn.upsert(old if same and old is not None else RowStatus(
                    key, row.state, row.revision, row.message, row.retries, now))
            for key in current.primary_keys():
                if key not in revisions:
                    txn.delete(key)

    # -- waiting and reporting ----------------------------------------------------------------------

    async def wait_done(self, key: Hashable, revision: int, timeout: float | None = None) -> None:
        """Return once the row under ``key`` is realized at ``revision`` or later; raise
        :class:`ReconcileFailed` when the attempt at that revision failed, TimeoutError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            snap = self.status_table.snapshot()
            status = snap.get(key)
            if status is not None and status.revision >= revision:
                if status.state == "done":
                    return
                if status.state == "error":
                    raise ReconcileFailed(status.message)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{self.name}: {key} not reconciled within {timeout}s")
            await wait_any([snap.changed], remaining)

    def health(self) -> dict[str, Any]:
        """What ``membrane status --verbose`` prints for this reconciler."""
        statuses = list(self.status_table.snapshot())
        errors = [s for s in statuses if s.state == "error"]
        return {
            "name": self.name,
            "table": self.table.name,
            "rows": len(statuses),
            "done": sum(s.state == "done" for s in statuses),
            "pending": sum(s.state == "pending" for s in statuses),
            "errors": len(errors),
            "retries": sum(s.retries for s in errors),
            "passes": self.passes,
            "fullSyncs": self.full_syncs,
            "lastFullSync": self.last_full,
            "lastError": self.last_error,
            "lastErrorTime": self.last_error_time,
            "failing": [{"key": str(s.key), "message": s.message, "retries": s.retries} for s in errors[:10]],
        }


def _row(snap: Snapshot[Row], key: Hashable) -> Row:
    row = snap.get(key)
    assert row is not None, key
    return row


def _message(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, MembraneError) and text else f"{type(exc).__name__}: {text}"
