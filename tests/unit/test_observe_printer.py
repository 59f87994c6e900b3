"""Hubble's output formats: compact/dict/table/jsonpb lines for the same flows, byte for byte.

The reference lines are the examples Hubble documents; the golden files under golden/observe hold
every format for one mixed set of flows (MEMBRANE_UPDATE_GOLDEN=1 rewrites them).
"""

from __future__ import annotations

import difflib
import io
import os
from pathlib import Path

import pytest

from membrane.observe import gotime
from membrane.observe.jsonpb import parse_json, to_json
from membrane.observe.model import (
    DROPPED,
    EGRESS,
    FORWARDED,
    HUBBLE_RING_BUFFER,
    INGRESS,
    NODE_CONNECTED,
    NODE_ERROR,
    REQUEST,
    RESPONSE,
    Flow,
    GetFlowsResponse,
    IPv4,
    IPv6,
    Node,
    Policy,
    ServerStatusResponse,
    Service,
    fill_summary,
    flow_response,
    mark_drop,
    mark_l7,
    mark_policy_verdict,
    mark_trace,
    set_reply,
    set_time,
)
from membrane.observe.printer import Output, Printer, PrinterOptions, format_nodes, format_server_status, tabwrite

GOLDEN = Path(__file__).parent / "golden" / "observe"
MAY_4 = gotime.parse_time("2024-05-04T13:23:40.501Z", 0)
DEC_11 = gotime.parse_time("2023-12-11T20:41:44.112Z", 0)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN"):
        path.write_text(text)
    expected = path.read_text() if path.exists() else ""
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), text.splitlines(keepends=True),
                                            f"golden/observe/{name}", "actual"))
        pytest.fail(f"output differs from golden/observe/{name} (MEMBRANE_UPDATE_GOLDEN=1 rewrites it):\n{diff}")


def endpoint(flow: Flow, side: str, *, ns: str = "", pod: str = "", identity: int = 0, labels: tuple[str, ...] = ()
             ) -> None:
    ep = getattr(flow, side)
    ep.namespace, ep.pod_name, ep.identity = ns, pod, identity
    ep.labels.extend(labels)


def tcp_flow(time_ns: int, src: str, sport: int, dst: str, dport: int, flags: str = "SYN") -> Flow:
    flow = Flow(node_name="kind-worker")
    set_time(flow, time_ns)
    flow.IP.source, flow.IP.destination, flow.IP.ipVersion = src, dst, (IPv6 if ":" in src else IPv4)
    flow.l4.TCP.source_port, flow.l4.TCP.destination_port = sport, dport
    for name in flags.split(","):
        setattr(flow.l4.TCP.flags, name, True)
    return flow


def udp_flow(time_ns: int, src: str, sport: int, dst: str, dport: int) -> Flow:
    flow = Flow(node_name="kind-worker")
    set_time(flow, time_ns)
    flow.IP.source, flow.IP.destination, flow.IP.ipVersion = src, dst, IPv4
    flow.l4.UDP.source_port, flow.l4.UDP.destination_port = sport, dport
    return flow


DEATHSTAR = "deathstar-c74d84667-cx5kp"
URL = "http://deathstar.default.svc.cluster.local/v1/request-landing"


def http_request(time_ns: int, method: str, url: str, verdict: int = FORWARDED) -> Flow:
    flow = tcp_flow(time_ns, "10.0.0.5", 42690, "10.0.1.7", 80, "ACK,PSH")
    endpoint(flow, "source", ns="default", pod="tiefighter", identity=8123)
    endpoint(flow, "destination", ns="default", pod=DEATHSTAR, identity=5678)
    mark_l7(flow, REQUEST, verdict=verdict)
    flow.l7.http.method, flow.l7.http.url, flow.l7.http.protocol = method, url, "HTTP/1.1"
    set_reply(flow, False)
    return fill_summary(flow)


