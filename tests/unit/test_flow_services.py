"""Service-aware flows: which frontend a connection went through, the flows that name it, the
``--service`` filters that select them and how the printers show them."""

from __future__ import annotations

import io
from ipaddress import IPv4Address

from membrane.datapath.flowcodes import (
    DROP_NO_SERVICE_BACKEND,
    TRACE_FIRST_REPLY,
    TRACE_NEW,
    TRACE_SERVICE_TRANSLATION,
    TRACE_TCP_ORIGINAL,
    TRACE_TCP_REPLY,
    CodeVerdict,
    Direction,
    DropReason,
    EventKind,
    FlowCode,
    parse_prefix,
)
from membrane.loadbalancer.model import ANY_ADDRESS, Backend, Frontend, L4Addr
from membrane.observe.cliflags import FilterBuilder
from membrane.observe.enrich import EndpointInfo, EnrichmentState, enrich
from membrane.observe.filters import FlowMatcher
from membrane.observe.jsonpb import to_json
from membrane.observe.model import MSG_TRACE_SOCK, TRACED, Flow, flow_response
from membrane.observe.nflog import (
    HOOK_FORWARD,
    HOOK_PREROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    NflogRecord,
    Packet,
)
from membrane.observe.pb.flow import flow_pb2
from membrane.observe.printer import Output, Printer, PrinterOptions
from membrane.observe.services import FrontendIndex, ServiceFlows

NODE = "node1"
CLIENT = EndpointInfo(ip="10.244.1.10", identity=1001, namespace="default", pod_name="client",
                      labels=("k8s:app=client",), endpoint_id=3, node=NODE, ifindex=7, ifname="lxcaaaaaaaaaaa")
WEB = EndpointInfo(ip="10.244.1.11", identity=1002, namespace="default", pod_name="web-0",
                   labels=("k8s:app=web",), endpoint_id=4, node=NODE, ifindex=9, ifname="lxcbbbbbbbbbbb")
OTHER = EndpointInfo(ip="10.244.1.12", identity=1003, namespace="default", pod_name="other",
                     labels=("k8s:app=other",), endpoint_id=5, node=NODE, ifindex=11, ifname="lxccccccccccc")
CLUSTER_IP, EMPTY_IP, NODE_IP = "10.96.0.10", "10.96.0.20", "172.31.0.11"
BACKEND = Backend(IPv4Address(WEB.ip), 8080, NODE)
FRONTENDS = (
    Frontend(1, ("default", "web"), "http", "ClusterIP", L4Addr(IPv4Address(CLUSTER_IP), "TCP", 80),
             (BACKEND,), (BACKEND,)),
    Frontend(2, ("default", "web"), "http", "NodePort", L4Addr(ANY_ADDRESS, "TCP", 30080), (BACKEND,), (BACKEND,)),
    Frontend(3, ("shop", "empty"), "", "ClusterIP", L4Addr(IPv4Address(EMPTY_IP), "TCP", 80), (), ()),
    Frontend(4, ("kube-system", "dns"), "dns", "ClusterIP", L4Addr(IPv4Address("10.96.0.53"), "UDP", 53),
             (BACKEND,), (BACKEND,)),
)
STATE = EnrichmentState.build(NODE, [CLIENT, WEB, OTHER])


def rec(code: object, src: str, sport: int, dst: str, dport: int, *, flags: int = 0, hook: int = HOOK_FORWARD,
        indev: int = 0, outdev: int = 0, proto: int = IPPROTO_TCP) -> NflogRecord:
    prefix = code.prefix()  # type: ignore[attr-defined]
    packet = Packet(4, src, dst, proto, 60, sport, dport, tcp_flags=flags)
    return NflogRecord(prefix, 1_700_000_000_123_456_789, hook, indev, outdev, 0, 0, packet)


def connection(client_port: int = 41000, frontend: tuple[str, int] = (CLUSTER_IP, 80)) -> list[NflogRecord]:
    """What the datapath logs for client → frontend → web-0:8080, a TCP connection opened and closed."""
    c, w = CLIENT.ip, WEB.ip
    return [
        rec(TRACE_SERVICE_TRANSLATION, c, client_port, *frontend, flags=TCP_SYN, hook=HOOK_PREROUTING, indev=7),
        rec(TRACE_NEW, c, client_port, w, 8080, flags=TCP_SYN, indev=7, outdev=9),
        rec(TRACE_TCP_REPLY, w, 8080, c, client_port, flags=TCP_SYN | TCP_ACK, indev=9, outdev=7),
        rec(TRACE_TCP_ORIGINAL, c, client_port, w, 8080, flags=TCP_FIN | TCP_ACK, indev=7, outdev=9),
        rec(TRACE_TCP_REPLY, w, 8080, c, client_port, flags=TCP_FIN | TCP_ACK, indev=9, outdev=7),
    ]


