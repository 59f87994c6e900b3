"""State tables: typed, immutable rows with indexes, a revision and a watch per table.

In the spirit of Cilium's StateDB (``pkg/statedb``): every stage of the agent between the store
and the kernel is a table. A table has exactly one writer (the module that owns it); any number of
readers take :class:`Snapshot` s, which never change under them, and wait on a snapshot's
:attr:`Snapshot.changed` event to learn that a newer one exists::

    pods = db.table("pods", primary=lambda p: (p.namespace, p.name), indexes={"node": lambda p: [p.node]})
    writer = pods.writer("intent/pods")         # a second writer() raises: one writer per table
    with writer.txn() as txn:                   # one revision for the whole transaction
        txn.upsert(pod)
        txn.delete(("ns", "gone"))
    snap = pods.snapshot()
    snap.get(("ns", "name")); snap.by("node", "node1"); snap.revision
    await wait_any([snap.changed], timeout=5)   # after a commit, pods.snapshot() is newer

Rows are values: frozen dataclasses or frozen pydantic models, replaced (``dataclasses.replace``),
never mutated. Each row remembers the table revision that last changed it
(:meth:`Snapshot.row_revision`), so a consumer tells exactly what changed since it last looked;
:meth:`Snapshot.changed_keys` names the rows changed since a revision without a scan of the table
(the table remembers the keys of its last commits).

Cost: a commit copies the table's dict only when a snapshot of the previous state is still held
(copy-on-write), so a burst of commits with no reader in between costs no copies, and a reader
costs one copy per commit it observes.

Primitives: :class:`StateDB`, :class:`Table`, :class:`Writer`, :class:`WriteTxn`, :class:`Snapshot`,
:func:`wait_any`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

Row = TypeVar("Row")
Key = Hashable

#: A secondary index: the keys a row is found under (any number; a row may be in none).
IndexFn = Callable[[Any], Iterable[Hashable]]

#: How many changed keys a table remembers for :meth:`Snapshot.changed_keys` (older changes are
#: forgotten; a reader that fell further behind reads the whole table).
CHANGE_LOG_KEYS = 8192


class TableError(Exception):
    """A programming error in the use of a table (a second writer, a write outside a transaction)."""


class Snapshot(Generic[Row]):
    """A table as of one revision: read-only, consistent, never changed by later commits."""

    __slots__ = ("_indexes", "_log", "_rows", "changed", "name", "revision")

    def __init__(
        self,
        name: str,
        revision: int,
        rows: Mapping[Key, tuple[Row, int]],
        indexes: Mapping[str, Mapping[Hashable, frozenset[Key]]],
        changed: asyncio.Event,
        log: _ChangeLog | None = None,
    ) -> None:
        self.name = name
        self.revision = revision
        self._rows = rows
        self._indexes = indexes
        #: Set once the table has a newer revision than this snapshot.
        self.changed = changed
        self._log = log

    def changed_keys(self, since: int) -> set[Key] | None:
        """Primary keys of the rows written or deleted after revision ``since``, up to this
        snapshot's revision; None when the table no longer remembers that far back (or ``since`` is
        newer than this snapshot): then read every row.

        A reader that keeps state derived from the rows updates only those keys, in time
        proportional to the change rather than to the table."""
        if since == self.revision:
            return set()
        if self._log is None or since > self.revision:
            return None
        return self._log.since(since, self.revision)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Row]:
        return (row for row, _ in self._rows.values())

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def get(self, key: Key) -> Row | None:
        entry = self._rows.get(key)
        return entry[0] if entry is not None else None

    def row_revision(self, key: Key) -> int:
        """The table revision that last wrote the row under ``key`` (0: no such row)."""
        entry = self._rows.get(key)
        return entry[1] if entry is not None else 0

    def primary_keys(self) -> Iterable[Key]:
        return self._rows.keys()

    def items(self) -> Iterator[tuple[Key, Row]]:
        return ((key, row) for key, (row, _) in self._rows.items())

    def revisions(self) -> dict[Key, int]:
        """Every row's revision by primary key (what change trackers compare)."""
        return {key: revision for key, (_, revision) in self._rows.items()}

    def by(self, index: str, value: Hashable) -> tuple[Row, ...]:
        """The rows a secondary index finds under ``value`` (in no particular order)."""
        try:
            found = self._indexes[index].get(value, frozenset())
        except KeyError:
            raise TableError(f"table {self.name} has no index {index!r}") from None
        return tuple(self._rows[key][0] for key in found)

    def as_dict(self) -> Mapping[Key, Row]:
        """Rows by primary key: a read-only view, made in O(1) (the snapshot never changes)."""
        return _RowsView(self._rows)