def http_response(time_ns: int) -> Flow:
    flow = tcp_flow(time_ns, "10.0.1.7", 80, "10.0.0.5", 42690, "ACK,PSH")
    endpoint(flow, "source", ns="default", pod=DEATHSTAR, identity=5678)
    endpoint(flow, "destination", ns="default", pod="tiefighter", identity=8123)
    mark_l7(flow, RESPONSE)
    flow.l7.latency_ns = 412_000
    flow.l7.http.code, flow.l7.http.method, flow.l7.http.url, flow.l7.http.protocol = 200, "POST", URL, "HTTP/1.1"
    set_reply(flow, True)
    return fill_summary(flow)


def xwing_drop(time_ns: int) -> Flow:
    flow = tcp_flow(time_ns, "10.0.0.9", 42818, "10.0.1.7", 80)
    endpoint(flow, "source", ns="default", pod="xwing", identity=9001)
    endpoint(flow, "destination", ns="default", pod=DEATHSTAR, identity=5678)
    mark_drop(flow, 133)
    flow.traffic_direction = INGRESS
    return fill_summary(flow)


def host_to_pacman(time_ns: int) -> Flow:
    flow = tcp_flow(time_ns, "10.42.2.188", 54816, "10.42.2.30", 8080, "ACK,FIN")
    endpoint(flow, "source", identity=1, labels=("reserved:host",))
    endpoint(flow, "destination", ns="pacman", pod="pacman-6d6b7f8c9-abcde", identity=9421)
    mark_trace(flow, "to-endpoint")
    set_reply(flow, False)
    return fill_summary(flow)


def dns_verdict(time_ns: int) -> Flow:
    flow = udp_flow(time_ns, "10.0.0.20", 51324, "10.0.2.2", 53)
    endpoint(flow, "source", ns="default", pod="client", identity=777)
    endpoint(flow, "destination", ns="kube-system", pod="coredns-5d78c9869d-x", identity=102)
    mark_policy_verdict(flow, verdict=FORWARDED, direction=EGRESS, match_type=2)
    flow.egress_allowed_by.append(Policy(name="allow-dns", namespace="default", kind="CiliumNetworkPolicy"))
    set_reply(flow, False)
    return fill_summary(flow)


def to_fqdn(time_ns: int) -> Flow:
    flow = tcp_flow(time_ns, "10.0.0.20", 41510, "104.198.14.52", 80)
    endpoint(flow, "source", ns="default", pod="client", identity=777)
    endpoint(flow, "destination", identity=16777217, labels=("fqdn:cilium.io",))
    flow.destination_names.append("cilium.io")
    mark_trace(flow, "to-stack")
    set_reply(flow, False)
    return fill_summary(flow)


def world_denied(time_ns: int) -> Flow:
    flow = tcp_flow(time_ns, "10.0.0.20", 40000, "1.1.1.1", 443)
    endpoint(flow, "source", ns="default", pod="client", identity=777)
    endpoint(flow, "destination", identity=2, labels=("reserved:world",))
    mark_policy_verdict(flow, verdict=DROPPED, direction=EGRESS, match_type=0)
    flow.egress_denied_by.append(Policy(name="deny-world", namespace="default", kind="CiliumNetworkPolicy"))
    set_reply(flow, False)
    return fill_summary(flow)


def compact(flow: Flow, **options: object) -> str:
    out = io.StringIO()
    printer = Printer(PrinterOptions(**options), out, io.StringIO())  # type: ignore[arg-type]
    printer.write(flow_response(flow))
    printer.close()
    return out.getvalue()


