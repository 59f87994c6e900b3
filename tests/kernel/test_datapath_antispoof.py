"""Anti-spoofing against the real kernel: a pod can send only from its own address.

Each check first shows the spoofed packet getting through without the protection, so a test that
passes is one that could have failed.
"""

from __future__ import annotations

import json
import socket
from ipaddress import IPv4Address

import pytest

from membrane.datapath.netlink import AttachedEndpoint, EndpointSpec, PyrouteNetlink
from membrane.datapath.nft import NftCommand
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import FROM_ENDPOINT, DesiredDatapath, EndpointAddress, build_ruleset
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(missing_binaries("busybox", "nft")), reason="needs busybox and nft"),
]

ROUTER = IPv4Address("10.244.1.1")
POD1, POD2 = "10.244.1.10", "10.244.1.11"
SPOOFED = ("10.244.1.99", "10.244.2.5")  # an unused local address, a pod address of another node


async def _setup(netns_factory: NetnsFactory) -> tuple[Netns, Netns, Netns, AttachedEndpoint, AttachedEndpoint]:
    node = netns_factory("mbdp-node-", lo_up=True)
    pod1, pod2 = netns_factory("mbdp-pod-"), netns_factory("mbdp-pod-")
    netlink = PyrouteNetlink(node.path)
    await netlink.ensure_host_device(ROUTER, 1500)
    ep1 = await netlink.attach_endpoint(EndpointSpec("ctr-1", pod1.path, "eth0", IPv4Address(POD1), ROUTER))
    ep2 = await netlink.attach_endpoint(EndpointSpec("ctr-2", pod2.path, "eth0", IPv4Address(POD2), ROUTER))
    for address in SPOOFED:  # what a pod with NET_ADMIN could do
        pod1.run("ip", "addr", "add", f"{address}/32", "dev", "eth0")
    return node, pod1, pod2, ep1, ep2


async def _protect(node: Netns, *endpoints: AttachedEndpoint) -> None:
    desired = DesiredDatapath.from_endpoints(EndpointAddress.of(e) for e in endpoints)
    await NftReconciler(NftCommand(node.path)).sync(build_ruleset(desired))


def _first_datagrams(sender_ns: Netns, own: str, receiver: socket.socket, sources: list[str]) -> list[bytes]:
    """Send one datagram from each source in order, then one from the pod's ``own`` address as a
    marker; return what arrived up to the marker. Same path, same order: anything missing was dropped.
    """
    dst = receiver.getsockname()
    for source in [*sources, own]:
        sender = sender_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sender.bind((source, 0))
            sender.sendto(source.encode(), dst)
        finally:
            sender.close()
    received = []
    while True:
        data = receiver.recv(64)
        received.append(data)
        if data == own.encode():
            return received


async def test_pod_can_send_only_from_its_own_address(netns_factory: NetnsFactory) -> None:
    node, pod1, pod2, ep1, ep2 = await _setup(netns_factory)
    # Pod to pod, and pod to node (the input path is guarded by the same prerouting hook).
    to_pod2 = pod2.socket(socket.AF_INET, socket.SOCK_DGRAM)
    to_node = node.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        to_pod2.bind((POD2, 9999))
        to_node.bind((str(ROUTER), 9999))
        for receiver in (to_pod2, to_node):
            receiver.settimeout(5)
        # Plain routing forwards whatever source a pod picks.
        spoofed = [s.encode() for s in SPOOFED]
        assert _first_datagrams(pod1, POD1, to_pod2, list(SPOOFED)) == [*spoofed, POD1.encode()]
        assert _first_datagrams(pod1, POD1, to_node, list(SPOOFED)) == [*spoofed, POD1.encode()]

        await _protect(node, ep1, ep2)
        assert _first_datagrams(pod1, POD1, to_pod2, list(SPOOFED)) == [POD1.encode()]
        assert _first_datagrams(pod1, POD1, to_node, list(SPOOFED)) == [POD1.encode()]
        # Another pod's address through one's own veth: (iif . saddr) is the key, not the address.
        # (Only now: a pod holding POD1 itself would discard POD1's packets as martians.)
        pod2.run("ip", "addr", "add", f"{POD1}/32", "dev", "eth0")
        assert _first_datagrams(pod2, POD2, to_node, [POD1]) == [POD2.encode()]
    finally:
        to_pod2.close()
        to_node.close()
    assert _counters(node)["spoofed or unknown source"] == 2 * len(SPOOFED) + 1


async def test_a_veth_unknown_to_the_ruleset_cannot_send(netns_factory: NetnsFactory) -> None:
    node, pod1, _, ep1, ep2 = await _setup(netns_factory)
    await _protect(node, ep2)  # pod1 attached, but not (yet) in the ruleset: fail closed
    assert pod1.run("busybox", "ping", "-c", "1", "-W", "1", POD2, check=False).returncode != 0
    await _protect(node, ep1, ep2)
    assert pod1.run("busybox", "ping", "-c", "1", "-W", "2", POD2, check=False).returncode == 0


async def test_ipv6_from_pods_is_dropped(netns_factory: NetnsFactory) -> None:
    node, pod1, _, ep1, ep2 = await _setup(netns_factory)
    await _protect(node, ep1, ep2)
    assert _counters(node)["pods are IPv4-only"] == 0
    pod1.run("ip", "-6", "addr", "add", "fd00::10/64", "dev", "eth0", "nodad")
    pod1.run("busybox", "ping6", "-c", "1", "-W", "1", "fd00::1", check=False)  # neighbour solicitation
    assert _counters(node)["pods are IPv4-only"] >= 1


async def test_arp_answers_and_learns_only_the_pods_own_address(netns_factory: NetnsFactory) -> None:
    node, pod1, _, ep1, _ = await _setup(netns_factory)

    def arping(source: str) -> bool:
        result = pod1.run(
            "busybox", "arping", "-c", "1", "-w", "1", "-I", "eth0", "-s", source, str(ROUTER), check=False
        )
        return result.returncode == 0

    def learnt(address: str) -> bool:
        out = node.run("ip", "-j", "neigh", "show", "dev", ep1.host_ifname).stdout
        return any(entry["dst"] == address for entry in json.loads(out))

    assert arping(POD1)
    assert not arping(SPOOFED[0])
    assert not learnt(SPOOFED[0])
    # Without arp_filter the node would answer, and remember, the spoofed sender.
    node.run("sh", "-c", f"echo 0 > /proc/sys/net/ipv4/conf/{ep1.host_ifname}/arp_filter")
    assert arping(SPOOFED[0])
    assert learnt(SPOOFED[0])


def _counters(node: Netns) -> dict[str, int]:
    """Packets counted by each commented rule of the from_endpoint chain."""
    out = node.run("nft", "-j", "list", "chain", "inet", "membrane", FROM_ENDPOINT).stdout
    counters = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        for expr in rule["expr"]:
            if "counter" in expr:
                counters[rule.get("comment", "")] = expr["counter"]["packets"]
    return counters
