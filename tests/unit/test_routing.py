"""Routing between nodes without a kernel: peers from node objects, the desired kernel state, and the
reconciler and its loop against FakeNetlink."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from membrane.agent.routing import (
    LocalNode,
    PeerNode,
    RoutingReconciler,
    desired_routing,
    peers_from_nodes,
    routing_module,
    tunnel_entries,
)
from membrane.api.cilium import CiliumNode
from membrane.core.config import ClusterConfig
from membrane.core.errors import DatapathError
from membrane.core.lifecycle import Lifecycle
from membrane.core.modules import ModuleRunner
from membrane.core.statedb import StateDB
from membrane.datapath.netlink import (
    TUNNEL_DEVICE,
    FakeNetlink,
    PeerFdbEntry,
    PeerNeighbour,
    PeerRoute,
    RoutingState,
    TunnelDevice,
    routing_changes,
    vtep_mac,
)
from membrane.datapath.netlink.fake import FakeRoute
from membrane.testing.netns import async_wait_until

VXLAN = ClusterConfig(routingMode="vxlan", vxlanVNI=7, tunnelPort=8472)
NATIVE = ClusterConfig(routingMode="native")
POOLS = [IPv4Network("10.244.0.0/16")]
LOCAL = LocalNode("node1", IPv4Address("172.31.0.11"), "eth0", 1500, IPv4Network("10.244.1.0/24"))


def node_object(ip: str | None, cidr: str | None, name: str = "") -> CiliumNode:
    spec: dict[str, Any] = {}
    if ip is not None:
        spec["addresses"] = [{"type": "ExternalIP", "ip": "198.51.100.9"}, {"type": "InternalIP", "ip": ip}]
    if cidr is not None:
        spec["ipam"] = {"podCIDRs": [cidr]}
    return CiliumNode.model_validate({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                                      "metadata": {"name": name}, "spec": spec})


def named(objects: dict[str, CiliumNode]) -> list[CiliumNode]:
    """Node objects carry their names (the dict keys)."""
    return [obj.model_copy(update={"metadata": obj.metadata.model_copy(update={"name": n})})
            for n, obj in objects.items()]


def peer(k: int) -> PeerNode:
    return PeerNode(f"node{k}", IPv4Address(f"172.31.0.{10 + k}"), IPv4Network(f"10.244.{k}.0/24"))


def nodes(*numbers: int) -> dict[str, CiliumNode]:
    return {f"node{k}": node_object(f"172.31.0.{10 + k}", f"10.244.{k}.0/24", f"node{k}") for k in numbers}


def fake_node() -> FakeNetlink:
    fake = FakeNetlink()
    fake.add_uplink("eth0", IPv4Address("172.31.0.11"), 24)
    # The router device holds the router IP, the source of the node's own traffic into the tunnel.
    fake.add_link("membrane_host").addresses.add((IPv4Address("10.244.1.1"), 32))
    return fake


def owned(fake: FakeNetlink) -> set[tuple[str, str, str | None]]:
    """The node's protocol-177 routes as (dst, dev, gateway)."""
    return {(str(r.dst), r.ifname, str(r.gateway) if r.gateway else None) for r in fake.node.routes if r.proto == 177}


# -- peers from node objects ---------------------------------------------------------------------


def test_every_other_node_with_an_address_and_a_pod_cidr_is_a_peer() -> None:
    objects = {**nodes(1, 2, 3), "node4": node_object("172.31.0.14", None), "node5": node_object(None, "10.244.5.0/24")}
    found = peers_from_nodes(named(objects), LOCAL, POOLS)
    # node1 is this node; node4 waits for its CIDR and node5 has no address: not peers, and not problems.
    assert found.peers == (peer(2), peer(3))
    assert found.skipped == ()


def test_conflicting_nodes_are_skipped_the_same_way_on_every_node() -> None:
    objects = {
        **nodes(2),
        "a-outside": node_object("172.31.0.20", "10.99.0.0/24"),
        "b-same-cidr-as-local": node_object("172.31.0.21", "10.244.1.0/24"),
        "node3": node_object("172.31.0.12", "10.244.3.0/24"),  # node2's address
        "node9": node_object("172.31.0.19", "10.244.2.0/25"),  # inside node2's CIDR
    }
    found = peers_from_nodes(named(objects), LOCAL, POOLS)
    assert found.peers == (peer(2),)
    assert found.skipped == (
        "node a-outside: pod CIDR 10.99.0.0/24 is outside the cluster pools",
        "node b-same-cidr-as-local: pod CIDR 10.244.1.0/24 overlaps another node's",
        "node node3: address 172.31.0.12 is another node's",
        "node node9: pod CIDR 10.244.2.0/25 overlaps another node's",
    )