REFERENCE = [
    (http_request(MAY_4, "POST", URL),
     "May  4 13:23:40.501: default/tiefighter:42690 (ID:8123) -> default/deathstar-c74d84667-cx5kp:80 (ID:5678) "
     "http-request FORWARDED (HTTP/1.1 POST http://deathstar.default.svc.cluster.local/v1/request-landing)"),
    (http_response(MAY_4 + 1_000_000),
     "May  4 13:23:40.502: default/tiefighter:42690 (ID:8123) <- default/deathstar-c74d84667-cx5kp:80 (ID:5678) "
     "http-response FORWARDED (HTTP/1.1 200 0ms (POST http://deathstar.default.svc.cluster.local/v1/request-landing))"),
    (http_request(MAY_4 + 3_290_000_000, "PUT", "http://deathstar.default.svc.cluster.local/v1/exhaust-port", DROPPED),
     "May  4 13:23:43.791: default/tiefighter:42690 (ID:8123) -> default/deathstar-c74d84667-cx5kp:80 (ID:5678) "
     "http-request DROPPED (HTTP/1.1 PUT http://deathstar.default.svc.cluster.local/v1/exhaust-port)"),
    (xwing_drop(MAY_4 + 7_351_000_000),
     "May  4 13:23:47.852: default/xwing:42818 (ID:9001) <> default/deathstar-c74d84667-cx5kp:80 (ID:5678) "
     "Policy denied DROPPED (TCP Flags: SYN)"),
    (host_to_pacman(DEC_11),
     "Dec 11 20:41:44.112: 10.42.2.188:54816 (host) -> pacman/pacman-6d6b7f8c9-abcde:8080 (ID:9421) "
     "to-endpoint FORWARDED (TCP Flags: ACK, FIN)"),
    (dns_verdict(DEC_11 + 888_000_000),
     "Dec 11 20:41:45.000: default/client:51324 (ID:777) -> kube-system/coredns-5d78c9869d-x:53 (ID:102) "
     "policy-verdict:L3-L4 EGRESS ALLOWED (UDP)"),
    (to_fqdn(DEC_11 + 1_898_000_000),
     "Dec 11 20:41:46.010: default/client:41510 (ID:777) -> cilium.io:80 (ID:16777217) to-stack FORWARDED "
     "(TCP Flags: SYN)"),
    (world_denied(DEC_11 + 2_388_000_000),
     "Dec 11 20:41:46.500: default/client:40000 (ID:777) -> 1.1.1.1:443 (world) policy-verdict:none EGRESS DENIED "
     "(TCP Flags: SYN)"),
]


@pytest.mark.parametrize(("flow", "line"), REFERENCE, ids=[str(i) for i in range(len(REFERENCE))])
def test_compact_prints_hubbles_reference_lines(flow: Flow, line: str) -> None:
    assert compact(flow) == line + "\n"


def test_reply_swaps_sides_and_unknown_direction_prints_diamond() -> None:
    flow = xwing_drop(MAY_4)
    assert " <> " in compact(flow)
    set_reply(flow, True)
    assert compact(flow).split(": ", 1)[1].startswith("default/deathstar-c74d84667-cx5kp:80 (ID:5678) <- ")


def test_node_name_policy_names_and_numeric() -> None:
    flow = dns_verdict(DEC_11)
    assert compact(flow, node_name=True).startswith("Dec 11 20:41:44.112 [kind-worker]: ")
    assert "EGRESS ALLOWED BY allow-dns (CiliumNetworkPolicy) (UDP)" in compact(flow, policy_names=True)
    assert "10.0.0.20:51324 (ID:777) -> 10.0.2.2:53 (ID:102)" in compact(flow, ip_translation=False)


def test_service_names_dns_names_and_ipv6_ports() -> None:
    flow = tcp_flow(DEC_11, "fd00::1", 5000, "fd00::2", 443)
    set_reply(fill_summary(mark_trace(flow, "to-stack")), False)
    assert "[fd00::1]:5000 (unknown) -> [fd00::2]:443 (unknown)" in compact(flow)
    flow.destination_service.CopyFrom(Service(name="web", namespace="shop"))
    flow.destination_names.append("web.example.")
    assert "-> shop/web:443 (unknown)" in compact(flow)


