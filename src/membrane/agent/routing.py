"""Pod traffic between nodes: the peers, the kernel state they need, and the loop that keeps it.

Every agent writes its own CiliumNode object (InternalIP, pod CIDR); every other agent turns those
objects into routes to the peer's pods:

    VXLAN mode   one device membrane_vxlan (VNI, port, local = node IP, dev = uplink, nolearning,
                 MTU uplink-50, MAC 02:6d:<node IP>), and per peer:
                   fdb    PEER_MAC dst PEER_NODE_IP                 (frames for the peer go to its node)
                   neigh  PEER_ROUTER_IP lladdr PEER_MAC permanent  (no ARP across the tunnel)
                   route  PEER_POD_CIDR via PEER_ROUTER_IP dev membrane_vxlan onlink src ROUTER_IP proto 177
    native mode  per peer: route PEER_POD_CIDR via PEER_NODE_IP dev UPLINK proto 177; no VXLAN device

The peer's MAC is derived from its node IP (:func:`~membrane.datapath.netlink.model.vtep_mac`), so
nothing beyond the CiliumNode object is exchanged. ``src ROUTER_IP`` makes traffic the node itself
sends to a remote pod come from its pod CIDR, so the answer returns through the tunnel too.

Pure: :class:`LocalNode`, :class:`PeerNode`, :func:`peers_from_nodes` (node objects → peers),
:func:`desired_routing` (peers → :class:`~membrane.datapath.netlink.model.RoutingState`),
:func:`masquerade_for` (cluster settings → the ruleset's masquerade inputs) and :func:`tunnel_entries`
(what ``membrane tunnel list`` shows).
I/O: :class:`RoutingReconciler` (desired state → the kernel, incremental with a cache of what it
applied, or full against a kernel read-back), driven by the agent's generic reconciler through
:class:`RoutingOperations` (a change of the ``peers`` table → an incremental sync; every resync
period → a full one that repairs drift; failures retried with backoff). :func:`routing_module`
wires the pure ``nodes → peers`` controller and that reconciler.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Literal

from membrane.agent.node import VXLAN_OVERHEAD
from membrane.api.cilium import CiliumNode
from membrane.core.config import ClusterConfig
from membrane.core.modules import Controller, Module
from membrane.core.reconciler import DEFAULT_RESYNC_INTERVAL, Reconciler
from membrane.core.statedb import StateDB, Table
from membrane.datapath.netlink.model import (
    TUNNEL_DEVICE,
    PeerFdbEntry,
    PeerNeighbour,
    PeerRoute,
    RoutingState,
    TunnelDevice,
    routing_changes,
    vtep_mac,
)
from membrane.datapath.netlink.protocol import Netlink
from membrane.datapath.ruleset import Masquerade
from membrane.ipam.pool import router_ip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalNode:
    """This node as routing sees it."""

    name: str
    node_ip: IPv4Address
    uplink: str
    uplink_mtu: int
    pod_cidr: IPv4Network

    @property
    def router_ip(self) -> IPv4Address:
        return router_ip(self.pod_cidr)


@dataclass(frozen=True, order=True)
class PeerNode:
    """Another node: where its pods live and how to reach it."""

    name: str
    node_ip: IPv4Address
    pod_cidr: IPv4Network

    @property
    def router_ip(self) -> IPv4Address:
        return router_ip(self.pod_cidr)

    @property
    def vtep_mac(self) -> str:
        return vtep_mac(self.node_ip)


@dataclass(frozen=True)
class Peers:
    """The usable peers (sorted by name) and why the other node objects were left out."""

    peers: tuple[PeerNode, ...] = ()
    skipped: tuple[str, ...] = ()


class _DisjointRanges:
    """Pairwise-disjoint address ranges with O(log n) overlap checks (sorted by first address).

    Because every range added is disjoint from the others, a new range overlaps some range iff it
    overlaps its predecessor or its successor in start order.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def overlaps(self, cidr: IPv4Network) -> bool:
        first, last = int(cidr.network_address), int(cidr.broadcast_address)
        i = bisect.bisect_right(self._starts, first)
        if i > 0 and self._ends[i - 1] >= first:
            return True
        return i < len(self._starts) and self._starts[i] <= last

    def add(self, cidr: IPv4Network) -> None:
        first = int(cidr.network_address)
        i = bisect.bisect_right(self._starts, first)
        self._starts.insert(i, first)
        self._ends.insert(i, int(cidr.broadcast_address))


