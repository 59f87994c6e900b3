"""Cluster-wide tasks, run by exactly one agent at a time: the holder of the ``operator`` role.

The role is a store key bound to the holder's heartbeat lease, created only if absent; when the
holder dies its lease expires, the key goes with it, and the next agent to look takes the role —
so the role moves within one lease TTL.

Tasks: give every node a pod CIDR, place pods that name no node (fewest pods first), forget
nodes that were removed (their CIDR claim, endpoints and addresses), and collect identities no
endpoint uses.

LB-IPAM (:class:`~membrane.agent.lbipam.LoadBalancerIPAM`) runs here too: LoadBalancer Services
get their IPs from the pools, at most a second after a pool or Service changed.

It also plays Kubernetes' EndpointSlice controller: every Service with a selector gets the
EndpointSlices :func:`membrane.loadbalancer.endpointslices.derive_endpoint_slices` derives from
the pods and their endpoint records (an address when the pod's endpoint is ``ready``), written
only when they differ from the stored ones and removed when no longer derived. Slices it did not
write (another ``endpointslice.kubernetes.io/managed-by``, or none: a user's slices for a
selectorless Service) are never touched. Services, slices, pods and endpoints come from the
intent tables. A
terminating pod stays in its slices (``terminating: true``) until its node removes it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from membrane.agent.intent import IntentTables, ready_addresses
from membrane.agent.lbipam import LoadBalancerIPAM
from membrane.api import k8s
from membrane.api.meta import ApiObject
from membrane.api.podrow import PodRow
from membrane.core.config import ClusterConfig
from membrane.core.errors import CompareFailed, MembraneError
from membrane.core.statedb import Snapshot, wait_any
from membrane.loadbalancer.endpointslices import derive_endpoint_slices
from membrane.store import keys
from membrane.store.base import Compare, Delete, Put, Store
from membrane.store.identities import IdentityAllocator
from membrane.store.ipam import claim_node_cidr, node_cidrs
from membrane.store.objects import ObjectClient

log = logging.getLogger(__name__)

OPERATOR_ROLE = "operator"
#: How long the operator lets changes gather before its next pass.
PASS_DEBOUNCE = 0.05
#: How long a holder trusts that it still holds the role (the loop's own period).
ROLE_CHECK_INTERVAL = 1.0
#: LB-IPAM's pools are not an intent table: it looks at the store at least this often.
LBIPAM_INTERVAL = 1.0
#: Every task runs at least this often, whether or not its inputs changed.
FULL_PASS_INTERVAL = 30.0


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
        intent: IntentTables,
        identities: IdentityAllocator,
        cluster: ClusterConfig,
        gc_interval: float = 60.0,
    ) -> None:
        self._cluster = cluster
        self._store = store
        self._node = node_name
        self._lease = lease
        self._intent = intent
        self._identities = identities
        self._gc_interval = gc_interval
        self._last_gc = time.monotonic()
        self._last_full = 0.0
        self._role_checked = 0.0
        self._lbipam_ran = 0.0
        self.is_leader = False
        self.lbipam = LoadBalancerIPAM(ObjectClient(store))

    async def try_acquire(self) -> bool:
        """Hold or take the role (asks the store)."""
        self._role_checked = time.monotonic()
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
        """Work when the nodes or pods change, or once a second (to notice the role moving).

        Each task is sized by what changed, never by the cluster: nodes and pods come from the
        intent tables, and only identity collection lists the store, once per ``gc_interval``.
        """
        seen: dict[str, int] = {}
        while True:
            intent = self._intent
            snapshots: dict[str, Snapshot[Any]] = {
                "nodes": intent.nodes.snapshot(), "pods": intent.pods.snapshot(),
                "endpoints": intent.endpoints.snapshot(), "services": intent.services.snapshot(),
                "endpointslices": intent.endpointslices.snapshot()}
            changed = {name for name, snap in snapshots.items() if seen.get(name) != snap.revision}
            seen = {name: snap.revision for name, snap in snapshots.items()}
            was_leader = self.is_leader
            # A holder asks the store again only once per ROLE_CHECK_INTERVAL: passes triggered by
            # changes (every endpoint change on a busy node) cost no store round trip.
            recent = was_leader and time.monotonic() - self._role_checked < ROLE_CHECK_INTERVAL
            if recent or await self.try_acquire():
                # A new holder knows nothing of what the last one did: everything, once; and
                # everything every FULL_PASS_INTERVAL, which retries what failed.
                full = not was_leader or time.monotonic() - self._last_full > FULL_PASS_INTERVAL
                if full:
                    self._last_full = time.monotonic()
                await self._pass(None if full else changed)
            await wait_any([snap.changed for snap in snapshots.values()], timeout=1.0)
            # A burst of changes (a rollout, a node joining) makes one pass, and the node's own
            # hot paths (CNI, routes) are not queued behind cluster-wide work.
            await asyncio.sleep(PASS_DEBOUNCE)

    async def _pass(self, changed: set[str] | None) -> None:
        """The tasks whose inputs changed (``None``: every task). LB-IPAM also runs once a second:
        its pools are not in the intent tables (it skips itself while the store did not change)."""
        periodic = changed is None
        changed = changed or set()
        if periodic or "nodes" in changed:
            await self.allocate_node_cidrs()
            await self.forget_removed_nodes()
            await self.remove_pods_of_removed_nodes()
        if periodic or changed & {"nodes", "pods"}:
            await self.schedule_pending_pods()
        if periodic or "services" in changed or time.monotonic() - self._lbipam_ran >= LBIPAM_INTERVAL:
            self._lbipam_ran = time.monotonic()
            await self.assign_load_balancer_ips()
        if periodic or changed & {"pods", "endpoints", "services", "endpointslices"}:
            try:
                await self.publish_endpoint_slices()
            except MembraneError as exc:
                log.warning("cannot publish endpoint slices: %s", exc)
        if time.monotonic() - self._last_gc > self._gc_interval:
            self._last_gc = time.monotonic()
            removed = await self._identities.collect_unreferenced()
            if removed:
                log.info("collected unused identities %s", removed)

    async def allocate_node_cidrs(self) -> None:
        """Every node object without a pod CIDR gets one (claimed by compare-and-swap)."""
        for node in self._intent.nodes.snapshot():
            name = node.name
            if node.spec.ipam is not None and node.spec.ipam.podCIDRs:
                continue
            try:
                cidr = await claim_node_cidr(self._store, name, self._cluster)
            except MembraneError as exc:
                log.error("cannot give node %s a pod CIDR: %s", name, exc)
                continue
            key = keys.object_key("ciliumnodes", None, name)
            kv = await self._store.get(key)
            if kv is None:
                continue
            current = json.loads(kv.value)
            current.setdefault("spec", {}).setdefault("ipam", {})["podCIDRs"] = [str(cidr)]
            written = await self._store.txn([Compare(key, kv.mod_revision)], [Put(key, json.dumps(current).encode())])
            if written.succeeded:
                log.info("node %s: pod CIDR %s", name, cidr)

    async def forget_removed_nodes(self) -> None:
        """A node whose object was deleted loses its endpoint records, their addresses, then its CIDR.

        The CIDR claim goes last: while it exists it marks the node as still to be cleaned up,
        so a crash half-way is finished by the next holder of the role.
        """
        claims = await node_cidrs(self._store)
        for cidr, owner in claims.items():
            if owner in self._intent.nodes.snapshot():
                continue
            endpoints, _ = await self._store.list(keys.endpoints_prefix(owner))
            for kv in endpoints:
                ops: list[Put | Delete] = [Delete(kv.key)]
                compares = [Compare(kv.key, kv.mod_revision)]
                try:
                    ip_key = keys.pod_ip_key(ipaddress.IPv4Address(json.loads(kv.value)["ipv4"]))
                except (ValueError, KeyError, TypeError):
                    ip_key = ""
                ip_kv = await self._store.get(ip_key) if ip_key else None
                if ip_kv is not None and ip_kv.value.decode() == kv.key:
                    ops.append(Delete(ip_kv.key))
                    compares.append(Compare(ip_kv.key, ip_kv.mod_revision))
                await self._store.txn(compares, ops)
            log.info("node %s was removed: released %d endpoints and %s", owner, len(endpoints), cidr)
            await self._store.delete(keys.pod_cidr_key(cidr))

    async def assign_load_balancer_ips(self) -> None:
        """LB-IPAM: one pass (it returns at once while no pool exists or nothing changed)."""
        try:
            await self.lbipam.sync()
        except MembraneError as exc:
            log.error("LB-IPAM: %s", exc)

    async def ready_nodes(self) -> list[str]:
        kvs, _ = await self._store.list(keys.HEARTBEATS)
        return [kv.key.removeprefix(keys.HEARTBEATS) for kv in kvs]

    async def schedule_pending_pods(self) -> None:
        pods = self._intent.pods.snapshot()
        pending = pods.by("node", "")
        if not pending:
            return
        nodes = await self.ready_nodes()
        counts: dict[str, int] = {}
        for pod in pods:
            if pod.node:
                counts[pod.node] = counts.get(pod.node, 0) + 1
        for pod in pending:
            node = choose_node(nodes, counts)
            if node is None:
                return
            if await self._bind(pod, node):
                counts[node] = counts.get(node, 0) + 1

    async def _bind(self, pod: PodRow, node: str) -> bool:
        namespace, name = pod.namespace, pod.name
        key = keys.object_key("pods", namespace, name)
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
        log.info("placed pod %s/%s on %s", namespace, name, node)
        return True

    async def remove_pods_of_removed_nodes(self) -> None:
        """A terminating pod whose node is gone has nobody left to stop it: its object goes
        (Kubernetes' pod garbage collector does the same)."""
        nodes = self._intent.nodes.snapshot()
        client = ObjectClient(self._store)
        for pod in self._intent.pods.snapshot():
            node = pod.node
            if not (pod.terminating and node and node not in nodes):
                continue
            if await client.finish_deletion("Pod", pod.namespace, pod.name, pod.uid):
                log.info("removed terminating pod %s/%s of removed node %s", pod.namespace, pod.name, node)

    async def publish_endpoint_slices(self) -> tuple[int, int]:
        """Write the derived EndpointSlices that changed and delete the ones no longer derived.
        Returns (written, deleted); a pass over an unchanged cluster writes nothing."""
        addresses = ready_addresses(self._intent)
        pods = list(self._intent.pods.snapshot())

        def ready(pod: PodRow) -> str | None:
            return addresses.get((pod.namespace, pod.name))

        desired: dict[tuple[str, str], k8s.EndpointSlice] = {}
        for service in self._intent.services.snapshot():
            for eps in derive_endpoint_slices(service, pods, ready):
                desired[(eps.namespace or "default", eps.name)] = eps
        stored: dict[tuple[str, str], ApiObject] = {
            (obj.namespace or "default", obj.name): obj for obj in self._intent.endpointslices.snapshot()}
        changed: list[ApiObject] = []
        for key, eps in desired.items():
            current = stored.get(key)
            if current is not None and not _managed(current):
                log.warning("endpoint slice %s/%s is not managed by the operator; not replacing it", *key)
                continue
            if current is None or _slice_content(current) != _slice_content(eps):
                changed.append(eps)
        stale = [obj for key, obj in stored.items() if key not in desired and _managed(obj)]
        client = ObjectClient(self._store)
        if changed:
            await client.apply(changed)
        if stale:
            await client.delete_objects(stale)
        return len(changed), len(stale)


def _managed(obj: ApiObject) -> bool:
    """A slice this operator wrote: the controller's manager label and a service name."""
    return (obj.labels.get(k8s.MANAGED_BY_LABEL) == k8s.ENDPOINTSLICE_CONTROLLER
            and k8s.SERVICE_NAME_LABEL in obj.labels)


def _slice_content(obj: ApiObject) -> tuple[object, ...]:
    return obj.labels, obj.metadata.ownerReferences, obj.body()
