"""An in-memory :class:`~membrane.datapath.netlink.protocol.Netlink` for tests without root.

Primitives: :class:`FakeNetlink` with its per-namespace state (:class:`FakeNamespace`,
:class:`FakeLink`, :class:`FakeRoute`). It keeps the same promises as the kernel implementation —
idempotent attach, cleanup on failure, prune by name only — so agent logic tested against it behaves
the same on a real node. Between nodes it refuses what the kernel refuses: a route through a missing
device, a gateway that is not on-link without ``onlink``, a source address the node does not hold,
FDB entries on anything but a vxlan device; deleting a device takes its routes, neighbours and FDB
entries with it. Container namespaces must be created first with :meth:`FakeNetlink.add_netns`
(the kernel refuses a namespace path that does not exist, and so does the fake).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network

from membrane.core.errors import DatapathError
from membrane.datapath.netlink.model import (
    HOST_DEVICE,
    HOST_DEVICE_PEER,
    RTPROT_MEMBRANE,
    TUNNEL_DEVICE,
    AttachedEndpoint,
    EndpointSpec,
    HostDevice,
    OwnedEndpoints,
    OwnedLink,
    OwnedRoute,
    PeerFdbEntry,
    PeerNeighbour,
    PeerRoute,
    RoutingChanges,
    RoutingState,
    TunnelDevice,
    endpoint_ifname,
    is_endpoint_ifname,
    is_peer_route,
    orphaned_links,
)

NODE = "node"  # key of the node namespace in FakeNetlink.namespaces


@dataclass(frozen=True)
class FakeRoute:
    dst: IPv4Network
    ifname: str
    gateway: IPv4Address | None = None
    scope: str = "universe"  # "link" for on-link routes
    proto: int = RTPROT_MEMBRANE
    onlink: bool = False
    source: IPv4Address | None = None


@dataclass
class FakeLink:
    ifname: str
    ifindex: int
    kind: str
    mac: str
    mtu: int = 1500
    up: bool = False
    peer: tuple[str, str] | None = None  # (namespace key, ifname)
    addresses: set[tuple[IPv4Address, int]] = field(default_factory=set)
    sysctl: dict[str, str] = field(default_factory=dict)
    vxlan: TunnelDevice | None = None  # kind "vxlan": its settings (mtu and mac are the link's)
    learning: bool = False


@dataclass
class FakeNamespace:
    links: dict[str, FakeLink] = field(default_factory=dict)
    routes: set[FakeRoute] = field(default_factory=set)
    neighbours: dict[tuple[IPv4Address, str], str] = field(default_factory=dict)  # (ip, dev) -> mac
    fdb: set[tuple[str, str, IPv4Address]] = field(default_factory=set)  # (dev, mac, dst)
    sysctl: dict[str, str] = field(default_factory=dict)
    next_index: int = 2  # 1 is lo

    def __post_init__(self) -> None:
        self.links.setdefault("lo", FakeLink(ifname="lo", ifindex=1, kind="loopback", mac="00:00:00:00:00:00"))


def _multi_destination(mac: str) -> bool:
    """The vxlan driver keeps a list of destinations only for the all-zero and multicast MACs."""
    first = int(mac.split(":")[0], 16)
    return bool(first & 1) or mac == "00:00:00:00:00:00"


def _mac(seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    # Locally administered, unicast (like the kernel's random veth addresses).
    return ":".join(f"{b:02x}" for b in (0x02 | (digest[0] & 0xFC), *digest[1:6]))


class FakeNetlink:
    """Records links, addresses, routes and neighbours per namespace.

    ``fail`` maps an operation name ("ensure_host_device", "attach_endpoint", "attach_configure",
    "detach_endpoint", "prune") to an exception raised once on its next call; "attach_configure"
    fails after the veth exists, to exercise the cleanup path.
    """

    def __init__(self) -> None:
        self.namespaces: dict[str, FakeNamespace] = {NODE: FakeNamespace()}
        self.fail: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.routing_batches: list[int] = []  # requests per apply_routing call (what a batch would send)

    # -- test controls ------------------------------------------------------------------------

    def add_netns(self, path: str) -> FakeNamespace:
        return self.namespaces.setdefault(path, FakeNamespace())

    def delete_netns(self, path: str) -> None:
        """A container going away: its veth ends die, and with them their node-side peers."""
        ns = self.namespaces.pop(path)
        for link in ns.links.values():
            if link.peer is not None and link.peer[0] in self.namespaces:
                self._delete_link(link.peer[0], link.peer[1])

    def add_link(self, ifname: str, kind: str = "veth", netns: str = NODE) -> FakeLink:
        """Create a link outside the agent's control (for prune tests)."""
        return self._new_link(netns, ifname, kind)

    def add_uplink(self, ifname: str, address: IPv4Address, prefixlen: int, mtu: int = 1500) -> FakeLink:
        """The node's device facing the underlay, up, with its address."""
        link = self._new_link(NODE, ifname, "veth", mtu)
        link.up = True
        link.addresses.add((address, prefixlen))
        return link

    def delete_link(self, ifname: str, netns: str = NODE) -> None:
        """``ip link del``: a veth takes its peer with it, a device its routes and neighbours."""
        if ifname not in self.namespaces[netns].links:
            raise DatapathError(f"{ifname} does not exist")
        self._delete_link(netns, ifname)

    def set_link_down(self, ifname: str, netns: str = NODE) -> None:
        """``ip link set down``: as in the kernel, the routes through the link and its neighbour
        entries (permanent ones too) are flushed; addresses stay."""
        ns = self.namespaces[netns]
        ns.links[ifname].up = False
        ns.routes = {r for r in ns.routes if r.ifname != ifname}
        ns.neighbours = {k: v for k, v in ns.neighbours.items() if k[1] != ifname}

    @property
    def node(self) -> FakeNamespace:
        return self.namespaces[NODE]

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail:
            raise self.fail.pop(op)

    def _new_link(self, ns_key: str, ifname: str, kind: str, mtu: int = 1500) -> FakeLink:
        ns = self.namespaces[ns_key]
        if ifname in ns.links:
            raise DatapathError(f"{ifname} already exists")
        link = FakeLink(ifname=ifname, ifindex=ns.next_index, kind=kind, mac=_mac(f"{ns_key}/{ifname}/{ns.next_index}"))
        link.mtu = mtu
        ns.next_index += 1
        ns.links[ifname] = link
        return link

    def _delete_link(self, ns_key: str, ifname: str) -> None:
        ns = self.namespaces[ns_key]
        link = ns.links.pop(ifname, None)
        if link is None:
            return
        ns.routes = {r for r in ns.routes if r.ifname != ifname}
        ns.neighbours = {k: v for k, v in ns.neighbours.items() if k[1] != ifname}
        ns.fdb = {e for e in ns.fdb if e[0] != ifname}
        if link.peer is not None and link.peer[0] in self.namespaces:
            peer_ns = self.namespaces[link.peer[0]]
            if peer_ns.links.get(link.peer[1]) is not None and peer_ns.links[link.peer[1]].peer == (
                ns_key,
                ifname,
            ):
                peer_ns.links[link.peer[1]].peer = None
                self._delete_link(link.peer[0], link.peer[1])

    # -- Netlink ------------------------------------------------------------------------------

    async def ensure_host_device(self, router_ip: IPv4Address, mtu: int) -> HostDevice:
        self._maybe_fail("ensure_host_device")
        node = self.node
        host = node.links.get(HOST_DEVICE)
        if host is not None and host.kind != "veth":
            raise DatapathError(f"{HOST_DEVICE} exists and is a {host.kind} device, not a veth")
        if host is None:
            node.links.pop(HOST_DEVICE_PEER, None)
            host = self._new_link(NODE, HOST_DEVICE, "veth", mtu)
            peer = self._new_link(NODE, HOST_DEVICE_PEER, "veth", mtu)
            host.peer, peer.peer = (NODE, HOST_DEVICE_PEER), (NODE, HOST_DEVICE)
        for name in (HOST_DEVICE, HOST_DEVICE_PEER):
            node.links[name].up = True
            node.links[name].mtu = mtu
        host.addresses = {(router_ip, 32)}
        node.sysctl["net/ipv4/ip_forward"] = "1"
        return HostDevice(ifname=HOST_DEVICE, ifindex=host.ifindex, router_ip=router_ip, mtu=mtu)

    async def attach_endpoint(self, spec: EndpointSpec) -> AttachedEndpoint:
        self._maybe_fail("attach_endpoint")
        if spec.netns not in self.namespaces:
            raise DatapathError(f"network namespace {spec.netns}: No such file or directory")
        node, pod = self.node, self.namespaces[spec.netns]
        host = node.links.get(spec.host_ifname)
        fresh = True
        if host is not None:
            if host.peer == (spec.netns, spec.ifname) and spec.ifname in pod.links:
                fresh = False
            else:
                self._delete_link(NODE, spec.host_ifname)
        if fresh:
            if spec.ifname in pod.links:
                raise DatapathError(f"{spec.ifname} already exists in {spec.netns} and is not this endpoint's veth")
            host = self._new_link(NODE, spec.host_ifname, "veth", spec.mtu)
            peer = self._new_link(spec.netns, spec.ifname, "veth", spec.mtu)
            host.peer, peer.peer = (spec.netns, spec.ifname), (NODE, spec.host_ifname)
        try:
            self._maybe_fail("attach_configure")
            return self._configure(spec)
        except BaseException:
            if fresh:
                self._delete_link(NODE, spec.host_ifname)
            raise

    def _configure(self, spec: EndpointSpec) -> AttachedEndpoint:
        node, pod = self.node, self.namespaces[spec.netns]
        host, peer = node.links[spec.host_ifname], pod.links[spec.ifname]
        host.sysctl["arp_filter"] = "1"
        host.up = peer.up = pod.links["lo"].up = True
        host.mtu = peer.mtu = spec.mtu
        peer.addresses = {(spec.pod_ip, 32)}
        pod.routes = {r for r in pod.routes if r.ifname != spec.ifname}
        pod.routes.add(FakeRoute(IPv4Network(f"{spec.router_ip}/32"), spec.ifname, scope="link"))
        pod.routes.add(FakeRoute(IPv4Network("0.0.0.0/0"), spec.ifname, gateway=spec.router_ip))
        pod.neighbours[(spec.router_ip, spec.ifname)] = host.mac
        node.routes = {r for r in node.routes if not (r.ifname == spec.host_ifname and r.proto == RTPROT_MEMBRANE)}
        node.routes.add(FakeRoute(IPv4Network(f"{spec.pod_ip}/32"), spec.host_ifname, scope="link"))
        return AttachedEndpoint(
            container_id=spec.container_id,
            host_ifname=spec.host_ifname,
            host_ifindex=host.ifindex,
            host_mac=host.mac,
            container_ifname=spec.ifname,
            container_ifindex=peer.ifindex,
            container_mac=peer.mac,
            pod_ip=spec.pod_ip,
        )

    async def detach_endpoint(self, container_id: str, host_ifname: str | None = None) -> None:
        self._maybe_fail("detach_endpoint")
        name = host_ifname or endpoint_ifname(container_id)
        if not is_endpoint_ifname(name):
            raise DatapathError(f"{name} is not an endpoint veth name; refusing to delete it")
        self._delete_link(NODE, name)

    async def check_endpoint(self, spec: EndpointSpec) -> None:
        self._maybe_fail("check_endpoint")
        node = self.node
        host = node.links.get(spec.host_ifname)
        if host is None:
            raise DatapathError(f"endpoint {spec.container_id[:12]}: host veth {spec.host_ifname} is missing")
        problems = []
        if not host.up:
            problems.append(f"host veth {spec.host_ifname} is down")
        if FakeRoute(IPv4Network(f"{spec.pod_ip}/32"), spec.host_ifname, scope="link") not in node.routes:
            problems.append(f"route {spec.pod_ip}/32 dev {spec.host_ifname} proto {RTPROT_MEMBRANE} is missing")
        pod = self.namespaces.get(spec.netns)
        if pod is None:
            problems.append(f"network namespace {spec.netns} does not exist")
        elif host.peer != (spec.netns, spec.ifname) or spec.ifname not in pod.links:
            problems.append(f"{spec.ifname} in {spec.netns} is not the peer of {spec.host_ifname}")
        else:
            peer = pod.links[spec.ifname]
            if not peer.up:
                problems.append(f"{spec.ifname} is down")
            if peer.mtu != spec.mtu:
                problems.append(f"{spec.ifname} has MTU {peer.mtu}, expected {spec.mtu}")
            if (spec.pod_ip, 32) not in peer.addresses:
                problems.append(f"address {spec.pod_ip}/32 is missing on {spec.ifname}")
            if not any(r.dst == IPv4Network(f"{spec.router_ip}/32") and r.ifname == spec.ifname for r in pod.routes):
                problems.append(f"route {spec.router_ip} dev {spec.ifname} scope link is missing")
            if not any(r.dst.prefixlen == 0 and r.gateway == spec.router_ip for r in pod.routes):
                problems.append(f"default route via {spec.router_ip} is missing")
        if problems:
            raise DatapathError(f"endpoint {spec.container_id[:12]}: " + "; ".join(problems))

    async def list_owned(self) -> OwnedEndpoints:
        links = {
            name: link for name, link in self.node.links.items() if is_endpoint_ifname(name) and link.kind == "veth"
        }
        routes = [
            OwnedRoute(dst=r.dst, ifname=r.ifname, ifindex=links[r.ifname].ifindex)
            for r in self.node.routes
            if r.proto == RTPROT_MEMBRANE and r.ifname in links
        ]
        return OwnedEndpoints(
            links=tuple(OwnedLink(ifname=n, ifindex=links[n].ifindex) for n in sorted(links)),
            routes=tuple(sorted(routes, key=lambda r: (r.ifname, int(r.dst.network_address)))),
        )

    async def prune(self, keep: Collection[str]) -> tuple[str, ...]:
        self._maybe_fail("prune")
        doomed = orphaned_links(await self.list_owned(), keep)
        for name in doomed:
            self._delete_link(NODE, name)
        return doomed

    # -- between nodes ----------------------------------------------------------------------------

    async def ensure_tunnel_device(self, device: TunnelDevice) -> bool:
        self._maybe_fail("ensure_tunnel_device")
        node = self.node
        if device.uplink not in node.links:
            raise DatapathError(f"{device.name}: uplink {device.uplink} does not exist")
        link = node.links.get(device.name)
        if link is not None and link.kind != "vxlan":
            raise DatapathError(f"{device.name} exists and is a {link.kind} device, not a vxlan")
        # As in the kernel: only the MTU can change in place.
        if link is not None and (
            link.learning or link.vxlan is None or link.mac != device.mac
            or replace(link.vxlan, mtu=device.mtu) != device
        ):
            self._delete_link(NODE, device.name)
            link = None
        created = link is None
        if link is None:
            link = self._new_link(NODE, device.name, "vxlan", device.mtu)
        link.vxlan, link.mac, link.mtu, link.up = device, device.mac, device.mtu, True
        return created

    async def delete_tunnel_device(self) -> bool:
        self._maybe_fail("delete_tunnel_device")
        link = self.node.links.get(TUNNEL_DEVICE)
        if link is None:
            return False
        if link.kind != "vxlan":
            raise DatapathError(f"{TUNNEL_DEVICE} is a {link.kind} device, not a vxlan; refusing to delete it")
        self._delete_link(NODE, TUNNEL_DEVICE)
        return True

    async def list_routing(self, pools: Collection[IPv4Network]) -> RoutingState:
        node = self.node
        link = node.links.get(TUNNEL_DEVICE)
        tunnel = None
        if link is not None and link.kind == "vxlan" and link.vxlan is not None:
            tunnel = replace(link.vxlan, mtu=link.mtu, mac=link.mac)
        routes = frozenset(
            PeerRoute(r.dst, r.gateway, r.ifname, r.onlink, r.source)
            for r in node.routes
            if is_peer_route(r.dst, r.ifname, r.proto, pools)
        )
        neighbours = frozenset(PeerNeighbour(ip, mac) for (ip, dev), mac in node.neighbours.items()
                               if dev == TUNNEL_DEVICE)
        fdb = frozenset(PeerFdbEntry(mac, dst) for dev, mac, dst in node.fdb if dev == TUNNEL_DEVICE)
        return RoutingState(tunnel if link is not None and link.kind == "vxlan" else None, routes, neighbours, fdb)

    async def apply_routing(self, changes: RoutingChanges) -> None:
        self._maybe_fail("apply_routing")
        if not changes:
            return
        self.routing_batches.append(len(changes))
        node = self.node
        problems: list[str] = []
        tunnel = node.links.get(TUNNEL_DEVICE)
        local = {address for link in node.links.values() for address, _ in link.addresses}
        for entry in changes.add_fdb:
            if tunnel is None or tunnel.kind != "vxlan":
                problems.append(f"fdb {entry}: device {TUNNEL_DEVICE} does not exist")
            elif _multi_destination(entry.mac) or not any(
                    dev == TUNNEL_DEVICE and mac == entry.mac for dev, mac, _ in node.fdb):
                node.fdb.add((TUNNEL_DEVICE, entry.mac, entry.dst))
            # else: as in the vxlan driver, an append to a unicast MAC that has a destination already
            # keeps the one it has, without an error.
        for neigh in changes.add_neighbours:
            if tunnel is None:
                problems.append(f"neighbour {neigh}: device {TUNNEL_DEVICE} does not exist")
            else:
                node.neighbours[(neigh.ip, TUNNEL_DEVICE)] = neigh.mac
        for route in changes.add_routes:
            if (problem := self._route_problem(route, local)) is not None:
                problems.append(f"route {route}: {problem}")
                continue
            node.routes = {r for r in node.routes if r.dst != route.dst}
            node.routes.add(FakeRoute(route.dst, route.device, route.gateway, onlink=route.onlink, source=route.source))
        for route in changes.delete_routes:
            node.routes = {
                r for r in node.routes
                if not (r.dst == route.dst and r.ifname == route.device and r.proto == RTPROT_MEMBRANE
                        and (route.gateway is None or r.gateway == route.gateway))
            }
        for neigh in changes.delete_neighbours:
            node.neighbours.pop((neigh.ip, TUNNEL_DEVICE), None)
        for entry in changes.delete_fdb:
            node.fdb.discard((TUNNEL_DEVICE, entry.mac, entry.dst))
        if problems:
            raise DatapathError("; ".join(problems))

    def _route_problem(self, route: PeerRoute, local: set[IPv4Address]) -> str | None:
        link = self.node.links.get(route.device)
        if link is None:
            return f"device {route.device} does not exist"
        if route.gateway is None:
            return "a peer route needs a gateway"
        if not route.onlink and not any(
            route.gateway in IPv4Network(f"{address}/{prefixlen}", strict=False)
            for address, prefixlen in link.addresses
        ):
            return "Network is unreachable"  # the kernel's "Nexthop has invalid gateway"
        if route.source is not None and route.source not in local:
            return "Invalid argument"  # not a local address
        return None