def peers_from_nodes(nodes: Iterable[CiliumNode], local: LocalNode, pools: Iterable[IPv4Network]) -> Peers:
    """Every other node with an InternalIP and a pod CIDR inside the cluster pools.

    A node without a pod CIDR yet (the operator has not given it one) is simply not a peer. Conflicts
    are resolved the same way on every node — by name order, the local node first — so no node ever
    holds two routes for one CIDR: a peer whose CIDR overlaps one taken already, or whose address is
    taken already, is skipped and named in ``skipped``.
    """
    pool_list = list(pools)
    taken_cidrs = _DisjointRanges()
    taken_cidrs.add(local.pod_cidr)
    taken_ips = {local.node_ip}
    peers: list[PeerNode] = []
    skipped: list[str] = []
    for obj in sorted(nodes, key=lambda n: n.name):
        name = obj.name
        if name == local.name:
            continue
        node_ip, cidr = obj.internal_ip(), obj.pod_cidr()
        if node_ip is None or cidr is None:
            continue
        if not any(cidr.subnet_of(pool) for pool in pool_list):
            skipped.append(f"node {name}: pod CIDR {cidr} is outside the cluster pools")
        elif taken_cidrs.overlaps(cidr):
            skipped.append(f"node {name}: pod CIDR {cidr} overlaps another node's")
        elif node_ip in taken_ips:
            skipped.append(f"node {name}: address {node_ip} is another node's")
        elif cidr.num_addresses < 4:
            skipped.append(f"node {name}: pod CIDR {cidr} has no room for a router address")
        else:
            taken_cidrs.add(cidr)
            taken_ips.add(node_ip)
            peers.append(PeerNode(name, node_ip, cidr))
    return Peers(tuple(peers), tuple(skipped))


def tunnel_device(local: LocalNode, cluster: ClusterConfig) -> TunnelDevice | None:
    if cluster.routingMode != "vxlan":
        return None
    return TunnelDevice(
        vni=cluster.vxlanVNI,
        port=cluster.tunnelPort,
        local=local.node_ip,
        uplink=local.uplink,
        mtu=local.uplink_mtu - VXLAN_OVERHEAD,
        mac=vtep_mac(local.node_ip),
    )


def desired_routing(local: LocalNode, peers: Iterable[PeerNode], cluster: ClusterConfig) -> RoutingState:
    """What the node must hold so its pods reach every peer's pods."""
    peer_list = list(peers)
    tunnel = tunnel_device(local, cluster)
    if tunnel is None:
        return RoutingState(routes=frozenset(PeerRoute(p.pod_cidr, p.node_ip, local.uplink) for p in peer_list))
    return RoutingState(
        tunnel=tunnel,
        routes=frozenset(
            PeerRoute(p.pod_cidr, p.router_ip, TUNNEL_DEVICE, onlink=True, source=local.router_ip) for p in peer_list
        ),
        neighbours=frozenset(PeerNeighbour(p.router_ip, p.vtep_mac) for p in peer_list),
        fdb=frozenset(PeerFdbEntry(p.vtep_mac, p.node_ip) for p in peer_list),
    )


def masquerade_for(cluster: ClusterConfig, pod_cidr: IPv4Network) -> Masquerade | None:
    """The ruleset's masquerade inputs for this node, or None when ``enableIPv4Masquerade`` is off."""
    if not cluster.enableIPv4Masquerade:
        return None
    return Masquerade.of(pod_cidr, cluster.pod_pools(), (IPv4Network(c) for c in cluster.nonMasqueradeCIDRs))


def tunnel_entries(peers: Iterable[PeerNode]) -> list[tuple[IPv4Network, IPv4Address]]:
    """``membrane tunnel list``: pod CIDR → node IP, in address order."""
    return sorted(((p.pod_cidr, p.node_ip) for p in peers), key=lambda e: (int(e[0].network_address), e[0].prefixlen))


@dataclass(frozen=True)
class RoutingSyncResult:
    kind: Literal["full", "incremental"]
    peers: int
    added: int = 0
    deleted: int = 0
    tunnel_created: bool = False


def _without_tunnel_entries(state: RoutingState) -> RoutingState:
    """What is left of ``state`` once the tunnel device is gone (its entries go with it)."""
    return RoutingState(routes=frozenset(r for r in state.routes if r.device != TUNNEL_DEVICE))


