"""What the agent asks of netlink and what it gets back (pure data, no I/O).

Primitives: :data:`RTPROT_MEMBRANE` (the route protocol number marking routes the agent owns),
:func:`endpoint_ifname` (the host-side veth name of a container), :class:`EndpointSpec`,
:class:`AttachedEndpoint`, :class:`HostDevice`, :class:`OwnedEndpoints`, and
:func:`orphaned_links` (which owned links a prune removes).

Between nodes: :data:`TUNNEL_DEVICE` and :class:`TunnelDevice` (the node's one VXLAN device),
:func:`vtep_mac` (its MAC, derived from the node address), :class:`PeerRoute`,
:class:`PeerNeighbour` and :class:`PeerFdbEntry` (what one peer node costs), :class:`RoutingState`
(what the node holds of them), :class:`RoutingChanges` and :func:`routing_changes` (the difference
to apply), and :func:`is_peer_route` (which routes the routing reconciler owns).

Ownership is by name and protocol only: links named ``lxc`` + 11 hex digits are endpoint veths,
``membrane_host``/``membrane_net`` and ``membrane_vxlan`` are the node's devices, routes with
protocol 177 are the agent's. Nothing else is ever deleted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from membrane.core.errors import InvalidInput

# rtm_protocol of every route the agent installs (iproute2 prints "proto 177"). Values above
# RTPROT_STATIC (4) up to 255 are free for routing daemons; 177 is not in rt_protos.
RTPROT_MEMBRANE = 177

# Host side of the node's router device pair (Cilium's cilium_host/cilium_net). The router IP,
# the pods' gateway, lives on HOST_DEVICE as a /32.
HOST_DEVICE = "membrane_host"
HOST_DEVICE_PEER = "membrane_net"

ENDPOINT_IFNAME_PREFIX = "lxc"
_ENDPOINT_IFNAME = re.compile(r"^lxc[0-9a-f]{11}$")
IFNAMSIZ = 16  # including the NUL: names are at most 15 characters


def endpoint_ifname(container_id: str) -> str:
    """``lxc`` + 11 hex digits of sha256(container id): stable across retries, 14 characters."""
    return ENDPOINT_IFNAME_PREFIX + hashlib.sha256(container_id.encode()).hexdigest()[:11]


def is_endpoint_ifname(name: str) -> bool:
    return bool(_ENDPOINT_IFNAME.match(name))


def _check_ifname(name: str, what: str) -> str | None:
    if not name or len(name) >= IFNAMSIZ or "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        return f"{what}: {name!r} is not a valid interface name (1-15 characters, no '/' or spaces)"
    return None


@dataclass(frozen=True)
class EndpointSpec:
    """One container to wire: its namespace (a path such as /run/netns/X or /proc/PID/ns/net)."""

    container_id: str
    netns: str
    ifname: str
    pod_ip: IPv4Address
    router_ip: IPv4Address
    mtu: int = 1500

    def __post_init__(self) -> None:
        problems = []
        if not self.container_id:
            problems.append("container_id: must not be empty")
        if not self.netns.startswith("/"):
            problems.append(f"netns: {self.netns!r} must be an absolute path")
        if (problem := _check_ifname(self.ifname, "ifname")) is not None:
            problems.append(problem)
        if not 68 <= self.mtu <= 65535:
            problems.append(f"mtu: {self.mtu} is outside 68-65535")
        if self.pod_ip == self.router_ip:
            problems.append(f"pod_ip: {self.pod_ip} is the router address")
        if problems:
            raise InvalidInput(problems)

    @property
    def host_ifname(self) -> str:
        return endpoint_ifname(self.container_id)


@dataclass(frozen=True)
class AttachedEndpoint:
    """What ``attach_endpoint`` made: enough for the CNI result and the nft endpoint sets."""

    container_id: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    container_ifname: str
    container_ifindex: int
    container_mac: str
    pod_ip: IPv4Address


@dataclass(frozen=True)
class HostDevice:
    """The node's router device after ``ensure_host_device``."""

    ifname: str
    ifindex: int
    router_ip: IPv4Address
    mtu: int


