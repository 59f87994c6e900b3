"""The generic reconciler: incremental updates, deletes, per-row retry, full resync, status."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from membrane.core.errors import DatapathError
from membrane.core.reconciler import ReconcileFailed, Reconciler
from membrane.core.statedb import StateDB


@dataclass(frozen=True)
class Route:
    prefix: str
    via: str


@dataclass
class FakeClock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RouteTable:
    """A target that holds routes and can be told to refuse some or to drift."""

    held: dict[str, str] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    async def update(self, row: Route) -> None:
        self.calls.append(f"update {row.prefix}")
        if row.prefix in self.refuse:
            raise DatapathError(f"route {row.prefix}: refused")
        self.held[row.prefix] = row.via

    async def delete(self, row: Route) -> None:
        self.calls.append(f"delete {row.prefix}")
        self.held.pop(row.prefix, None)

    async def prune(self, rows: Sequence[Route]) -> None:
        self.calls.append("prune")
        wanted = {r.prefix for r in rows}
        for prefix in [p for p in self.held if p not in wanted]:
            del self.held[prefix]


@dataclass
class Transactional:
    """A batch target: the whole desired set in one go (as an nft table)."""

    held: frozenset[Route] = frozenset()
    fail: bool = False
    log: list[tuple[str, int, int]] = field(default_factory=list)

    async def apply(self, desired: Sequence[Route], updated: Sequence[Route], deleted: Sequence[Route]) -> None:
        self.log.append(("apply", len(updated), len(deleted)))
        if self.fail:
            raise DatapathError("transaction refused")
        self.held = frozenset(desired)

    async def repair(self, desired: Sequence[Route]) -> None:
        self.log.append(("repair", len(desired), 0))
        if self.fail:
            raise DatapathError("transaction refused")
        self.held = frozenset(desired)


def _setup(ops, **kw):  # type: ignore[no-untyped-def]
    db = StateDB()
    table = db.table("routes", primary=lambda r: r.prefix)
    clock = FakeClock()
    reconciler = Reconciler("routes", db, table, ops, clock=clock, resync_interval=60, **kw)
    return table.writer("controller"), reconciler, clock


async def test_incremental_passes_touch_only_changed_rows() -> None:
    target = RouteTable()
    writer, reconciler, clock = _setup(target)
    writer.upsert(Route("10.0.1.0/24", "a"), Route("10.0.2.0/24", "b"))
    await reconciler.reconcile_once()  # first pass: full
    assert target.held == {"10.0.1.0/24": "a", "10.0.2.0/24": "b"}
    target.calls.clear()
    clock.now += 1
    writer.upsert(Route("10.0.2.0/24", "c"))
    writer.delete("10.0.1.0/24")
    await reconciler.reconcile_once()
    assert target.calls == ["delete 10.0.1.0/24", "update 10.0.2.0/24"]
    assert target.held == {"10.0.2.0/24": "c"}
    target.calls.clear()
    await reconciler.reconcile_once()
    assert target.calls == []


async def test_failed_row_is_retried_alone_with_backoff_and_reported() -> None:
    target = RouteTable(refuse={"10.0.9.0/24"})
    writer, reconciler, clock = _setup(target, retry_initial=1.0)
    writer.upsert(Route("10.0.1.0/24", "a"), Route("10.0.9.0/24", "x"))
    await reconciler.reconcile_once()
    status = reconciler.status_table.snapshot()
    assert status.get("10.0.1.0/24").state == "done"  # type: ignore[union-attr]
    bad = status.get("10.0.9.0/24")
    assert bad is not None and bad.state == "error" and "refused" in bad.message and bad.retries == 1
    target.calls.clear()
    clock.now += 0.5  # before the backoff expires: not retried
    await reconciler.reconcile_once()
    assert target.calls == []
    clock.now += 0.6
    await reconciler.reconcile_once()
    assert target.calls == ["update 10.0.9.0/24"]
    assert reconciler.status_table.snapshot().get("10.0.9.0/24").retries == 2  # type: ignore[union-attr]
    target.refuse.clear()
    clock.now += 2.1
    await reconciler.reconcile_once()
    assert reconciler.status_table.snapshot().get("10.0.9.0/24").state == "done"  # type: ignore[union-attr]
    health = reconciler.health()
    assert (health["done"], health["errors"]) == (2, 0)


async def test_full_resync_repairs_drift_and_prunes_foreign_objects() -> None:
    target = RouteTable()
    writer, reconciler, clock = _setup(target)
    writer.upsert(Route("10.0.1.0/24", "a"))
    await reconciler.reconcile_once()
    del target.held["10.0.1.0/24"]  # deleted by hand
    target.held["10.9.9.0/24"] = "stray"  # ours by the target's rules, wanted by nobody
    clock.now += 30
    await reconciler.reconcile_once()
    assert "10.0.1.0/24" not in target.held  # not yet: nothing changed and no resync due
    clock.now += 31
    await reconciler.reconcile_once()
    assert target.held == {"10.0.1.0/24": "a"}
    assert reconciler.full_syncs == 2


async def test_batch_target_gets_one_call_per_pass_and_repairs_after_failure() -> None:
    target = Transactional()
    writer, reconciler, clock = _setup(target, retry_initial=1.0)
    writer.upsert(Route("10.0.1.0/24", "a"))
    await reconciler.reconcile_once()
    assert target.log == [("repair", 1, 0)]
    writer.upsert(Route("10.0.2.0/24", "b"), Route("10.0.3.0/24", "c"))
    clock.now += 1
    await reconciler.reconcile_once()
    assert target.log[-1] == ("apply", 2, 0)
    target.fail = True
    writer.delete("10.0.1.0/24")
    writer.upsert(Route("10.0.4.0/24", "d"))
    clock.now += 1
    await reconciler.reconcile_once()
    assert reconciler.status_table.snapshot().get("10.0.4.0/24").state == "error"  # type: ignore[union-attr]
    target.fail = False
    clock.now += 1.1  # the retry after a failed transaction is a full repair
    await reconciler.reconcile_once()
    assert target.log[-1][0] == "repair"
    assert target.held == {Route("10.0.2.0/24", "b"), Route("10.0.3.0/24", "c"), Route("10.0.4.0/24", "d")}
    assert all(s.state == "done" for s in reconciler.status_table.snapshot())


async def test_wait_done_returns_once_realized_and_raises_on_failure() -> None:
    target = RouteTable(refuse={"10.0.9.0/24"})
    writer, reconciler, _ = _setup(target)
    task = asyncio.create_task(reconciler.run())
    try:
        writer.upsert(Route("10.0.1.0/24", "a"))
        await reconciler.wait_done("10.0.1.0/24", reconciler.table.snapshot().revision, timeout=2)
        assert target.held["10.0.1.0/24"] == "a"
        writer.upsert(Route("10.0.9.0/24", "x"))
        with pytest.raises(ReconcileFailed, match="refused"):
            await reconciler.wait_done("10.0.9.0/24", reconciler.table.snapshot().revision, timeout=2)
        with pytest.raises(TimeoutError):
            await reconciler.wait_done("10.7.7.0/24", 1, timeout=0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_nothing_is_touched_until_the_table_is_initialized() -> None:
    target = RouteTable(held={"10.0.7.0/24": "left by the previous run"})
    db = StateDB()
    table = db.table("routes", primary=lambda r: r.prefix, initialized=False)
    reconciler = Reconciler("routes", db, table, target, clock=FakeClock())
    writer = table.writer("restore")
    await reconciler.reconcile_once()  # a full pass now would prune the route nobody restored yet
    assert target.calls == [] and target.held == {"10.0.7.0/24": "left by the previous run"}
    writer.upsert(Route("10.0.7.0/24", "restored"))
    table.initialized.set()
    await reconciler.reconcile_once()
    assert target.held == {"10.0.7.0/24": "restored"}
