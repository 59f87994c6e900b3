"""The endpoint manager: CNI ADD/DEL/CHECK for this node, and endpoint restoration after a restart.

    ADD:  identity (store CAS) -> address + record "creating" (one store txn) -> kernel wiring
          -> datapath sync (anti-spoofing entry) -> record "ready" -> CNI result
    DEL:  kernel unwiring -> datapath sync -> record + address released (one store txn)

The order is what makes crashes harmless: the store names a container before the kernel holds
anything for it and forgets it only once the kernel is clean, so :meth:`restore` can finish or
undo whatever a killed agent left half-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable
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


class EndpointWiring(Protocol):
    """The kernel side of an endpoint (implemented over the netlink boundary)."""

    async def attach(self, record: EndpointRecord, node: NodeContext) -> Wired: ...

    async def detach(self, record: EndpointRecord) -> None: ...

    async def check(self, record: EndpointRecord, node: NodeContext) -> None: ...

    async def prune(self, keep_host_ifnames: set[str]) -> list[str]:
        """Remove endpoint links not kept (their routes go with them); returns what was removed."""
        ...


class LabelSource(Protocol):
    def endpoint_labels(self, namespace: str, pod: str) -> frozenset[Label]: ...


DatapathSync = Callable[[], Awaitable[None]]


def netns_exists(path: str) -> bool:
    return bool(path) and os.path.exists(path)


class EndpointManager:
    """Implements the agent's EndpointService for this node."""

    def __init__(
        self,
        store: Store,
        node: NodeContext,
        wiring: EndpointWiring,
        identities: IdentityAllocator,
        labels: LabelSource,
        sync_datapath: DatapathSync,
        netns_present: Callable[[str], bool] = netns_exists,
    ) -> None:
        self._netns_present = netns_present
        self._store = store
        self.node = node
        self._wiring = wiring
        self._identities = identities
        self._labels = labels
        self._sync_datapath = sync_datapath
        self._records: dict[str, tuple[EndpointRecord, int]] = {}  # container id -> (record, mod_revision)
        self._alloc_lock = asyncio.Lock()  # this agent is the only writer of its node's addresses
        self._container_locks: dict[str, asyncio.Lock] = {}
        self._last_ip: ipaddress.IPv4Address | None = None
        self.on_change: Callable[[], None] = lambda: None

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
            await self._sync_datapath()
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
            await self._wiring.check(record, self.node)
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

        - ``creating`` records were interrupted mid-ADD: undo them (the runtime retries or DELs).
        - records whose network namespace is gone: the container is gone: remove them.
        - ready records: re-wire idempotently (a no-op when the kernel is intact).
        - kernel links and routes no record names, and addresses no record holds, are pruned.
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
        for rec in self.records():
            if rec.state != "ready" or not self._netns_present(rec.netns):
                log.info("removing endpoint %s/%s (%s, netns present: %s)", rec.namespace, rec.pod,
                         rec.state, self._netns_present(rec.netns))
                await self._remove(rec, sync=False)
                continue
            try:
                wired = await self._wire(rec)
            except DatapathError as exc:
                log.warning("re-wiring %s/%s failed: %s", rec.namespace, rec.pod, exc)
                continue
            if wired.host_ifindex != rec.host_ifindex or wired.mac != rec.mac:
                await self._write(rec.replace(host_ifindex=wired.host_ifindex, mac=wired.mac,
                                              host_ifname=wired.host_ifname))
        keep = {rec.host_ifname for rec in self.records() if rec.host_ifname}
        removed = await self._wiring.prune(keep)
        if removed:
            log.info("pruned orphaned kernel objects: %s", ", ".join(removed))
        await self._release_orphan_addresses()
        self._last_ip = max((rec.ipv4 for rec in self.records()), default=None)

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
        return await self._wiring.attach(record, self.node)

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
        self.on_change()

    async def _remove(self, record: EndpointRecord, sync: bool = True) -> None:
        entry = self._records.get(record.container_id)
        mod_revision = entry[1] if entry else 0
        if entry is not None:
            disconnecting = record.replace(state="disconnecting")
            with contextlib.suppress(MembraneError):
                await self._write(disconnecting)
                mod_revision = self._records[record.container_id][1]
        await self._wiring.detach(record)
        self._records.pop(record.container_id, None)
        if sync:
            await self._sync_datapath()
        ip_key = keys.pod_ip_key(record.ipv4)
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
        self.on_change()

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
