"""Cluster-wide tasks, run by exactly one agent at a time: the holder of the ``operator`` role.

The role is a store key bound to the holder's heartbeat lease, created only if absent; when the
holder dies its lease expires, the key goes with it, and the next agent to look takes the role —
so the role moves within one lease TTL.

Tasks: place pods that name no node (fewest pods first), and collect identities no endpoint uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from membrane.agent.intent import Intent
from membrane.core.errors import CompareFailed
from membrane.identity.allocator import IdentityAllocator
from membrane.store import keys
from membrane.store.base import Compare, Put, Store

log = logging.getLogger(__name__)

OPERATOR_ROLE = "operator"


def choose_node(ready_nodes: list[str], pods_per_node: dict[str, int]) -> str | None:
    """Spread pods: the ready node with the fewest pods, ties broken by name."""
    if not ready_nodes:
        return None
    return min(sorted(ready_nodes), key=lambda n: pods_per_node.get(n, 0))


class Operator:
    def __init__(
        self,
        store: Store,
        node_name: str,
        lease: Callable[[], int],
        intent: Intent,
        identities: IdentityAllocator,
        gc_interval: float = 60.0,
    ) -> None:
        self._store = store
        self._node = node_name
        self._lease = lease
        self._intent = intent
        self._identities = identities
        self._gc_interval = gc_interval
        self._last_gc = time.monotonic()
        self.is_leader = False
        self.wake = asyncio.Event()

    async def try_acquire(self) -> bool:
        key = keys.role_key(OPERATOR_ROLE)
        lease = self._lease()
        if not lease:
            self.is_leader = False
            return False
        await self._store.txn([Compare(key, 0)], [Put(key, self._node.encode(), lease=lease)])
        kv = await self._store.get(key)
        leader = kv is not None and kv.value.decode() == self._node and kv.lease == lease
        if leader != self.is_leader:
            log.info("operator role %s", "acquired" if leader else "held elsewhere")
        self.is_leader = leader
        return leader

    async def run(self) -> None:
        while True:
            if await self.try_acquire():
                await self.schedule_pending_pods()
                if time.monotonic() - self._last_gc > self._gc_interval:
                    self._last_gc = time.monotonic()
                    removed = await self._identities.collect_unreferenced()
                    if removed:
                        log.info("collected unused identities %s", removed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            self.wake.clear()

    async def ready_nodes(self) -> list[str]:
        kvs, _ = await self._store.list(keys.HEARTBEATS)
        return [kv.key.removeprefix(keys.HEARTBEATS) for kv in kvs]

    async def schedule_pending_pods(self) -> None:
        pending = [pod for pod in self._intent.pods.values() if not (pod.get("spec") or {}).get("nodeName")]
        if not pending:
            return
        nodes = await self.ready_nodes()
        counts: dict[str, int] = {}
        for pod in self._intent.pods.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                counts[node] = counts.get(node, 0) + 1
        for pod in pending:
            node = choose_node(nodes, counts)
            if node is None:
                return
            if await self._bind(pod, node):
                counts[node] = counts.get(node, 0) + 1

    async def _bind(self, pod: dict[str, Any], node: str) -> bool:
        meta = pod["metadata"]
        key = keys.object_key("pods", meta.get("namespace", "default"), meta["name"])
        kv = await self._store.get(key)
        if kv is None:
            return False
        obj = json.loads(kv.value)
        if (obj.get("spec") or {}).get("nodeName"):
            return False
        obj.setdefault("spec", {})["nodeName"] = node
        try:
            await self._store.put(key, json.dumps(obj).encode(), expect_mod_revision=kv.mod_revision)
        except CompareFailed:
            return False
        log.info("placed pod %s/%s on %s", meta.get("namespace", "default"), meta["name"], node)
        return True