def observe(records: list[NflogRecord], services: ServiceFlows | None = None) -> list[Flow]:
    services = services if services is not None else ServiceFlows(FrontendIndex.build(FRONTENDS))
    flows = []
    for record in records:
        flow = enrich(record, STATE)
        assert flow is not None
        services.annotate(record, flow)
        flows.append(flow)
    return flows


def named(flow: Flow) -> tuple[str, str]:
    """The flow's services as ``src-service → dst-service`` names ("" when unset)."""
    def name(which: str) -> str:
        if not flow.HasField(which):
            return ""
        service = getattr(flow, which)
        return f"{service.namespace}/{service.name}"
    return name("source_service"), name("destination_service")


# -- enrichment ---------------------------------------------------------------------------------------


def test_the_translation_event_is_hubbles_pre_xlate_flow_to_the_frontend() -> None:
    [translation] = observe(connection()[:1])
    assert translation.event_type.type == MSG_TRACE_SOCK and translation.event_type.sub_type == 1
    assert translation.sock_xlate_point == flow_pb2.SOCK_XLATE_POINT_PRE_DIRECTION_FWD
    assert translation.Type == flow_pb2.SOCK and translation.verdict == TRACED
    assert (translation.IP.source, translation.IP.destination) == (CLIENT.ip, CLUSTER_IP)
    assert (translation.l4.TCP.source_port, translation.l4.TCP.destination_port) == (41000, 80)
    assert not translation.l4.TCP.HasField("flags") and translation.Summary == "TCP"
    assert translation.source.pod_name == "client" and not translation.HasField("is_reply")
    assert named(translation) == ("", "default/web")


def test_every_flow_of_a_service_connection_names_the_service_on_the_frontends_side() -> None:
    flows = observe(connection())
    assert [named(f) for f in flows] == [
        ("", "default/web"),   # pre-xlate-fwd: client → 10.96.0.10:80
        ("", "default/web"),   # SYN to the backend, after DNAT
        ("default/web", ""),   # SYN-ACK: the reply comes from the service, as the client sees it
        ("", "default/web"),
        ("default/web", ""),
    ]
    assert [f.destination.pod_name for f in flows[1::2]] == ["web-0", "web-0"]
    assert [f.IP.destination for f in flows[1:]] == [WEB.ip, CLIENT.ip, WEB.ip, CLIENT.ip]


def test_a_connection_that_does_not_go_through_a_frontend_names_no_service() -> None:
    flows = observe(connection()[1:])  # the same packets, without the translation: client → web-0 directly
    assert [named(f) for f in flows] == [("", "")] * 4


def test_a_direct_connection_reusing_the_tuple_of_a_service_connection_is_not_named() -> None:
    services = ServiceFlows(FrontendIndex.build(FRONTENDS))
    observe(connection(), services)
    again = observe(connection()[1:3], services)  # a new connection (no translation) on the same tuple
    assert [named(f) for f in again] == [("", ""), ("", "")]


def test_connections_are_told_apart_by_client_port() -> None:
    services = ServiceFlows(FrontendIndex.build(FRONTENDS))
    first, second = connection(41000), connection(41001)
    flows = observe([first[0], second[0], second[1], first[1], first[2]], services)
    assert [named(f) for f in flows] == [("", "default/web")] * 4 + [("default/web", "")]
    assert observe([rec(TRACE_NEW, CLIENT.ip, 41002, WEB.ip, 8080, flags=TCP_SYN, indev=7, outdev=9)],
                   services)[0].HasField("destination_service") is False


def test_a_node_port_translation_is_matched_by_protocol_and_port() -> None:
    flows = observe(connection(frontend=(NODE_IP, 30080)))
    assert flows[0].IP.destination == NODE_IP and flows[0].l4.TCP.destination_port == 30080
    assert [named(f)[1] or named(f)[0] for f in flows] == ["default/web"] * 5


def test_udp_first_reply_names_the_source_service() -> None:
    c, w = CLIENT.ip, WEB.ip
    flows = observe([
        rec(TRACE_SERVICE_TRANSLATION, c, 5000, "10.96.0.53", 53, hook=HOOK_PREROUTING, indev=7, proto=IPPROTO_UDP),
        rec(TRACE_NEW, c, 5000, w, 8080, indev=7, outdev=9, proto=IPPROTO_UDP),
        rec(TRACE_FIRST_REPLY, w, 8080, c, 5000, indev=9, outdev=7, proto=IPPROTO_UDP),
    ])
    assert [named(f) for f in flows] == [("", "kube-system/dns"), ("", "kube-system/dns"), ("kube-system/dns", "")]
    assert flows[0].Summary == "UDP"


