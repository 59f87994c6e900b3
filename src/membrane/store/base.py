"""The store protocol: revisioned keys, transactions, watch, leases.

The shape follows etcd's v3 API so that the embedded SQLite backend and the etcd backend are
interchangeable, and so that every agent can agree on allocations by compare-and-swap:

- every write bumps one cluster-wide ``revision``; a key remembers the revision that created it
  (``create_revision``) and the one that last changed it (``mod_revision``);
- a transaction applies all of its operations atomically if all of its compares hold;
- ``watch(prefix, start_revision)`` yields every change with ``revision >= start_revision`` in order,
  so ``list`` followed by ``watch(prefix, revision + 1)`` misses nothing;
- a lease expires ``ttl`` seconds after its last keep-alive and deletes the keys attached to it.

Primitives: :class:`KeyValue`, :class:`WatchEvent`, :class:`Compare`, :class:`Put`,
:class:`Delete`, :class:`TxnResult` and the :class:`Store` protocol.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from membrane.core.errors import StoreError


class Compacted(StoreError):
    """A watch asked for revisions the store no longer keeps; list again and re-watch."""


class LeaseNotFound(StoreError):
    """The lease expired or was revoked."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int = 1
    lease: int = 0


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change. For DELETE, ``kv.value`` is empty and ``kv.mod_revision`` is the deletion's revision."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class Compare:
    """Holds when ``key``'s mod_revision equals ``mod_revision``; 0 means "the key does not exist"."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


class Store(Protocol):
    """A revisioned key-value store. All methods may raise :class:`StoreError`."""

    url: str

    async def get(self, key: str) -> KeyValue | None: ...

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, sorted by key, and the store revision of that snapshot."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None) -> int:
        """Write ``key``; with ``expect_mod_revision`` raise CompareFailed unless it holds. Returns the revision."""
        ...

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        """Delete ``key``; False if it did not exist. CompareFailed if ``expect_mod_revision`` does not hold."""
        ...

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        """Apply ``ops`` atomically if every compare holds; otherwise apply nothing."""
        ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Yield every change under ``prefix`` with revision >= ``start_revision``, in order, forever."""
        ...

    async def revision(self) -> int: ...

    async def grant_lease(self, ttl: float) -> int: ...

    async def keepalive(self, lease: int) -> None:
        """Extend the lease by its ttl; LeaseNotFound if it has already expired."""
        ...

    async def revoke_lease(self, lease: int) -> None: ...

    async def close(self) -> None: ...
