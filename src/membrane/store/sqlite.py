"""The embedded store: one SQLite file shared by every process on the host.

The design follows kine, the SQLite shim that lets k3s run without etcd:

    kv      the current keys (key -> value, create/mod revision, version, lease)
    events  an append-only log, one row per change, indexed by revision; a row holds the new value
            and the previous one so that a watcher needs nothing else
    leases  id -> ttl and deadline on CLOCK_BOOTTIME, which every process of the host shares
    meta    the store revision, the compacted revision and the schema version

Every write is one ``BEGIN IMMEDIATE`` transaction that checks the compares, rewrites ``kv``,
appends to ``events`` and bumps the revision, so a writer killed at any instant leaves either all
of a txn or none of it (WAL journal, ``synchronous=FULL``). Concurrent writers, in this process or
others, queue on SQLite's write lock (``busy_timeout``).

Watch polls the event log. SQLite has no way to notify another process of a commit, and the
alternatives (inotify on the WAL file, a side channel socket) are either unreliable or another
thing to keep alive; kine polls for the same reason. Polling is cheap here: ``PRAGMA
data_version`` tells a connection whether anyone else committed, without reading a page, so an
idle watcher costs one pragma per interval (:data:`POLL_INTERVAL`) and the catch-up query is an
index range scan over the new rows only. Writes made through the same :class:`SqliteStore` wake
its watchers immediately. Every instance also sweeps expired leases (deleting their keys with
DELETE events) from its operations and from its watchers' poll, so a lease expires even if the
process that granted it is gone.

SQLite calls run inline on the event loop: each statement is sub-millisecond, a whole txn a few
milliseconds, and a thread hop would cost more than the call. The one long wait is a writer
queueing behind another writer for the lock, bounded by :data:`BUSY_TIMEOUT`.

The history is bounded: every write drops the events older than the last ``history`` revisions,
and a watcher that asks for them gets :class:`~membrane.store.base.Compacted`.

Primitive: :class:`SqliteStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from membrane.core.errors import CompareFailed, StoreError
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
from membrane.store.memory import (
    DEFAULT_HISTORY,
    Clock,
    check_ttl,
    compares_hold,
    describe_failed_compare,
    leases_used,
    plan_ops,
    prefix_range,
    tombstone,
    validate_key,
    validate_txn,
)

T = TypeVar("T")

SCHEMA_VERSION = 1
#: How often an idle watcher looks for commits by other processes and for expired leases.
POLL_INTERVAL = 0.025
#: How long a writer waits for another writer's lock before giving up (seconds).
BUSY_TIMEOUT = 5.0
#: How many revisions one catch-up query of a watcher reads at most; never splits a revision.
WATCH_WINDOW = 512

_PUT, _DELETE = 0, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key             TEXT PRIMARY KEY,
    value           BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS events (
    id                   INTEGER PRIMARY KEY,
    revision             INTEGER NOT NULL,
    type                 INTEGER NOT NULL,
    key                  TEXT NOT NULL,
    value                BLOB NOT NULL,
    create_revision      INTEGER NOT NULL,
    version              INTEGER NOT NULL,
    lease                INTEGER NOT NULL,
    prev_value           BLOB,
    prev_create_revision INTEGER,
    prev_mod_revision    INTEGER,
    prev_version         INTEGER,
    prev_lease           INTEGER
);
CREATE INDEX IF NOT EXISTS events_revision ON events (revision);
CREATE TABLE IF NOT EXISTS leases (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl     REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expires ON leases (expires);
"""

_EVENT_COLUMNS = (
    "revision, type, key, value, create_revision, version, lease, "
    "prev_value, prev_create_revision, prev_mod_revision, prev_version, prev_lease"
)