@dataclass(frozen=True)
class OwnedLink:
    ifname: str
    ifindex: int


@dataclass(frozen=True)
class OwnedRoute:
    dst: IPv4Network
    ifname: str
    ifindex: int


@dataclass(frozen=True)
class OwnedEndpoints:
    """Endpoint veths (``lxc…``) and the protocol-177 routes through them, in the node namespace."""

    links: tuple[OwnedLink, ...] = ()
    routes: tuple[OwnedRoute, ...] = ()

    @property
    def ifnames(self) -> frozenset[str]:
        return frozenset(link.ifname for link in self.links)


def orphaned_links(owned: OwnedEndpoints, keep: Collection[str]) -> tuple[str, ...]:
    """Owned endpoint links not in ``keep``, sorted; their routes go with them."""
    keep_set = set(keep)
    return tuple(sorted(name for name in owned.ifnames if is_endpoint_ifname(name) and name not in keep_set))


# -- between nodes ----------------------------------------------------------------------------

# The node's VXLAN device (Cilium's cilium_vxlan). Neighbours and FDB entries on it are the agent's.
TUNNEL_DEVICE = "membrane_vxlan"
VNI_MAX = 2**24 - 1
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def vtep_mac(node_ip: IPv4Address) -> str:
    """The MAC of the VXLAN device of the node at ``node_ip``: ``02`` (locally administered,
    unicast), ``6d`` ("m"), then the four address bytes. Derived, so peers never exchange it."""
    return ":".join(f"{b:02x}" for b in (0x02, 0x6D, *node_ip.packed))


@dataclass(frozen=True)
class TunnelDevice:
    """The node's VXLAN device: ``ip link add membrane_vxlan type vxlan id VNI dstport PORT local
    NODE_IP dev UPLINK nolearning`` with ``address MAC mtu MTU addrgenmode none``."""

    vni: int
    port: int
    local: IPv4Address
    uplink: str
    mtu: int
    mac: str
    name: str = TUNNEL_DEVICE

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.vni <= VNI_MAX:
            problems.append(f"vni: {self.vni} is outside 1-{VNI_MAX}")
        if not 1 <= self.port <= 65535:
            problems.append(f"port: {self.port} is outside 1-65535")
        if not 68 <= self.mtu <= 65535:
            problems.append(f"mtu: {self.mtu} is outside 68-65535")
        if not _MAC.match(self.mac):
            problems.append(f"mac: {self.mac!r} is not a lowercase MAC address")
        for name, what in ((self.name, "name"), (self.uplink, "uplink")):
            if (problem := _check_ifname(name, what)) is not None:
                problems.append(problem)
        if problems:
            raise InvalidInput(problems)


@dataclass(frozen=True)
class PeerRoute:
    """``DST via GATEWAY dev DEVICE [onlink] [src SOURCE] proto 177`` in the main table. Read back from
    the kernel, an owned route may lack a gateway (someone else's device route): it is pruned."""

    dst: IPv4Network
    gateway: IPv4Address | None
    device: str
    onlink: bool = False
    source: IPv4Address | None = None

    def __str__(self) -> str:
        onlink = " onlink" if self.onlink else ""
        source = f" src {self.source}" if self.source is not None else ""
        via = f" via {self.gateway}" if self.gateway is not None else ""
        return f"{self.dst}{via} dev {self.device}{source}{onlink}"


@dataclass(frozen=True)
class PeerNeighbour:
    """A neighbour entry on the tunnel device: a peer's router IP → the peer's VTEP MAC."""

    ip: IPv4Address
    mac: str
    permanent: bool = True

    def __str__(self) -> str:
        return f"{self.ip} lladdr {self.mac}{' permanent' if self.permanent else ''} dev {TUNNEL_DEVICE}"


@dataclass(frozen=True)
class PeerFdbEntry:
    """An FDB entry on the tunnel device: frames for a peer's VTEP MAC go to the peer's node IP."""

    mac: str
    dst: IPv4Address

    def __str__(self) -> str:
        return f"{self.mac} dst {self.dst} dev {TUNNEL_DEVICE}"


