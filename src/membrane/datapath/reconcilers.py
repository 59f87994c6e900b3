"""Reconcilers: the only datapath code that decides *when* to touch the kernel.

Primitives: :class:`NftReconciler` (desired ruleset → the owned nft table), :class:`Backoff`,
:class:`SyncResult`, and :func:`prune_endpoints` (remove endpoint veths of containers the agent no
longer knows, after a crash or restart).

NftReconciler keeps the ruleset it last applied as its cache. The first sync and any sync after an
error replace the whole table in one transaction; otherwise only what differs is sent, chain by
chain and element by element (:func:`~membrane.datapath.nft.transaction.plan_sync`). A failed
incremental sync means the cache no longer matches the kernel (someone edited the table), so the
reconciler drops the cache and replaces the table straight away; a failed full sync is retried with
exponential backoff.

:meth:`NftReconciler.repair` does not trust the cache: it reads the table back and sends what
turns the kernel's table into the desired one, again chain by chain. Rules read back are in nft's
normal form, not the rendered text, so a chain's rules are compared with the fingerprints the
reconciler saw in that chain at an earlier read-back (rules as nft lists them, see
:mod:`membrane.datapath.nft.runner`); a chain written since the last read-back has no fingerprints
yet and is compared by its number of rules, then its fingerprints are learned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from membrane.core.errors import DatapathError
from membrane.datapath.nft.objects import Key, Map, Ruleset, Set, TableContents, canonical_key
from membrane.datapath.nft.runner import NftRunner
from membrane.datapath.nft.transaction import (
    ChainState,
    SetState,
    TableState,
    Transaction,
    full_sync,
    plan_changes,
    plan_sync,
)
from membrane.datapath.ruleset import TABLE_FAMILY, TABLE_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: initial, initial*factor, … capped at maximum; ``attempts`` in all."""

    initial: float = 0.05
    factor: float = 2.0
    maximum: float = 2.0
    attempts: int = 5

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial < 0 or self.factor < 1 or self.maximum < self.initial:
            raise ValueError(f"invalid backoff {self}")

    def delay(self, failures: int) -> float:
        """The pause after the ``failures``-th failure (1-based)."""
        return float(min(self.maximum, self.initial * self.factor ** (failures - 1)))


@dataclass(frozen=True)
class SyncResult:
    """What a sync or repair sent. ``kind``: "full" (the table was replaced), "chains" (chains, rules
    or set declarations changed in place, maybe elements too), "partial" (elements only),
    "unchanged" (nothing sent). ``changed``: chains and sets whose rules or declaration were touched."""

    kind: Literal["full", "chains", "partial", "unchanged"]
    added: int = 0
    deleted: int = 0
    attempts: int = 0  # transactions sent, including failed ones
    changed: tuple[str, ...] = ()


def _keys(data: Set | Map) -> Iterable[Key]:
    return data.elements if isinstance(data, Set) else (k for k, _ in data.elements)


def _kind(tx: Transaction) -> Literal["full", "chains", "partial"]:
    if tx.full:
        return "full"
    return "chains" if tx.structural else "partial"


