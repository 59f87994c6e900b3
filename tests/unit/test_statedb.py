"""State tables: snapshots stay consistent, indexes follow rows, one writer, watches fire."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest

from membrane.core.statedb import StateDB, TableError, wait_any


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node: str
    labels: tuple[str, ...] = ()


def _pods(db: StateDB | None = None):  # type: ignore[no-untyped-def]
    db = db or StateDB()
    table = db.table("pods", primary=lambda p: (p.namespace, p.name),
                     indexes={"node": lambda p: [p.node], "label": lambda p: p.labels})
    return table, table.writer("test")


async def test_snapshot_is_not_changed_by_later_commits() -> None:
    table, writer = _pods()
    writer.upsert(Pod("a", "p1", "n1"))
    before = table.snapshot()
    writer.upsert(Pod("a", "p2", "n1"), Pod("a", "p1", "n2"))
    writer.delete(("a", "p1"))
    assert [p.name for p in before] == ["p1"]
    assert before.get(("a", "p1")) == Pod("a", "p1", "n1")
    assert before.by("node", "n1") == (Pod("a", "p1", "n1"),)
    after = table.snapshot()
    assert [p.name for p in after] == ["p2"]
    assert after.by("node", "n2") == ()


async def test_one_revision_per_transaction_and_none_for_no_change() -> None:
    table, writer = _pods()
    with writer.txn() as txn:
        txn.upsert(Pod("a", "p1", "n1"))
        txn.upsert(Pod("a", "p2", "n1"))
    assert table.revision == 1
    writer.upsert(Pod("a", "p1", "n1"))  # equal row: nothing changes
    assert table.revision == 1
    writer.upsert(Pod("a", "p1", "n2"))
    snap = table.snapshot()
    assert snap.revision == 2
    assert snap.row_revision(("a", "p1")) == 2
    assert snap.row_revision(("a", "p2")) == 1
    assert snap.row_revision(("a", "nope")) == 0


async def test_secondary_indexes_follow_updates_and_deletes() -> None:
    table, writer = _pods()
    writer.upsert(*(Pod("a", f"p{i}", f"n{i % 2}", ("app=web",) if i < 3 else ()) for i in range(6)))
    snap = table.snapshot()
    assert sorted(p.name for p in snap.by("node", "n0")) == ["p0", "p2", "p4"]
    assert sorted(p.name for p in snap.by("label", "app=web")) == ["p0", "p1", "p2"]
    writer.upsert(replace(snap.get(("a", "p0")), node="n1", labels=()))  # type: ignore[type-var]
    writer.delete(("a", "p2"))
    snap = table.snapshot()
    assert sorted(p.name for p in snap.by("node", "n0")) == ["p4"]
    assert sorted(p.name for p in snap.by("label", "app=web")) == ["p1"]
    with pytest.raises(TableError, match="no index"):
        snap.by("zone", "x")


async def test_replace_all_keeps_revisions_of_unchanged_rows() -> None:
    table, writer = _pods()
    writer.upsert(Pod("a", "p1", "n1"), Pod("a", "p2", "n1"))
    writer.replace_all([Pod("a", "p1", "n1"), Pod("a", "p3", "n1")])
    snap = table.snapshot()
    assert sorted(p.name for p in snap) == ["p1", "p3"]
    assert snap.row_revision(("a", "p1")) == 1
    assert snap.row_revision(("a", "p3")) == 2


async def test_one_writer_per_table() -> None:
    db = StateDB()
    table, _ = _pods(db)
    with pytest.raises(TableError, match="written by test already"):
        table.writer("someone else")
    with pytest.raises(TableError, match="exists already"):
        _pods(db)
    assert db.status() == [{"table": "pods", "revision": 0, "rows": 0, "writer": "test"}]


async def test_watch_fires_on_commit_only() -> None:
    table, writer = _pods()
    snap = table.snapshot()
    assert not await wait_any([snap.changed], timeout=0.01)
    writer.upsert(Pod("a", "p1", "n1"))  # equal rows later do not fire the new watch
    assert await wait_any([snap.changed], timeout=1)
    newer = table.snapshot()
    writer.upsert(Pod("a", "p1", "n1"))
    assert not newer.changed.is_set()

    async def later() -> None:
        await asyncio.sleep(0.01)
        writer.delete(("a", "p1"))

    task = asyncio.create_task(later())
    assert await wait_any([newer.changed], timeout=1)
    await task
    assert len(table.snapshot()) == 0


async def test_failed_transaction_commits_nothing() -> None:
    table, writer = _pods()
    with pytest.raises(RuntimeError), writer.txn() as txn:
        txn.upsert(Pod("a", "p1", "n1"))
        raise RuntimeError("boom")
    assert table.revision == 0 and len(table.snapshot()) == 0


def test_changed_keys_name_the_rows_written_or_deleted_since_a_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    table, writer = _pods()
    writer.upsert(Pod("a", "p1", "n1"), Pod("a", "p2", "n1"))
    start = table.snapshot()
    assert start.changed_keys(start.revision) == set()
    writer.upsert(Pod("a", "p1", "n2"))
    writer.upsert(Pod("a", "p1", "n2"))  # unchanged: no revision, nothing named
    writer.delete(("a", "p2"))
    later = table.snapshot()
    assert later.changed_keys(start.revision) == {("a", "p1"), ("a", "p2")}
    assert later.changed_keys(later.revision - 1) == {("a", "p2")}
    assert start.changed_keys(later.revision) is None  # a snapshot older than the reader's revision
    # A reader that fell further behind than the table remembers reads every row.
    monkeypatch.setattr("membrane.core.statedb.CHANGE_LOG_KEYS", 2)
    for i in range(3):
        writer.upsert(Pod("b", f"q{i}", "n1"))
    assert table.snapshot().changed_keys(later.revision) is None
    assert table.snapshot().changed_keys(table.revision - 1) == {("b", "q2")}
