"""What only the SQLite store promises: files and modes, opening errors, several processes on one
file, bounded history, and all-or-nothing writes when the writer is killed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from membrane.core.errors import InvalidInput, StoreError
from membrane.store import open_store
from membrane.store import sqlite as sqlite_module
from membrane.store.base import Compacted, EventType, Put
from membrane.store.memory import MemoryStore
from membrane.store.sqlite import SqliteStore
from membrane.testing.store_contract import watching

WAIT = 10.0


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "store.db")
    yield store
    await store.close()


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


# -- opening


async def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    memory = await open_store("memory://")
    assert isinstance(memory, MemoryStore)
    await memory.close()
    path = tmp_path / "sub" / "store.db"
    store = await open_store(f"sqlite://{path}")
    try:
        assert isinstance(store, SqliteStore) and store.url == f"sqlite://{path}"
        assert path.exists()
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url", ["sqlite://relative/x.db", "sqlite:///var/lib/dir/", "redis://h:1", "/var/lib/x.db", "memory://x"]
)
async def test_open_store_refuses_urls_it_cannot_serve_naming_them(url: str) -> None:
    with pytest.raises(InvalidInput) as err:
        await open_store(url)
    assert url in str(err.value) and "\n" not in str(err.value)


async def test_creates_a_private_directory_and_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "membrane" / "store.db"
    store = SqliteStore(path)
    await store.put("/k", b"v")
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        for name in ("store.db", "store.db-wal", "store.db-shm"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


async def test_a_corrupt_file_is_one_clear_store_error(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(StoreError) as err:
        await open_store(f"sqlite://{path}")
    message = str(err.value)
    assert str(path) in message and "not a database" in message and "\n" not in message


async def test_an_unusable_directory_is_one_clear_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(StoreError) as err:
        SqliteStore(blocker / "store.db")
    assert str(blocker) in str(err.value) and "\n" not in str(err.value)


async def test_state_survives_reopening(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "s.db")
    await first.put("/k/a", b"1")
    rev = await first.put("/k/b", b"2")
    await first.close()
    second = SqliteStore(tmp_path / "s.db")
    try:
        assert await second.revision() == rev
        kvs, _ = await second.list("/k/")
        assert [(kv.key, kv.value) for kv in kvs] == [("/k/a", b"1"), ("/k/b", b"2")]
        assert await second.put("/k/c", b"3") == rev + 1
    finally:
        await second.close()


# -- history


async def test_history_is_bounded_and_older_watches_are_compacted(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", history=10)
    try:
        revs = [await store.put("/k/x", b"%d" % i) for i in range(30)]
        with pytest.raises(Compacted):
            async with watching(store, "/k/", revs[5]) as events:
                await events.next()
        async with watching(store, "/k/", revs[-10]) as events:
            assert [e.kv.value for e in await events.take(10)] == [b"%d" % i for i in range(20, 30)]
        with contextlib.closing(sqlite3.connect(store.path)) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 10
    finally:
        await store.close()


async def test_a_long_backlog_is_read_in_windows_without_losing_events(
    db: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "WATCH_WINDOW", 3)
    start = await db.revision() + 1
    for i in range(5):
        await db.txn([], [Put(f"/k/{i}/{j}", b"v") for j in range(3)])
        await db.put("/other", b"%d" % i)
    async with watching(db, "/k/", start) as events:
        got = [e.kv.key for e in await events.take(15)]
    assert got == [f"/k/{i}/{j}" for i in range(5) for j in range(3)]


# -- several processes


async def test_watch_sees_writes_of_another_process(db: SqliteStore) -> None:
    start = await db.revision() + 1
    async with watching(db, "/cli/", start) as events:
        writer = asyncio.create_task(
            asyncio.to_thread(
                run_python,
                """
                import asyncio, sys
                from membrane.store.sqlite import SqliteStore
                from membrane.store.base import Put
                async def main():
                    store = SqliteStore(sys.argv[1])
                    for i in range(3):
                        await store.put(f"/cli/{i}", b"%d" % i)
                    await store.txn([], [Put("/cli/a", b"a"), Put("/cli/b", b"b")])
                    await store.close()
                asyncio.run(main())
                """,
                str(db.path),
            )
        )
        got = await events.take(5)
        await writer
    assert [(e.kv.key, e.revision - start) for e in got] == [
        ("/cli/0", 0),
        ("/cli/1", 1),
        ("/cli/2", 2),
        ("/cli/a", 3),
        ("/cli/b", 3),
    ]


async def test_lease_of_a_process_that_died_expires_on_the_shared_clock(db: SqliteStore) -> None:
    start = await db.revision() + 1
    run_python(
        """
        import asyncio, sys
        from membrane.store.sqlite import SqliteStore
        async def main():
            store = SqliteStore(sys.argv[1])
            lease = await store.grant_lease(0.2)
            await store.put("/hb/node1", b"alive", lease=lease)
        asyncio.run(main())  # exits without revoking or closing
        """,
        str(db.path),
    )
    async with watching(db, "/hb/", start) as events:
        put, deleted = await events.take(2)
    assert (put.type, deleted.type) == (EventType.PUT, EventType.DELETE)
    assert deleted.kv.key == "/hb/node1" and await db.get("/hb/node1") is None


# -- crash safety

_CRASH_WRITER = """
import asyncio, hashlib, sys
from membrane.store.sqlite import SqliteStore
from membrane.store.base import Put