def test_other_time_formats() -> None:
    when = gotime.parse_time("2024-05-04T13:23:40.5Z", 0)
    assert gotime.format_time(when, "RFC3339") == "2024-05-04T13:23:40Z"
    assert gotime.format_time(when, "RFC3339Milli") == "2024-05-04T13:23:40.5Z"
    assert gotime.format_time(when, "RFC3339Nano") == "2024-05-04T13:23:40.5Z"
    assert gotime.format_time(when, "RFC1123Z") == "Sat, 04 May 2024 13:23:40 +0000"
    assert gotime.format_time(when, "YearMonthDayHour") == "2024-05-04T13Z"
    assert gotime.format_time(when + 7, "StampMilli") == "May  4 13:23:40.500"
    assert gotime.format_time(None) == "N/A"
    assert gotime.parse_time("Sat, 04 May 2024 15:23:40 +0200", 0) == gotime.parse_time("2024-05-04T13:23:40Z", 0)
    assert gotime.parse_time("1h30m", 10**13) == 10**13 - 5400 * 10**9
    with pytest.raises(Exception, match="failed to convert yesterday to time"):
        gotime.parse_time("yesterday", 0)


def test_terminal_control_characters_are_neutralised_but_colours_kept() -> None:
    flow = host_to_pacman(DEC_11)
    flow.destination.pod_name = "evil\x1b[2J\rpod"
    plain = compact(flow)
    assert "pacman/evil^[[2J\\rpod:8080" in plain
    coloured = compact(flow, color=True)
    assert "\x1b[36m" in coloured and "\x1b[2J" not in coloured and "^[[2J" in coloured


def all_responses() -> list[GetFlowsResponse]:
    flows = [flow for flow, _ in REFERENCE]
    responses = [flow_response(f) for f in flows]
    lost = GetFlowsResponse(node_name="kind-worker")
    lost.lost_events.source = HUBBLE_RING_BUFFER
    lost.lost_events.num_events_lost = 42
    lost.time.CopyFrom(flows[-1].time)
    responses.insert(4, lost)
    return responses


@pytest.mark.parametrize(("name", "options"), [
    ("compact.txt", PrinterOptions()),
    ("compact-node-name.txt", PrinterOptions(node_name=True, policy_names=True)),
    ("dict.txt", PrinterOptions(output=Output.DICT)),
    ("dict-node-name.txt", PrinterOptions(output=Output.DICT, node_name=True)),
    ("table.txt", PrinterOptions(output=Output.TABLE)),
    ("table-node-name.txt", PrinterOptions(output=Output.TABLE, node_name=True, time_format="RFC3339Milli")),
    ("jsonpb.txt", PrinterOptions(output=Output.JSONPB)),
])
def test_every_format_matches_its_golden_file(name: str, options: PrinterOptions) -> None:
    out = io.StringIO()
    printer = Printer(options, out, io.StringIO())
    for response in all_responses():
        printer.write(response)
    printer.close()
    assert_golden(name, out.getvalue())


def test_jsonpb_is_hubbles_json_and_reads_back() -> None:
    flow = tcp_flow(1735787045123456789, "10.0.1.5", 51324, "10.0.2.9", 80)
    flow.uuid = "7f0e2c9b"
    endpoint(flow, "source", ns="default", pod="client-abc", identity=8123, labels=("k8s:app=client",))
    flow.source.ID = 1234
    mark_trace(flow, "to-stack")
    set_reply(flow, False)
    flow.destination_service.CopyFrom(Service(name="web", namespace="default"))
    flow.l7.http.url = "http://web/?a=1&b=<2>"
    flow.Summary = "TCP Flags: SYN"
    line = to_json(flow_response(flow))
    # Declaration order (uuid before verdict), proto names, enums by name, HTML escaped like Go's encoder.
    assert line == (
        '{"flow":{"time":"2025-01-02T03:04:05.123456789Z","uuid":"7f0e2c9b","verdict":"FORWARDED",'
        '"IP":{"source":"10.0.1.5","destination":"10.0.2.9","ipVersion":"IPv4"},'
        '"l4":{"TCP":{"source_port":51324,"destination_port":80,"flags":{"SYN":true}}},'
        '"source":{"ID":1234,"identity":8123,"namespace":"default","labels":["k8s:app=client"],'
        '"pod_name":"client-abc"},"Type":"L3_L4","node_name":"kind-worker",'
        '"l7":{"http":{"url":"http://web/?a=1\\u0026b=\\u003c2\\u003e"}},"event_type":{"type":4,"sub_type":3},'
        '"destination_service":{"name":"web","namespace":"default"},"trace_observation_point":"TO_STACK",'
        '"is_reply":false,"Summary":"TCP Flags: SYN"},"node_name":"kind-worker",'
        '"time":"2025-01-02T03:04:05.123456789Z"}')
    assert parse_json(line, GetFlowsResponse()) == flow_response(flow)