def _route_order(route: PeerRoute) -> tuple[int, int, str]:
    return (int(route.dst.network_address), route.dst.prefixlen, str(route))


@dataclass(frozen=True)
class RoutingState:
    """The routing reconciler's share of the node: the tunnel device (None: absent), the peer routes,
    and the neighbours and FDB entries on the tunnel device."""

    tunnel: TunnelDevice | None = None
    routes: frozenset[PeerRoute] = frozenset()
    neighbours: frozenset[PeerNeighbour] = frozenset()
    fdb: frozenset[PeerFdbEntry] = frozenset()


@dataclass(frozen=True)
class RoutingChanges:
    """What to send, in this order: FDB entries, neighbours and routes to add or replace (so a new
    route never points at a peer the device cannot reach yet), then routes, neighbours and FDB entries
    to delete."""

    add_fdb: tuple[PeerFdbEntry, ...] = ()
    add_neighbours: tuple[PeerNeighbour, ...] = ()
    add_routes: tuple[PeerRoute, ...] = ()
    delete_routes: tuple[PeerRoute, ...] = ()
    delete_neighbours: tuple[PeerNeighbour, ...] = ()
    delete_fdb: tuple[PeerFdbEntry, ...] = ()

    def __len__(self) -> int:
        return (len(self.add_fdb) + len(self.add_neighbours) + len(self.add_routes) + len(self.delete_routes)
                + len(self.delete_neighbours) + len(self.delete_fdb))

    @property
    def added(self) -> int:
        return len(self.add_fdb) + len(self.add_neighbours) + len(self.add_routes)

    @property
    def deleted(self) -> int:
        return len(self.delete_routes) + len(self.delete_neighbours) + len(self.delete_fdb)


def routing_changes(current: RoutingState, desired: RoutingState) -> RoutingChanges:
    """The difference from ``current`` to ``desired`` (the tunnel device itself is not part of it).

    Routes are keyed by destination and neighbours by address, and both are written with replace: a
    changed next hop is one replace, never a delete followed by an add (no moment without a route).
    FDB entries are keyed by (MAC, destination): the kernel keeps a list of destinations for the
    all-zero and multicast MACs; a unicast MAC keeps its first destination (an append is a no-op).
    """
    want_routes = {r.dst: r for r in desired.routes}
    have_routes = {r.dst: r for r in current.routes}
    want_neigh = {n.ip: n for n in desired.neighbours}
    have_neigh = {n.ip: n for n in current.neighbours}
    return RoutingChanges(
        add_fdb=tuple(sorted(desired.fdb - current.fdb, key=str)),
        add_neighbours=tuple(sorted((n for ip, n in want_neigh.items() if have_neigh.get(ip) != n), key=str)),
        add_routes=tuple(sorted((r for dst, r in want_routes.items() if have_routes.get(dst) != r), key=_route_order)),
        delete_routes=tuple(sorted((r for dst, r in have_routes.items() if dst not in want_routes), key=_route_order)),
        delete_neighbours=tuple(sorted((n for ip, n in have_neigh.items() if ip not in want_neigh), key=str)),
        delete_fdb=tuple(sorted(current.fdb - desired.fdb, key=str)),
    )


def is_peer_route(dst: IPv4Network, ifname: str, proto: int, pools: Collection[IPv4Network]) -> bool:
    """Whether a main-table route belongs to the routing reconciler: protocol 177 and either through
    the tunnel device, or to a destination inside a cluster pod pool through any device but an
    endpoint veth or the router device (those routes belong to the endpoints)."""
    if proto != RTPROT_MEMBRANE:
        return False
    if ifname == TUNNEL_DEVICE:
        return True
    if is_endpoint_ifname(ifname) or ifname in (HOST_DEVICE, HOST_DEVICE_PEER):
        return False
    return any(dst.subnet_of(pool) for pool in pools)
