"""The endpoints module: CNI ADD/DEL/CHECK for this node, and endpoint restoration after a restart.

    ADD:  identity (store CAS) -> address + record "creating" (one store txn)
          -> desired wiring row -> wiring reconciler attaches the veth (wait until done)
          -> record "ready" (store, then the local_endpoints table)
          -> wait until the nft reconciler holds the anti-spoofing entry -> CNI result
    DEL:  record "disconnecting" -> wiring row deleted -> reconciler detaches (wait)
          -> local_endpoints updated, nft programmed -> record + address released (one store txn)

The order is what makes crashes harmless: the store names a container before the kernel holds
anything for it and forgets it only once the kernel is clean, so :meth:`restore` can finish or
undo whatever a killed agent left half-done. The manager writes two tables: ``endpoint_wiring``
(what the kernel must hold, realized by the wiring reconciler through the netlink boundary, which
also repairs drift and prunes veths no row names on every full resync) and ``local_endpoints``
(this node's records, read by the policy and datapath modules).

Primitives: :class:`NodeContext`, :class:`EndpointWiringOperations`, :class:`EndpointManager`,
:func:`endpoints_module`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from membrane.agent.contract import (
    CNI_ERR_DATAPATH,
    CNI_ERR_INVALID_ENV,
    CNI_ERR_IPAM_EXHAUSTED,
    CNI_ERR_UNKNOWN_CONTAINER,
    CniFailure,
    CniRequest,
)
from membrane.api.endpoint import EndpointOrigin, EndpointRecord
from membrane.core.errors import DatapathError, MembraneError
from membrane.core.modules import Module
from membrane.core.reconciler import DEFAULT_RESYNC_INTERVAL, ReconcileFailed, Reconciler
from membrane.core.statedb import StateDB, Table
from membrane.datapath.netlink.model import AttachedEndpoint, EndpointSpec, endpoint_ifname
from membrane.datapath.netlink.protocol import Netlink
from membrane.identity.labels import Label, canonical
from membrane.ipam.pool import next_free_pod_ip
from membrane.store import keys
from membrane.store.base import Compare, Delete, Put, Store
from membrane.store.identities import IdentityAllocator

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeContext:
    name: str
    node_ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network
    router_ip: ipaddress.IPv4Address
    mtu: int


@dataclass(frozen=True, slots=True)
class Wired:
    host_ifname: str
    host_ifindex: int
    mac: str


def endpoint_spec(record: EndpointRecord, node: NodeContext) -> EndpointSpec:
    return EndpointSpec(container_id=record.container_id, netns=record.netns, ifname=record.ifname,
                        pod_ip=record.ipv4, router_ip=node.router_ip, mtu=node.mtu)


class EndpointWiringOperations:
    """The ``endpoint_wiring`` table's target: one veth (and /32 route) per row, over netlink.

    ``update`` is the netlink attach, idempotent: a retried or periodic one repairs what drifted.
    ``prune`` (every full resync) repairs the host device and removes endpoint veths no row names
    (their routes go with them). What an attach made is kept in :attr:`attached` for the CNI result.
    """

    def __init__(self, netlink: Netlink, node: NodeContext) -> None:
        self.netlink = netlink
        self.node = node
        self.attached: dict[str, AttachedEndpoint] = {}

    async def ensure_host(self) -> None:
        await self.netlink.ensure_host_device(self.node.router_ip, self.node.mtu)

    async def update(self, spec: EndpointSpec) -> None:
        self.attached[spec.container_id] = await self.netlink.attach_endpoint(spec)

    async def delete(self, spec: EndpointSpec) -> None:
        attached = self.attached.pop(spec.container_id, None)
        await self.netlink.detach_endpoint(spec.container_id, attached.host_ifname if attached else None)

    async def prune(self, specs: Sequence[EndpointSpec]) -> None:
        await self.ensure_host()
        removed = await self.netlink.prune({endpoint_ifname(s.container_id) for s in specs})
        if removed:
            log.info("pruned endpoint veths no endpoint names: %s", ", ".join(removed))


class LabelSource(Protocol):
    def endpoint_labels(self, namespace: str, pod: str) -> frozenset[Label]: ...


#: Waits until the kernel holds a ruleset computed from this revision of ``local_endpoints``.
WaitProgrammed = Callable[[int], Awaitable[None]]


def netns_exists(path: str) -> bool:
    return bool(path) and os.path.exists(path)


class EndpointManager:
    """Implements the agent's EndpointService for this node."""

    def __init__(
        self,
        store: Store,
        node: NodeContext,
        db: StateDB,
        netlink: Netlink,
        identities: IdentityAllocator,
        labels: LabelSource,
        wait_programmed: WaitProgrammed,
        *,
        netns_present: Callable[[str], bool] = netns_exists,
        resync_interval: float = DEFAULT_RESYNC_INTERVAL,
    ) -> None:
        self._netns_present = netns_present
        self._store = store
        self.node = node
        self.wiring = EndpointWiringOperations(netlink, node)
        #: Filled by :meth:`restore` first: until then the reconciler neither attaches nor prunes.
        self.wiring_table: Table[EndpointSpec] = db.table("endpoint_wiring", primary=lambda s: s.container_id,
                                                          initialized=False)
        self._wiring_writer = self.wiring_table.writer("endpoint manager")
        self.reconciler = Reconciler("endpoint-wiring", db, self.wiring_table, self.wiring,
                                     resync_interval=resync_interval)
        self.local: Table[EndpointRecord] = db.table("local_endpoints", primary=lambda r: r.container_id)
        self._local_writer = self.local.writer("endpoint manager")
        self._identities = identities
        self._labels = labels
        self._wait_programmed = wait_programmed
        self._records: dict[str, tuple[EndpointRecord, int]] = {}  # container id -> (record, mod_revision)
        #: container id -> mod_revision of the address key this agent wrote for it (released without a read).
        self._address_revisions: dict[str, int] = {}
        self._alloc_lock = asyncio.Lock()  # this agent is the only writer of its node's addresses
        self._container_locks: dict[str, asyncio.Lock] = {}
        self._last_ip: ipaddress.IPv4Address | None = None

    # -- queries -------------------------------------------------------------------------------

    def records(self) -> list[EndpointRecord]:
        return [rec for rec, _ in self._records.values()]

    def ready_records(self) -> list[EndpointRecord]:
        return [rec for rec, _ in self._records.values() if rec.state == "ready" and rec.host_ifindex]

    def by_pod(self, namespace: str, pod: str) -> EndpointRecord | None:
        for rec, _ in self._records.values():
            if rec.namespace == namespace and rec.pod == pod:
                return rec
        return None

    def get(self, container_id: str) -> EndpointRecord | None:
        entry = self._records.get(container_id)
        return entry[0] if entry else None

    # -- CNI -----------------------------------------------------------------------------------

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._container_locks.setdefault(container_id, asyncio.Lock())

    async def cni_add(self, request: CniRequest) -> dict[str, Any]:
        return await self.add(request, origin="cni")

    async def add(self, request: CniRequest, origin: EndpointOrigin) -> dict[str, Any]:
        if not request.container_id:
            raise CniFailure(CNI_ERR_INVALID_ENV, "CNI_CONTAINERID is required")
        if not self._netns_present(request.netns):
            raise CniFailure(CNI_ERR_INVALID_ENV, f"network namespace {request.netns!r} does not exist")
        async with self._lock(request.container_id):
            existing = self.get(request.container_id)
            if existing is not None and existing.state == "ready":
                # A retried ADD: make sure the kernel still matches and answer the same.
                wired = await self._wire(existing)
                return self._result(existing.replace(host_ifname=wired.host_ifname, mac=wired.mac))
            record = existing or await self._create_record(request, origin)
            try:
                wired = await self._wire(record)
            except DatapathError as exc:
                await self._remove(record)
                raise CniFailure(CNI_ERR_DATAPATH, "wiring the endpoint failed", str(exc)) from None
            ready = record.replace(
                state="ready", host_ifname=wired.host_ifname, host_ifindex=wired.host_ifindex, mac=wired.mac
            )
            await self._write(ready)
            await self._programmed()
            return self._result(ready)

    async def cni_del(self, request: CniRequest) -> None:
        async with self._lock(request.container_id):
            record = self.get(request.container_id)
            if record is None:
                return  # DEL is idempotent: nothing is known, so nothing is held
            await self._remove(record)

    async def cni_check(self, request: CniRequest) -> None:
        record = self.get(request.container_id)
        if record is None or record.state != "ready":
            raise CniFailure(CNI_ERR_UNKNOWN_CONTAINER, f"container {request.container_id} is not attached")
        try:
            await self.wiring.netlink.check_endpoint(endpoint_spec(record, self.node))
        except DatapathError as exc:
            raise CniFailure(CNI_ERR_DATAPATH, "endpoint does not match its configuration", str(exc)) from None

    async def cni_gc(self, request: CniRequest, valid_attachments: list[tuple[str, str]]) -> None:
        """CNI GC (spec 1.1): remove CNI attachments the runtime no longer knows. Pods of the
        built-in runner are not the runtime's to collect."""
        valid = set(valid_attachments)
        for record in self.records():
            if record.origin == "cni" and (record.container_id, record.ifname) not in valid:
                async with self._lock(record.container_id):
                    if self.get(record.container_id) is not None:
                        await self._remove(record)

    # -- label changes -------------------------------------------------------------------------

    async def refresh_identities(self) -> bool:
        """Re-derive each endpoint's identity from current pod/namespace labels; True if any changed."""
        changed = False
        for record in self.records():
            if record.state != "ready":
                continue
            labels = self._labels.endpoint_labels(record.namespace, record.pod)
            if tuple(canonical(labels)) == record.labels:
                continue
            async with self._lock(record.container_id):
                current = self.get(record.container_id)
                if current is None:
                    continue
                identity = await self._identities.allocate(labels)
                updated = current.replace(identity=identity.id, labels=tuple(canonical(labels)))
                compare, touch = identity.touch_ops()
                await self._write(updated, extra_compares=[compare], extra_ops=[touch])
                changed = True
        return changed

    # -- restore after a restart ---------------------------------------------------------------

    async def restore(self) -> None:
        """Load this node's records and make kernel and store agree again.

        - ready records whose network namespace exists are wired again (idempotent: a no-op when the
          kernel is intact) by the wiring reconciler's first pass, which also prunes every endpoint
          veth no record names and repairs the host device;
        - ``creating`` records were interrupted mid-ADD, and records whose namespace is gone belong
          to containers that are gone: once the prune has cleaned the kernel, they are forgotten
          (the runtime retries or DELs);
        - addresses no record holds are released.
        """
        kvs, _ = await self._store.list(keys.endpoints_prefix(self.node.name))
        self._records = {}
        for kv in kvs:
            try:
                rec = EndpointRecord.from_json(kv.value)
            except (ValueError, TypeError, KeyError):
                log.warning("dropping unreadable endpoint record %s", kv.key)
                await self._store.delete(kv.key)
                continue
            self._records[rec.container_id] = (rec, kv.mod_revision)
        keep = [rec for rec in self.records() if rec.state == "ready" and self._netns_present(rec.netns)]
        gone = [rec for rec in self.records() if rec not in keep]
        await self.wiring.ensure_host()
        self._wiring_writer.replace_all(endpoint_spec(rec, self.node) for rec in keep)
        revision = self.wiring_table.revision
        self.wiring_table.initialized.set()
        for rec in keep:
            try:
                await self.reconciler.wait_done(rec.container_id, revision, timeout=60)
            except ReconcileFailed as exc:
                log.warning("re-wiring %s/%s failed (retrying): %s", rec.namespace, rec.pod, exc)
                continue
            wired = self._wired(rec.container_id)
            if wired.host_ifindex != rec.host_ifindex or wired.mac != rec.mac:
                await self._write(rec.replace(host_ifindex=wired.host_ifindex, mac=wired.mac,
                                              host_ifname=wired.host_ifname))
        for rec in gone:
            # The first pass pruned its veth (no row names it): the kernel holds nothing for it.
            log.info("removing endpoint %s/%s (%s, netns present: %s)", rec.namespace, rec.pod, rec.state,
                     self._netns_present(rec.netns))
            await self._forget(rec)
        await self._release_orphan_addresses()
        self._last_ip = max((rec.ipv4 for rec in self.records()), default=None)
        self._publish()

    async def _release_orphan_addresses(self) -> None:
        """Address keys pointing at this node's endpoint records that no longer exist."""
        prefix = keys.endpoints_prefix(self.node.name)
        ips, _ = await self._store.list(keys.POD_IPS)
        for kv in ips:
            owner = kv.value.decode()
            if owner.startswith(prefix) and owner.removeprefix(prefix) not in self._records:
                await self._store.txn([Compare(kv.key, kv.mod_revision)], [Delete(kv.key)])

    # -- internals -----------------------------------------------------------------------------

    async def _create_record(self, request: CniRequest, origin: EndpointOrigin) -> EndpointRecord:
        labels = self._labels.endpoint_labels(request.pod_namespace, request.pod_name)
        for _attempt in range(8):
            identity = await self._identities.allocate(labels)
            async with self._alloc_lock:
                used = {rec.ipv4 for rec in self.records()}
                ip = next_free_pod_ip(self.node.pod_cidr, used, self._last_ip)
                if ip is None:
                    raise CniFailure(CNI_ERR_IPAM_EXHAUSTED, f"no free address left in {self.node.pod_cidr}")
                used_ids = {rec.endpoint_id for rec in self.records()}
                endpoint_id = next(i for i in range(1, len(used_ids) + 2) if i not in used_ids)
                record = EndpointRecord(
                    container_id=request.container_id,
                    endpoint_id=endpoint_id,
                    node=self.node.name,
                    namespace=request.pod_namespace,
                    pod=request.pod_name,
                    ifname=request.ifname or "eth0",
                    netns=request.netns,
                    ipv4=ip,
                    identity=identity.id,
                    labels=tuple(canonical(labels)),
                    origin=origin,
                    created=time.time(),
                )
                ip_key = keys.pod_ip_key(ip)
                compare, touch = identity.touch_ops()
                result = await self._store.txn(
                    [Compare(record.key, 0), Compare(ip_key, 0), compare],
                    [Put(record.key, record.to_json()), Put(ip_key, record.key.encode()), touch],
                )
                if result.succeeded:
                    self._records[record.container_id] = (record, result.revision)
                    self._address_revisions[record.container_id] = result.revision
                    self._last_ip = ip
                    return record
                # Someone else holds that address (or the identity was just collected): look again.
                await self._forget_foreign_address(ip_key)
        raise CniFailure(CNI_ERR_IPAM_EXHAUSTED, "could not allocate an address: the store kept conflicting")

    async def _forget_foreign_address(self, ip_key: str) -> None:
        """An address key held by a record that no longer exists is a leftover; free it."""
        kv = await self._store.get(ip_key)
        if kv is None:
            return
        owner = await self._store.get(kv.value.decode())
        if owner is None:
            await self._store.txn([Compare(ip_key, kv.mod_revision)], [Delete(ip_key)])

    async def _wire(self, record: EndpointRecord) -> Wired:
        """Ask the wiring reconciler for this endpoint and wait until the kernel holds it."""
        self._wiring_writer.upsert(endpoint_spec(record, self.node))
        try:
            await self.reconciler.wait_done(record.container_id, self.wiring_table.revision, timeout=60)
        except (ReconcileFailed, TimeoutError) as exc:
            raise DatapathError(str(exc) or "wiring timed out") from None
        return self._wired(record.container_id)

    def _wired(self, container_id: str) -> Wired:
        attached = self.wiring.attached[container_id]
        return Wired(attached.host_ifname, attached.host_ifindex, attached.container_mac)

    def _publish(self) -> None:
        """The local_endpoints table follows the records (one transaction per change)."""
        self._local_writer.replace_all(rec for rec, _ in self._records.values())

    async def _programmed(self) -> None:
        await self._wait_programmed(self.local.revision)

    async def _write(
        self,
        record: EndpointRecord,
        extra_compares: list[Compare] | None = None,
        extra_ops: list[Put | Delete] | None = None,
    ) -> None:
        _, mod_revision = self._records[record.container_id]
        result = await self._store.txn(
            [Compare(record.key, mod_revision), *(extra_compares or [])],
            [Put(record.key, record.to_json()), *(extra_ops or [])],
        )
        if not result.succeeded:
            raise MembraneError(f"endpoint record {record.key} changed underneath the agent")
        self._records[record.container_id] = (record, result.revision)
        self._publish()

    async def _remove(self, record: EndpointRecord) -> None:
        entry = self._records.get(record.container_id)
        mod_revision = entry[1] if entry else 0
        unprogrammed = 0  # the local_endpoints revision the kernel must hold before the address goes
        if entry is not None:
            disconnecting = record.replace(state="disconnecting")
            with contextlib.suppress(MembraneError):
                await self._write(disconnecting)
                mod_revision = self._records[record.container_id][1]
                # No longer ready: the datapath drops its entries from here on, while the veth goes.
                unprogrammed = self.local.revision
        self._wiring_writer.delete(record.container_id)
        try:
            await self.reconciler.wait_deleted(record.container_id, timeout=60)
        except (ReconcileFailed, TimeoutError) as exc:
            # The record stays (disconnecting): the reconciler retries, and a restart prunes.
            raise DatapathError(f"unwiring {record.namespace}/{record.pod} failed: {exc}") from None
        self._records.pop(record.container_id, None)
        self._publish()
        # Forgetting a record that is no longer ready changes nothing the datapath renders: waiting
        # for the revision that took it out of the ruleset is enough.
        await self._wait_programmed(unprogrammed or self.local.revision)
        await self._release(record, mod_revision)

    async def _forget(self, record: EndpointRecord) -> None:
        """Release a record whose kernel side is known to be clean (after a prune)."""
        entry = self._records.pop(record.container_id, None)
        await self._release(record, entry[1] if entry else 0)

    async def _release(self, record: EndpointRecord, mod_revision: int) -> None:
        ip_key = keys.pod_ip_key(record.ipv4)
        written = self._address_revisions.pop(record.container_id, 0)
        if written:
            # The address key as this agent wrote it: one transaction, no read first.
            compares = [Compare(record.key, mod_revision), Compare(ip_key, written)]
            if (await self._store.txn(compares, [Delete(record.key), Delete(ip_key)])).succeeded:
                self._container_locks.pop(record.container_id, None)
                return
        ip_kv = await self._store.get(ip_key)
        ops: list[Put | Delete] = [Delete(record.key)]
        compares = [Compare(record.key, mod_revision)]
        if ip_kv is not None and ip_kv.value.decode() == record.key:
            ops.append(Delete(ip_key))
            compares.append(Compare(ip_key, ip_kv.mod_revision))
        if not (await self._store.txn(compares, ops)).succeeded:
            await self._store.delete(record.key)
            await self._forget_foreign_address(ip_key)
        self._container_locks.pop(record.container_id, None)

    def _result(self, record: EndpointRecord) -> dict[str, Any]:
        """The CNI 1.0.0 result of an attached endpoint."""
        return {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": record.host_ifname},
                {"name": record.ifname, "mac": record.mac, "sandbox": record.netns},
            ],
            "ips": [{"address": f"{record.ipv4}/32", "gateway": str(self.node.router_ip), "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": str(self.node.router_ip)}],
            "dns": {},
        }


def endpoints_module(manager: EndpointManager, reads: tuple[Table[Any], ...] = ()) -> Module:
    """Restores this node's endpoints before anything downstream starts (policy, datapath, API).
    ``reads``: the tables its label source reads (pods, namespaces)."""
    return Module("endpoints", reads=reads, writes=(manager.wiring_table, manager.local), start=manager.restore,
                  reconcilers=(manager.reconciler,))
