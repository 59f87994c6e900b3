"""Service flows from the real kernel: a pod's connection to a ClusterIP through the real ruleset
(services and flow logging on) yields flows that name the service, with the frontend address in
the translation event, exactly as the agent's observer builds them (enrich + ServiceFlows).

Two pods are wired the way the agent wires them; the reader binds the group in the node namespace.
Each test ends its traffic with a marker datagram and looks at the records before it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from membrane.datapath.flowcodes import TRACE_SERVICE_TRANSLATION, parse_prefix
from membrane.datapath.netlink import AttachedEndpoint, EndpointSpec, PyrouteNetlink
from membrane.datapath.nft import NftCommand
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, FlowLog, build_ruleset
from membrane.datapath.services import ServiceDatapath
from membrane.loadbalancer.model import ANY_ADDRESS, Backend, Frontend, L4Addr
from membrane.observe.enrich import EndpointInfo, EnrichmentState, enrich
from membrane.observe.model import MSG_TRACE_SOCK, TRACED, Flow
from membrane.observe.nflog import HOOK_PREROUTING, NETLINK_NETFILTER, NflogReader, NflogRecord
from membrane.observe.services import FrontendIndex, ServiceFlows
from membrane.testing.netns import Netns, NetnsFactory, async_wait_until, missing_binaries

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(bool(missing_binaries("nft")), reason="needs nft")]

ROUTER = IPv4Address("10.244.7.1")
POD1, POD2 = "10.244.7.10", "10.244.7.11"
CLUSTER_IP = "10.96.7.10"
NODE_IP = IPv4Address("10.250.7.1")
GROUP = 4245
MARKER_PORT = 65002
SERVICE = ("default", "web")
FRONTENDS = (
    Frontend(id=1, service=SERVICE, port_name="http", type="ClusterIP",
             address=L4Addr(IPv4Address(CLUSTER_IP), "TCP", 80),
             backends=(Backend(IPv4Address(POD2), 8080, "node1"),),
             selected=(Backend(IPv4Address(POD2), 8080, "node1"),)),
    Frontend(id=2, service=SERVICE, port_name="http", type="NodePort", address=L4Addr(ANY_ADDRESS, "TCP", 30080),
             backends=(Backend(IPv4Address(POD2), 8080, "node1"),),
             selected=(Backend(IPv4Address(POD2), 8080, "node1"),)),
)


@dataclass
class Node:
    node: Netns
    pod1: Netns
    pod2: Netns
    ep1: AttachedEndpoint
    ep2: AttachedEndpoint
    records: list[NflogRecord]
    marker_port: int = MARKER_PORT

    async def until_marker(self) -> list[NflogRecord]:
        """Send the marker from pod1; every record before it (taken from ``records``). Each marker
        comes from a port of its own: a repeated one would be no new connection, so no event."""
        self.marker_port -= 1
        marker = self.marker_port
        sender = self.pod1.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sender.bind((POD1, marker))
            sender.sendto(b"marker", (POD2, 9))
        finally:
            sender.close()

        def marker_index() -> int | None:
            return next((i for i, r in enumerate(self.records) if r.packet and r.packet.source_port == marker),
                        None)

        await async_wait_until(lambda: marker_index() is not None, timeout=10, what="the marker's record")
        index = marker_index()
        assert index is not None
        before, self.records[:] = self.records[:index], self.records[index + 1 :]
        return before

    async def flows(self) -> list[Flow]:
        """The flows of every record before the marker, as the observer makes them."""
        records = await self.until_marker()
        state = EnrichmentState.build("node1", [
            EndpointInfo(POD1, 1001, "default", "client", node="node1", ifindex=self.ep1.host_ifindex,
                         ifname=self.ep1.host_ifname, endpoint_id=1),
            EndpointInfo(POD2, 1002, "default", "web-0", node="node1", ifindex=self.ep2.host_ifindex,
                         ifname=self.ep2.host_ifname, endpoint_id=2),
        ])
        services = ServiceFlows(FrontendIndex.build(FRONTENDS))
        out = []
        for record in records:
            flow = enrich(record, state)
            if flow is not None:
                services.annotate(record, flow)
                out.append(flow)
        return out


@pytest.fixture
async def node(netns_factory: NetnsFactory) -> AsyncIterator[Node]:
    node_ns = netns_factory("mfs-node-", lo_up=True)
    pod1, pod2 = netns_factory("mfs-pod-", lo_up=True), netns_factory("mfs-pod-", lo_up=True)
    netlink = PyrouteNetlink(node_ns.path)
    await netlink.ensure_host_device(ROUTER, 1500)
    ep1 = await netlink.attach_endpoint(EndpointSpec("ctr-1", pod1.path, "eth0", IPv4Address(POD1), ROUTER))
    ep2 = await netlink.attach_endpoint(EndpointSpec("ctr-2", pod2.path, "eth0", IPv4Address(POD2), ROUTER))
    reader = NflogReader(GROUP, sock=node_ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    records: list[NflogRecord] = []
    task = asyncio.create_task(reader.run(records.extend))
    await asyncio.wait_for(reader.bound.wait(), 10)
    desired = DesiredDatapath(endpoints=frozenset({EndpointAddress.of(ep1), EndpointAddress.of(ep2)}),
                              flow_log=FlowLog(group=GROUP),
                              services=ServiceDatapath(FRONTENDS, node_address=NODE_IP, gateway=ROUTER))
    await NftReconciler(NftCommand(node_ns.path)).sync(build_ruleset(desired))
    discard = pod2.socket(socket.AF_INET, socket.SOCK_DGRAM)
    discard.bind((POD2, 9))  # takes the markers without an ICMP answer (another event)
    try:
        yield Node(node_ns, pod1, pod2, ep1, ep2, records)
    finally:
        discard.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _connect(node: Node, address: str, port: int) -> int:
    """One TCP connection pod1 → ``address:port`` reaching pod2:8080; the client's port."""
    server = node.pod2.socket()
    client = node.pod1.socket()
    try:
        server.bind((POD2, 8080))
        server.listen(1)
        client.settimeout(5)
        client.connect((address, port))
        accepted, _ = server.accept()
        sport = int(client.getsockname()[1])
        client.close()
        assert accepted.recv(16) == b""
        accepted.close()
        return sport
    finally:
        client.close()
        server.close()


