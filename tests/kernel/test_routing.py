"""Routing between nodes and masquerade against the real kernel.

Each test builds its own small cluster of namespaces (names ``mbrt-…``)::

    mbrt-ul-…   br0 172.31.250.1/24 (the underlay)
      │                  │                   │
    mbrt-n-… (node1)   mbrt-n-… (node2)    mbrt-out-… (outside, .100)
    eth0 .11           eth0 .12
    pod 10.244.1.10    pod 10.244.2.10

and drives :class:`RoutingReconciler` (and the nft ruleset) on each node directly, without agents.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

import pytest

from membrane.agent.routing import LocalNode, PeerNode, RoutingReconciler, masquerade_for
from membrane.core.config import ClusterConfig
from membrane.core.errors import DatapathError
from membrane.datapath.netlink import TUNNEL_DEVICE, EndpointSpec, PyrouteNetlink, vtep_mac
from membrane.datapath.nft import NftCommand
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, build_ruleset
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries, wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(bool(missing_binaries("nft", "bridge")),
                                                     reason="needs nft and bridge")]

Mode = Literal["vxlan", "native"]
SUBNET = "172.31.250"
OUTSIDE_IP = f"{SUBNET}.100"

# Answers each TCP connection and each UDP datagram with the source address it saw.
WHO_SERVER = textwrap.dedent("""
    import socket, threading
    def tcp():
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", 7000)); srv.listen(16)
        while True:
            conn, peer = srv.accept()
            with conn:
                conn.sendall(peer[0].encode())
    def udp():
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); srv.bind(("0.0.0.0", 7001))
        while True:
            _, peer = srv.recvfrom(64)
            srv.sendto(peer[0].encode(), peer)
    threading.Thread(target=udp, daemon=True).start()
    tcp()
""")

WHO_CLIENT = textwrap.dedent("""
    import socket, sys
    proto, target = sys.argv[1], sys.argv[2]
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    if proto == "tcp":
        with socket.create_connection((target, 7000), timeout=timeout) as sock:
            print(sock.recv(64).decode())
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.settimeout(0.5)
        for _ in range(6):
            sock.sendto(b"who", (target, 7001))
            try:
                print(sock.recv(64).decode()); break
            except TimeoutError:
                continue
        else:
            sys.exit(1)
""")


@dataclass
class Node:
    k: int
    ns: Netns
    netlink: PyrouteNetlink
    pod: Netns
    reconciler: RoutingReconciler

    @property
    def ip(self) -> IPv4Address:
        return IPv4Address(f"{SUBNET}.{10 + self.k}")

    @property
    def pod_ip(self) -> str:
        return f"10.244.{self.k}.10"

    @property
    def peer(self) -> PeerNode:
        return PeerNode(f"node{self.k}", self.ip, IPv4Network(f"10.244.{self.k}.0/24"))

    def routes(self) -> list[dict[str, object]]:
        return list(json.loads(self.ns.run("ip", "-j", "-d", "route", "show", "proto", "177").stdout))

    def peer_routes(self) -> dict[str, dict[str, object]]:
        return {str(r["dst"]): r for r in self.routes() if not str(r["dev"]).startswith("lxc")}

    def neighbours(self) -> dict[str, str]:
        out = json.loads(self.ns.run("ip", "-j", "neigh", "show", "dev", TUNNEL_DEVICE).stdout)
        return {n["dst"]: n.get("lladdr", "") for n in out}

    def fdb(self) -> set[tuple[str, str]]:
        out = json.loads(self.ns.run("bridge", "-j", "fdb", "show", "dev", TUNNEL_DEVICE).stdout)
        return {(e["mac"], e["dst"]) for e in out if "dst" in e}

    def tunnel(self) -> dict[str, object] | None:
        result = self.ns.run("ip", "-j", "-d", "link", "show", TUNNEL_DEVICE, check=False)
        return json.loads(result.stdout)[0] if result.returncode == 0 else None


@dataclass
class Cluster:
    underlay: Netns
    outside: Netns
    nodes: list[Node]
    factory: NetnsFactory

    def peers_of(self, node: Node) -> list[PeerNode]:
        return [n.peer for n in self.nodes if n is not node]

    async def sync_all(self, *, full: bool = False) -> None:
        for node in self.nodes:
            await node.reconciler.sync(self.peers_of(node), full=full)

    async def masquerade_all(self, cluster: ClusterConfig) -> None:
        for node in self.nodes:
            veth = json.loads(node.ns.run("ip", "-j", "link", "show", "type", "veth").stdout)
            lxc = next(link["ifindex"] for link in veth if link["ifname"].startswith("lxc"))
            desired = DesiredDatapath.from_endpoints([EndpointAddress(lxc, IPv4Address(node.pod_ip))],
                                                     masquerade_for(cluster, node.peer.pod_cidr))
            reconciler = NftReconciler(NftCommand(node.ns.path))
            await reconciler.sync(build_ruleset(desired))
            assert not await reconciler.drifted()  # the interval set reads back exactly


def plug(underlay: Netns, member: Netns, port: str, ip: str) -> None:
    """``member``'s eth0 on the underlay bridge, with ``ip``/24 and a default route via .1."""
    subprocess.run(["ip", "link", "add", "eth0", "netns", member.name, "type", "veth", "peer", "name", port,
                    "netns", underlay.name], check=True, capture_output=True)
    underlay.run("ip", "link", "set", port, "master", "br0", "up")
    member.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    member.run("ip", "link", "set", "eth0", "up")
    member.run("ip", "route", "add", "default", "via", f"{SUBNET}.1")


