"""Reconcilers: the only datapath code that decides *when* to touch the kernel.

Primitives: :class:`NftReconciler` (desired ruleset → the owned nft table), :class:`Backoff`,
:class:`SyncResult`, and :func:`prune_endpoints` (remove endpoint veths of containers the agent no
longer knows, after a crash or restart).

NftReconciler keeps the ruleset it last applied as its element cache. The first sync, any sync
after an error, and any sync whose chains or set declarations differ replace the whole table in one
transaction; otherwise only the element difference is sent. A failed element sync means the cache
no longer matches the kernel (someone edited the table), so the reconciler drops the cache and
replaces the table straight away; a failed full sync is retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from membrane.core.errors import DatapathError
from membrane.datapath.netlink.model import endpoint_ifname
from membrane.datapath.netlink.protocol import Netlink
from membrane.datapath.nft.objects import Ruleset
from membrane.datapath.nft.runner import NftRunner
from membrane.datapath.nft.transaction import plan_sync
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
    kind: Literal["full", "partial", "unchanged"]
    added: int = 0
    deleted: int = 0
    attempts: int = 0  # transactions sent, including failed ones


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
        self._lock = asyncio.Lock()

    @property
    def applied(self) -> Ruleset | None:
        """The ruleset the kernel holds as far as this reconciler knows (None: unknown)."""
        return self._applied

    def invalidate(self) -> None:
        """Forget the element cache: the next sync replaces the whole table."""
        self._applied = None

    async def sync(self, desired: Ruleset) -> SyncResult:
        if (desired.family, desired.table) != (TABLE_FAMILY, TABLE_NAME):
            raise ValueError(f"refusing to program table {desired.family} {desired.table}: not owned")
        async with self._lock:
            sent = 0
            full_failures = 0
            while True:
                tx = plan_sync(self._applied, desired)
                if tx is None:
                    return SyncResult("unchanged", attempts=sent)
                sent += 1
                try:
                    await self._runner.apply(tx)
                except DatapathError as exc:
                    self._applied = None
                    if not tx.full:
                        log.warning("nft element sync failed, replacing the table: %s", exc)
                        continue
                    full_failures += 1
                    if full_failures >= self._backoff.attempts:
                        raise DatapathError(f"nft sync failed after {full_failures} attempts: {exc}") from None
                    delay = self._backoff.delay(full_failures)
                    log.warning("nft full sync failed (attempt %d), retrying in %.2fs: %s", full_failures, delay, exc)
                    await self._sleep(delay)
                    continue
                self._applied = desired
                return SyncResult("full" if tx.full else "partial", tx.added, tx.deleted, sent)

    async def drifted(self) -> bool:
        """True when the kernel's table differs from what was last applied (or nothing was)."""
        if self._applied is None:
            return True
        current = await self._runner.read_table(TABLE_FAMILY, TABLE_NAME)
        return current != self._applied.contents()


async def prune_endpoints(netlink: Netlink, container_ids: Iterable[str]) -> tuple[str, ...]:
    """Delete endpoint veths (and with them their routes) of containers not in ``container_ids``.

    Call only once the agent knows every endpoint of this node (after its initial sync from the
    store): a container missing from the list loses its networking. Returns the names removed.
    """
    keep = {endpoint_ifname(container_id) for container_id in container_ids}
    removed = await netlink.prune(keep)
    if removed:
        log.info("pruned %d orphaned endpoint veth(s): %s", len(removed), ", ".join(removed))
    return removed
