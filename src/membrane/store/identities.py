"""Cluster-wide identity allocation by compare-and-swap in the store.

An identity is two keys written in one transaction: ``id/<n>`` (the canonical labels) and
``labels/<sha256>`` (the number). Creating both with "must not exist" compares makes the
allocation race-free across agents: the loser re-reads and finds the winner's number.

Garbage collection is reference-based: endpoints reference identities. Every endpoint write
rewrites the identity's ``id/<n>`` key in the same transaction (see :func:`touch_ops`), so a
collector that saw the identity unreferenced deletes it only if ``id/<n>`` is unchanged since —
a concurrent new reference makes the collector's compare fail instead of leaving a dangling id.

The pure parts (labels and their canonical form, the reserved ids and the cluster range) are
:mod:`membrane.identity`'s; this module is where they meet the store.

Primitives: :class:`IdentityAllocator`, :class:`AllocatedIdentity`, :func:`decode_identity`,
:class:`IdentitySpaceExhausted`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from membrane.core.errors import MembraneError
from membrane.identity.labels import Label, canonical, parse_labels
from membrane.identity.reserved import MIN_CLUSTER_IDENTITY, next_free_identity
from membrane.store import keys
from membrane.store.base import Compare, Delete, KeyValue, Put, Store


class IdentitySpaceExhausted(MembraneError):
    """No free cluster identity is left (65,280 label sets are in use)."""


@dataclass(frozen=True, slots=True)
class AllocatedIdentity:
    id: int
    labels: frozenset[Label]
    mod_revision: int  # of the id/<n> key, for compares in the caller's transaction

    def touch_ops(self) -> tuple[Compare, Put]:
        """Compare + rewrite of the id key: include both in any transaction that adds a reference."""
        key = keys.identity_id_key(self.id)
        return Compare(key, self.mod_revision), Put(key, _encode(self.labels))


def _encode(labels: Iterable[Label]) -> bytes:
    return json.dumps(canonical(labels)).encode()


def decode_identity(kv: KeyValue) -> tuple[int, frozenset[Label]]:
    identity = int(kv.key.rsplit("/", 1)[1])
    return identity, parse_labels(json.loads(kv.value))


class IdentityAllocator:
    """Finds or creates the identity of a label set. Safe to use from every agent at once."""

    def __init__(self, store: Store, max_attempts: int = 16) -> None:
        self._store = store
        self._max_attempts = max_attempts

    async def lookup(self, labels: frozenset[Label]) -> AllocatedIdentity | None:
        by_labels = await self._store.get(keys.identity_labels_key(canonical(labels)))
        if by_labels is None:
            return None
        identity = int(by_labels.value)
        id_kv = await self._store.get(keys.identity_id_key(identity))
        if id_kv is None:
            return None  # half-collected; allocate() repairs
        return AllocatedIdentity(identity, labels, id_kv.mod_revision)

    async def allocate(self, labels: frozenset[Label]) -> AllocatedIdentity:
        canon = canonical(labels)
        labels_key = keys.identity_labels_key(canon)
        for _ in range(self._max_attempts):
            found = await self.lookup(labels)
            if found is not None:
                return found
            existing, _rev = await self._store.list(keys.IDENTITY_BY_ID)
            used = {int(kv.key.rsplit("/", 1)[1]) for kv in existing}
            stale = await self._store.get(labels_key)
            candidate = next_free_identity(used, max(used, default=MIN_CLUSTER_IDENTITY - 1))
            if candidate is None:
                raise IdentitySpaceExhausted("no free security identity is left in 256-65535")
            id_key = keys.identity_id_key(candidate)
            result = await self._store.txn(
                [Compare(id_key, 0), Compare(labels_key, stale.mod_revision if stale else 0)],
                [Put(id_key, _encode(labels)), Put(labels_key, str(candidate).encode())],
            )
            if result.succeeded:
                return AllocatedIdentity(candidate, labels, result.revision)
        raise MembraneError(f"identity allocation for {canon} kept conflicting; try again")

    async def collect_unreferenced(self) -> list[int]:
        """List identities, then endpoints; delete each identity no endpoint references, by CAS."""
        identities, _ = await self._store.list(keys.IDENTITY_BY_ID)
        endpoints, _ = await self._store.list(keys.ENDPOINTS)
        referenced = set()
        for kv in endpoints:
            try:
                referenced.add(int(json.loads(kv.value).get("identity", 0)))
            except (ValueError, AttributeError):
                continue
        removed = []
        for kv in identities:
            identity, labels = decode_identity(kv)
            if identity in referenced:
                continue
            labels_key = keys.identity_labels_key(canonical(labels))
            labels_kv = await self._store.get(labels_key)
            ops: list[Put | Delete] = [Delete(kv.key)]
            compares = [Compare(kv.key, kv.mod_revision)]
            if labels_kv is not None and labels_kv.value == str(identity).encode():
                ops.append(Delete(labels_key))
                compares.append(Compare(labels_key, labels_kv.mod_revision))
            if (await self._store.txn(compares, ops)).succeeded:
                removed.append(identity)
        return removed