def test_tunnel_entries_are_pod_cidr_to_node_ip_in_address_order() -> None:
    assert tunnel_entries([peer(10), peer(2)]) == [
        (IPv4Network("10.244.2.0/24"), IPv4Address("172.31.0.12")),
        (IPv4Network("10.244.10.0/24"), IPv4Address("172.31.0.20")),
    ]


# -- desired kernel state ------------------------------------------------------------------------


def test_vtep_mac_is_derived_from_the_node_address() -> None:
    assert vtep_mac(IPv4Address("172.31.0.12")) == "02:6d:ac:1f:00:0c"
    assert vtep_mac(IPv4Address("10.0.0.1")) != vtep_mac(IPv4Address("10.0.0.2"))


def test_vxlan_mode_wants_one_device_and_per_peer_fdb_neighbour_and_onlink_route() -> None:
    desired = desired_routing(LOCAL, [peer(2), peer(3)], VXLAN)
    assert desired.tunnel == TunnelDevice(vni=7, port=8472, local=IPv4Address("172.31.0.11"), uplink="eth0",
                                          mtu=1450, mac="02:6d:ac:1f:00:0b")
    assert desired.routes == {
        PeerRoute(IPv4Network(f"10.244.{k}.0/24"), IPv4Address(f"10.244.{k}.1"), TUNNEL_DEVICE, onlink=True,
                  source=IPv4Address("10.244.1.1"))
        for k in (2, 3)
    }
    assert desired.neighbours == {
        PeerNeighbour(IPv4Address("10.244.2.1"), "02:6d:ac:1f:00:0c"),
        PeerNeighbour(IPv4Address("10.244.3.1"), "02:6d:ac:1f:00:0d"),
    }
    assert desired.fdb == {
        PeerFdbEntry("02:6d:ac:1f:00:0c", IPv4Address("172.31.0.12")),
        PeerFdbEntry("02:6d:ac:1f:00:0d", IPv4Address("172.31.0.13")),
    }


def test_native_mode_wants_plain_routes_via_the_peers_node_addresses() -> None:
    desired = desired_routing(LOCAL, [peer(2)], NATIVE)
    assert desired == RoutingState(
        routes=frozenset({PeerRoute(IPv4Network("10.244.2.0/24"), IPv4Address("172.31.0.12"), "eth0")})
    )


def test_a_changed_next_hop_is_one_replace_never_a_delete() -> None:
    before = desired_routing(LOCAL, [peer(2), peer(3)], NATIVE)
    moved = PeerNode("node2", IPv4Address("172.31.0.99"), IPv4Network("10.244.2.0/24"))
    after = desired_routing(LOCAL, [moved], NATIVE)
    changes = routing_changes(before, after)
    assert changes.add_routes == (PeerRoute(IPv4Network("10.244.2.0/24"), IPv4Address("172.31.0.99"), "eth0"),)
    assert [str(r.dst) for r in changes.delete_routes] == ["10.244.3.0/24"]
    assert routing_changes(after, after).added == routing_changes(after, after).deleted == 0


# -- the reconciler against FakeNetlink ----------------------------------------------------------


async def test_first_sync_builds_the_tunnel_and_every_peer() -> None:
    fake = fake_node()
    result = await RoutingReconciler(fake, LOCAL, VXLAN).sync([peer(2), peer(3)])
    assert (result.kind, result.added, result.deleted, result.tunnel_created) == ("full", 6, 0, True)
    device = fake.node.links[TUNNEL_DEVICE]
    assert (device.kind, device.up, device.mtu, device.mac) == ("vxlan", True, 1450, "02:6d:ac:1f:00:0b")
    assert owned(fake) == {
        ("10.244.2.0/24", TUNNEL_DEVICE, "10.244.2.1"),
        ("10.244.3.0/24", TUNNEL_DEVICE, "10.244.3.1"),
    }
    assert fake.node.neighbours == {(IPv4Address("10.244.2.1"), TUNNEL_DEVICE): "02:6d:ac:1f:00:0c",
                                    (IPv4Address("10.244.3.1"), TUNNEL_DEVICE): "02:6d:ac:1f:00:0d"}
    assert fake.node.fdb == {(TUNNEL_DEVICE, "02:6d:ac:1f:00:0c", IPv4Address("172.31.0.12")),
                             (TUNNEL_DEVICE, "02:6d:ac:1f:00:0d", IPv4Address("172.31.0.13"))}


