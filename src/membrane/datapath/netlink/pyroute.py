"""The kernel implementation of :class:`~membrane.datapath.netlink.protocol.Netlink` on pyroute2.

Primitive: :class:`PyrouteNetlink`. One endpoint attach is about a dozen netlink requests over two
sockets (node and container namespace), each socket made by a thread that joined the namespace
(see :mod:`membrane.datapath.netns`), so no process is forked per pod.

Wiring made by ``attach_endpoint`` (node side | container side)::

    lxcXXXXXXXXXXX  up, MTU, no IPv6 address     eth0  up, MTU, no IPv6 address
      arp_filter=1 (answers/learns ARP only        POD_IP/32
      for the pod's own address)                   ROUTER_IP dev eth0 scope link proto 177
    POD_IP/32 dev lxc… scope link proto 177        default via ROUTER_IP dev eth0 proto 177
                                                   neigh ROUTER_IP lladdr <lxc… MAC> PERMANENT
                                                   lo up

The static neighbour makes the pod independent of the node's ARP settings (``arp_ignore``); the node
still answers ARP for the router IP, which lives on ``membrane_host``, on every host veth.

Between nodes (``ensure_tunnel_device``, ``list_routing``, ``apply_routing``)::

    membrane_vxlan  vxlan id VNI dstport PORT local NODE_IP dev UPLINK nolearning
                    address 02:6d:<node IP bytes>  MTU uplink-50  addrgenmode none  up
    per peer (vxlan)   fdb   PEER_MAC dst PEER_NODE_IP self permanent
                       neigh PEER_ROUTER_IP lladdr PEER_MAC nud permanent
                       route PEER_POD_CIDR via PEER_ROUTER_IP dev membrane_vxlan src ROUTER_IP onlink proto 177
    per peer (native)  route PEER_POD_CIDR via PEER_NODE_IP dev UPLINK proto 177

Peer entries are written with batched netlink (:mod:`membrane.datapath.netlink.batch`): a resync
that touches many peers is a few system calls, not one round trip per entry.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from membrane.core.errors import DatapathError, InvalidInput
from membrane.datapath.netlink.batch import (
    RTNH_F_ONLINK,
    Request,
    fdb_request,
    neighbour_request,
    route_request,
    send_batch,
)
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
from membrane.datapath.netns import if_nametoindex, netlink_socket_fd, netns_path, open_netns, write_sysctl

AF_INET = 2
AF_BRIDGE = 7
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
NUD_PERMANENT = 0x80
IFF_UP = 0x1
LOOPBACK_IFINDEX = 1  # the loopback device has index 1 in every namespace
IN6_ADDR_GEN_MODE_NONE = 1
# Pods are IPv4-only: no link-local IPv6 address on either veth end, so no DAD/RS/MLD chatter.
_NO_IPV6_ADDRESS = {"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]}

RTNL = Any  # pyroute2 has no type hints


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return os.strerror(exc.code)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


async def _get_link(ipr: RTNL, ifname: str) -> Any | None:
    try:
        return (await ipr.link("get", ifname=ifname))[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


async def _links(ipr: RTNL) -> list[Any]:
    return [msg async for msg in await ipr.link("dump")]


async def _ipv4_addresses(ipr: RTNL, index: int) -> list[tuple[IPv4Address, int]]:
    return [
        (IPv4Address(msg.get("address")), msg["prefixlen"])
        async for msg in await ipr.addr("dump", family=AF_INET)
        if msg["index"] == index
    ]


async def _dump(request: Any) -> list[Any]:
    return [msg async for msg in await request]


async def _ipv4_routes(ipr: RTNL) -> list[Any]:
    return [
        msg
        async for msg in await ipr.route("dump", family=AF_INET)
        if msg.get("table") == RT_TABLE_MAIN and msg["type"] == 1  # RTN_UNICAST
    ]


def _route_dst(msg: Any) -> IPv4Network:
    return IPv4Network(f"{msg.get('dst') or '0.0.0.0'}/{msg['dst_len']}")


def _kind(link: Any) -> str | None:
    kind: str | None = link.get(("linkinfo", "kind"))
    return kind


BATCH_TIMEOUT = 10.0  # seconds to wait for the kernel's acks of one batch (they come at once)


def _vxlan_data(link: Any) -> dict[str, Any]:
    data = link.get(("linkinfo", "data"))
    if data is None:
        return {}
    return {name: value for name, value in data.get("attrs", []) if isinstance(name, str)}


def _tunnel_of(link: Any, names: dict[int, str]) -> tuple[TunnelDevice, bool] | None:
    """The tunnel device as the kernel holds it, and whether it learns (it must not); None when it
    lacks a piece a TunnelDevice needs (then it is not one this agent made)."""
    data = _vxlan_data(link)
    try:
        device = TunnelDevice(
            vni=int(data["IFLA_VXLAN_ID"]),
            port=int(data["IFLA_VXLAN_PORT"]),
            local=IPv4Address(data["IFLA_VXLAN_LOCAL"]),
            uplink=names.get(int(data.get("IFLA_VXLAN_LINK") or 0), "?"),
            mtu=int(link.get("mtu")),
            mac=str(link.get("address")),
            name=str(link.get("ifname")),
        )
    except (KeyError, TypeError, ValueError, InvalidInput):
        return None
    return device, bool(data.get("IFLA_VXLAN_LEARNING"))


class PyrouteNetlink:
    """Netlink through pyroute2. ``node_netns`` (name or path) is the node's namespace; None means the
    namespace the agent runs in, which is the production case (tests pass a fresh namespace)."""

    def __init__(self, node_netns: str | None = None) -> None:
        self._node_netns = netns_path(node_netns) if node_netns is not None else None

    @asynccontextmanager
    async def _rtnl(self, netns: str | int | None) -> AsyncIterator[RTNL]:
        try:
            fd = netlink_socket_fd(netns)
        except OSError as exc:
            raise DatapathError(f"netlink socket in {netns}: {_strerror(exc)}") from None
        ipr = AsyncIPRoute(fileno=fd)
        try:
            yield ipr
        finally:
            ipr.close()

    # -- node router device -------------------------------------------------------------------

    async def ensure_host_device(self, router_ip: IPv4Address, mtu: int) -> HostDevice:
        async with self._rtnl(self._node_netns) as node:
            try:
                host = await _get_link(node, HOST_DEVICE)
                if host is not None and _kind(host) != "veth":
                    raise DatapathError(f"{HOST_DEVICE} exists and is a {_kind(host)} device, not a veth")
                if host is None:
                    # A lone peer name would make the pair creation fail; it can only be ours.
                    if await _get_link(node, HOST_DEVICE_PEER) is not None:
                        await node.link("del", ifname=HOST_DEVICE_PEER)
                    await node.link(
                        "add",
                        ifname=HOST_DEVICE,
                        kind="veth",
                        mtu=mtu,
                        peer={"ifname": HOST_DEVICE_PEER, "mtu": mtu},
                    )
                    host = await _get_link(node, HOST_DEVICE)
                peer = await _get_link(node, HOST_DEVICE_PEER)
                if host is None or peer is None:
                    raise DatapathError(f"{HOST_DEVICE}/{HOST_DEVICE_PEER} vanished while being set up")
                for link in (host, peer):
                    await node.link("set", index=link["index"], state="up", mtu=mtu, af_spec=_NO_IPV6_ADDRESS)
                index = host["index"]
                have = await _ipv4_addresses(node, index)
                if (router_ip, 32) not in have:
                    await node.addr("add", index=index, address=str(router_ip), prefixlen=32)
                for address, prefixlen in have:
                    if (address, prefixlen) != (router_ip, 32):
                        await node.addr("del", index=index, address=str(address), prefixlen=prefixlen)
            except NetlinkError as exc:
                raise DatapathError(f"setting up {HOST_DEVICE}: {_strerror(exc)}") from None
        write_sysctl(self._node_netns, "net/ipv4/ip_forward", 1)
        return HostDevice(ifname=HOST_DEVICE, ifindex=index, router_ip=router_ip, mtu=mtu)

    # -- endpoints ----------------------------------------------------------------------------

    async def attach_endpoint(self, spec: EndpointSpec) -> AttachedEndpoint:
        host_ifname = spec.host_ifname
        ns_fd = open_netns(spec.netns)
        node_ns = os.stat(self._node_netns or "/proc/self/ns/net")
        container_ns = os.fstat(ns_fd)
        if (container_ns.st_dev, container_ns.st_ino) == (node_ns.st_dev, node_ns.st_ino):
            # A container "namespace" that is the node's own (e.g. a /proc/PID path read before the
            # process entered its namespace) would have us rename and readdress the node's interfaces.
            os.close(ns_fd)
            raise DatapathError(f"refusing to attach {spec.container_id[:12]}: {spec.netns} is the node's own "
                                "network namespace")
        try:
            async with self._rtnl(self._node_netns) as node, self._rtnl(ns_fd) as pod:
                try:
                    host = await _get_link(node, host_ifname)
                    if host is not None:
                        pod_link = await _get_link(pod, spec.ifname)
                        if _is_pair(host, pod_link):
                            # A retried ADD: the same veth pair, converge it in place.
                            return await self._configure(node, pod, spec, host, pod_link, fresh=False)
                        await node.link("del", index=host["index"])
                    await self._create_veth(node, spec, ns_fd)
                except NetlinkError as exc:
                    raise DatapathError(f"attaching {spec.container_id[:12]}: {_strerror(exc)}") from None
                try:
                    host = await _get_link(node, host_ifname)
                    pod_link = await _get_link(pod, spec.ifname)
                    if host is None or pod_link is None:
                        raise DatapathError(f"veth {host_ifname} vanished while being set up")
                    return await self._configure(node, pod, spec, host, pod_link, fresh=True)
                except BaseException as exc:
                    # No half-made endpoint: the peer and the routes go with the host veth.
                    with suppress(NetlinkError):
                        await node.link("del", ifname=host_ifname)
                    if isinstance(exc, NetlinkError):
                        raise DatapathError(f"attaching {spec.container_id[:12]}: {_strerror(exc)}") from None
                    raise
        finally:
            os.close(ns_fd)

    async def _create_veth(self, node: RTNL, spec: EndpointSpec, ns_fd: int) -> None:
        # One request creates both ends, the peer directly inside the container namespace under its
        # final name: no rename, no move.
        try:
            await node.link(
                "add",
                ifname=spec.host_ifname,
                kind="veth",
                mtu=spec.mtu,
                peer={"ifname": spec.ifname, "net_ns_fd": ns_fd, "mtu": spec.mtu},
            )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise DatapathError(
                    f"{spec.ifname} already exists in {spec.netns} and is not this endpoint's veth"
                ) from None
            raise

    async def _configure(
        self, node: RTNL, pod: RTNL, spec: EndpointSpec, host: Any, pod_link: Any, *, fresh: bool
    ) -> AttachedEndpoint:
        host_index: int = host["index"]
        host_mac: str = host.get("address")
        pod_index: int = pod_link["index"]
        router = str(spec.router_ip)
        # Before the link is up: ARP on this veth is answered (and learnt) only for addresses routed
        # back through it, i.e. the pod's own; a pod cannot plant entries for other addresses.
        write_sysctl(self._node_netns, f"net/ipv4/conf/{spec.host_ifname}/arp_filter", 1)
        await node.link("set", index=host_index, state="up", mtu=spec.mtu, af_spec=_NO_IPV6_ADDRESS)

        await pod.link("set", index=LOOPBACK_IFINDEX, state="up")
        await pod.link("set", index=pod_index, state="up", mtu=spec.mtu, af_spec=_NO_IPV6_ADDRESS)
        if not fresh:
            for address, prefixlen in await _ipv4_addresses(pod, pod_index):
                if (address, prefixlen) != (spec.pod_ip, 32):
                    await pod.addr("del", index=pod_index, address=str(address), prefixlen=prefixlen)
        await pod.addr("replace", index=pod_index, address=str(spec.pod_ip), prefixlen=32)
        await pod.route("replace", dst=f"{router}/32", oif=pod_index, scope=RT_SCOPE_LINK, proto=RTPROT_MEMBRANE)
        await pod.neigh("replace", dst=router, lladdr=host_mac, ifindex=pod_index, state=NUD_PERMANENT)
        await pod.route("replace", dst="0.0.0.0/0", gateway=router, oif=pod_index, proto=RTPROT_MEMBRANE)

        if not fresh:
            for route in await _ipv4_routes(node):
                if (
                    route.get("oif") == host_index
                    and route["proto"] == RTPROT_MEMBRANE
                    and _route_dst(route) != IPv4Network(f"{spec.pod_ip}/32")
                ):
                    await node.route(
                        "del",
                        dst=str(_route_dst(route)),
                        oif=host_index,
                        scope=route["scope"],
                        proto=RTPROT_MEMBRANE,
                    )
        await node.route("replace", dst=f"{spec.pod_ip}/32", oif=host_index, scope=RT_SCOPE_LINK, proto=RTPROT_MEMBRANE)
        return AttachedEndpoint(
            container_id=spec.container_id,
            host_ifname=spec.host_ifname,
            host_ifindex=host_index,
            host_mac=host_mac,
            container_ifname=spec.ifname,
            container_ifindex=pod_index,
            container_mac=pod_link.get("address"),
            pod_ip=spec.pod_ip,
        )

    async def detach_endpoint(self, container_id: str, host_ifname: str | None = None) -> None:
        name = host_ifname or endpoint_ifname(container_id)
        if not is_endpoint_ifname(name):
            raise DatapathError(f"{name} is not an endpoint veth name; refusing to delete it")
        async with self._rtnl(self._node_netns) as node:
            try:
                await node.link("del", ifname=name)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise DatapathError(f"detaching {container_id[:12]}: {_strerror(exc)}") from None

    async def check_endpoint(self, spec: EndpointSpec) -> None:
        problems: list[str] = []
        async with self._rtnl(self._node_netns) as node:
            host = await _get_link(node, spec.host_ifname)
            if host is None:
                raise DatapathError(f"endpoint {spec.container_id[:12]}: host veth {spec.host_ifname} is missing")
            if not host["flags"] & IFF_UP:
                problems.append(f"host veth {spec.host_ifname} is down")
            host_routes = [
                r for r in await _ipv4_routes(node) if r.get("oif") == host["index"] and r["proto"] == RTPROT_MEMBRANE
            ]
            if not any(_route_dst(r) == IPv4Network(f"{spec.pod_ip}/32") for r in host_routes):
                problems.append(f"route {spec.pod_ip}/32 dev {spec.host_ifname} proto {RTPROT_MEMBRANE} is missing")
        if os.path.exists(spec.netns):
            problems.extend(await self._check_container(spec, host))
        else:
            problems.append(f"network namespace {spec.netns} does not exist")
        if problems:
            raise DatapathError(f"endpoint {spec.container_id[:12]}: " + "; ".join(problems))

    async def _check_container(self, spec: EndpointSpec, host: Any) -> list[str]:
        problems: list[str] = []
        async with self._rtnl(spec.netns) as pod:
            pod_link = await _get_link(pod, spec.ifname)
            if pod_link is None or not _is_pair(host, pod_link):
                return [f"{spec.ifname} in {spec.netns} is not the peer of {spec.host_ifname}"]
            index = pod_link["index"]
            if not pod_link["flags"] & IFF_UP:
                problems.append(f"{spec.ifname} is down")
            if pod_link.get("mtu") != spec.mtu:
                problems.append(f"{spec.ifname} has MTU {pod_link.get('mtu')}, expected {spec.mtu}")
            if (spec.pod_ip, 32) not in await _ipv4_addresses(pod, index):
                problems.append(f"address {spec.pod_ip}/32 is missing on {spec.ifname}")
            routes = [r for r in await _ipv4_routes(pod) if r.get("oif") == index]
            if not any(
                _route_dst(r) == IPv4Network(f"{spec.router_ip}/32") and r["scope"] == RT_SCOPE_LINK for r in routes
            ):
                problems.append(f"route {spec.router_ip} dev {spec.ifname} scope link is missing")
            if not any(
                _route_dst(r) == IPv4Network("0.0.0.0/0") and r.get("gateway") == str(spec.router_ip) for r in routes
            ):
                problems.append(f"default route via {spec.router_ip} is missing")
        return problems

    async def list_owned(self) -> OwnedEndpoints:
        async with self._rtnl(self._node_netns) as node:
            links = {
                msg["index"]: msg.get("ifname")
                for msg in await _links(node)
                if is_endpoint_ifname(msg.get("ifname") or "") and _kind(msg) == "veth"
            }
            routes = [
                OwnedRoute(dst=_route_dst(r), ifname=links[r.get("oif")], ifindex=r.get("oif"))
                for r in await _ipv4_routes(node)
                if r["proto"] == RTPROT_MEMBRANE and r.get("oif") in links
            ]
        return OwnedEndpoints(
            links=tuple(sorted((OwnedLink(ifname=n, ifindex=i) for i, n in links.items()), key=lambda x: x.ifname)),
            routes=tuple(sorted(routes, key=lambda r: (r.ifname, int(r.dst.network_address)))),
        )

    async def prune(self, keep: Collection[str]) -> tuple[str, ...]:
        doomed = orphaned_links(await self.list_owned(), keep)
        removed: list[str] = []
        async with self._rtnl(self._node_netns) as node:
            for name in doomed:
                try:
                    await node.link("del", ifname=name)
                    removed.append(name)
                except NetlinkError as exc:
                    if exc.code == errno.ENODEV:  # gone meanwhile: a concurrent DEL
                        continue
                    raise DatapathError(f"pruning {name}: {_strerror(exc)}") from None
        return tuple(removed)

    # -- between nodes ------------------------------------------------------------------------

    async def ensure_tunnel_device(self, device: TunnelDevice) -> bool:
        async with self._rtnl(self._node_netns) as node:
            try:
                uplink = await _get_link(node, device.uplink)
                if uplink is None:
                    raise DatapathError(f"{device.name}: uplink {device.uplink} does not exist")
                link = await _get_link(node, device.name)
                if link is not None and _kind(link) != "vxlan":
                    raise DatapathError(f"{device.name} exists and is a {_kind(link)} device, not a vxlan")
                if link is not None:
                    have = _tunnel_of(link, {uplink["index"]: device.uplink})
                    # VNI, port, local address and uplink cannot change on a live vxlan device, and a
                    # changed MAC would strand the peers' entries: replace the device.
                    if have is None or have[1] or have[0] != replace(device, mtu=have[0].mtu):
                        await node.link("del", index=link["index"])
                        link = None
                created = link is None
                if link is None:
                    await node.link(
                        "add",
                        ifname=device.name,
                        kind="vxlan",
                        vxlan_id=device.vni,
                        vxlan_port=device.port,
                        vxlan_local=str(device.local),
                        vxlan_link=uplink["index"],
                        vxlan_learning=0,
                        address=device.mac,
                        mtu=device.mtu,
                    )
                    link = await _get_link(node, device.name)
                    if link is None:
                        raise DatapathError(f"{device.name} vanished while being set up")
                await node.link("set", index=link["index"], state="up", mtu=device.mtu, af_spec=_NO_IPV6_ADDRESS)
            except NetlinkError as exc:
                raise DatapathError(f"setting up {device.name}: {_strerror(exc)}") from None
        return created

    async def delete_tunnel_device(self) -> bool:
        async with self._rtnl(self._node_netns) as node:
            try:
                link = await _get_link(node, TUNNEL_DEVICE)
                if link is None:
                    return False
                if _kind(link) != "vxlan":
                    raise DatapathError(
                        f"{TUNNEL_DEVICE} is a {_kind(link)} device, not a vxlan; refusing to delete it"
                    )
                await node.link("del", index=link["index"])
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False
                raise DatapathError(f"deleting {TUNNEL_DEVICE}: {_strerror(exc)}") from None
        return True

    async def list_routing(self, pools: Collection[IPv4Network]) -> RoutingState:
        async with self._rtnl(self._node_netns) as node:
            try:
                links = await _links(node)
                names = {msg["index"]: str(msg.get("ifname")) for msg in links}
                tunnel_link = next(
                    (m for m in links if m.get("ifname") == TUNNEL_DEVICE and _kind(m) == "vxlan"), None
                )
                routes = []
                for r in await _ipv4_routes(node):
                    ifname = names.get(r.get("oif"))
                    if ifname is None or not is_peer_route(_route_dst(r), ifname, r["proto"], pools):
                        continue
                    gateway, source = r.get("gateway"), r.get("prefsrc")
                    routes.append(PeerRoute(
                        dst=_route_dst(r),
                        gateway=IPv4Address(gateway) if gateway else None,
                        device=ifname,
                        onlink=bool(r["flags"] & RTNH_F_ONLINK),
                        source=IPv4Address(source) if source else None,
                    ))
                tunnel = None
                neighbours: list[PeerNeighbour] = []
                fdb: list[PeerFdbEntry] = []
                if tunnel_link is not None:
                    index = tunnel_link["index"]
                    found = _tunnel_of(tunnel_link, names)
                    tunnel = found[0] if found is not None else None
                    for msg in await _dump(node.neigh("dump", family=AF_INET, ifindex=index)):
                        if msg["ifindex"] == index and msg.get("dst"):
                            neighbours.append(PeerNeighbour(
                                ip=IPv4Address(msg.get("dst")),
                                mac=str(msg.get("lladdr") or ""),
                                permanent=bool(msg["state"] & NUD_PERMANENT),
                            ))
                    for msg in await _dump(node.neigh("dump", family=AF_BRIDGE, ifindex=index)):
                        # Entries without a remote are the device's own addresses, not peers.
                        if msg["ifindex"] == index and msg.get("dst") and msg.get("lladdr"):
                            fdb.append(PeerFdbEntry(mac=str(msg.get("lladdr")), dst=IPv4Address(msg.get("dst"))))
            except NetlinkError as exc:
                raise DatapathError(f"reading routes and neighbours: {_strerror(exc)}") from None
        return RoutingState(tunnel, frozenset(routes), frozenset(neighbours), frozenset(fdb))

    async def apply_routing(self, changes: RoutingChanges) -> None:
        if not changes:
            return
        devices = {r.device for r in (*changes.add_routes, *changes.delete_routes)} | {TUNNEL_DEVICE}
        index = if_nametoindex(self._node_netns, sorted(devices))
        tunnel = index.get(TUNNEL_DEVICE)
        requests: list[Request] = []
        problems: list[str] = []
        if tunnel is None:
            problems += [f"{what}: device {TUNNEL_DEVICE} does not exist"
                         for what in (*(f"fdb {e}" for e in changes.add_fdb),
                                      *(f"neighbour {n}" for n in changes.add_neighbours))]
        else:
            requests += [fdb_request(delete=False, mac=e.mac, dst=e.dst, ifindex=tunnel, what=f"fdb {e}")
                         for e in changes.add_fdb]
            requests += [neighbour_request(delete=False, ip=n.ip, mac=n.mac, ifindex=tunnel, what=f"neighbour {n}")
                         for n in changes.add_neighbours]
        for route in changes.add_routes:
            oif = index.get(route.device)
            if oif is None:
                problems.append(f"route {route}: device {route.device} does not exist")
            elif route.gateway is None:
                problems.append(f"route {route}: a peer route needs a gateway")
            else:
                requests.append(route_request(delete=False, dst=route.dst, gateway=route.gateway, oif=oif,
                                              proto=RTPROT_MEMBRANE, onlink=route.onlink, source=route.source,
                                              what=f"route {route}"))
        # Entries whose device is gone are gone already: the kernel removed them with the device.
        for route in changes.delete_routes:
            if (oif := index.get(route.device)) is not None:
                requests.append(route_request(delete=True, dst=route.dst, gateway=route.gateway, oif=oif,
                                              proto=RTPROT_MEMBRANE, what=f"delete route {route}"))
        if tunnel is not None:
            requests += [
                neighbour_request(delete=True, ip=n.ip, mac=n.mac, ifindex=tunnel, what=f"delete neighbour {n}")
                for n in changes.delete_neighbours
            ]
            requests += [fdb_request(delete=True, mac=e.mac, dst=e.dst, ifindex=tunnel, what=f"delete fdb {e}")
                         for e in changes.delete_fdb]
        if requests:
            try:
                refused = await asyncio.to_thread(self._send, requests)
            except OSError as exc:
                raise DatapathError(f"netlink batch of {len(requests)} requests: {_strerror(exc)}") from None
            problems += [f"{request.what}: {os.strerror(code)}" for request, code in refused]
        if problems:
            raise DatapathError("; ".join(problems))

    def _send(self, requests: list[Request]) -> list[tuple[Request, int]]:
        sock = socket.socket(fileno=netlink_socket_fd(self._node_netns))
        try:
            sock.settimeout(BATCH_TIMEOUT)
            return send_batch(sock, requests)
        finally:
            sock.close()


def _is_pair(host: Any, pod_link: Any | None) -> bool:
    """True when ``pod_link`` is the veth peer of ``host`` (each names the other's index)."""
    return (
        pod_link is not None
        and _kind(pod_link) == "veth"
        and pod_link.get("link") == host["index"]
        and host.get("link") == pod_link["index"]
    )
