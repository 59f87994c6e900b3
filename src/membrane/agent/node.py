"""This node in the cluster: its address, its pod CIDR, its CiliumNode object and its heartbeat.

The heartbeat is a key bound to a store lease: when the agent stops keeping the lease alive the
key disappears after the TTL, which is how every other agent (and ``node list``) tells the node
is NotReady.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from membrane.agent.config import AgentConfig
from membrane.api.cilium import CiliumNode
from membrane.core.config import ClusterConfig
from membrane.core.errors import InvalidInput, MembraneError
from membrane.core.statedb import Table, wait_any
from membrane.ipam.pool import router_ip
from membrane.store import keys
from membrane.store.base import Compare, LeaseNotFound, Put, Store

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
OWN_DEVICE_PREFIXES = ("lxc", "membrane_", "vxlan")


@dataclass(frozen=True, slots=True)
class Uplink:
    device: str
    address: ipaddress.IPv4Address
    mtu: int


def detect_uplink(config: AgentConfig) -> Uplink:
    """The device and address facing the underlay: configured, else the default route's, else the first global one."""
    with IPRoute() as ipr:
        links = {link["index"]: link for link in ipr.get_links()}
        addrs = [(a["index"], a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=2)]

        def name(index: int) -> str:
            return str(links[index].get_attr("IFLA_IFNAME"))

        candidates = [(i, ipaddress.IPv4Address(a)) for i, a in addrs if not ipaddress.IPv4Address(a).is_loopback]
        candidates = [(i, a) for i, a in candidates if not name(i).startswith(OWN_DEVICE_PREFIXES)]
        if config.nodeIP:
            wanted = ipaddress.IPv4Address(config.nodeIP)
            candidates = [(i, a) for i, a in candidates if a == wanted]
        elif config.device:
            candidates = [(i, a) for i, a in candidates if name(i) == config.device]
        else:
            defaults = [r.get_attr("RTA_OIF") for r in ipr.get_default_routes(family=2)]
            preferred = [(i, a) for i, a in candidates if i in defaults]
            candidates = preferred or candidates
        if not candidates:
            wanted_what = config.nodeIP or config.device or "a global IPv4 address"
            raise InvalidInput([f"agent: no usable uplink: {wanted_what} not found on this node"])
        index, address = candidates[0]
        return Uplink(name(index), address, int(links[index].get_attr("IFLA_MTU")))


async def ensure_cluster_config(store: Store, proposed: ClusterConfig) -> ClusterConfig:
    """The first agent writes the cluster settings; everyone (the first included) reads them back."""
    await store.txn([Compare(keys.CLUSTER_CONFIG, 0)], [Put(keys.CLUSTER_CONFIG, proposed.model_dump_json().encode())])
    kv = await store.get(keys.CLUSTER_CONFIG)
    if kv is None:
        raise MembraneError("cluster configuration vanished from the store")
    stored = ClusterConfig.model_validate_json(kv.value)
    if stored != proposed:
        log.info("using the cluster configuration already in the store")
    return stored


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    uplink: Uplink
    pod_cidr: ipaddress.IPv4Network
    router_ip: ipaddress.IPv4Address
    pod_mtu: int


class NodeRegistration:
    """Registers this node: heartbeat lease first, then the CiliumNode object, then its pod CIDR.

    The pod CIDR is allocated by whichever agent holds the operator role (possibly this one), so
    :meth:`wait_for_pod_cidr` waits until the node object carries it.
    """

    def __init__(self, store: Store, config: AgentConfig, cluster: ClusterConfig) -> None:
        self._store = store
        self._config = config
        self._cluster = cluster
        self._lease = 0
        self._uplink: Uplink | None = None
        self.info: NodeInfo | None = None
        self.last_heartbeat = 0.0

    @property
    def name(self) -> str:
        return self._config.nodeName

    @property
    def key(self) -> str:
        return keys.object_key("ciliumnodes", None, self.name)

    async def start(self) -> Uplink:
        self._uplink = await asyncio.to_thread(detect_uplink, self._config)
        await self.heartbeat()
        await self.update_node_object()
        return self._uplink

    async def wait_for_pod_cidr(self, nodes: Table[CiliumNode], timeout: float = 60.0) -> NodeInfo:
        """Wait until this node's object in the ``nodes`` table carries its pod CIDR."""
        assert self._uplink is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            snapshot = nodes.snapshot()
            node = snapshot.get(self.name)
            cidr = node.pod_cidr() if node is not None else None
            if cidr is not None:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await wait_any([snapshot.changed], remaining):
                raise MembraneError(f"node {self.name} got no pod CIDR within {timeout:g}s: is an operator running?")
        overhead = VXLAN_OVERHEAD if self._cluster.routingMode == "vxlan" else 0
        mtu = self._config.mtu or self._uplink.mtu - overhead
        self.info = NodeInfo(self.name, self._uplink, cidr, router_ip(cidr), mtu)
        await self.update_node_object()
        return self.info

    async def update_node_object(self, **status: Any) -> None:
        """Write this node's addresses and agent status; keep what the operator and others wrote."""
        assert self._uplink is not None
        for _ in range(16):
            kv = await self._store.get(self.key)
            obj: dict[str, Any] = json.loads(kv.value) if kv else {
                "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                "metadata": {"name": self.name, "uid": str(uuid.uuid4()),
                             "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "generation": 1},
            }
            spec = obj.setdefault("spec", {})
            spec["addresses"] = [{"type": "InternalIP", "ip": str(self._uplink.address)}]
            spec.setdefault("ipam", {})
            node_status = obj.setdefault("status", {})
            node_status.update({"routing": self._cluster.routingMode, "device": self._uplink.device,
                                "agentPID": os.getpid(), **status})
            if self.info is not None:
                node_status["mtu"] = self.info.pod_mtu
            result = await self._store.txn([Compare(self.key, kv.mod_revision if kv else 0)],
                                           [Put(self.key, json.dumps(obj).encode())])
            if result.succeeded:
                return
        raise MembraneError(f"could not write node object {self.key}")

    async def heartbeat(self) -> None:
        """Keep the lease alive and stamp the heartbeat key; re-create both if the lease was lost."""
        assert self._uplink is not None
        now = time.time()
        payload = json.dumps({"time": now, "nodeIP": str(self._uplink.address)}).encode()
        if self._lease:
            try:
                await self._store.keepalive(self._lease)
            except LeaseNotFound:
                log.warning("heartbeat lease expired; registering again")
                self._lease = 0
        if not self._lease:
            self._lease = await self._store.grant_lease(self._config.heartbeatTTL)
        await self._store.put(keys.heartbeat_key(self.name), payload, lease=self._lease)
        self.last_heartbeat = now

    @property
    def lease(self) -> int:
        return self._lease

    async def run_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeatTTL / 3)
            await self.heartbeat()

    async def deregister_heartbeat(self) -> None:
        if self._lease:
            await self._store.revoke_lease(self._lease)
            self._lease = 0