def boottime() -> float:
    """Seconds since boot, counting suspend: the lease clock every process of a host agrees on."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _event_row(ev: WatchEvent) -> tuple[Any, ...]:
    kv, prev = ev.kv, ev.prev_kv
    head = (kv.mod_revision, _PUT if ev.type is EventType.PUT else _DELETE, kv.key, kv.value)
    body = (kv.create_revision, kv.version, kv.lease)
    if prev is None:
        return (*head, *body, None, None, None, None, None)
    return (*head, *body, prev.value, prev.create_revision, prev.mod_revision, prev.version, prev.lease)


def _row_event(row: tuple[Any, ...]) -> WatchEvent:
    rev, typ, key, value, create, version, lease, p_value, p_create, p_mod, p_version, p_lease = row
    prev = None if p_mod is None else KeyValue(key, bytes(p_value), p_create, p_mod, p_version, p_lease)
    if typ == _PUT:
        return WatchEvent(EventType.PUT, KeyValue(key, bytes(value), create, rev, version, lease), prev)
    return WatchEvent(EventType.DELETE, tombstone(key, rev), prev)


def _row_kv(row: tuple[Any, ...]) -> KeyValue:
    key, value, create, mod, version, lease = row
    return KeyValue(key, bytes(value), create, mod, version, lease)


def _range_sql(column: str, prefix: str) -> tuple[str, list[str]]:
    lo, hi = prefix_range(prefix)
    if hi is None:
        return f"{column} >= ?", [lo]
    return f"{column} >= ? AND {column} < ?", [lo, hi]


class SqliteStore:
    """The :class:`~membrane.store.base.Store` kept in one SQLite file at ``path``.

    Any number of instances, in any number of processes, may open the same file. ``clock`` is the
    lease clock (all instances sharing a file must share it); ``history`` the number of revisions
    kept for watchers; ``poll_interval`` how often idle watchers look for other writers.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = boottime,
        history: int = DEFAULT_HISTORY,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self.url = f"sqlite://{self.path}"
        self._clock = clock
        self._history = max(1, history)
        self._poll_interval = poll_interval
        self._closed = False
        self._wake = asyncio.Event()
        self._seen_data_version = 0
        self._last_poll = float("-inf")
        self._wrote = False
        self._conn = self._open()

    # -- opening

    def _open(self) -> sqlite3.Connection:
        try:
            self._prepare_path()
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {self.url}: {_reason(exc)}") from exc
        # Switching to WAL takes an exclusive lock without consulting the busy handler, so two
        # processes opening a new store at once (agents of a lab starting together) can meet
        # "database is locked" here: retry for as long as a write would wait.
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                self._init(conn)
                break
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    conn.close()
                    raise StoreError(f"cannot open store {self.url}: {_reason(exc)}") from exc
                time.sleep(0.01)
            except sqlite3.Error as exc:
                conn.close()
                raise StoreError(f"cannot open store {self.url}: {_reason(exc)}") from exc
            except StoreError:
                conn.close()
                raise
        return conn

    def _prepare_path(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
        # Create the file ourselves so that it is 0600 from the start; SQLite gives its -wal and
        # -shm files the mode of the database file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def _init(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('revision', 1)")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('compact_revision', 0)")
            schema = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
            if schema != SCHEMA_VERSION:
                raise StoreError(
                    f"cannot open store {self.url}: schema version {schema}, "
                    f"this membrane knows {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._seen_data_version = conn.execute("PRAGMA data_version").fetchone()[0]

    # -- plumbing

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        try:
            yield
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise StoreError(f"store {self.url}: {_reason(exc)}") from exc

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one read transaction: a consistent snapshot, never blocking writers (WAL)."""
        with self._errors():
            self._sweep_if_due()
            self._conn.execute("BEGIN")
            try:
                return fn(self._conn)
            finally:
                self._conn.execute("COMMIT")

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction, after sweeping expired leases; all or nothing."""
        with self._errors():
            # Sweep in its own transaction, so that a refused operation does not undo the sweep.
            self._sweep_if_due()
            return self._transact(fn)

    def _transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._wrote = False
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # Again under the write lock: a lease may have expired since the check.
            self._sweep_locked()
            result = fn(self._conn)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        if self._wrote:
            self._notify()
        return result

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    @staticmethod
    def _meta(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    @staticmethod
    def _lookup(conn: sqlite3.Connection) -> Callable[[str], KeyValue | None]:
        def lookup(key: str) -> KeyValue | None:
            row = conn.execute(
                "SELECT key, value, create_revision, mod_revision, version, lease FROM kv WHERE key = ?",
                (key,),
            ).fetchone()
            return None if row is None else _row_kv(row)

        return lookup

    def _apply(self, conn: sqlite3.Connection, events: Sequence[WatchEvent]) -> None:
        """Write events that share one new revision: kv rows, log rows, revision, compaction."""
        if not events:
            return
        revision = events[0].revision
        for ev in events:
            kv = ev.kv
            if ev.type is EventType.PUT:
                conn.execute(
                    "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                    (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease),
                )
            else:
                conn.execute("DELETE FROM kv WHERE key = ?", (kv.key,))
        conn.executemany(
            f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_event_row(ev) for ev in events],
        )
        conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))
        self._wrote = True
        self._compact_locked(conn, revision - self._history)

    @staticmethod
    def _compact_locked(conn: sqlite3.Connection, through: int) -> None:
        if through <= SqliteStore._meta(conn, "compact_revision"):
            return
        conn.execute("DELETE FROM events WHERE revision <= ?", (through,))
        conn.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (through,))

    # -- leases

    def _sweep_if_due(self) -> None:
        """Sweep expired leases if there are any; one indexed lookup when there are none."""
        due = self._conn.execute(
            "SELECT 1 FROM leases WHERE expires <= ? LIMIT 1", (self._clock(),)
        ).fetchone()
        if due is not None:
            self._transact(lambda conn: None)  # sweeps under the write lock

    def _sweep_locked(self) -> None:
        conn = self._conn
        now = self._clock()
        expired = [
            r[0] for r in conn.execute("SELECT id FROM leases WHERE expires <= ? ORDER BY expires", (now,))
        ]
        for lease in expired:
            self._drop_lease_locked(conn, lease)

    def _drop_lease_locked(self, conn: sqlite3.Connection, lease: int) -> None:
        # One revision per lease, like etcd's lease revoke.
        keys = [r[0] for r in conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))]
        revision = self._meta(conn, "revision")
        self._apply(conn, plan_ops([Delete(k) for k in keys], self._lookup(conn), revision + 1))
        conn.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def expire_leases(self) -> None:
        """Delete the expired leases and their keys now (operations and watchers also do this)."""
        with self._errors():
            self._sweep_if_due()

    async def grant_lease(self, ttl: float) -> int:
        check_ttl(ttl)

        def grant(conn: sqlite3.Connection) -> int:
            cur = conn.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl, self._clock() + ttl))
            assert cur.lastrowid is not None
            return cur.lastrowid

        return self._write(grant)

    async def keepalive(self, lease: int) -> None:
        def extend(conn: sqlite3.Connection) -> None:
            cur = conn.execute("UPDATE leases SET expires = ? + ttl WHERE id = ?", (self._clock(), lease))
            if cur.rowcount == 0:
                raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)")

        self._write(extend)

    async def revoke_lease(self, lease: int) -> None:
        def revoke(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
                raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)")
            self._drop_lease_locked(conn, lease)

        self._write(revoke)

    # -- reads

    async def get(self, key: str) -> KeyValue | None:
        validate_key(key)
        return self._read(lambda conn: self._lookup(conn)(key))

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        where, args = _range_sql("key", prefix)

        def snapshot(conn: sqlite3.Connection) -> tuple[list[KeyValue], int]:
            revision = self._meta(conn, "revision")
            rows = conn.execute(
                "SELECT key, value, create_revision, mod_revision, version, lease FROM kv "
                f"WHERE {where} ORDER BY key",
                args,
            ).fetchall()
            return [_row_kv(r) for r in rows], revision

        return self._read(snapshot)

    async def revision(self) -> int:
        return self._read(lambda conn: self._meta(conn, "revision"))

    # -- writes

    async def put(
        self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None
    ) -> int:
        compares = [] if expect_mod_revision is None else [Compare(key, expect_mod_revision)]
        return self._write(
            lambda conn: self._txn_locked(conn, compares, [Put(key, value, lease)], True)
        ).revision

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        compares = [] if expect_mod_revision is None else [Compare(key, expect_mod_revision)]

        def delete(conn: sqlite3.Connection) -> bool:
            existed = self._lookup(conn)(key) is not None
            self._txn_locked(conn, compares, [Delete(key)], True)
            return existed

        return self._write(delete)

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        return self._write(lambda conn: self._txn_locked(conn, compares, ops, False))

    def _txn_locked(
        self, conn: sqlite3.Connection, compares: Sequence[Compare], ops: Sequence[Op], raise_on_fail: bool
    ) -> TxnResult:
        validate_txn(compares, ops)
        lookup = self._lookup(conn)
        revision = self._meta(conn, "revision")
        if not compares_hold(compares, lookup):
            if raise_on_fail:
                raise CompareFailed(describe_failed_compare(compares, lookup))
            return TxnResult(False, revision)
        for lease in leases_used(ops):
            if conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
                raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)")
        events = plan_ops(ops, lookup, revision + 1)
        self._apply(conn, events)
        return TxnResult(True, revision + 1 if events else revision)

    async def compact(self, revision: int) -> None:
        """Forget the history up to and including ``revision``; older watches raise Compacted."""

        def compact(conn: sqlite3.Connection) -> None:
            self._compact_locked(conn, min(revision, self._meta(conn, "revision")))

        self._write(compact)

    # -- watch

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        where, args = _range_sql("key", prefix)
        next_rev = start_revision
        if next_rev <= 0:
            next_rev = self._read(lambda conn: self._meta(conn, "revision")) + 1

        def catch_up(conn: sqlite3.Connection) -> tuple[list[WatchEvent], int]:
            """Events of the next window of revisions; returns them and the store revision."""
            compacted = self._meta(conn, "compact_revision")
            if next_rev <= compacted:
                raise Compacted(
                    f"watch of {prefix!r} from revision {next_rev}: the store {self.url} has compacted "
                    f"through revision {compacted}"
                )
            current = self._meta(conn, "revision")
            upto = min(current, next_rev + WATCH_WINDOW - 1)
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE revision >= ? AND revision <= ? AND {where} "
                "ORDER BY id",
                [next_rev, upto, *args],
            ).fetchall()
            return [_row_event(r) for r in rows], current

        while not self._closed:
            wake = self._wake
            # Read everything up to the current revision before waiting. No await between the
            # yields: a consumer draining without suspending sees every event of a revision together.
            while True:
                events, current = self._read(catch_up)
                next_rev = max(next_rev, min(current, next_rev + WATCH_WINDOW - 1) + 1)
                for ev in events:
                    yield ev
                if next_rev > current:
                    break
            await self._idle(wake)

    async def _idle(self, wake: asyncio.Event) -> None:
        """Return once this store wrote, another process committed, or a lease expired."""
        while not (wake.is_set() or self._closed):
            try:
                async with asyncio.timeout(self._poll_interval):
                    await wake.wait()
            except TimeoutError:
                self._poll()

    def _poll(self) -> None:
        """Look for commits by other connections and for due leases; shared by all watchers."""
        now = time.monotonic()
        if self._closed or now - self._last_poll < self._poll_interval / 2:
            return
        self._last_poll = now
        with self._errors():
            # Changes only when another connection commits; our own writes notify directly.
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._seen_data_version:
                self._seen_data_version = version
                self._notify()
            self._sweep_if_due()

    # -- lifecycle

    async def close(self) -> None:
        """Close the connection; running watches end (return) and other calls raise StoreError."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._conn.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__
