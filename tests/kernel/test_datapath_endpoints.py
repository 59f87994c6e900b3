"""Endpoint wiring against the real kernel: a fresh node namespace and a namespace per pod.

What every Netlink implementation promises (idempotence, repair, check, detach, prune) is the
contract suite (test_netlink_contract.py); this module keeps what only the kernel shows: traffic.

Pods are routed through the node (no bridge): pod → lxc veth → /32 route → lxc veth → pod.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

import pytest

from membrane.core.errors import DatapathError
from membrane.datapath.netlink import (
    HOST_DEVICE,
    RTPROT_MEMBRANE,
    AttachedEndpoint,
    EndpointSpec,
    PyrouteNetlink,
    endpoint_ifname,
)
from membrane.datapath.nft import NftCommand
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, build_ruleset
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(missing_binaries("busybox", "nft")), reason="needs busybox and nft"),
]

ROUTER = IPv4Address("10.244.1.1")
MTU = 1450


@dataclass
class Node:
    ns: Netns
    netlink: PyrouteNetlink
    factory: NetnsFactory

    def pod_netns(self) -> Netns:
        return self.factory("mbdp-pod-")

    def spec(self, pod: Netns, ip: str, container_id: str | None = None) -> EndpointSpec:
        return EndpointSpec(
            container_id=container_id or f"ctr-{pod.name}",
            netns=pod.path,
            ifname="eth0",
            pod_ip=IPv4Address(ip),
            router_ip=ROUTER,
            mtu=MTU,
        )

    def links(self) -> dict[str, dict[str, object]]:
        out = self.ns.run("ip", "-j", "-d", "link", "show").stdout
        return {link["ifname"]: link for link in json.loads(out)}

    def routes(self) -> list[dict[str, object]]:
        return list(json.loads(self.ns.run("ip", "-j", "route", "show", "table", "main").stdout))


@pytest.fixture
async def node(netns_factory: NetnsFactory) -> Node:
    ns = netns_factory("mbdp-node-", lo_up=True)
    netlink = PyrouteNetlink(ns.path)
    await netlink.ensure_host_device(ROUTER, MTU)
    return Node(ns=ns, netlink=netlink, factory=netns_factory)


def ping(ns: Netns, ip: str) -> bool:
    return ns.run("busybox", "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0


@pytest.fixture
def udp_receiver() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()




async def test_two_pods_reach_each_other_and_the_node(node: Node) -> None:
    pod1, pod2 = node.pod_netns(), node.pod_netns()
    ep1 = await node.netlink.attach_endpoint(node.spec(pod1, "10.244.1.10"))
    ep2 = await node.netlink.attach_endpoint(node.spec(pod2, "10.244.1.11"))
    # The anti-spoofing table is in place, as it would be on a real node.
    runner = NftCommand(node.ns.path)
    await NftReconciler(runner).sync(
        build_ruleset(DesiredDatapath.from_endpoints([EndpointAddress.of(ep1), EndpointAddress.of(ep2)]))
    )

    assert ping(pod1, "10.244.1.11")
    assert ping(pod2, "10.244.1.10")
    assert ping(pod1, str(ROUTER))
    assert ping(node.ns, "10.244.1.10")

    # TCP through the routed path; the server sees the client's own pod address (no NAT).
    server = pod2.socket()
    client = pod1.socket()
    try:
        server.bind(("10.244.1.11", 8080))
        server.listen(1)
        server.settimeout(5)
        client.settimeout(5)
        client.connect(("10.244.1.11", 8080))
        conn, peer = server.accept()
        with conn:
            client.sendall(b"hello")
            assert conn.recv(5) == b"hello"
        assert peer[0] == "10.244.1.10"
    finally:
        client.close()
        server.close()

    # What the pod sees: its address, MTU, the router as gateway, pinned to the host veth's MAC.
    addr = json.loads(pod1.run("ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout)[0]
    assert addr["mtu"] == MTU
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.244.1.10", 32)]
    assert json.loads(pod1.run("ip", "-j", "link", "show", "eth0").stdout)[0]["address"] == ep1.container_mac
    routes = json.loads(pod1.run("ip", "-j", "route").stdout)
    assert {"dst": "default", "gateway": str(ROUTER)}.items() <= routes[0].items()
    neigh = json.loads(pod1.run("ip", "-j", "neigh", "show", str(ROUTER)).stdout)
    assert neigh[0]["lladdr"] == ep1.host_mac and "PERMANENT" in neigh[0]["state"]
    assert not json.loads(pod1.run("ip", "-j", "-6", "addr", "show", "dev", "eth0").stdout)


async def test_attach_creates_owned_route_and_is_idempotent(node: Node) -> None:
    pod = node.pod_netns()
    spec = node.spec(pod, "10.244.1.20")
    first = await node.netlink.attach_endpoint(spec)
    again = await node.netlink.attach_endpoint(spec)
    assert again == first
    assert first.host_ifname == spec.host_ifname and first.host_ifname.startswith("lxc")

    host_links = [name for name in node.links() if name.startswith("lxc")]
    assert host_links == [first.host_ifname]
    route = [(r["dev"], r["protocol"], r["scope"]) for r in node.routes() if r["dst"] == "10.244.1.20"]
    assert route == [(first.host_ifname, str(RTPROT_MEMBRANE), "link")]
    arp_filter = node.ns.run("cat", f"/proc/sys/net/ipv4/conf/{first.host_ifname}/arp_filter").stdout
    assert arp_filter.strip() == "1"
    await node.netlink.check_endpoint(spec)








async def test_failed_attach_leaves_nothing_behind(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    pod = node.pod_netns()
    # The container already has an eth0 that is not ours: refuse, delete nothing of theirs.
    pod.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    with pytest.raises(DatapathError, match="eth0 already exists"):
        await node.netlink.attach_endpoint(node.spec(pod, "10.244.1.50"))
    assert not [name for name in node.links() if name.startswith("lxc")]
    assert "other0" in pod.run("ip", "-o", "link").stdout

    # A namespace that does not exist (the container died meanwhile).
    with pytest.raises(DatapathError, match=r"does not exist|No such file"):
        gone = replace(node.spec(pod, "10.244.1.51", container_id="gone"), netns=pod.path + "-gone")
        await node.netlink.attach_endpoint(gone)

    # The kernel refusing halfway through the configuration: the veth pair is removed again.
    pod2 = node.pod_netns()

    async def refuse(*args: object, **kwargs: object) -> AttachedEndpoint:
        raise DatapathError("injected")

    monkeypatch.setattr(node.netlink, "_configure", refuse)
    with pytest.raises(DatapathError, match="injected"):
        await node.netlink.attach_endpoint(node.spec(pod2, "10.244.1.52"))
    assert not [name for name in node.links() if name.startswith("lxc")]
    assert "eth0" not in pod2.run("ip", "-o", "link").stdout


async def test_prune_removes_orphans_and_nothing_it_does_not_own(node: Node) -> None:
    kept_pod, orphan_pod = node.pod_netns(), node.pod_netns()
    kept = await node.netlink.attach_endpoint(node.spec(kept_pod, "10.244.1.60", container_id="kept"))
    orphan = await node.netlink.attach_endpoint(node.spec(orphan_pod, "10.244.1.61", container_id="orphan"))
    # Things that merely look similar: another veth, an lxc-prefixed name outside the scheme, a route
    # with another protocol.
    node.ns.run("ip", "link", "add", "lxcforeign", "type", "veth", "peer", "name", "foreign0")
    node.ns.run("ip", "link", "add", "vethmbdp", "type", "veth", "peer", "name", "vethmbdp1")
    node.ns.run("ip", "link", "set", "vethmbdp", "up")
    node.ns.run("ip", "route", "add", "10.244.9.0/24", "dev", "vethmbdp", "proto", "static")

    owned = await node.netlink.list_owned()
    assert owned.ifnames == {kept.host_ifname, orphan.host_ifname}

    removed = await node.netlink.prune({endpoint_ifname("kept")})
    assert removed == (orphan.host_ifname,)
    links = node.links()
    assert kept.host_ifname in links and orphan.host_ifname not in links
    assert {"lxcforeign", "foreign0", "vethmbdp", "vethmbdp1", HOST_DEVICE} <= links.keys()
    dsts = {r["dst"] for r in node.routes()}
    assert {"10.244.1.60", "10.244.9.0/24"} <= dsts and "10.244.1.61" not in dsts
    assert ping(kept_pod, str(ROUTER))


async def test_the_node_namespace_is_never_wired_as_a_container(node: Node) -> None:
    spec = replace(node.spec(node.pod_netns(), "10.244.1.71"), netns=node.ns.path)
    with pytest.raises(DatapathError, match="node's own network namespace"):
        await node.netlink.attach_endpoint(spec)


async def test_a_namespace_given_as_proc_pid_path_works(node: Node) -> None:
    pod = node.pod_netns()
    holder = pod.spawn("busybox", "sleep", "300")  # the container's process; killed on teardown
    proc_path = f"/proc/{holder.pid}/ns/net"
    pod_ns = os.stat(pod.path)
    # nsenter joins the namespace right after fork: until then the pid's namespace is ours.
    wait_until(lambda: (os.stat(proc_path).st_dev, os.stat(proc_path).st_ino) == (pod_ns.st_dev, pod_ns.st_ino),
               what="the holder process to enter the pod namespace")
    spec = replace(node.spec(pod, "10.244.1.70"), netns=proc_path)
    attached = await node.netlink.attach_endpoint(spec)
    assert attached.container_ifname == "eth0"
    assert ping(pod, str(ROUTER))
    await node.netlink.check_endpoint(spec)
