"""Flow events from the real kernel: the ruleset's log rules and the NFLOG reader in a node namespace.

Two pods are wired the way the agent wires them and the real ruleset (flow logging on) is applied;
the reader binds the group in the node namespace. Each test ends its traffic with a marker (a UDP
datagram from a port nothing else uses) and checks the records that came before it, so "exactly
these events and no others" is decided without sleeping.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from membrane.datapath.flowcodes import (
    DROP_SPOOFED_SOURCE,
    TRACE_FIRST_REPLY,
    TRACE_NEW,
    TRACE_TCP_ORIGINAL,
    TRACE_TCP_REPLY,
    FlowCode,
    parse_prefix,
)
from membrane.datapath.netlink import AttachedEndpoint, EndpointSpec, PyrouteNetlink
from membrane.datapath.nft import NftCommand
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, FlowLog, build_ruleset
from membrane.observe.nflog import (
    HOOK_FORWARD,
    HOOK_INPUT,
    HOOK_OUTPUT,
    HOOK_PREROUTING,
    NETLINK_NETFILTER,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    NflogReader,
    NflogRecord,
    NflogSettings,
)
from membrane.testing.netns import Netns, NetnsFactory, async_wait_until, missing_binaries

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(bool(missing_binaries("nft")), reason="needs nft")]

ROUTER = IPv4Address("10.244.1.1")
POD1, POD2, SPOOFED = "10.244.1.10", "10.244.1.11", "10.244.1.99"
GROUP = 4244
MARKER_PORT = 65001


@dataclass
class Node:
    node: Netns
    pod1: Netns
    pod2: Netns
    ep1: AttachedEndpoint
    ep2: AttachedEndpoint
    reader: NflogReader
    records: list[NflogRecord]

    async def log_rules(self, on: bool = True) -> None:
        desired = DesiredDatapath.from_endpoints((EndpointAddress.of(self.ep1), EndpointAddress.of(self.ep2)),
                                                 flow_log=FlowLog(group=GROUP) if on else None)
        await NftReconciler(NftCommand(self.node.path)).sync(build_ruleset(desired))

    async def until_marker(self) -> list[tuple[FlowCode | None, NflogRecord]]:
        """Send the marker from pod1 and return every record before it, with its code."""
        sender = self.pod1.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sender.bind((POD1, MARKER_PORT))
            sender.sendto(b"marker", (POD2, 9))
        finally:
            sender.close()

        def marker_index() -> int | None:
            for index, rec in enumerate(self.records):
                if rec.packet is not None and rec.packet.source_port == MARKER_PORT:
                    return index
            return None

        await async_wait_until(lambda: marker_index() is not None, timeout=10, what="the marker's record")
        index = marker_index()
        assert index is not None
        before, self.records[:] = self.records[:index], self.records[index + 1 :]
        return [(parse_prefix(r.prefix), r) for r in before]


@pytest.fixture
async def node(netns_factory: NetnsFactory) -> AsyncIterator[Node]:
    node_ns = netns_factory("mbfl-node-", lo_up=True)
    pod1, pod2 = netns_factory("mbfl-pod-", lo_up=True), netns_factory("mbfl-pod-", lo_up=True)
    netlink = PyrouteNetlink(node_ns.path)
    await netlink.ensure_host_device(ROUTER, 1500)
    ep1 = await netlink.attach_endpoint(EndpointSpec("ctr-1", pod1.path, "eth0", IPv4Address(POD1), ROUTER))
    ep2 = await netlink.attach_endpoint(EndpointSpec("ctr-2", pod2.path, "eth0", IPv4Address(POD2), ROUTER))
    sock = node_ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    reader = NflogReader(GROUP, sock=sock)
    records: list[NflogRecord] = []
    task = asyncio.create_task(reader.run(records.extend))
    await asyncio.wait_for(reader.bound.wait(), 10)
    state = Node(node_ns, pod1, pod2, ep1, ep2, reader, records)
    await state.log_rules()
    # Takes the markers without an answer (a closed port would answer with ICMP: another event).
    discard = pod2.socket(socket.AF_INET, socket.SOCK_DGRAM)
    discard.bind((POD2, 9))
    try:
        yield state
    finally:
        discard.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def summary(events: list[tuple[FlowCode | None, NflogRecord]]) -> list[tuple[FlowCode | None, str, str, int]]:
    return [(code, r.packet.source if r.packet else "", r.packet.destination if r.packet else "",
             r.packet.tcp_flags if r.packet else 0) for code, r in events]


def connect_and_close(client_ns: Netns, server_ns: Netns, port: int) -> None:
    """One TCP connection pod1 → pod2: handshake, then the client closes first, then the server."""
    server = server_ns.socket()
    client = client_ns.socket()
    try:
        server.bind((POD2, port))
        server.listen(1)
        client.connect((POD2, port))
        accepted, _ = server.accept()
        client.close()  # FIN from the client …
        assert accepted.recv(16) == b""
        accepted.close()  # … then from the server
    finally:
        client.close()
        server.close()


async def test_a_tcp_connection_between_pods_reports_syn_syn_ack_and_both_fins(node: Node) -> None:
    connect_and_close(node.pod1, node.pod2, 8080)
    events = await node.until_marker()
    assert summary(events) == [
        (TRACE_NEW, POD1, POD2, TCP_SYN),
        (TRACE_TCP_REPLY, POD2, POD1, TCP_SYN | TCP_ACK),
        (TRACE_TCP_ORIGINAL, POD1, POD2, TCP_FIN | TCP_ACK),
        (TRACE_TCP_REPLY, POD2, POD1, TCP_FIN | TCP_ACK),
    ]
    new = events[0][1]
    assert (new.hook, new.in_ifindex, new.out_ifindex) == (HOOK_FORWARD, node.ep1.host_ifindex,
                                                          node.ep2.host_ifindex)
    assert new.packet is not None and new.packet.destination_port == 8080
    assert node.reader.stats.lost == 0


async def test_other_protocols_report_the_first_packet_and_the_first_reply_once(node: Node) -> None:
    server = node.pod2.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = node.pod1.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.bind((POD2, 5353))
        server.settimeout(5)
        client.settimeout(5)
        for i in range(3):
            client.sendto(f"q{i}".encode(), (POD2, 5353))
            data, peer = server.recvfrom(16)
            server.sendto(data, peer)
            assert client.recv(16) == data
    finally:
        client.close()
        server.close()
    events = await node.until_marker()
    assert [(code, src, dst) for code, src, dst, _ in summary(events)] == [
        (TRACE_NEW, POD1, POD2), (TRACE_FIRST_REPLY, POD2, POD1)]


async def test_a_spoofed_packet_is_reported_as_a_drop_at_the_pods_veth(node: Node) -> None:
    node.pod1.run("ip", "addr", "add", f"{SPOOFED}/32", "dev", "eth0")
    sender = node.pod1.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.bind((SPOOFED, 0))
        sender.sendto(b"spoofed", (POD2, 9))
    finally:
        sender.close()
    events = await node.until_marker()
    assert [code for code, _ in events] == [DROP_SPOOFED_SOURCE]
    drop = events[0][1]
    assert (drop.hook, drop.in_ifindex) == (HOOK_PREROUTING, node.ep1.host_ifindex)
    assert drop.packet is not None and (drop.packet.source, drop.packet.destination) == (SPOOFED, POD2)


async def test_traffic_between_a_pod_and_its_node_is_reported_at_input_and_output(node: Node) -> None:
    listener = node.node.socket()
    try:
        listener.bind((str(ROUTER), 8081))
        listener.listen(1)
        to_node = node.pod1.socket()
        to_node.connect((str(ROUTER), 8081))
        to_node.close()
        listener.accept()[0].close()
    finally:
        listener.close()
    server = node.pod2.socket()
    try:
        server.bind((POD2, 8082))
        server.listen(1)
        from_node = node.node.socket()
        from_node.connect((POD2, 8082))
        from_node.close()
        server.accept()[0].close()
    finally:
        server.close()
    events = await node.until_marker()
    firsts = [(r.hook, r.packet.destination) for code, r in events if code == TRACE_NEW and r.packet]
    assert firsts == [(HOOK_INPUT, str(ROUTER)), (HOOK_OUTPUT, POD2)]
    # The replies of pod → node leave the node through output, and those of node → pod come in.
    assert {r.hook for _, r in events} == {HOOK_INPUT, HOOK_OUTPUT}


async def test_without_flow_logging_nothing_is_reported(node: Node) -> None:
    await node.log_rules(on=False)
    connect_and_close(node.pod1, node.pod2, 8083)
    await node.log_rules(on=True)
    assert await node.until_marker() == []


FLOOD = textwrap.dedent("""
    import socket, sys
    count, dst = int(sys.argv[1]), sys.argv[2]
    for port in range(20000, 20000 + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))   # a new source port each time: a new connection, a NEW event
        s.sendto(b"x", (dst, 5999))
        s.close()