async def build(factory: NetnsFactory, mode: Mode, nodes: int = 2) -> Cluster:
    cluster_config = ClusterConfig(routingMode=mode)
    underlay = factory("mbrt-ul-", lo_up=True)
    underlay.run("ip", "link", "add", "br0", "type", "bridge")
    underlay.run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
    underlay.run("ip", "link", "set", "br0", "up")
    outside = factory("mbrt-out-", lo_up=True)
    plug(underlay, outside, "out", OUTSIDE_IP)
    members = []
    for k in range(1, nodes + 1):
        ns = factory("mbrt-n-", lo_up=True)
        plug(underlay, ns, f"node{k}", f"{SUBNET}.{10 + k}")
        netlink = PyrouteNetlink(ns.path)
        mtu = 1450 if mode == "vxlan" else 1500
        await netlink.ensure_host_device(IPv4Address(f"10.244.{k}.1"), mtu)
        pod = factory("mbrt-p-", lo_up=True)
        await netlink.attach_endpoint(EndpointSpec(container_id=f"ctr-{pod.name}", netns=pod.path, ifname="eth0",
                                                   pod_ip=IPv4Address(f"10.244.{k}.10"),
                                                   router_ip=IPv4Address(f"10.244.{k}.1"), mtu=mtu))
        local = LocalNode(f"node{k}", IPv4Address(f"{SUBNET}.{10 + k}"), "eth0", 1500,
                          IPv4Network(f"10.244.{k}.0/24"))
        members.append(Node(k, ns, netlink, pod, RoutingReconciler(netlink, local, cluster_config)))
    return Cluster(underlay, outside, members, factory)


def who(ns: Netns, proto: str, target: str, timeout: float = 2.0) -> str:
    result = ns.run(sys.executable, "-c", WHO_CLIENT, proto, target, str(timeout), check=False)
    return result.stdout.strip() if result.returncode == 0 else f"failed: {result.stderr.strip()[-200:]}"


def serve(ns: Netns) -> None:
    ns.spawn(sys.executable, "-c", WHO_SERVER)
    wait_until(lambda: who(ns, "tcp", "127.0.0.1") == "127.0.0.1", timeout=10, what=f"the server in {ns.name}")


