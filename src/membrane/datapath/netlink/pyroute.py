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
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager, suppress
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from membrane.core.errors import DatapathError
from membrane.datapath.netlink.model import (
    HOST_DEVICE,
    HOST_DEVICE_PEER,
    RTPROT_MEMBRANE,
    AttachedEndpoint,
    EndpointSpec,
    HostDevice,
    OwnedEndpoints,
    OwnedLink,
    OwnedRoute,
    endpoint_ifname,
    is_endpoint_ifname,
    orphaned_links,
)
from membrane.datapath.netns import netlink_socket_fd, netns_path, open_netns, write_sysctl

AF_INET = 2
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


def _is_pair(host: Any, pod_link: Any | None) -> bool:
    """True when ``pod_link`` is the veth peer of ``host`` (each names the other's index)."""
    return (
        pod_link is not None
        and _kind(pod_link) == "veth"
        and pod_link.get("link") == host["index"]
        and host.get("link") == pod_link["index"]
    )