def test_server_status_like_hubble_status() -> None:
    status = ServerStatusResponse(num_flows=16380, max_flows=16380, seen_flows=90000, uptime_ns=3_723_500_000_000,
                                  flows_rate=27.19, version="0.1.0")
    assert format_server_status(status, Output.COMPACT) == (
        "Current/Max Flows: 16,380/16,380 (100.00%)\nFlows/s: 27.19\n")
    status.num_connected_nodes.value = 3
    status.num_unavailable_nodes.value = 2
    status.unavailable_nodes.extend(["node5"])
    assert format_server_status(status, Output.COMPACT).endswith(
        "Connected Nodes: 3/5\nUnavailable Nodes: 2\n  - node5\n  - and 1 more...\n")
    assert format_server_status(status, Output.TABLE) == (
        "NUM FLOWS   MAX FLOWS   SEEN FLOWS   FLOWS PER SECOND   UPTIME     NUM CONNECTED NODES   "
        "NUM UNAVAILABLE NODES   VERSION\n"
        "16,380      16,380      90,000       27.19              1h2m3.5s   3                     "
        "2                       0.1.0\n")
    # Without a rate, Flows/s falls back to seen flows over uptime.
    quiet = ServerStatusResponse(num_flows=10, max_flows=4095, seen_flows=10, uptime_ns=4 * 10**9)
    assert format_server_status(quiet, Output.COMPACT) == "Current/Max Flows: 10/4,095 (0.24%)\nFlows/s: 2.50\n"


def test_nodes_like_hubble_list_nodes() -> None:
    node = Node(name="node1", state=NODE_CONNECTED, uptime_ns=125_400_000_000, num_flows=410, max_flows=4095,
                seen_flows=1000, version="0.1.0", address="127.0.0.1:4244")
    node.tls.enabled = False
    gone = Node(name="node0", state=NODE_ERROR)
    assert format_nodes([node, gone]) == (
        "NAME    STATUS      AGE    FLOWS/S   CURRENT/MAX-FLOWS\n"
        "node0   Error       N/A    N/A       N/A\n"
        "node1   Connected   2m5s   8.00      410/4095 ( 10.01%)\n")
    assert format_nodes([node], wide=True).splitlines()[1].endswith("0.1.0     127.0.0.1:4244   Disabled")


def test_tabwriter_aligns_column_blocks_like_go() -> None:
    assert tabwrite("a\tbb\tc\nccc\td\te\n") == "a     bb   c\nccc   d    e\n"
    # A line with fewer cells ends the column block above it.
    assert tabwrite("aaaa\tx\nb\ny\tz\n") == "aaaa   x\nb\ny   z\n"


def test_lost_and_node_status_events() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(PrinterOptions(debug=True), out, err)
    lost = GetFlowsResponse(node_name="node1")
    lost.lost_events.source = HUBBLE_RING_BUFFER
    lost.lost_events.num_events_lost = 42
    set_time(lost, DEC_11)  # type: ignore[arg-type]
    printer.write(lost)
    status = GetFlowsResponse(node_name="relay")
    status.node_status.state_change = NODE_CONNECTED
    status.node_status.node_names.extend(["a", "b", "c"])
    set_time(status, DEC_11)  # type: ignore[arg-type]
    printer.write(status)
    status.node_status.state_change = NODE_ERROR
    status.node_status.message = 'boom "x"'
    printer.write(status)
    assert out.getvalue() == "Dec 11 20:41:44.112 EVENTS LOST: HUBBLE_RING_BUFFER CPU(0) 42\n"
    assert err.getvalue() == ("Dec 11 20:41:44.112 [relay]: Receiving flows from 3 nodes: a, b, c\n"
                              'Dec 11 20:41:44.112 [relay]: Error "boom \\"x\\"" on 3 nodes: a, b, c\n')