class RoutingReconciler:
    """Brings the node's peer routes, neighbours, FDB entries and tunnel device to the desired state.

    It keeps what it applied last as its cache: a sync after a change sends only the difference (one
    new peer costs one FDB entry, one neighbour and one route), without reading the kernel. A full
    sync — the first one, any one after an error, and the periodic resync — reads the kernel back
    (only what it owns) and repairs whatever drifted. Nothing else is touched.
    """

    def __init__(self, netlink: Netlink, local: LocalNode, cluster: ClusterConfig) -> None:
        self._netlink = netlink
        self._local = local
        self._cluster = cluster
        self._pools = cluster.pod_pools()
        self._applied: RoutingState | None = None
        self._lock = asyncio.Lock()
        self.last: RoutingSyncResult | None = None
        self.syncs = 0

    @property
    def local(self) -> LocalNode:
        return self._local

    @property
    def pools(self) -> list[IPv4Network]:
        return list(self._pools)

    @property
    def applied(self) -> RoutingState | None:
        return self._applied

    def invalidate(self) -> None:
        self._applied = None

    async def sync(self, peers: Iterable[PeerNode], *, full: bool = False) -> RoutingSyncResult:
        peer_list = list(peers)
        desired = desired_routing(self._local, peer_list, self._cluster)
        async with self._lock:
            applied = None if full else self._applied
            full = applied is None
            try:
                current = applied if applied is not None else await self._netlink.list_routing(self._pools)
                created = False
                if desired.tunnel is not None and (full or current.tunnel != desired.tunnel):
                    created = await self._netlink.ensure_tunnel_device(desired.tunnel)
                    if created:
                        current = _without_tunnel_entries(current)
                    current = replace(current, tunnel=desired.tunnel)
                elif desired.tunnel is None and (full or current.tunnel is not None):
                    # The mode changed to native (or a device of ours survived from it): remove it.
                    removed = await self._netlink.delete_tunnel_device()
                    if removed:
                        current = _without_tunnel_entries(current)
                changes = routing_changes(current, desired)
                await self._netlink.apply_routing(changes)
            except BaseException:
                self._applied = None  # unknown now: the next sync reads the kernel back
                raise
            self._applied = desired
            self.syncs += 1
            self.last = RoutingSyncResult(
                "full" if full else "incremental", len(peer_list), changes.added, changes.deleted, created
            )
            return self.last

    def status(self) -> dict[str, Any]:
        last = self.last
        return {
            "mode": self._cluster.routingMode,
            "syncs": self.syncs,
            "peers": last.peers if last else 0,
            "last": None if last is None else {"kind": last.kind, "added": last.added, "deleted": last.deleted},
        }


class RoutingOperations:
    """The routing reconciler as the generic reconciler's target: the ``peers`` table in, one
    batch of netlink changes out (see :class:`~membrane.core.reconciler.BatchOperations`)."""

    def __init__(self, reconciler: RoutingReconciler) -> None:
        self.reconciler = reconciler

    async def apply(self, desired: Sequence[PeerNode], updated: Sequence[PeerNode],
                    deleted: Sequence[PeerNode]) -> None:
        await self.reconciler.sync(desired)

    async def repair(self, desired: Sequence[PeerNode]) -> None:
        await self.reconciler.sync(desired, full=True)


def routing_module(db: StateDB, nodes: Table[CiliumNode], netlink: Netlink, local: LocalNode,
                   cluster: ClusterConfig, *, resync_interval: float = DEFAULT_RESYNC_INTERVAL) -> Module:
    """Peers' pod CIDRs through the tunnel (or native routes): ``nodes → peers → kernel``."""
    peers: Table[PeerNode] = db.table("peers", primary=lambda p: p.name, initialized=False)
    writer = peers.writer("routing controller")
    pools = cluster.pod_pools()
    skipped: list[tuple[str, ...]] = [()]

    def compute() -> None:
        found = peers_from_nodes(nodes.snapshot(), local, pools)
        if found.skipped != skipped[0]:
            for reason in found.skipped:
                log.warning("routing: %s; no route to it", reason)
            skipped[0] = found.skipped
        if set(found.peers) != set(peers.snapshot()):
            log.info("routing: %d peers: %s", len(found.peers),
                     ", ".join(f"{p.name} {p.pod_cidr} via {p.node_ip}" for p in found.peers) or "none")
        writer.replace_all(found.peers)

    reconciler = Reconciler("routing", db, peers, RoutingOperations(RoutingReconciler(netlink, local, cluster)),
                            resync_interval=resync_interval)
    # A node's route is programmed in the same step as the peers are computed: on a large cluster the
    # policy and datapath controllers take hundreds of ms per change, and the route must not wait.
    controller = Controller("routing", [nodes], compute, outputs=[peers], then=reconciler.reconcile_once)
    return Module("routing", reads=(nodes,), writes=(peers,), controllers=(controller,), reconcilers=(reconciler,))
