"""The behaviour every :class:`~membrane.datapath.netlink.protocol.Netlink` must show, as a pytest suite.

A test module provides a ``netlink_backend`` fixture yielding a :class:`NetlinkBackend` (a fresh
node namespace each time) and subclasses :class:`NetlinkContract`::

    @pytest.fixture
    def netlink_backend() -> NetlinkBackend:
        return FakeNetlinkBackend()

    class TestNetlinkContract(NetlinkContract):
        pass

The suite runs against :class:`FakeNetlinkBackend` (in memory) and :class:`KernelNetlinkBackend`
(:class:`~membrane.datapath.netlink.pyroute.PyrouteNetlink` in namespaces made by a
:class:`~membrane.testing.netns.NetnsFactory`): where they disagree, the fake is wrong.

A backend is three things: the ``netlink`` under test, *probes* that read the node as it is
(:meth:`NetlinkBackend.link`, :meth:`~NetlinkBackend.routes`, ...), and *pokes* that change it
behind the agent's back the way an operator with ``ip`` would (:meth:`~NetlinkBackend.set_down`,
:meth:`~NetlinkBackend.delete_route`, ...). ``netns`` arguments are None for the node or a path
returned by :meth:`~NetlinkBackend.new_container`.

Primitives: :class:`LinkView`, :class:`RouteView`, :class:`NetlinkBackend` with
:class:`FakeNetlinkBackend` and :class:`KernelNetlinkBackend`, and :class:`NetlinkContract`.
"""

from __future__ import annotations

import abc
import asyncio
import json
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from membrane.core.errors import DatapathError
from membrane.datapath.netlink import (
    HOST_DEVICE,
    HOST_DEVICE_PEER,
    RTPROT_MEMBRANE,
    TUNNEL_DEVICE,
    EndpointSpec,
    FakeNetlink,
    Netlink,
    PeerFdbEntry,
    PeerNeighbour,
    PeerRoute,
    PyrouteNetlink,
    RoutingChanges,
    RoutingState,
    TunnelDevice,
    endpoint_ifname,
    vtep_mac,
)
from membrane.datapath.netlink.fake import NODE, FakeLink, FakeRoute
from membrane.datapath.netns import read_sysctl
from membrane.testing.netns import Netns, NetnsFactory

ROUTER = IPv4Address("10.244.1.1")
MTU = 1450
POOL = IPv4Network("10.244.0.0/16")
UPLINK = "eth0"
NODE_IP = IPv4Address("172.31.250.11")
PEER_IP = IPv4Address("172.31.250.12")
WAIT = 10.0  # seconds for what the kernel does in the background


@dataclass(frozen=True)
class LinkView:
    """One interface as the namespace holds it."""

    ifname: str
    ifindex: int
    kind: str
    mac: str
    mtu: int
    up: bool
    addresses: frozenset[tuple[IPv4Address, int]]


@dataclass(frozen=True)
class RouteView:
    """One unicast route of the main table."""

    dst: IPv4Network
    dev: str
    gateway: IPv4Address | None
    proto: int


class NetlinkBackend(abc.ABC):
    """A fresh node namespace, the ``netlink`` bound to it, and ways to read and break it."""

    name: str
    netlink: Netlink

    # -- namespaces ---------------------------------------------------------------------------

    @abc.abstractmethod
    def new_container(self) -> str:
        """A new, empty container network namespace (``lo`` down); its path."""

    @abc.abstractmethod
    def delete_container(self, path: str) -> None:
        """The container going away: its namespace and everything in it."""

    # -- probes -------------------------------------------------------------------------------

    @abc.abstractmethod
    def link(self, ifname: str, netns: str | None = None) -> LinkView | None: ...

    @abc.abstractmethod
    def links(self, netns: str | None = None) -> set[str]: ...

    @abc.abstractmethod
    def routes(self, netns: str | None = None) -> set[RouteView]: ...

    @abc.abstractmethod
    def neighbours(self, ifname: str, netns: str | None = None) -> dict[IPv4Address, str]:
        """Permanent IPv4 neighbours on ``ifname``: address → MAC."""

    @abc.abstractmethod
    def sysctl(self, key: str, netns: str | None = None) -> str: ...

    # -- pokes --------------------------------------------------------------------------------

    @abc.abstractmethod
    def set_down(self, ifname: str, netns: str | None = None) -> None: ...

    @abc.abstractmethod
    def set_mtu(self, ifname: str, mtu: int, netns: str | None = None) -> None: ...

    @abc.abstractmethod
    def add_address(self, ifname: str, address: IPv4Address, prefixlen: int, netns: str | None = None) -> None: ...

    @abc.abstractmethod
    def delete_address(self, ifname: str, address: IPv4Address, prefixlen: int,
                       netns: str | None = None) -> None: ...

    @abc.abstractmethod
    def add_route(self, dst: IPv4Network, dev: str, gateway: IPv4Address | None, proto: int) -> None:
        """A route in the node namespace (someone else's when ``proto`` is not 177)."""

    @abc.abstractmethod
    def delete_route(self, dst: IPv4Network, netns: str | None = None) -> None: ...

    @abc.abstractmethod
    def add_link(self, ifname: str, kind: str, netns: str | None = None) -> None:
        """A link the agent did not make: ``bridge`` or ``veth`` (its peer named ``ifname`` + "p")."""

    @abc.abstractmethod
    def delete_link(self, ifname: str, netns: str | None = None) -> None: ...

    @abc.abstractmethod
    def add_uplink(self, ifname: str, address: IPv4Address, prefixlen: int) -> None:
        """The node's underlay device: up, with ``address``/``prefixlen``."""


