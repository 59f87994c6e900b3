"""Enrichment: an NFLOG record and the agent's knowledge → the flow Hubble users read."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from membrane.agent.observer import enrichment_state
from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.datapath.flowcodes import (
    DROP_IPV6,
    DROP_SPOOFED_SOURCE,
    TRACE_FIRST_REPLY,
    TRACE_NEW,
    TRACE_TCP_ORIGINAL,
    TRACE_TCP_REPLY,
    CodeVerdict,
    Direction,
    DropReason,
    EventKind,
    FlowCode,
    FlowCodeError,
)
from membrane.observe.enrich import EndpointInfo, EnrichmentState, FlowIds, NodeAddress, enrich
from membrane.observe.model import (
    DROPPED,
    EGRESS,
    FORWARDED,
    INGRESS,
    MSG_DROP,
    MSG_TRACE,
    TRAFFIC_DIRECTION_UNKNOWN,
    Flow,
    IPv4,
    IPv6,
)
from membrane.observe.nflog import (
    HOOK_FORWARD,
    HOOK_INPUT,
    HOOK_OUTPUT,
    HOOK_PREROUTING,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    NflogRecord,
    Packet,
)
from membrane.observe.pb.flow import flow_pb2

NODE = "node1"
CLIENT = EndpointInfo(ip="10.244.1.10", identity=1001, namespace="default", pod_name="client",
                      labels=("k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"),
                      endpoint_id=3, node=NODE, ifindex=7, ifname="lxcaaaaaaaaaaa")
SERVER = EndpointInfo(ip="10.244.1.11", identity=1002, namespace="shop", pod_name="server",
                      labels=("k8s:app=server", "k8s:io.kubernetes.pod.namespace=shop"),
                      endpoint_id=4, node=NODE, ifindex=9, ifname="lxcbbbbbbbbbbb")
REMOTE = EndpointInfo(ip="10.244.2.20", identity=1003, namespace="default", pod_name="far",
                      labels=("k8s:app=far",), node="node2")
NODES = (NodeAddress("node1", "172.31.0.11", "10.244.1.1"), NodeAddress("node2", "172.31.0.12", "10.244.2.1"))
TUNNEL = 4


def state(cluster: str = "default") -> EnrichmentState:
    return EnrichmentState.build(NODE, [CLIENT, SERVER, REMOTE], NODES, cluster_name=cluster, tunnel_ifindex=TUNNEL)


def record(prefix: str, src: str, dst: str, *, proto: int = IPPROTO_TCP, flags: int = 0, sport: int = 40000,
           dport: int = 8080, hook: int = HOOK_FORWARD, indev: int = 0, outdev: int = 0, version: int = 4,
           icmp: tuple[int, int] = (0, 0)) -> NflogRecord:
    packet = Packet(version, src, dst, proto, 60, sport if proto != IPPROTO_ICMP else 0,
                    dport if proto != IPPROTO_ICMP else 0, tcp_flags=flags, icmp_type=icmp[0], icmp_code=icmp[1])
    return NflogRecord(prefix, 1_700_000_000_123_456_789, hook, indev, outdev, 0, 0, packet)


def flow_of(rec: NflogRecord, st: EnrichmentState | None = None) -> Flow:
    flow = enrich(rec, st or state(), flow_id="id-1")
    assert flow is not None
    return flow


def test_a_new_connection_between_local_pods_is_seen_at_the_destination() -> None:
    flow = flow_of(record(TRACE_NEW.prefix(), CLIENT.ip, SERVER.ip, flags=TCP_SYN, indev=7, outdev=9))
    assert (flow.time.seconds, flow.time.nanos) == (1_700_000_000, 123_456_789)
    assert flow.uuid == "id-1" and flow.node_name == NODE
    assert (flow.IP.source, flow.IP.destination, flow.IP.ipVersion) == (CLIENT.ip, SERVER.ip, IPv4)
    assert (flow.l4.TCP.source_port, flow.l4.TCP.destination_port) == (40000, 8080)
    assert flow.l4.TCP.flags.SYN and not flow.l4.TCP.flags.ACK
    assert (flow.verdict, flow.event_type.type, flow.event_type.sub_type) == (FORWARDED, MSG_TRACE, 0)
    assert flow.trace_observation_point == flow_pb2.TO_ENDPOINT
    assert flow.trace_reason == flow_pb2.NEW
    assert flow.traffic_direction == INGRESS  # relative to the server, where it was seen
    assert flow.HasField("is_reply") and flow.is_reply.value is False
    assert (flow.source.ID, flow.source.identity, flow.source.namespace, flow.source.pod_name) == (
        3, 1001, "default", "client")
    assert list(flow.source.labels) == list(CLIENT.labels)
    assert [(w.name, w.kind) for w in flow.source.workloads] == [("client", "Pod")]
    assert flow.source.cluster_name == "default"
    assert (flow.destination.ID, flow.destination.identity, flow.destination.pod_name) == (4, 1002, "server")
    assert (flow.interface.index, flow.interface.name) == (9, "lxcbbbbbbbbbbb")
    assert flow.Summary == "TCP Flags: SYN"
    assert flow.Type == flow_pb2.L3_L4


def test_the_reply_is_marked_and_changes_direction() -> None:
    flow = flow_of(record(TRACE_TCP_REPLY.prefix(), SERVER.ip, CLIENT.ip, flags=TCP_SYN | TCP_ACK,
                          sport=8080, dport=40000, indev=9, outdev=7))
    assert flow.is_reply.value is True and flow.reply is True
    assert flow.trace_reason == flow_pb2.REPLY
    assert flow.traffic_direction == EGRESS
    assert flow.Summary == "TCP Flags: SYN, ACK"
    assert flow.source.pod_name == "server" and flow.destination.pod_name == "client"


def test_a_pod_reaching_another_node_through_the_tunnel() -> None:
    flow = flow_of(record(TRACE_TCP_ORIGINAL.prefix(), CLIENT.ip, REMOTE.ip, flags=TCP_FIN | TCP_ACK,
                          indev=7, outdev=TUNNEL))
    assert flow.trace_observation_point == flow_pb2.TO_OVERLAY
    assert flow.event_type.sub_type == 4
    assert flow.traffic_direction == EGRESS
    assert flow.trace_reason == flow_pb2.ESTABLISHED
    # A remote pod: identity and names from the store, no endpoint ID (those are node-local).
    assert (flow.destination.ID, flow.destination.identity, flow.destination.pod_name) == (0, 1003, "far")
    assert flow.Summary == "TCP Flags: ACK, FIN"


def test_traffic_from_another_node_to_a_local_pod() -> None:
    flow = flow_of(record(TRACE_NEW.prefix(), REMOTE.ip, SERVER.ip, flags=TCP_SYN, indev=TUNNEL, outdev=9))
    assert flow.trace_observation_point == flow_pb2.TO_ENDPOINT
    assert flow.traffic_direction == INGRESS
    assert (flow.source.identity, flow.source.pod_name) == (1003, "far")


def test_the_outside_world_and_the_stack() -> None:
    flow = flow_of(record(TRACE_FIRST_REPLY.prefix(), "93.184.216.34", CLIENT.ip, proto=IPPROTO_UDP,
                          sport=53, dport=5353, indev=2, outdev=7))
    assert (flow.source.identity, list(flow.source.labels)) == (2, ["reserved:world"])
    assert not flow.source.pod_name and not flow.source.workloads
    assert flow.traffic_direction == EGRESS  # the reply to what the client sent
    assert flow.l4.UDP.source_port == 53 and flow.Summary == "UDP"
    out = flow_of(record(TRACE_NEW.prefix(), CLIENT.ip, "93.184.216.34", proto=IPPROTO_UDP, indev=7, outdev=2))
    assert out.trace_observation_point == flow_pb2.TO_STACK and out.traffic_direction == EGRESS


def test_node_addresses_are_host_here_and_remote_node_elsewhere() -> None:
    to_host = flow_of(record(TRACE_NEW.prefix(), CLIENT.ip, "10.244.1.1", flags=TCP_SYN, hook=HOOK_INPUT, indev=7))
    assert to_host.trace_observation_point == flow_pb2.TO_HOST
    assert (to_host.destination.identity, list(to_host.destination.labels)) == (1, ["reserved:host"])
    assert to_host.traffic_direction == EGRESS
    from_host = flow_of(record(TRACE_NEW.prefix(), "172.31.0.11", SERVER.ip, flags=TCP_SYN, hook=HOOK_OUTPUT,
                               outdev=9))
    assert from_host.source.identity == 1 and from_host.trace_observation_point == flow_pb2.TO_ENDPOINT
    remote_node = flow_of(record(TRACE_NEW.prefix(), "172.31.0.12", SERVER.ip, flags=TCP_SYN, outdev=9))
    assert (remote_node.source.identity, list(remote_node.source.labels)) == (6, ["reserved:remote-node"])


def test_a_spoofed_packet_is_dropped_and_names_its_real_sender() -> None:
    flow = flow_of(record(DROP_SPOOFED_SOURCE.prefix(), "10.244.1.99", SERVER.ip, proto=IPPROTO_UDP,
                          hook=HOOK_PREROUTING, indev=7))
    assert (flow.verdict, flow.event_type.type, flow.event_type.sub_type) == (DROPPED, MSG_DROP, 132)
    assert flow.drop_reason == 132
    assert flow.drop_reason_desc == flow_pb2.INVALID_SOURCE_IP
    assert flow.IP.source == "10.244.1.99"  # what the packet claimed …
    assert (flow.source.pod_name, flow.source.identity) == ("client", 1001)  # … and who sent it
    assert flow.traffic_direction == EGRESS
    assert not flow.HasField("is_reply")  # unknown for drops, as in Hubble
    assert (flow.interface.index, flow.interface.name) == (7, "lxcaaaaaaaaaaa")
    assert not flow.trace_observation_point


@pytest.mark.parametrize(("direction", "decided_at", "traffic"), [
    (Direction.EGRESS, CLIENT, EGRESS), (Direction.INGRESS, SERVER, INGRESS), (None, CLIENT, EGRESS)])
def test_a_policy_drop_between_local_pods_belongs_to_the_side_its_rule_names(
        direction: Direction | None, decided_at: EndpointInfo, traffic: int) -> None:
    code = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED, 23, direction)
    flow = flow_of(record(code.prefix(), CLIENT.ip, SERVER.ip, flags=TCP_SYN, indev=7, outdev=9))
    assert flow.drop_reason_desc == flow_pb2.POLICY_DENIED and flow.verdict == DROPPED
    assert flow.traffic_direction == traffic
    assert flow.interface.index == decided_at.ifindex
    assert (flow.source.pod_name, flow.destination.pod_name) == ("client", "server")


def test_an_audited_policy_miss_is_a_policy_verdict_event() -> None:
    code = FlowCode(EventKind.POLICY_VERDICT, CodeVerdict.AUDIT, DropReason.POLICY_DENIED, 25, Direction.INGRESS)
    flow = flow_of(record(code.prefix(), CLIENT.ip, SERVER.ip, flags=TCP_SYN, indev=7, outdev=9))
    assert (flow.event_type.type, flow.verdict) == (5, flow_pb2.AUDIT)
    assert flow.traffic_direction == INGRESS
    assert flow.is_reply.value is False
    assert not flow.drop_reason  # let through: not a drop
    assert flow.Summary == "TCP Flags: SYN"


def test_ipv6_from_a_pod_is_an_unsupported_l3_drop() -> None:
    flow = flow_of(record(DROP_IPV6.prefix(), "fe80::1", "ff02::2", proto=IPPROTO_ICMPV6, version=6,
                          hook=HOOK_PREROUTING, indev=7, icmp=(133, 0)))
    assert flow.IP.ipVersion == IPv6
    assert flow.drop_reason_desc == flow_pb2.UNSUPPORTED_L3_PROTOCOL
    assert flow.l4.ICMPv6.type == 133
    assert flow.Summary == "ICMPv6 RouterSolicitation"
    assert flow.source.pod_name == "client"


def test_icmp_summary() -> None:
    flow = flow_of(record(TRACE_NEW.prefix(), CLIENT.ip, SERVER.ip, proto=IPPROTO_ICMP, icmp=(8, 0),
                          indev=7, outdev=9))
    assert flow.Summary == "ICMPv4 EchoRequest"


def test_neither_side_local_has_no_direction() -> None:
    flow = flow_of(record(TRACE_NEW.prefix(), REMOTE.ip, "93.184.216.34", flags=TCP_SYN, indev=TUNNEL, outdev=2))
    assert flow.traffic_direction == TRAFFIC_DIRECTION_UNKNOWN


def test_the_cluster_name_prefixes_the_node_name_outside_the_default_cluster() -> None:
    flow = flow_of(record(TRACE_NEW.prefix(), CLIENT.ip, SERVER.ip, flags=TCP_SYN, indev=7, outdev=9),
                   state("blue"))
    assert flow.node_name == "blue/node1"
    assert flow.source.cluster_name == "blue"


def test_records_that_are_not_ours_are_skipped_and_broken_ones_raise() -> None:
    assert enrich(record("NEW ", CLIENT.ip, SERVER.ip), state()) is None
    no_ip = NflogRecord(TRACE_NEW.prefix(), 0, HOOK_FORWARD, 7, 9, 0, 0, None)
    assert enrich(no_ip, state()) is None
    with pytest.raises(FlowCodeError):
        enrich(record("mb:t:F:?:1", CLIENT.ip, SERVER.ip), state())


def test_flow_ids_are_unique_and_shaped_like_uuids() -> None:
    ids = FlowIds()
    many = {ids.next() for _ in range(1000)}
    assert len(many) == 1000
    assert all(len(i) == 36 and i.count("-") == 4 for i in many)


def test_state_from_the_intent_knows_every_pod_and_node() -> None:
    local = EndpointRecord("c1", 3, NODE, "default", "client", "eth0", "/run/netns/x", IPv4Address(CLIENT.ip),
                           1001, CLIENT.labels, "runner", "ready", "lxcaaaaaaaaaaa", 7)
    remote = EndpointRecord("c2", 9, "node2", "default", "far", "eth0", "/run/netns/y", IPv4Address(REMOTE.ip),
                            1003, REMOTE.labels, "runner", "ready", "lxccccccccccc", 12)
    node2 = CiliumNode.model_validate(
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node2"},
         "spec": {"addresses": [{"type": "InternalIP", "ip": "172.31.0.12"}], "ipam": {"podCIDRs": ["10.244.2.0/24"]}}})
    no_address = CiliumNode.model_validate({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                                            "metadata": {"name": "node3"}})
    st = enrichment_state(NODE, [local, remote], [node2, no_address], tunnel_ifindex=TUNNEL)
    assert st.local_by_ifindex[7].pod_name == "client"
    assert 12 not in st.local_by_ifindex  # another node's veth index means nothing here
    far = st.lookup(REMOTE.ip)
    assert (far.identity, far.endpoint_id, far.ifindex) == (1003, 0, 0)
    assert st.lookup("10.244.2.1").identity == 6 and st.lookup("172.31.0.12").identity == 6
    assert st.lookup("8.8.8.8").identity == 2
    assert st.tunnel_ifindex == TUNNEL