def test_a_refused_connection_names_the_service_by_its_frontend_address() -> None:
    [drop] = observe([rec(DROP_NO_SERVICE_BACKEND, CLIENT.ip, 41000, EMPTY_IP, 80, flags=TCP_SYN, indev=7)])
    assert drop.drop_reason_desc == flow_pb2.SERVICE_BACKEND_NOT_FOUND
    assert named(drop) == ("", "shop/empty")


def test_a_policy_drop_of_the_translated_packet_names_the_service() -> None:
    denied = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED, 1024, Direction.INGRESS)
    records = [*connection()[:1], rec(denied, CLIENT.ip, 41000, WEB.ip, 8080, flags=TCP_SYN, indev=7, outdev=9)]
    assert [named(f) for f in observe(records)] == [("", "default/web"), ("", "default/web")]


def test_without_frontends_nothing_is_kept() -> None:
    services = ServiceFlows()
    flows = observe(connection(), services)
    assert [named(f) for f in flows] == [("", "")] * 5 and len(services) == 0


def test_the_tables_are_bounded_oldest_first() -> None:
    services = ServiceFlows(FrontendIndex.build(FRONTENDS), max_connections=2)
    for port in (41000, 41001, 41002):
        observe(connection(port)[:2], services)
    assert len(services) == 2
    oldest, newest = (observe([connection(port)[2]], services)[0] for port in (41000, 41002))
    assert named(oldest) == ("", "") and named(newest) == ("default/web", "")


def test_the_translation_code_round_trips() -> None:
    assert TRACE_SERVICE_TRANSLATION.prefix() == "mb:x:T:0:31"
    assert parse_prefix("mb:x:T:0:31") == TRACE_SERVICE_TRANSLATION


# -- filters: hubble observe --service / --to-service / --from-service ----------------------------------


def matcher(*flags: tuple[str, str]) -> FlowMatcher:
    builder = FilterBuilder()
    for name, value in flags:
        builder.set(name, value)
    white, black = builder.finish()
    return FlowMatcher.build(white, black)


def test_service_filters_select_the_side_hubble_does() -> None:
    flows = observe([*connection(), rec(TRACE_NEW, CLIENT.ip, 42000, OTHER.ip, 80, flags=TCP_SYN, indev=7,
                                        outdev=11)])

    def selected(*flags: tuple[str, str]) -> list[int]:
        match = matcher(*flags)
        return [i for i, f in enumerate(flows) if match(f)]
    assert selected(("service", "default/web")) == [0, 1, 2, 3, 4]
    assert selected(("to-service", "default/web")) == [0, 1, 3]
    assert selected(("from-service", "default/web")) == [2, 4]
    assert selected(("service", "web")) == [0, 1, 2, 3, 4]  # no namespace: "default", as Hubble
    assert selected(("to-service", "kube-system/")) == []
    assert selected(("to-service", "default/w"), ("type", "trace-sock")) == [0]  # a name prefix, the translation


# -- printers ---------------------------------------------------------------------------------------------


def printed(flow: Flow, output: Output = Output.COMPACT) -> str:
    out = io.StringIO()
    printer = Printer(PrinterOptions(output=output), out, io.StringIO())
    printer.write(flow_response(flow))
    printer.close()
    return out.getvalue()


def test_compact_shows_the_service_where_no_pod_stands() -> None:
    translation, syn, syn_ack = observe(connection()[:3])
    assert printed(translation).endswith(
        # Hubble's arrow for an event without a reply flag: "<>".
        ": default/client:41000 (ID:1001) <> default/web:80 (world) pre-xlate-fwd TRACED (TCP)\n")
    # After DNAT the backend pod is named (a pod wins over a service, as in Hubble).
    assert "default/client:41000 (ID:1001) -> default/web-0:8080 (ID:1002) to-endpoint FORWARDED" in printed(syn)
    assert "default/client:41000 (ID:1001) <- default/web-0:8080 (ID:1002) to-endpoint" in printed(syn_ack)


def test_json_and_dict_carry_the_service_fields() -> None:
    translation, _, syn_ack = observe(connection()[:3])
    line = to_json(flow_response(translation))
    assert '"destination_service":{"name":"web","namespace":"default"}' in line
    assert '"Type":"SOCK"' in line and '"sock_xlate_point":"SOCK_XLATE_POINT_PRE_DIRECTION_FWD"' in line
    assert '"event_type":{"type":7,"sub_type":1}' in line and '"verdict":"TRACED"' in line
    assert '"source_service":{"name":"web","namespace":"default"}' in to_json(flow_response(syn_ack))
    text = printed(translation, Output.DICT)
    assert "DESTINATION: default/web:80" in text and "TYPE: pre-xlate-fwd" in text and "VERDICT: TRACED" in text