class FakeNetlinkBackend(NetlinkBackend):
    """:class:`FakeNetlink`; pokes go through its test controls or mutate its state directly."""

    name = "fake"

    def __init__(self) -> None:
        self.fake = FakeNetlink()
        self.netlink = self.fake
        self._containers = 0

    def _ns(self, netns: str | None) -> str:
        return NODE if netns is None else netns

    def new_container(self) -> str:
        self._containers += 1
        path = f"/run/netns/mbnlc-pod-{self._containers}"
        self.fake.add_netns(path)
        return path

    def delete_container(self, path: str) -> None:
        self.fake.delete_netns(path)

    def _link(self, ifname: str, netns: str | None) -> FakeLink:
        return self.fake.namespaces[self._ns(netns)].links[ifname]

    def link(self, ifname: str, netns: str | None = None) -> LinkView | None:
        link = self.fake.namespaces[self._ns(netns)].links.get(ifname)
        if link is None:
            return None
        return LinkView(link.ifname, link.ifindex, link.kind, link.mac, link.mtu, link.up, frozenset(link.addresses))

    def links(self, netns: str | None = None) -> set[str]:
        return set(self.fake.namespaces[self._ns(netns)].links)

    def routes(self, netns: str | None = None) -> set[RouteView]:
        return {RouteView(r.dst, r.ifname, r.gateway, r.proto) for r in self.fake.namespaces[self._ns(netns)].routes}

    def neighbours(self, ifname: str, netns: str | None = None) -> dict[IPv4Address, str]:
        return {ip: mac for (ip, dev), mac in self.fake.namespaces[self._ns(netns)].neighbours.items() if dev == ifname}

    def sysctl(self, key: str, netns: str | None = None) -> str:
        ns = self.fake.namespaces[self._ns(netns)]
        parts = key.split("/")
        if parts[:3] == ["net", "ipv4", "conf"] and len(parts) == 5 and parts[3] in ns.links:
            return ns.links[parts[3]].sysctl.get(parts[4], "0")  # per-interface settings live on the link
        return ns.sysctl.get(key, "0")

    def set_down(self, ifname: str, netns: str | None = None) -> None:
        self.fake.set_link_down(ifname, self._ns(netns))

    def set_mtu(self, ifname: str, mtu: int, netns: str | None = None) -> None:
        self._link(ifname, netns).mtu = mtu

    def add_address(self, ifname: str, address: IPv4Address, prefixlen: int, netns: str | None = None) -> None:
        self._link(ifname, netns).addresses.add((address, prefixlen))

    def delete_address(self, ifname: str, address: IPv4Address, prefixlen: int, netns: str | None = None) -> None:
        self._link(ifname, netns).addresses.discard((address, prefixlen))

    def add_route(self, dst: IPv4Network, dev: str, gateway: IPv4Address | None, proto: int) -> None:
        self.fake.node.routes.add(FakeRoute(dst, dev, gateway, proto=proto))

    def delete_route(self, dst: IPv4Network, netns: str | None = None) -> None:
        ns = self.fake.namespaces[self._ns(netns)]
        ns.routes = {r for r in ns.routes if r.dst != dst}

    def add_link(self, ifname: str, kind: str, netns: str | None = None) -> None:
        self.fake.add_link(ifname, kind, self._ns(netns))

    def delete_link(self, ifname: str, netns: str | None = None) -> None:
        self.fake.delete_link(ifname, self._ns(netns))

    def add_uplink(self, ifname: str, address: IPv4Address, prefixlen: int) -> None:
        self.fake.add_uplink(ifname, address, prefixlen)


_PROTOCOLS = {"kernel": 2, "boot": 3, "static": 4}