async def test_one_new_node_costs_its_own_three_entries_and_a_leaving_node_takes_exactly_its_own() -> None:
    fake = fake_node()
    reconciler = RoutingReconciler(fake, LOCAL, VXLAN)
    many = [peer(k) for k in range(2, 60)]
    await reconciler.sync(many)
    assert fake.routing_batches == [58 * 3]  # a full resync of many peers is one batch

    result = await reconciler.sync([*many, peer(60)])
    assert (result.kind, result.added, result.deleted) == ("incremental", 3, 0)
    assert fake.routing_batches[-1] == 3
    assert "ensure_tunnel_device" not in fake.calls[1:]  # the device is left alone when it did not change

    await reconciler.sync([p for p in many if p.name != "node7"] + [peer(60)])
    assert fake.routing_batches[-1] == 3
    assert ("10.244.7.0/24", TUNNEL_DEVICE, "10.244.7.1") not in owned(fake)
    assert (IPv4Address("10.244.7.1"), TUNNEL_DEVICE) not in fake.node.neighbours
    assert not any(mac == vtep_mac(IPv4Address("172.31.0.17")) for _, mac, _ in fake.node.fdb)
    assert len(owned(fake)) == 58


async def test_only_what_routing_owns_is_ever_removed() -> None:
    fake = fake_node()
    lxc = fake.add_link("lxc0123456789a")
    fake.node.routes |= {
        FakeRoute(IPv4Network("10.244.1.10/32"), lxc.ifname, scope="link"),  # an endpoint's route
        FakeRoute(IPv4Network("10.244.9.0/24"), "eth0", IPv4Address("172.31.0.1"), proto=4),  # static, not ours
        FakeRoute(IPv4Network("192.168.5.0/24"), "eth0", IPv4Address("172.31.0.1")),  # proto 177 outside the pools
    }
    stale = FakeRoute(IPv4Network("10.244.8.0/24"), "eth0", IPv4Address("172.31.0.18"))  # a peer that left
    fake.node.routes.add(stale)
    before = set(fake.node.routes)
    await RoutingReconciler(fake, LOCAL, NATIVE).sync([peer(2)])
    added = FakeRoute(IPv4Network("10.244.2.0/24"), "eth0", IPv4Address("172.31.0.12"))
    assert fake.node.routes == (before - {stale}) | {added}


async def test_a_full_sync_repairs_drift_and_sends_nothing_when_converged() -> None:
    fake = fake_node()
    reconciler = RoutingReconciler(fake, LOCAL, VXLAN)
    await reconciler.sync([peer(2), peer(3)])
    batches = len(fake.routing_batches)
    assert (await reconciler.sync([peer(2), peer(3)], full=True)).added == 0
    assert len(fake.routing_batches) == batches  # nothing sent

    fake.node.routes = {r for r in fake.node.routes if str(r.dst) != "10.244.2.0/24"}
    fake.node.neighbours[(IPv4Address("10.244.77.1"), TUNNEL_DEVICE)] = "02:00:00:00:00:01"
    fake.node.links[TUNNEL_DEVICE].mtu = 1300
    result = await reconciler.sync([peer(2), peer(3)], full=True)
    assert (result.added, result.deleted) == (1, 1)
    assert ("10.244.2.0/24", TUNNEL_DEVICE, "10.244.2.1") in owned(fake)
    assert (IPv4Address("10.244.77.1"), TUNNEL_DEVICE) not in fake.node.neighbours
    assert fake.node.links[TUNNEL_DEVICE].mtu == 1450


async def test_a_changed_vni_replaces_the_device_and_rebuilds_its_entries() -> None:
    fake = fake_node()
    await RoutingReconciler(fake, LOCAL, VXLAN).sync([peer(2)])
    old_index = fake.node.links[TUNNEL_DEVICE].ifindex
    result = await RoutingReconciler(fake, LOCAL, VXLAN.model_copy(update={"vxlanVNI": 8})).sync([peer(2)])
    assert result.tunnel_created and result.added == 3
    link = fake.node.links[TUNNEL_DEVICE]
    assert link.ifindex != old_index and link.vxlan is not None and link.vxlan.vni == 8
    assert ("10.244.2.0/24", TUNNEL_DEVICE, "10.244.2.1") in owned(fake)