KEYS, SIZE = 8, 48 * 1024

def value(gen: int, key: int) -> bytes:
    seed = hashlib.sha256(b"%d/%d" % (gen, key)).digest()
    return b"%d:" % gen + seed * (SIZE // len(seed))

async def main() -> None:
    store = SqliteStore(sys.argv[1], history=16)
    gen = await store.revision()
    print("ready", flush=True)
    while True:
        gen += 1
        ops = [Put(f"/crash/{k}", value(gen, k)) for k in range(KEYS)]
        await store.txn([], ops)

asyncio.run(main())
"""


def _expected_value(gen: int, key: str) -> bytes:
    seed = hashlib.sha256(b"%d/%d" % (gen, int(key.rsplit("/", 1)[1]))).digest()
    return b"%d:" % gen + seed * ((48 * 1024) // len(seed))


def _check_crash_state(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT key, value, mod_revision FROM kv WHERE key LIKE '/crash/%'").fetchall()
        per_revision = conn.execute("SELECT revision, count(*) FROM events GROUP BY revision").fetchall()
    assert all(count == 8 for _, count in per_revision), "the event log holds part of a txn"
    if not rows:
        return
    assert len(rows) == 8, "a txn wrote some of its keys"
    generations = {int(bytes(value).split(b":", 1)[0]) for _, value, _ in rows}
    assert len(generations) == 1, f"keys from different txns: {generations}"
    assert len({mod for _, _, mod in rows}) == 1
    (gen,) = generations
    for key, value, _ in rows:
        assert bytes(value) == _expected_value(gen, key), f"{key} is torn"


async def test_a_killed_writer_leaves_whole_txns_only(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    rng = random.Random(os.getpid())
    revisions = []
    for _ in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", _CRASH_WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "ready"
            await asyncio.sleep(rng.uniform(0.02, 0.25))  # let it get into some txn, then kill it
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            assert writer.stdout is not None
            writer.stdout.close()
        _check_crash_state(path)
        store = SqliteStore(path)
        try:
            revisions.append(await store.revision())
            kvs, _ = await store.list("/crash/")
            assert len({kv.mod_revision for kv in kvs}) <= 1
        finally:
            await store.close()
    assert revisions == sorted(revisions) and revisions[-1] > 1, "the writer made progress"


def _open_store(path: str) -> None:
    from membrane.store.sqlite import SqliteStore

    SqliteStore(Path(path))


def _write_for(path: str, seconds: float) -> None:
    import time as _time

    from membrane.store.sqlite import SqliteStore

    store = SqliteStore(Path(path))
    deadline = _time.monotonic() + seconds
    while _time.monotonic() < deadline:
        asyncio.run(store.put("/k", os.urandom(64)))


def test_processes_open_the_store_while_another_one_writes(tmp_path: Path) -> None:
    """Agents of a lab start together on one file while the first already writes: none may fail
    with "database is locked"."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    path = str(tmp_path / "s.db")
    _open_store(path)
    writer = context.Process(target=_write_for, args=(path, 3.0))
    writer.start()
    try:
        for _ in range(10):
            openers = [context.Process(target=_open_store, args=(path,)) for _ in range(3)]
            for opener in openers:
                opener.start()
            for opener in openers:
                opener.join(timeout=30)
            assert [o.exitcode for o in openers] == [0, 0, 0]
    finally:
        writer.join(timeout=30)