class KernelNetlinkBackend(NetlinkBackend):
    """:class:`PyrouteNetlink` on a fresh node namespace; probes and pokes run ``ip`` inside."""

    name = "kernel"

    def __init__(self, factory: NetnsFactory, prefix: str) -> None:
        self._factory = factory
        self._prefix = prefix
        self.node = factory(prefix + "node-", lo_up=True)
        self.netlink = PyrouteNetlink(self.node.path)
        self._containers: dict[str, Netns] = {}

    def _ns(self, netns: str | None) -> Netns:
        return self.node if netns is None else self._containers[netns]

    def _json(self, netns: str | None, *cmd: str) -> list[dict[str, object]]:
        result = self._ns(netns).run("ip", "-j", *cmd, check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return []
        return list(json.loads(result.stdout))

    def new_container(self) -> str:
        ns = self._factory(self._prefix + "pod-")
        self._containers[ns.path] = ns
        return ns.path

    def delete_container(self, path: str) -> None:
        self._containers.pop(path).delete()

    def link(self, ifname: str, netns: str | None = None) -> LinkView | None:
        found = self._json(netns, "-d", "link", "show", "dev", ifname)
        if not found:
            return None
        link = found[0]
        addresses = self._json(netns, "-4", "addr", "show", "dev", ifname)
        info = link.get("linkinfo") or {}
        assert isinstance(info, dict)
        flags = link.get("flags") or []
        assert isinstance(flags, list)
        return LinkView(
            ifname=str(link["ifname"]),
            ifindex=int(str(link["ifindex"])),
            kind=str(info.get("info_kind", "")),
            mac=str(link.get("address", "")),
            mtu=int(str(link["mtu"])),
            up="UP" in flags,
            addresses=frozenset(
                (IPv4Address(a["local"]), int(a["prefixlen"]))
                for entry in addresses for a in entry.get("addr_info", [])  # type: ignore[attr-defined]
            ),
        )

    def links(self, netns: str | None = None) -> set[str]:
        return {str(link["ifname"]) for link in self._json(netns, "link", "show")}

    def routes(self, netns: str | None = None) -> set[RouteView]:
        routes = set()
        for r in self._json(netns, "route", "show", "table", "main"):
            if r.get("type", "unicast") != "unicast":
                continue
            dst = "0.0.0.0/0" if r["dst"] == "default" else str(r["dst"])
            proto = str(r.get("protocol", "boot"))
            gateway = r.get("gateway")
            routes.add(RouteView(IPv4Network(dst), str(r["dev"]), IPv4Address(str(gateway)) if gateway else None,
                                 _PROTOCOLS[proto] if proto in _PROTOCOLS else int(proto)))
        return routes

    def neighbours(self, ifname: str, netns: str | None = None) -> dict[IPv4Address, str]:
        return {
            IPv4Address(str(n["dst"])): str(n.get("lladdr", ""))
            for n in self._json(netns, "-4", "neigh", "show", "dev", ifname)
            if "PERMANENT" in (n.get("state") or [])  # type: ignore[operator]
        }

    def sysctl(self, key: str, netns: str | None = None) -> str:
        return read_sysctl(self._ns(netns).path, key)

    def set_down(self, ifname: str, netns: str | None = None) -> None:
        self._ns(netns).run("ip", "link", "set", ifname, "down")

    def set_mtu(self, ifname: str, mtu: int, netns: str | None = None) -> None:
        self._ns(netns).run("ip", "link", "set", ifname, "mtu", str(mtu))

    def add_address(self, ifname: str, address: IPv4Address, prefixlen: int, netns: str | None = None) -> None:
        self._ns(netns).run("ip", "addr", "add", f"{address}/{prefixlen}", "dev", ifname)

    def delete_address(self, ifname: str, address: IPv4Address, prefixlen: int, netns: str | None = None) -> None:
        self._ns(netns).run("ip", "addr", "del", f"{address}/{prefixlen}", "dev", ifname)

    def add_route(self, dst: IPv4Network, dev: str, gateway: IPv4Address | None, proto: int) -> None:
        via = ["via", str(gateway)] if gateway is not None else []
        self.node.run("ip", "route", "add", str(dst), *via, "dev", dev, "proto", str(proto))

    def delete_route(self, dst: IPv4Network, netns: str | None = None) -> None:
        self._ns(netns).run("ip", "route", "del", str(dst))

    def add_link(self, ifname: str, kind: str, netns: str | None = None) -> None:
        peer = ["peer", "name", ifname[:14] + "p"] if kind == "veth" else []
        self._ns(netns).run("ip", "link", "add", ifname, "type", kind, *peer)

    def delete_link(self, ifname: str, netns: str | None = None) -> None:
        self._ns(netns).run("ip", "link", "del", ifname)

    def add_uplink(self, ifname: str, address: IPv4Address, prefixlen: int) -> None:
        # A veth pair with both ends up has carrier: routes through it are usable, as on a real uplink.
        self.node.run("ip", "link", "add", ifname, "type", "veth", "peer", "name", ifname[:14] + "p")
        self.node.run("ip", "addr", "add", f"{address}/{prefixlen}", "dev", ifname)
        self.node.run("ip", "link", "set", ifname[:14] + "p", "up")
        self.node.run("ip", "link", "set", ifname, "up")


def _host(n: int) -> IPv4Network:
    return IPv4Network(f"10.244.1.{n}/32")


def tunnel_device(**changes: object) -> TunnelDevice:
    device = TunnelDevice(vni=2, port=8472, local=NODE_IP, uplink=UPLINK, mtu=MTU, mac=vtep_mac(NODE_IP))
    return replace(device, **changes)  # type: ignore[arg-type]


PEER_MAC = vtep_mac(PEER_IP)
PEER_FDB = PeerFdbEntry(PEER_MAC, PEER_IP)
PEER_NEIGHBOUR = PeerNeighbour(IPv4Address("10.244.2.1"), PEER_MAC)
TUNNEL_ROUTE = PeerRoute(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.1"), TUNNEL_DEVICE, onlink=True,
                         source=ROUTER)
NATIVE_ROUTE = PeerRoute(IPv4Network("10.244.3.0/24"), IPv4Address("172.31.250.13"), UPLINK)


class NetlinkContract:
    """The suite; a subclass runs it against the ``netlink_backend`` fixture's implementation."""

    @staticmethod
    def spec(b: NetlinkBackend, netns: str, n: int, container_id: str | None = None, **changes: object) -> EndpointSpec:
        spec = EndpointSpec(container_id=container_id or f"ctr-{n}", netns=netns, ifname="eth0",
                            pod_ip=IPv4Address(f"10.244.1.{n}"), router_ip=ROUTER, mtu=MTU)
        return replace(spec, **changes)  # type: ignore[arg-type]

    @staticmethod
    async def node(b: NetlinkBackend) -> None:
        await b.netlink.ensure_host_device(ROUTER, MTU)

    # -- ensure_host_device -----------------------------------------------------------------

    async def test_host_device_is_up_with_the_router_address_and_forwarding(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        device = await b.netlink.ensure_host_device(ROUTER, MTU)
        host, peer = b.link(HOST_DEVICE), b.link(HOST_DEVICE_PEER)
        assert host is not None and peer is not None
        assert (device.ifname, device.ifindex, device.router_ip, device.mtu) == (HOST_DEVICE, host.ifindex, ROUTER, MTU)
        assert (host.kind, host.up, host.mtu, host.addresses) == ("veth", True, MTU, frozenset({(ROUTER, 32)}))
        assert (peer.up, peer.mtu) == (True, MTU)
        assert b.sysctl("net/ipv4/ip_forward") == "1"
        assert await b.netlink.ensure_host_device(ROUTER, MTU) == device

    async def test_host_device_is_repaired_and_takes_a_new_router_address(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        first = await b.netlink.ensure_host_device(ROUTER, MTU)
        b.set_down(HOST_DEVICE)
        b.set_mtu(HOST_DEVICE_PEER, 1300)
        b.delete_address(HOST_DEVICE, ROUTER, 32)
        b.add_address(HOST_DEVICE, IPv4Address("10.9.9.9"), 24)
        again = await b.netlink.ensure_host_device(ROUTER, MTU)
        host, peer = b.link(HOST_DEVICE), b.link(HOST_DEVICE_PEER)
        assert host is not None and peer is not None
        assert again == first
        assert (host.up, host.mtu, host.addresses, peer.mtu) == (True, MTU, frozenset({(ROUTER, 32)}), MTU)

        moved = await b.netlink.ensure_host_device(IPv4Address("10.244.7.1"), 1400)
        host = b.link(HOST_DEVICE)
        assert host is not None and host.addresses == {(IPv4Address("10.244.7.1"), 32)} and host.mtu == 1400
        assert moved.ifindex == first.ifindex  # repaired in place, not recreated

    async def test_host_device_peer_left_alone_is_replaced(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await b.netlink.ensure_host_device(ROUTER, MTU)
        b.delete_link(HOST_DEVICE_PEER)  # a veth pair dies whole
        assert HOST_DEVICE not in b.links()
        await b.netlink.ensure_host_device(ROUTER, MTU)
        assert {HOST_DEVICE, HOST_DEVICE_PEER} <= b.links()

    async def test_a_stray_host_device_peer_name_is_taken_over(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        b.add_link(HOST_DEVICE_PEER, "bridge")  # the name alone, left behind: only the agent uses it
        await b.netlink.ensure_host_device(ROUTER, MTU)
        peer = b.link(HOST_DEVICE_PEER)
        assert peer is not None and (peer.kind, peer.up) == ("veth", True)

    async def test_a_foreign_host_device_is_refused(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        b.add_link(HOST_DEVICE, "bridge")
        with pytest.raises(DatapathError, match=f"{HOST_DEVICE} exists and is a bridge device, not a veth"):
            await b.netlink.ensure_host_device(ROUTER, MTU)
        assert b.link(HOST_DEVICE) is not None

    # -- attach_endpoint --------------------------------------------------------------------

    async def test_attach_wires_both_sides_and_a_retry_returns_the_same(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        spec = self.spec(b, pod, 20)
        first = await b.netlink.attach_endpoint(spec)
        host, peer = b.link(spec.host_ifname), b.link("eth0", pod)
        assert host is not None and peer is not None
        assert first.container_id == spec.container_id and first.pod_ip == spec.pod_ip
        assert (first.host_ifname, first.host_ifindex, first.host_mac) == (
            endpoint_ifname(spec.container_id), host.ifindex, host.mac)
        assert (first.container_ifname, first.container_ifindex, first.container_mac) == (
            "eth0", peer.ifindex, peer.mac)
        assert (host.kind, host.up, host.mtu) == ("veth", True, MTU)
        assert (peer.kind, peer.up, peer.mtu, peer.addresses) == ("veth", True, MTU, frozenset({(spec.pod_ip, 32)}))
        lo = b.link("lo", pod)
        assert lo is not None and lo.up
        assert RouteView(_host(20), spec.host_ifname, None, RTPROT_MEMBRANE) in b.routes()
        pod_routes = b.routes(pod)
        assert RouteView(IPv4Network("0.0.0.0/0"), "eth0", ROUTER, RTPROT_MEMBRANE) in pod_routes
        assert RouteView(_host(1), "eth0", None, RTPROT_MEMBRANE) in pod_routes
        assert b.neighbours("eth0", pod) == {ROUTER: host.mac}
        assert b.sysctl(f"net/ipv4/conf/{spec.host_ifname}/arp_filter") == "1"

        assert await b.netlink.attach_endpoint(spec) == first
        assert [n for n in b.links() if n.startswith("lxc")] == [spec.host_ifname]
        await b.netlink.check_endpoint(spec)

    async def test_a_retried_attach_with_a_new_address_converges(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        await b.netlink.attach_endpoint(self.spec(b, pod, 21, "c1"))
        moved = await b.netlink.attach_endpoint(self.spec(b, pod, 22, "c1"))
        peer = b.link("eth0", pod)
        assert peer is not None and peer.addresses == {(IPv4Address("10.244.1.22"), 32)}
        owned = await b.netlink.list_owned()
        assert [(r.dst, r.ifname) for r in owned.routes] == [(_host(22), moved.host_ifname)]
        await b.netlink.check_endpoint(self.spec(b, pod, 22, "c1"))

    async def test_attach_refuses_a_foreign_interface_and_leaves_nothing(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        b.add_link("eth0", "bridge", pod)
        with pytest.raises(DatapathError, match="eth0 already exists"):
            await b.netlink.attach_endpoint(self.spec(b, pod, 23))
        assert not [n for n in b.links() if n.startswith("lxc")]
        assert (await b.netlink.list_owned()).links == ()
        link = b.link("eth0", pod)
        assert link is not None and link.kind == "bridge"

    async def test_attach_to_a_namespace_that_is_gone_fails(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        b.delete_container(pod)
        with pytest.raises(DatapathError, match="No such file or directory"):
            await b.netlink.attach_endpoint(self.spec(b, pod, 24))
        assert (await b.netlink.list_owned()).links == ()

    # -- detach_endpoint --------------------------------------------------------------------

    async def test_detach_removes_both_ends_and_the_route_and_tolerates_absence(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        attached = await b.netlink.attach_endpoint(self.spec(b, pod, 30))
        await b.netlink.detach_endpoint(attached.container_id, attached.host_ifname)
        assert attached.host_ifname not in b.links()
        assert "eth0" not in b.links(pod)
        assert not [r for r in b.routes() if r.dst == _host(30)]
        await b.netlink.detach_endpoint(attached.container_id)  # already gone
        await b.netlink.detach_endpoint("never-attached")

    async def test_detach_refuses_a_name_that_is_not_an_endpoint(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        with pytest.raises(DatapathError, match="not an endpoint veth name"):
            await b.netlink.detach_endpoint("c", HOST_DEVICE)
        assert HOST_DEVICE in b.links()

    # -- check_endpoint ---------------------------------------------------------------------

    async def test_check_names_missing_routes_and_address_and_a_retry_repairs(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        spec = self.spec(b, pod, 40)
        await b.netlink.attach_endpoint(spec)
        b.delete_route(_host(40))
        b.delete_route(IPv4Network("0.0.0.0/0"), pod)
        b.delete_address("eth0", spec.pod_ip, 32, pod)
        with pytest.raises(DatapathError) as err:
            await b.netlink.check_endpoint(spec)
        message = str(err.value)
        assert f"route 10.244.1.40/32 dev {spec.host_ifname} proto 177 is missing" in message
        assert "default route via 10.244.1.1 is missing" in message
        assert "address 10.244.1.40/32 is missing on eth0" in message
        assert message.startswith(f"endpoint {spec.container_id[:12]}: ")

        await b.netlink.attach_endpoint(spec)
        await b.netlink.check_endpoint(spec)

    async def test_check_names_a_host_veth_set_down_and_what_went_with_it(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        spec = self.spec(b, pod, 41)
        await b.netlink.attach_endpoint(spec)
        b.set_down(spec.host_ifname)
        # The kernel flushes the routes through a link that goes down.
        assert (await b.netlink.list_owned()).routes == ()
        with pytest.raises(DatapathError) as err:
            await b.netlink.check_endpoint(spec)
        assert f"host veth {spec.host_ifname} is down" in str(err.value)
        assert "route 10.244.1.41/32" in str(err.value)
        await b.netlink.attach_endpoint(spec)
        await b.netlink.check_endpoint(spec)

    async def test_check_names_a_container_side_set_down_or_resized(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        spec = self.spec(b, pod, 42)
        await b.netlink.attach_endpoint(spec)
        b.set_mtu("eth0", 1300, pod)
        b.set_down("eth0", pod)
        with pytest.raises(DatapathError) as err:
            await b.netlink.check_endpoint(spec)
        message = str(err.value)
        assert "eth0 is down" in message
        assert "eth0 has MTU 1300, expected 1450" in message
        # Its routes went with it, and the pinned router neighbour.
        assert "route 10.244.1.1 dev eth0 scope link is missing" in message
        assert "default route via 10.244.1.1 is missing" in message
        assert b.neighbours("eth0", pod) == {}
        await b.netlink.attach_endpoint(spec)
        await b.netlink.check_endpoint(spec)
        host = b.link(spec.host_ifname)
        assert host is not None and b.neighbours("eth0", pod) == {ROUTER: host.mac}

    async def test_check_names_a_missing_host_veth(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        spec = self.spec(b, pod, 43)
        with pytest.raises(DatapathError, match=f"host veth {spec.host_ifname} is missing"):
            await b.netlink.check_endpoint(spec)
        await b.netlink.attach_endpoint(spec)
        b.delete_link("eth0", pod)  # the peer takes the host end with it
        with pytest.raises(DatapathError, match=f"host veth {spec.host_ifname} is missing"):
            await b.netlink.check_endpoint(spec)

    async def test_check_names_a_namespace_that_is_gone(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod = b.new_container()
        spec = self.spec(b, pod, 44)
        await b.netlink.attach_endpoint(spec)
        b.delete_container(pod)
        with pytest.raises(DatapathError, match=f"endpoint {spec.container_id}: "):
            await b.netlink.check_endpoint(spec)

        # The kernel tears a namespace down in the background; the veth pair dies with it.
        async with asyncio.timeout(WAIT):
            while (await b.netlink.list_owned()).links:
                await asyncio.sleep(0.02)
        with pytest.raises(DatapathError, match=f"host veth {spec.host_ifname} is missing"):
            await b.netlink.check_endpoint(spec)

    async def test_check_names_a_peer_in_another_namespace(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        pod, other = b.new_container(), b.new_container()
        spec = self.spec(b, pod, 45)
        await b.netlink.attach_endpoint(spec)
        with pytest.raises(DatapathError, match=f"eth0 in {other} is not the peer of {spec.host_ifname}"):
            await b.netlink.check_endpoint(replace(spec, netns=other))

    # -- list_owned and prune ---------------------------------------------------------------

    async def test_list_owned_and_prune_keep_exactly_what_they_are_told(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        attached = {}
        for n, cid in ((50, "kept"), (51, "orphan-a"), (52, "orphan-b")):
            attached[cid] = await b.netlink.attach_endpoint(self.spec(b, b.new_container(), n, cid))
        # Look-alikes that are not the agent's: a veth outside the naming scheme, a non-veth inside it,
        # a veth with another name and a route of another protocol through it.
        b.add_link("lxcforeign", "veth")
        b.add_link("lxc0123456789a", "bridge")
        b.add_link("vethmb", "veth")
        b.add_address("vethmb", IPv4Address("10.99.0.1"), 24)

        owned = await b.netlink.list_owned()
        assert owned.ifnames == {a.host_ifname for a in attached.values()}
        assert [link.ifname for link in owned.links] == sorted(owned.ifnames)
        assert {(r.dst, r.ifname, r.ifindex) for r in owned.routes} == {
            (_host(n), a.host_ifname, a.host_ifindex) for n, a in zip((50, 51, 52), attached.values(), strict=True)}

        removed = await b.netlink.prune([attached["kept"].host_ifname])
        assert removed == tuple(sorted((attached["orphan-a"].host_ifname, attached["orphan-b"].host_ifname)))
        owned = await b.netlink.list_owned()
        assert owned.ifnames == {attached["kept"].host_ifname}
        assert [r.dst for r in owned.routes] == [_host(50)]
        assert {"lxcforeign", "lxc0123456789a", "vethmb", HOST_DEVICE, HOST_DEVICE_PEER} <= b.links()
        assert await b.netlink.prune([attached["kept"].host_ifname]) == ()
        assert await b.netlink.prune([]) == (attached["kept"].host_ifname,)

    # -- between nodes ----------------------------------------------------------------------

    async def routed_node(self, b: NetlinkBackend) -> TunnelDevice:
        await self.node(b)
        b.add_uplink(UPLINK, NODE_IP, 24)
        device = tunnel_device()
        assert await b.netlink.ensure_tunnel_device(device) is True
        return device

    async def test_tunnel_device_is_made_once_and_reads_back(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        device = await self.routed_node(b)
        link = b.link(TUNNEL_DEVICE)
        assert link is not None and (link.kind, link.up, link.mtu, link.mac) == ("vxlan", True, MTU, device.mac)
        assert await b.netlink.ensure_tunnel_device(device) is False
        assert (await b.netlink.list_routing([POOL])).tunnel == device

    async def test_tunnel_device_mtu_is_repaired_in_place_and_entries_stay(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        device = await self.routed_node(b)
        await b.netlink.apply_routing(RoutingChanges(add_fdb=(PEER_FDB,), add_neighbours=(PEER_NEIGHBOUR,),
                                                     add_routes=(TUNNEL_ROUTE,)))
        b.set_mtu(TUNNEL_DEVICE, 1300)
        assert (await b.netlink.list_routing([POOL])).tunnel == replace(device, mtu=1300)
        assert await b.netlink.ensure_tunnel_device(device) is False
        state = await b.netlink.list_routing([POOL])
        assert state == RoutingState(device, frozenset({TUNNEL_ROUTE}), frozenset({PEER_NEIGHBOUR}),
                                     frozenset({PEER_FDB}))

    async def test_tunnel_device_with_other_settings_is_replaced_and_loses_its_entries(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.routed_node(b)
        await b.netlink.apply_routing(RoutingChanges(add_fdb=(PEER_FDB,), add_neighbours=(PEER_NEIGHBOUR,),
                                                     add_routes=(TUNNEL_ROUTE,)))
        other = tunnel_device(vni=3)
        assert await b.netlink.ensure_tunnel_device(other) is True
        assert await b.netlink.list_routing([POOL]) == RoutingState(other)

    async def test_tunnel_device_needs_its_uplink_and_refuses_a_foreign_device(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        with pytest.raises(DatapathError, match=f"uplink {UPLINK} does not exist"):
            await b.netlink.ensure_tunnel_device(tunnel_device())
        b.add_uplink(UPLINK, NODE_IP, 24)
        b.add_link(TUNNEL_DEVICE, "bridge")
        with pytest.raises(DatapathError, match="is a bridge device, not a vxlan"):
            await b.netlink.ensure_tunnel_device(tunnel_device())
        with pytest.raises(DatapathError, match="refusing to delete it"):
            await b.netlink.delete_tunnel_device()
        assert (await b.netlink.list_routing([POOL])).tunnel is None
        assert TUNNEL_DEVICE in b.links()

    async def test_deleting_the_tunnel_device_takes_its_entries(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.routed_node(b)
        await b.netlink.apply_routing(RoutingChanges(add_fdb=(PEER_FDB,), add_neighbours=(PEER_NEIGHBOUR,),
                                                     add_routes=(TUNNEL_ROUTE, NATIVE_ROUTE)))
        assert await b.netlink.delete_tunnel_device() is True
        assert TUNNEL_DEVICE not in b.links()
        assert await b.netlink.list_routing([POOL]) == RoutingState(routes=frozenset({NATIVE_ROUTE}))
        assert await b.netlink.delete_tunnel_device() is False

    async def test_routing_entries_read_back_as_applied_and_delete_cleanly(
            self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        device = await self.routed_node(b)
        other_mac = "02:6d:ac:1f:fa:0e"
        # A second destination for a unicast MAC: the kernel keeps the first (only the all-zero and
        # multicast MACs hold a list of destinations) and says nothing.
        extra_fdb = PeerFdbEntry(PEER_MAC, IPv4Address("172.31.250.14"))
        changes = RoutingChanges(add_fdb=(PEER_FDB, extra_fdb), add_neighbours=(PEER_NEIGHBOUR,),
                                 add_routes=(TUNNEL_ROUTE, NATIVE_ROUTE))
        await b.netlink.apply_routing(changes)
        await b.netlink.apply_routing(changes)  # the same again: replaced, not doubled
        want = RoutingState(device, frozenset({TUNNEL_ROUTE, NATIVE_ROUTE}), frozenset({PEER_NEIGHBOUR}),
                            frozenset({PEER_FDB}))
        assert await b.netlink.list_routing([POOL]) == want
        assert b.neighbours(TUNNEL_DEVICE) == {PEER_NEIGHBOUR.ip: PEER_MAC}

        # A changed next hop and MAC are one replace each.
        moved_route = replace(NATIVE_ROUTE, gateway=IPv4Address("172.31.250.15"))
        moved_neighbour = replace(PEER_NEIGHBOUR, mac=other_mac)
        await b.netlink.apply_routing(RoutingChanges(add_neighbours=(moved_neighbour,), add_routes=(moved_route,)))
        state = await b.netlink.list_routing([POOL])
        assert state.routes == {TUNNEL_ROUTE, moved_route} and state.neighbours == {moved_neighbour}

        # Outside the pools, a native route is not routing's; inside, only protocol 177 is.
        assert (await b.netlink.list_routing([IPv4Network("10.244.2.0/24")])).routes == {TUNNEL_ROUTE}

        delete = RoutingChanges(delete_routes=(TUNNEL_ROUTE, moved_route), delete_neighbours=(moved_neighbour,),
                                delete_fdb=(PEER_FDB, extra_fdb))
        await b.netlink.apply_routing(delete)
        assert await b.netlink.list_routing([POOL]) == RoutingState(device)
        await b.netlink.apply_routing(delete)  # gone already: fine
        await b.netlink.apply_routing(RoutingChanges())

    async def test_routes_the_agent_does_not_own_are_not_listed(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.routed_node(b)
        pod = b.new_container()
        await b.netlink.attach_endpoint(self.spec(b, pod, 60))
        b.add_route(IPv4Network("10.244.77.0/24"), UPLINK, IPv4Address("172.31.250.1"), 4)  # proto static
        b.add_route(IPv4Network("192.168.77.0/24"), UPLINK, IPv4Address("172.31.250.1"), RTPROT_MEMBRANE)
        b.add_route(IPv4Network("10.244.78.0/24"), UPLINK, IPv4Address("172.31.250.1"), RTPROT_MEMBRANE)
        routes = (await b.netlink.list_routing([POOL])).routes
        assert routes == {PeerRoute(IPv4Network("10.244.78.0/24"), IPv4Address("172.31.250.1"), UPLINK)}

    async def test_refusals_are_named_and_the_rest_is_applied(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        device = await self.routed_node(b)
        far = PeerRoute(IPv4Network("10.244.50.0/24"), IPv4Address("192.168.50.5"), UPLINK)
        nowhere = PeerRoute(IPv4Network("10.244.51.0/24"), IPv4Address("172.31.250.16"), "nosuch0")
        gatewayless = PeerRoute(IPv4Network("10.244.52.0/24"), None, UPLINK)
        foreign_source = replace(TUNNEL_ROUTE, dst=IPv4Network("10.244.53.0/24"), source=IPv4Address("10.9.9.9"))
        with pytest.raises(DatapathError) as err:
            await b.netlink.apply_routing(RoutingChanges(add_fdb=(PEER_FDB,), add_neighbours=(PEER_NEIGHBOUR,),
                                                         add_routes=(far, nowhere, gatewayless, foreign_source,
                                                                     TUNNEL_ROUTE, NATIVE_ROUTE)))
        message = str(err.value)
        assert f"route {far}: Network is unreachable" in message
        assert f"route {nowhere}: device nosuch0 does not exist" in message
        assert f"route {gatewayless}: a peer route needs a gateway" in message
        assert f"route {foreign_source}: Invalid argument" in message
        assert await b.netlink.list_routing([POOL]) == RoutingState(
            device, frozenset({TUNNEL_ROUTE, NATIVE_ROUTE}), frozenset({PEER_NEIGHBOUR}), frozenset({PEER_FDB}))

    async def test_entries_on_a_missing_tunnel_device_are_refused(self, netlink_backend: NetlinkBackend) -> None:
        b = netlink_backend
        await self.node(b)
        b.add_uplink(UPLINK, NODE_IP, 24)
        with pytest.raises(DatapathError) as err:
            await b.netlink.apply_routing(RoutingChanges(add_fdb=(PEER_FDB,), add_neighbours=(PEER_NEIGHBOUR,),
                                                         add_routes=(NATIVE_ROUTE,)))
        assert f"fdb {PEER_FDB}: device {TUNNEL_DEVICE} does not exist" in str(err.value)
        assert f"neighbour {PEER_NEIGHBOUR}: device {TUNNEL_DEVICE} does not exist" in str(err.value)
        assert await b.netlink.list_routing([POOL]) == RoutingState(routes=frozenset({NATIVE_ROUTE}))
        # Deleting entries of a device that is gone is fine: they went with it.
        await b.netlink.apply_routing(RoutingChanges(delete_routes=(TUNNEL_ROUTE, NATIVE_ROUTE),
                                                     delete_neighbours=(PEER_NEIGHBOUR,), delete_fdb=(PEER_FDB,)))
        assert await b.netlink.list_routing([POOL]) == RoutingState()