@pytest.mark.parametrize("mode", ["vxlan", "native"])
async def test_pods_reach_each_other_across_nodes_and_the_outside_through_masquerade(
    netns_factory: NetnsFactory, mode: Mode
) -> None:
    cluster = await build(netns_factory, mode)
    node1, node2 = cluster.nodes
    for ns in (node1.pod, node2.pod, cluster.outside):
        serve(ns)
    # Without routes, the pod's packets go to the underlay gateway, which knows no pods.
    assert who(node1.pod, "tcp", node2.pod_ip, timeout=0.3).startswith("failed")

    await cluster.sync_all()
    await cluster.masquerade_all(ClusterConfig(routingMode=mode))
    for proto in ("tcp", "udp"):
        # Pod to pod keeps the pod's address, in both directions.
        assert who(node1.pod, proto, node2.pod_ip) == node1.pod_ip
        assert who(node2.pod, proto, node1.pod_ip) == node2.pod_ip
        # To the outside, the node's address.
        assert who(node1.pod, proto, OUTSIDE_IP) == str(node1.ip)
        assert who(node2.pod, proto, OUTSIDE_IP) == str(node2.ip)

    route = node1.peer_routes()["10.244.2.0/24"]
    if mode == "vxlan":
        assert (route["gateway"], route["dev"], route["prefsrc"]) == ("10.244.2.1", TUNNEL_DEVICE, "10.244.1.1")
        assert "onlink" in route["flags"]  # type: ignore[operator]
        tunnel = node1.tunnel()
        assert tunnel is not None and tunnel["mtu"] == 1450 and tunnel["address"] == vtep_mac(node1.ip)
        info = tunnel["linkinfo"]["info_data"]  # type: ignore[index]
        assert (info["id"], info["port"], info["local"], info["learning"]) == (2, 8472, str(node1.ip), False)
        assert node1.neighbours() == {"10.244.2.1": vtep_mac(node2.ip)}
        assert node1.fdb() == {(vtep_mac(node2.ip), str(node2.ip))}
        # The node's own traffic into the tunnel comes from its router IP, so answers come back through it.
        assert who(node1.ns, "tcp", node2.pod_ip) == "10.244.1.1"
    else:
        assert (route["gateway"], route["dev"]) == (str(node2.ip), "eth0")
        assert node1.tunnel() is None
        assert who(node1.ns, "tcp", node2.pod_ip) == str(node1.ip)


@pytest.mark.parametrize("mode", ["vxlan", "native"])
async def test_the_kernel_reads_back_as_applied_and_a_full_sync_repairs_drift(
    netns_factory: NetnsFactory, mode: Mode
) -> None:
    cluster = await build(netns_factory, mode)
    node1, node2 = cluster.nodes
    await cluster.sync_all()
    result = await node1.reconciler.sync(cluster.peers_of(node1), full=True)
    assert (result.kind, result.added, result.deleted, result.tunnel_created) == ("full", 0, 0, False)

    node1.ns.run("ip", "route", "del", "10.244.2.0/24")
    if mode == "vxlan":
        node1.ns.run("ip", "neigh", "del", "10.244.2.1", "dev", TUNNEL_DEVICE)
        node1.ns.run("bridge", "fdb", "del", vtep_mac(node2.ip), "dev", TUNNEL_DEVICE, "dst", str(node2.ip))
        node1.ns.run("ip", "neigh", "add", "10.244.66.1", "lladdr", "02:00:00:00:00:66", "dev", TUNNEL_DEVICE)
        node1.ns.run("ip", "link", "set", TUNNEL_DEVICE, "mtu", "1300")
    result = await node1.reconciler.sync(cluster.peers_of(node1), full=True)
    assert (result.added, result.deleted) == ((3, 1) if mode == "vxlan" else (1, 0))
    assert "10.244.2.0/24" in node1.peer_routes()
    if mode == "vxlan":
        assert node1.neighbours() == {"10.244.2.1": vtep_mac(node2.ip)}
        assert node1.fdb() == {(vtep_mac(node2.ip), str(node2.ip))}
        tunnel = node1.tunnel()
        assert tunnel is not None and tunnel["mtu"] == 1450


async def test_a_peer_that_leaves_loses_its_entries_and_nothing_else_is_touched(netns_factory: NetnsFactory) -> None:
    cluster = await build(netns_factory, "vxlan", nodes=3)
    node1, _, node3 = cluster.nodes
    # Routes that are not routing's: another protocol into the pool, protocol 177 outside the pools.
    node1.ns.run("ip", "route", "add", "10.244.77.0/24", "via", f"{SUBNET}.1", "proto", "static")
    node1.ns.run("ip", "route", "add", "192.168.77.0/24", "via", f"{SUBNET}.1", "proto", "177")
    await cluster.sync_all()
    before = {r["dst"] for r in node1.routes()}
    assert {"10.244.2.0/24", "10.244.3.0/24", "192.168.77.0/24", node1.pod_ip} <= before

    result = await node1.reconciler.sync([node3.peer])
    assert (result.kind, result.added, result.deleted) == ("incremental", 0, 3)
    assert {r["dst"] for r in node1.routes()} == before - {"10.244.2.0/24"}
    assert node1.neighbours() == {"10.244.3.1": vtep_mac(node3.ip)}
    assert node1.fdb() == {(vtep_mac(node3.ip), str(node3.ip))}
    assert "10.244.77.0/24" in node1.ns.run("ip", "route", "show", "proto", "static").stdout