def _service(message: object) -> tuple[str, str]:
    return message.namespace, message.name  # type: ignore[attr-defined]


def _ports(flow: Flow) -> tuple[int, int]:
    return flow.l4.TCP.source_port, flow.l4.TCP.destination_port


async def test_a_connection_to_a_cluster_ip_names_the_service_on_every_flow(node: Node) -> None:
    sport = _connect(node, CLUSTER_IP, 80)
    flows = await node.flows()
    translation, *packets = flows
    # The translation event: Hubble's pre-xlate-fwd, to the frontend, naming the service.
    assert translation.event_type.type == MSG_TRACE_SOCK and translation.verdict == TRACED
    assert (translation.IP.source, translation.IP.destination, _ports(translation)) == (
        POD1, CLUSTER_IP, (sport, 80))
    assert _service(translation.destination_service) == SERVICE
    assert translation.source.pod_name == "client"
    # The packets, after DNAT: to the backend pod, the service named on the side it stands for.
    assert [(f.IP.source, f.IP.destination, f.is_reply.value) for f in packets] == [
        (POD1, POD2, False), (POD2, POD1, True), (POD1, POD2, False), (POD2, POD1, True)]
    for flow in packets:
        if flow.is_reply.value:
            assert _service(flow.source_service) == SERVICE and not flow.HasField("destination_service")
            assert _ports(flow) == (8080, sport)
        else:
            assert _service(flow.destination_service) == SERVICE and not flow.HasField("source_service")
            assert flow.destination.pod_name == "web-0" and _ports(flow) == (sport, 8080)


async def test_a_node_port_connection_names_the_service_and_a_direct_one_does_not(node: Node) -> None:
    _connect(node, str(ROUTER), 30080)
    _connect(node, POD2, 8080)
    flows = await node.flows()
    translations = [f for f in flows if f.event_type.type == MSG_TRACE_SOCK]
    assert [(f.IP.destination, _ports(f)[1], _service(f.destination_service)) for f in translations] == [
        (str(ROUTER), 30080, SERVICE)]
    packets = [f for f in flows if f.event_type.type != MSG_TRACE_SOCK]
    assert len(packets) == 8
    through_service, direct = packets[:4], packets[4:]
    assert all(f.HasField("destination_service") or f.HasField("source_service") for f in through_service)
    assert not any(f.HasField("destination_service") or f.HasField("source_service") for f in direct)


async def test_the_translation_is_logged_before_dnat_once_per_connection(node: Node) -> None:
    for _ in range(2):
        _connect(node, CLUSTER_IP, 80)
        records = await node.until_marker()
        assert len(records) == 5  # the translation, SYN, SYN-ACK and both FINs
        translated = [r for r in records if parse_prefix(r.prefix) == TRACE_SERVICE_TRANSLATION]
        assert len(translated) == 1
    [record] = translated
    assert record.hook == HOOK_PREROUTING and record.in_ifindex == node.ep1.host_ifindex
    assert record.packet is not None and (record.packet.destination, record.packet.destination_port) == (
        CLUSTER_IP, 80)