""")


async def test_events_the_reader_could_not_take_are_counted_exactly(netns_factory: NetnsFactory,
                                                                   node: Node) -> None:
    sink = node.pod2.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((POD2, 5999))  # takes the datagrams without answering (no ICMP, no reply events)
    small = NflogReader(GROUP + 1, sock=node.node.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER),
                        settings=NflogSettings(rcvbuf=1 << 16))
    records: list[NflogRecord] = []
    task = asyncio.create_task(small.run(records.extend))
    try:
        await asyncio.wait_for(small.bound.wait(), 10)
        # The same rules, now reporting to the small reader's group.
        desired = DesiredDatapath.from_endpoints((EndpointAddress.of(node.ep1), EndpointAddress.of(node.ep2)),
                                                 flow_log=FlowLog(group=GROUP + 1))
        await NftReconciler(NftCommand(node.node.path)).sync(build_ruleset(desired))
        sent = 20_000
        # Runs while the event loop (and so the reader) is blocked: the socket overflows.
        node.pod1.run(sys.executable, "-c", FLOOD, str(sent), POD2, timeout=120)
        await asyncio.sleep(0)
        marker = node.pod1.socket(socket.AF_INET, socket.SOCK_DGRAM)
        marker.bind((POD1, MARKER_PORT))
        marker.sendto(b"marker", (POD2, 9))
        marker.close()
        await async_wait_until(
            lambda: any(r.packet is not None and r.packet.source_port == MARKER_PORT for r in records),
            timeout=30, what="the marker after the flood")
        stats = small.stats
        assert stats.lost > 0, "the flood should have overflowed a 64 KiB socket buffer"
        assert stats.received + stats.lost == sent + 1
        assert len(records) == stats.received
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sink.close()


async def test_a_second_reader_cannot_take_a_bound_group(node: Node) -> None:
    intruder = NflogReader(GROUP, sock=node.node.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    with pytest.raises(OSError, match="bound by another reader"):
        await asyncio.wait_for(intruder.run(lambda records: None), 10)