class _RowsView(Mapping[Key, Row]):
    """Controllers look rows up by key in tight loops over the whole cluster: ``get`` and ``in``
    skip the generic Mapping machinery."""

    __slots__ = ("_rows",)

    def __init__(self, rows: Mapping[Key, tuple[Row, int]]) -> None:
        self._rows = rows

    def __getitem__(self, key: Key) -> Row:
        return self._rows[key][0]

    def get(self, key: Key, default: Any = None) -> Any:
        entry = self._rows.get(key)
        return entry[0] if entry is not None else default

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def values(self) -> Any:
        return [row for row, _ in self._rows.values()]

    def __iter__(self) -> Iterator[Key]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


class _ChangeLog:
    """The keys of the last commits of one table (at most about :data:`CHANGE_LOG_KEYS` keys)."""

    __slots__ = ("_entries", "_keys", "complete_after")

    def __init__(self) -> None:
        self._entries: deque[tuple[int, frozenset[Key]]] = deque()
        self._keys = 0
        #: The log holds every commit after this revision.
        self.complete_after = 0

    def add(self, revision: int, keys: frozenset[Key]) -> None:
        self._entries.append((revision, keys))
        self._keys += len(keys)
        while self._keys > CHANGE_LOG_KEYS and self._entries:
            dropped, old = self._entries.popleft()
            self._keys -= len(old)
            self.complete_after = dropped

    def since(self, since: int, until: int) -> set[Key] | None:
        if since < self.complete_after:
            return None
        found: set[Key] = set()
        # Newest first: a reader that keeps up looks at the last entry or two.
        for revision, keys in reversed(self._entries):
            if revision <= since:
                break
            if revision <= until:
                found |= keys
        return found


class Table(Generic[Row]):
    """One table: rows by primary key, secondary indexes, a revision, a watch and one writer."""

    def __init__(self, name: str, primary: Callable[[Row], Key], indexes: Mapping[str, IndexFn] | None = None,
                 *, initialized: bool = True) -> None:
        self.name = name
        #: Set once the writer has put in everything it knows (a restore after a restart); until
        #: then a reconciler of the table neither updates nor prunes (Cilium: table initializers).
        self.initialized = asyncio.Event()
        if initialized:
            self.initialized.set()
        self._primary = primary
        self._index_fns: dict[str, IndexFn] = dict(indexes or {})
        self._rows: dict[Key, tuple[Row, int]] = {}
        self._indexes: dict[str, dict[Hashable, frozenset[Key]]] = {name: {} for name in self._index_fns}
        self._revision = 0
        self._changed = asyncio.Event()
        self._shared = False  # a snapshot holds the current dicts: copy before the next write
        self._writer: str | None = None
        self._snapshot: Snapshot[Row] | None = None
        self._log = _ChangeLog()

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def writer_name(self) -> str | None:
        return self._writer

    def primary_key(self, row: Row) -> Key:
        return self._primary(row)

    def writer(self, owner: str) -> Writer[Row]:
        """The table's only writer; ``owner`` names it in errors and in ``status``."""
        if self._writer is not None:
            raise TableError(f"table {self.name} is written by {self._writer} already; {owner} cannot write it")
        self._writer = owner
        return Writer(self)

    def snapshot(self) -> Snapshot[Row]:
        if self._snapshot is None or self._snapshot.revision != self._revision:
            self._shared = True
            self._snapshot = Snapshot(self.name, self._revision, MappingProxyType(self._rows),
                                      MappingProxyType(self._indexes), self._changed, self._log)
        return self._snapshot

    # -- writing (through WriteTxn only) ---------------------------------------------------------------

    def _prepare_write(self) -> None:
        if self._shared:
            self._rows = dict(self._rows)
            self._indexes = {name: dict(index) for name, index in self._indexes.items()}
            self._shared = False

    def _reindex(self, removed: Iterable[tuple[Key, Row]], added: Iterable[tuple[Key, Row]]) -> None:
        """Update every secondary index for a commit, building each touched entry once (a bulk load
        of rows sharing one index value stays linear)."""
        for name, fn in self._index_fns.items():
            delta: dict[Hashable, tuple[set[Key], set[Key]]] = {}
            for key, row in removed:
                for value in fn(row):
                    delta.setdefault(value, (set(), set()))[1].add(key)
            for key, row in added:
                for value in fn(row):
                    entry = delta.setdefault(value, (set(), set()))
                    entry[0].add(key)
                    entry[1].discard(key)
            index = self._indexes[name]
            for value, (plus, minus) in delta.items():
                updated = (index.get(value, frozenset()) - minus) | plus
                if updated:
                    index[value] = frozenset(updated)
                else:
                    index.pop(value, None)

    def _commit(self, upserts: dict[Key, Row], deletes: set[Key]) -> bool:
        """Apply one transaction; returns False (and keeps the revision) when nothing changed."""
        effective_upserts = {k: r for k, r in upserts.items() if (cur := self._rows.get(k)) is None or cur[0] != r}
        effective_deletes = {k for k in deletes if k in self._rows and k not in upserts}
        if not effective_upserts and not effective_deletes:
            return False
        self._prepare_write()
        revision = self._revision + 1
        removed = [(key, self._rows.pop(key)[0]) for key in effective_deletes]
        for key, row in effective_upserts.items():
            current = self._rows.get(key)
            if current is not None:
                removed.append((key, current[0]))
            self._rows[key] = (row, revision)
        self._reindex(removed, effective_upserts.items())
        self._log.add(revision, frozenset(effective_upserts.keys() | effective_deletes))
        self._revision = revision
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True