async def test_switching_routing_modes_replaces_the_tunnel_with_uplink_routes_and_back(
    netns_factory: NetnsFactory,
) -> None:
    cluster = await build(netns_factory, "vxlan")
    node1, node2 = cluster.nodes
    await cluster.sync_all()
    assert node1.tunnel() is not None

    native = RoutingReconciler(node1.netlink, node1.reconciler.local, ClusterConfig(routingMode="native"))
    await native.sync([node2.peer])
    assert node1.tunnel() is None
    assert {d: (r["gateway"], r["dev"]) for d, r in node1.peer_routes().items()} == {
        "10.244.2.0/24": (str(node2.ip), "eth0")}

    back = RoutingReconciler(node1.netlink, node1.reconciler.local, ClusterConfig(routingMode="vxlan"))
    result = await back.sync([node2.peer])
    assert result.tunnel_created
    assert {d: (r["gateway"], r["dev"]) for d, r in node1.peer_routes().items()} == {
        "10.244.2.0/24": ("10.244.2.1", TUNNEL_DEVICE)}


async def test_an_unreachable_native_peer_is_named_and_the_others_are_routed(netns_factory: NetnsFactory) -> None:
    cluster = await build(netns_factory, "native")
    node1, node2 = cluster.nodes
    far = PeerNode("far", IPv4Address("192.168.50.5"), IPv4Network("10.244.50.0/24"))
    with pytest.raises(DatapathError, match=r"route 10\.244\.50\.0/24 via 192\.168\.50\.5 dev eth0: "):
        await node1.reconciler.sync([node2.peer, far])
    assert set(node1.peer_routes()) == {"10.244.2.0/24"}


async def test_many_peers_go_in_one_batch_and_read_back_exactly(netns_factory: NetnsFactory) -> None:
    underlay = netns_factory("mbrt-ul-", lo_up=True)
    underlay.run("ip", "link", "add", "br0", "type", "bridge")
    node = netns_factory("mbrt-n-", lo_up=True)
    plug(underlay, node, "node1", f"{SUBNET}.11")
    netlink = PyrouteNetlink(node.path)
    await netlink.ensure_host_device(IPv4Address("10.128.0.1"), 1450)
    config = ClusterConfig(clusterPoolIPv4PodCIDRList=("10.128.0.0/9",), clusterPoolIPv4MaskSize=26)
    local = LocalNode("node1", IPv4Address(f"{SUBNET}.11"), "eth0", 1500, IPv4Network("10.128.0.0/26"))
    peers = [PeerNode(f"p{i}", IPv4Address(f"172.30.{i // 250}.{i % 250 + 1}"),
                      IPv4Network(f"10.128.{(i + 1) // 4}.{(i + 1) % 4 * 64}/26")) for i in range(600)]
    reconciler = RoutingReconciler(netlink, local, config)
    assert (await reconciler.sync(peers)).added == 1800
    assert len(json.loads(node.run("ip", "-j", "route", "show", "proto", "177").stdout)) == 600
    assert len(json.loads(node.run("ip", "-j", "neigh", "show", "dev", TUNNEL_DEVICE).stdout)) == 600
    assert (await reconciler.sync(peers, full=True)).added == 0
    result = await reconciler.sync(peers[:300])
    assert (result.kind, result.deleted) == ("incremental", 900)
    assert len(json.loads(node.run("ip", "-j", "route", "show", "proto", "177").stdout)) == 300


async def test_a_tunnel_device_with_other_settings_is_replaced(netns_factory: NetnsFactory) -> None:
    cluster = await build(netns_factory, "vxlan")
    node1, node2 = cluster.nodes
    # Left by an agent configured differently: another VNI, learning on.
    node1.ns.run("ip", "link", "add", TUNNEL_DEVICE, "type", "vxlan", "id", "99", "dstport", "8472", "local",
                 str(node1.ip), "dev", "eth0")
    result = await node1.reconciler.sync([node2.peer])
    assert result.tunnel_created
    tunnel = node1.tunnel()
    assert tunnel is not None
    info = tunnel["linkinfo"]["info_data"]  # type: ignore[index]
    assert (info["id"], info["learning"], tunnel["address"]) == (2, False, vtep_mac(node1.ip))
    assert node1.fdb() == {(vtep_mac(node2.ip), str(node2.ip))}
