"""The flow model: Hubble's wire numbers and names, and the summaries producers get from the helpers."""

from __future__ import annotations

import pytest

from membrane.observe.jsonpb import parse_json
from membrane.observe.model import (
    DROPPED,
    EGRESS,
    REQUEST,
    RESPONSE,
    Flow,
    GetFlowsResponse,
    fill_summary,
    flow_protocol,
    icmp_summary,
    mark_drop,
    mark_l7,
    mark_policy_verdict,
    mark_trace,
)
from membrane.observe.pb.observer import observer_pb2


@pytest.mark.parametrize(("message", "field", "number"), [
    (Flow, "time", 1), (Flow, "uuid", 34), (Flow, "verdict", 2), (Flow, "IP", 5), (Flow, "l4", 6),
    (Flow, "source", 8), (Flow, "Type", 10), (Flow, "node_name", 11), (Flow, "l7", 15), (Flow, "event_type", 19),
    (Flow, "traffic_direction", 22), (Flow, "trace_observation_point", 24), (Flow, "drop_reason_desc", 25),
    (Flow, "is_reply", 26), (Flow, "Summary", 100000), (Flow, "egress_allowed_by", 21001),
    (observer_pb2.GetFlowsRequest, "whitelist", 6), (observer_pb2.GetFlowsRequest, "first", 9),
    (observer_pb2.GetFlowsRequest, "field_mask", 10), (observer_pb2.GetFlowsResponse, "node_name", 1000),
    (observer_pb2.ServerStatusResponse, "flows_rate", 9),
])
def test_field_numbers_are_hubbles(message: type, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number  # type: ignore[attr-defined]


def test_service_and_package_names_are_hubbles() -> None:
    assert observer_pb2.DESCRIPTOR.services_by_name["Observer"].full_name == "observer.Observer"
    assert Flow.DESCRIPTOR.full_name == "flow.Flow"


def test_hubbles_json_parses() -> None:
    line = ('{"flow":{"time":"2025-01-02T03:04:05.123456789Z","uuid":"u","verdict":"FORWARDED",'
            '"IP":{"source":"10.0.1.5","destination":"10.0.2.9","ipVersion":"IPv4"},'
            '"l4":{"TCP":{"source_port":51324,"destination_port":80,"flags":{"SYN":true}}},'
            '"source":{"ID":1234,"identity":8123,"namespace":"default","labels":["k8s:app=client"],'
            '"pod_name":"client-abc","workloads":[{"name":"client","kind":"Deployment"}]},'
            '"Type":"L3_L4","node_name":"kind-worker","event_type":{"type":4,"sub_type":3},'
            '"traffic_direction":"EGRESS","trace_observation_point":"TO_STACK","trace_reason":"NEW",'
            '"is_reply":false,"interface":{"index":12,"name":"lxc1"},"Summary":"TCP Flags: SYN",'
            '"some_future_field":1},"node_name":"kind-worker","time":"2025-01-02T03:04:05.123456789Z"}')
    response = parse_json(line, GetFlowsResponse())
    flow = response.flow
    assert (flow.IP.destination, flow.l4.TCP.destination_port, flow.source.workloads[0].kind) == (
        "10.0.2.9", 80, "Deployment")
    assert flow.HasField("is_reply") and not flow.is_reply.value and flow.traffic_direction == EGRESS


def flow_with(**l4: dict[str, int]) -> Flow:
    flow = Flow()
    for name, fields in l4.items():
        for key, value in fields.items():
            setattr(getattr(flow.l4, name), key, value)
    return flow


@pytest.mark.parametrize(("flow", "summary"), [
    (flow_with(UDP={"destination_port": 53}), "UDP"),
    (flow_with(SCTP={"destination_port": 9}), "SCTP"),
    (flow_with(ICMPv4={"type": 8}), "ICMPv4 EchoRequest"),
    (flow_with(ICMPv4={"type": 3, "code": 3}), "ICMPv4 DestinationUnreachable(Port)"),
    (flow_with(ICMPv4={"type": 3, "code": 99}), "ICMPv4 DestinationUnreachable(Code: 99)"),
    (flow_with(ICMPv4={"type": 0, "code": 1}), "ICMPv4 EchoReply(Code: 1)"),
    (flow_with(ICMPv4={"type": 77, "code": 2}), "ICMPv4 77(2)"),
    (flow_with(ICMPv6={"type": 129}), "ICMPv6 EchoReply"),
    (flow_with(TCP={"source_port": 1}), "TCP Flags: "),
])
def test_l34_summaries(flow: Flow, summary: str) -> None:
    assert fill_summary(flow).Summary == summary


def test_tcp_flag_order_and_icmp_helper() -> None:
    flow = Flow()
    for name in ("FIN", "ACK", "SYN", "NS"):
        setattr(flow.l4.TCP.flags, name, True)
    assert fill_summary(flow).Summary == "TCP Flags: SYN, ACK, FIN, NS"
    assert icmp_summary(6, 1, 4) == "ICMPv6 DestinationUnreachable(PortUnreachable)"


def test_l7_summaries() -> None:
    request = mark_l7(Flow(), REQUEST)
    request.l7.dns.query = "cilium.io."
    request.l7.dns.qtypes.extend(["A", "AAAA"])
    assert fill_summary(request).Summary == "DNS Query cilium.io. A,AAAA"
    answer = mark_l7(Flow(), RESPONSE)
    answer.l7.dns.query, answer.l7.dns.ttl, answer.l7.dns.observation_source = "cilium.io.", 30, "proxy"
    answer.l7.dns.qtypes.append("A")
    answer.l7.dns.ips.extend(["1.2.3.4", "5.6.7.8"])
    answer.l7.dns.cnames.append("x.cilium.io.")
    assert fill_summary(answer).Summary == (
        'DNS Answer "1.2.3.4,5.6.7.8" CNAMEs: "x.cilium.io." TTL: 30 (Proxy cilium.io. A)')
    refused = mark_l7(Flow(), RESPONSE)
    refused.l7.dns.query, refused.l7.dns.rcode = "x.", 5
    assert fill_summary(refused).Summary == "DNS Answer RCode: Query Refused TTL: 0 (Query x. )"
    http = mark_l7(Flow(), RESPONSE)
    http.l7.latency_ns = 5_900_000
    http.l7.http.code, http.l7.http.method = 404, "GET"
    http.l7.http.url, http.l7.http.protocol = "http://a/b", "HTTP/1.1"
    assert fill_summary(http).Summary == "HTTP/1.1 404 5ms (GET http://a/b)"
    given = Flow(Summary="kept")
    assert fill_summary(given).Summary == "kept"


def test_event_helpers_set_what_hubble_sets() -> None:
    trace = mark_trace(Flow(), "from-network")
    assert (trace.event_type.type, trace.event_type.sub_type, trace.trace_observation_point) == (4, 10, 10)
    to_endpoint = mark_trace(Flow(), "to-endpoint")
    assert (to_endpoint.event_type.sub_type, to_endpoint.trace_observation_point) == (0, 101)
    drop = mark_drop(Flow(), 181)
    assert (drop.verdict, drop.drop_reason, drop.drop_reason_desc, drop.event_type.sub_type) == (DROPPED, 181, 181, 181)
    unknown = mark_drop(Flow(), 250)
    assert unknown.drop_reason_desc == 0 and unknown.drop_reason == 250
    denied = mark_policy_verdict(Flow(), verdict=DROPPED, direction=EGRESS, match_type=3)
    assert (denied.event_type.type, denied.drop_reason_desc, denied.policy_match_type) == (5, 133, 3)
    assert flow_protocol(mark_l7(Flow(), REQUEST)) == "Unknown L7"