class WriteTxn(Generic[Row]):
    """Changes to one table, committed together as one revision (see :meth:`Writer.txn`)."""

    def __init__(self, table: Table[Row]) -> None:
        self._table = table
        self._upserts: dict[Key, Row] = {}
        self._deletes: set[Key] = set()

    def upsert(self, row: Row) -> None:
        key = self._table.primary_key(row)
        self._deletes.discard(key)
        self._upserts[key] = row

    def delete(self, key: Key) -> None:
        self._upserts.pop(key, None)
        self._deletes.add(key)

    def replace_all(self, rows: Iterable[Row]) -> None:
        """Make the table hold exactly ``rows`` (rows equal to the current ones keep their revision)."""
        self._upserts = {self._table.primary_key(row): row for row in rows}
        self._deletes = {key for key in self._table.snapshot().primary_keys() if key not in self._upserts}


class Writer(Generic[Row]):
    """The right to write one table."""

    def __init__(self, table: Table[Row]) -> None:
        self.table = table

    @contextlib.contextmanager
    def txn(self) -> Iterator[WriteTxn[Row]]:
        """Collect changes; they are committed together when the block ends without an exception."""
        txn = WriteTxn(self.table)
        yield txn
        self.table._commit(txn._upserts, txn._deletes)

    def upsert(self, *rows: Row) -> None:
        with self.txn() as txn:
            for row in rows:
                txn.upsert(row)

    def delete(self, *keys: Key) -> None:
        with self.txn() as txn:
            for key in keys:
                txn.delete(key)

    def replace_all(self, rows: Iterable[Row]) -> None:
        with self.txn() as txn:
            txn.replace_all(rows)


class StateDB:
    """The agent's tables by name (for inspection: ``membrane status --verbose``)."""

    def __init__(self) -> None:
        self._tables: dict[str, Table[Any]] = {}

    def table(self, name: str, primary: Callable[[Row], Key], indexes: Mapping[str, IndexFn] | None = None,
              *, initialized: bool = True) -> Table[Row]:
        if name in self._tables:
            raise TableError(f"table {name} exists already")
        table: Table[Row] = Table(name, primary, indexes, initialized=initialized)
        self._tables[name] = table
        return table

    @property
    def tables(self) -> Mapping[str, Table[Any]]:
        return MappingProxyType(self._tables)

    def status(self) -> list[dict[str, Any]]:
        return [{"table": t.name, "revision": t.revision, "rows": len(t.snapshot()), "writer": t.writer_name or ""}
                for t in self._tables.values()]


async def wait_any(events: Iterable[asyncio.Event], timeout: float | None = None) -> bool:
    """Wait until one of ``events`` is set (True) or ``timeout`` seconds pass (False)."""
    pending = list(events)
    if any(event.is_set() for event in pending):
        return True
    if not pending:
        if timeout is not None:
            await asyncio.sleep(timeout)
        return False
    waiters = [asyncio.ensure_future(event.wait()) for event in pending]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