class NftReconciler:
    """Brings the owned table to a desired :class:`Ruleset`; refuses rulesets for any other table."""

    def __init__(
        self,
        runner: NftRunner,
        *,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._runner = runner
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._applied: Ruleset | None = None
        # Per chain: its rules as the kernel listed them while they matched ``_applied``.
        self._fingerprints: dict[str, tuple[str, ...]] = {}
        self._lock = asyncio.Lock()

    @property
    def applied(self) -> Ruleset | None:
        """The ruleset the kernel holds as far as this reconciler knows (None: unknown)."""
        return self._applied

    def invalidate(self) -> None:
        """Forget the cache: the next sync replaces the whole table."""
        self._applied = None
        self._fingerprints.clear()

    @staticmethod
    def _check_owned(desired: Ruleset) -> None:
        if (desired.family, desired.table) != (TABLE_FAMILY, TABLE_NAME):
            raise ValueError(f"refusing to program table {desired.family} {desired.table}: not owned")

    async def sync(self, desired: Ruleset) -> SyncResult:
        """Send what differs between the cache and ``desired`` (the whole table if the cache is empty)."""
        self._check_owned(desired)
        async with self._lock:
            return await self._converge(desired, plan_sync(self._applied, desired))

    async def repair(self, desired: Ruleset) -> SyncResult:
        """Read the table back and send the smallest transaction that makes it ``desired``.

        Repairs what someone else changed: deleted or added elements come back or go, a deleted,
        flushed or edited chain is re-created or refilled, a foreign chain, set or rule in the table
        goes, a deleted set comes back with its elements. Only a missing table (or nothing known, e.g.
        before the first sync) means a full replace. The cache is updated afterwards, so ``sync``
        goes on from the repaired state. Raises DatapathError when the table cannot be read or the
        repair fails after the backoff's attempts.
        """
        self._check_owned(desired)
        async with self._lock:
            current = await self._runner.read_table(TABLE_FAMILY, TABLE_NAME)
            tx, intact = self._plan_repair(current, desired)
            result = await self._converge(desired, tx)
            if current is not None and result.kind != "full":
                touched = set(result.changed)
                for name in intact - touched:
                    self._fingerprints[name] = current.rules.get(name, ())
            return result

    async def drifted(self) -> bool:
        """True when the kernel's table differs from what was last applied (or nothing was)."""
        if self._applied is None:
            return True
        current = await self._runner.read_table(TABLE_FAMILY, TABLE_NAME)
        tx, _ = self._plan_repair(current, self._applied)
        return tx is not None

    def _rules_intact(self, name: str, current: TableContents, desired: Ruleset) -> bool:
        """Whether the kernel's chain ``name`` still holds exactly the desired chain's rules."""
        if self._applied is None or name not in current.chains:
            return False
        try:
            wanted, applied = desired.get_chain(name), self._applied.get_chain(name)
        except KeyError:
            return False
        if wanted.rules != applied.rules:
            return False
        found = current.rules.get(name, ())
        known = self._fingerprints.get(name)
        # Without fingerprints (the chain was written since the last read-back) only the count
        # can be checked; the fingerprints learned now catch any later edit.
        return found == known if known is not None else len(found) == len(wanted.rules)

    def _plan_repair(self, current: TableContents | None, desired: Ruleset) -> tuple[Transaction | None, set[str]]:
        """The repair transaction and the chains found intact (their fingerprints can be learned)."""
        if current is None or self._applied is None or self._applied.comment != desired.comment:
            return full_sync(desired), set()
        if any(name not in current.declarations for name in (*current.sets, *current.maps)):
            return full_sync(desired), set()  # a runner that does not report declarations
        intact = {name for name in current.chains if self._rules_intact(name, current, desired)}
        chains = {name: ChainState(current.bases.get(name), name in intact) for name in current.chains}
        # Keys read back are canonical; desired keys may spell a value as a one-value range on
        # purpose (nft 1.0.6 can only delete such elements of concatenated interval maps when
        # they are spelt that way), so each key read back takes the desired spelling.
        spelling = {d.name: {canonical_key(k): k for k in _keys(d)} for d in desired.data()}
        sets: dict[str, SetState] = {}
        for name, keys in current.sets.items():
            spelt = spelling.get(name, {})
            sets[name] = SetState(current.declarations[name], {spelt.get(k, k): None for k in keys})
        for name, mapping in current.maps.items():
            spelt = spelling.get(name, {})
            sets[name] = SetState(current.declarations[name], {spelt.get(k, k): v for k, v in mapping.items()})
        return plan_changes(TableState(chains, sets), desired), intact

    async def _converge(self, desired: Ruleset, first: Transaction | None) -> SyncResult:
        sent = 0
        full_failures = 0
        tx = first
        while True:
            if tx is None:
                self._applied = desired
                return SyncResult("unchanged", attempts=sent)
            sent += 1
            try:
                await self._runner.apply(tx)
            except DatapathError as exc:
                self.invalidate()
                if not tx.full:
                    log.warning("nft incremental sync failed, replacing the table: %s", exc)
                    tx = full_sync(desired)
                    continue
                full_failures += 1
                if full_failures >= self._backoff.attempts:
                    raise DatapathError(f"nft sync failed after {full_failures} attempts: {exc}") from None
                delay = self._backoff.delay(full_failures)
                log.warning("nft full sync failed (attempt %d), retrying in %.2fs: %s", full_failures, delay, exc)
                await self._sleep(delay)
                continue
            self._applied = desired
            if tx.full:
                self._fingerprints.clear()
            else:
                for name in tx.changed:
                    self._fingerprints.pop(name, None)
            return SyncResult(_kind(tx), tx.added, tx.deleted, sent, tx.changed)