async def test_switching_to_native_removes_the_tunnel_and_its_entries() -> None:
    fake = fake_node()
    await RoutingReconciler(fake, LOCAL, VXLAN).sync([peer(2)])
    result = await RoutingReconciler(fake, LOCAL, NATIVE).sync([peer(2)])
    assert TUNNEL_DEVICE not in fake.node.links
    assert fake.node.neighbours == {} and fake.node.fdb == set()
    assert owned(fake) == {("10.244.2.0/24", "eth0", "172.31.0.12")}
    assert result.deleted == 0  # the entries went with the device


async def test_an_unreachable_peer_is_reported_the_others_are_routed_and_the_next_sync_rereads() -> None:
    fake = fake_node()
    reconciler = RoutingReconciler(fake, LOCAL, NATIVE)
    far = PeerNode("far", IPv4Address("192.168.50.5"), IPv4Network("10.244.50.0/24"))
    unreachable = r"route 10\.244\.50\.0/24 via 192\.168\.50\.5 dev eth0: Network is unreachable"
    with pytest.raises(DatapathError, match=unreachable):
        await reconciler.sync([peer(2), far])
    assert owned(fake) == {("10.244.2.0/24", "eth0", "172.31.0.12")}
    assert reconciler.applied is None
    assert (await reconciler.sync([peer(2)])).kind == "full"


# -- the loop ------------------------------------------------------------------------------------


class RoutingHarness:
    """The routing module (nodes → peers → kernel) on a FakeNetlink, with a node table the test writes."""

    def __init__(self, fake: FakeNetlink, resync_interval: float = 60.0) -> None:
        db = StateDB()
        self.nodes = db.table("nodes", primary=lambda n: n.name)
        self.writer = self.nodes.writer("test")
        module = routing_module(db, self.nodes, fake, LOCAL, VXLAN, resync_interval=resync_interval)
        self.reconciler = module.reconcilers[0]
        self.lifecycle = Lifecycle()
        self.runner = ModuleRunner(self.lifecycle, [module])

    async def __aenter__(self) -> RoutingHarness:
        await self.runner.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.stop()


async def test_node_changes_reach_the_kernel_and_drift_is_repaired_by_the_periodic_resync() -> None:
    fake = fake_node()
    async with RoutingHarness(fake, resync_interval=0.2) as h:
        h.writer.upsert(*nodes(1, 2).values())
        await async_wait_until(lambda: len(owned(fake)) == 1, what="node2's route")
        h.writer.upsert(*nodes(3).values())
        await async_wait_until(lambda: ("10.244.3.0/24", TUNNEL_DEVICE, "10.244.3.1") in owned(fake),
                               what="node3's route")
        h.writer.delete("node2")
        await async_wait_until(lambda: owned(fake) == {("10.244.3.0/24", TUNNEL_DEVICE, "10.244.3.1")},
                               what="node2's route to go")
        fake.node.routes.clear()  # drift nobody announces
        await async_wait_until(lambda: len(owned(fake)) == 1, timeout=5, what="the resync to repair it")
        assert h.reconciler.health()["errors"] == 0


async def test_a_failed_sync_is_retried_until_it_succeeds() -> None:
    fake = fake_node()
    fake.fail["apply_routing"] = DatapathError("netlink: No buffer space available")
    async with RoutingHarness(fake) as h:
        h.reconciler.retry_initial = 0.01
        h.writer.upsert(*nodes(2).values())
        await async_wait_until(lambda: len(owned(fake)) == 1, what="the retry to succeed")
        health = h.reconciler.health()
        assert health["errors"] == 0 and health["done"] == 1
        assert "No buffer space" in health["lastError"]
        assert fake.calls.count("apply_routing") >= 2


def test_overlap_check_agrees_with_pairwise_comparison() -> None:
    import ipaddress
    import random

    from membrane.agent.routing import _DisjointRanges

    rng = random.Random(7)
    ranges = _DisjointRanges()
    taken: list[ipaddress.IPv4Network] = []
    for _ in range(400):
        cidr = ipaddress.IPv4Network((rng.randrange(0, 1 << 16) << 8, rng.choice([20, 22, 24, 26])), strict=False)
        expected = any(cidr.overlaps(t) for t in taken)
        assert ranges.overlaps(cidr) == expected, cidr
        if not expected:
            ranges.add(cidr)
            taken.append(cidr)
