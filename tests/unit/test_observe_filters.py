"""Hubble's filter semantics, table-driven: a FlowFilter field by field, then white- and blacklists."""

from __future__ import annotations

from typing import Any

import pytest

from membrane.core.errors import InvalidInput
from membrane.observe.filters import FlowMatcher, compile_filter, parse_label_selector
from membrane.observe.model import (
    DROPPED,
    EGRESS,
    FORWARDED,
    INGRESS,
    REQUEST,
    RESPONSE,
    EventTypeFilter,
    Flow,
    FlowFilter,
    HTTPHeader,
    IPv4,
    NetworkInterface,
    TCPFlags,
    Workload,
    mark_drop,
    mark_l7,
    mark_trace,
    set_reply,
)


def drop() -> Flow:
    """default/xwing → default/deathstar, TCP SYN, dropped by policy on node1."""
    flow = Flow(uuid="u-drop", node_name="node1")
    flow.IP.source, flow.IP.destination, flow.IP.ipVersion = "10.0.0.1", "10.0.1.2", IPv4
    flow.l4.TCP.source_port, flow.l4.TCP.destination_port = 41000, 80
    flow.l4.TCP.flags.SYN = True
    flow.source.namespace, flow.source.pod_name, flow.source.identity = "default", "xwing", 9001
    flow.source.labels.extend(["k8s:app=xwing", "k8s:org=alliance", "k8s:io.kubernetes.pod.namespace=default"])
    flow.source.workloads.append(Workload(name="xwing", kind="Deployment"))
    flow.destination.namespace, flow.destination.pod_name, flow.destination.identity = "default", "deathstar-1", 5678
    flow.destination.labels.extend(["k8s:app=deathstar", "k8s:org=empire", "k8s:replicas=3"])
    flow.destination.cluster_name = "default"
    flow.traffic_direction = INGRESS
    flow.interface.index, flow.interface.name = 12, "lxc1234"
    return mark_drop(flow, 133)


def http(code: int = 0) -> Flow:
    flow = Flow(uuid="u-http", node_name="cluster-a/node2")
    flow.IP.source, flow.IP.destination, flow.IP.ipVersion = "10.0.0.7", "10.0.1.2", IPv4
    flow.l4.TCP.source_port, flow.l4.TCP.destination_port = 42000, 80
    flow.l4.TCP.flags.ACK = flow.l4.TCP.flags.PSH = True
    flow.source.namespace, flow.source.pod_name = "default", "tiefighter"
    flow.destination_service.name, flow.destination_service.namespace = "deathstar", "default"
    mark_l7(flow, RESPONSE if code else REQUEST)
    flow.l7.http.method, flow.l7.http.url, flow.l7.http.code = "GET", "http://deathstar/v1/request%2Dlanding?x=1", code
    flow.l7.http.headers.append(HTTPHeader(key="x-trace", value="abc"))
    flow.trace_context.parent.trace_id = "t-1"
    set_reply(flow, bool(code))
    return flow


def dns() -> Flow:
    flow = Flow(uuid="u-dns", node_name="node1")
    flow.IP.source, flow.IP.destination, flow.IP.ipVersion = "10.0.0.7", "10.96.0.10", IPv4
    flow.l4.UDP.source_port, flow.l4.UDP.destination_port = 53000, 53
    flow.source.namespace, flow.source.pod_name = "default", "tiefighter"
    flow.destination.namespace, flow.destination.pod_name = "kube-system", "coredns-x"
    mark_l7(flow, REQUEST)
    flow.l7.dns.query, flow.l7.dns.observation_source = "cilium.io.", "proxy"
    set_reply(flow, False)
    return flow


def world() -> Flow:
    flow = Flow(uuid="u-world", node_name="node1")
    flow.IP.source, flow.IP.destination, flow.IP.ipVersion = "10.0.0.7", "1.1.1.1", IPv4
    flow.IP.source_xlated = "192.168.1.10"
    flow.l4.ICMPv4.type = 8
    flow.destination.identity = 2
    flow.destination.labels.append("reserved:world")
    flow.destination_names.extend(["one.one.one.one", "API.Example.com"])
    flow.traffic_direction = EGRESS
    mark_trace(flow, "to-stack")
    set_reply(flow, False)
    return flow


F = FlowFilter
CASES: list[tuple[str, FlowFilter, Flow, bool]] = [
    ("exact source ip", F(source_ip=["10.0.0.1"]), drop(), True),
    ("source cidr", F(source_ip=["10.0.0.0/24"]), drop(), True),
    ("other cidr", F(source_ip=["10.9.0.0/16"]), drop(), False),
    ("ip values are ORed", F(destination_ip=["9.9.9.9", "10.0.1.2"]), drop(), True),
    ("translated source", F(source_ip_xlated=["192.168.1.0/24"]), world(), True),
    ("pod prefix in default", F(source_pod=["xw"]), drop(), True),
    ("pod prefix elsewhere", F(source_pod=["kube-system/xw"]), drop(), False),
    ("whole namespace", F(destination_pod=["default/"]), drop(), True),
    ("any namespace", F(destination_pod=["/death"]), drop(), True),
    ("no pod at all", F(destination_pod=["default/"]), world(), False),
    ("service", F(destination_service=["default/death"]), http(), True),
    ("service elsewhere", F(destination_service=["kube-system/"]), http(), False),
    ("label", F(destination_label=["org=empire"]), drop(), True),
    ("label with source", F(destination_label=["k8s:org=empire"]), drop(), True),
    ("label with other source", F(destination_label=["container:org=empire"]), drop(), False),
    ("label values ORed", F(source_label=["org=empire", "org=alliance"]), drop(), True),
    ("label AND inside one selector", F(source_label=["org=alliance,app=tiefighter"]), drop(), False),
    ("label set", F(destination_label=["org in (empire, rebels)"]), drop(), True),
    ("label notin", F(destination_label=["org notin (empire)"]), drop(), False),
    ("label absent", F(destination_label=["!team"]), drop(), True),
    ("label not equal", F(destination_label=["app!=deathstar"]), drop(), False),
    ("label greater than", F(destination_label=["replicas>2"]), drop(), True),
    ("reserved label", F(destination_label=["reserved:world"]), world(), True),
    ("namespace label", F(source_label=["io.kubernetes.pod.namespace=default"]), drop(), True),
    ("fqdn wildcard", F(destination_fqdn=["*.one.one"]), world(), True),
    ("fqdn trailing dot", F(destination_fqdn=["one.one.one.one."]), world(), True),
    ("fqdn pattern is lower-cased, names are not", F(destination_fqdn=["api.example.com"]), world(), False),
    ("fqdn is anchored", F(destination_fqdn=["one.one"]), world(), False),
    ("source identity", F(source_identity=[9001]), drop(), True),
    ("destination identity", F(destination_identity=[1, 2]), drop(), False),
    ("verdict", F(verdict=[DROPPED]), drop(), True),
    ("verdict other", F(verdict=[FORWARDED]), drop(), False),
    ("drop reason", F(drop_reason_desc=[133]), drop(), True),
    ("event type", F(event_type=[EventTypeFilter(type=1)]), drop(), True),
    ("trace sub-type", F(event_type=[EventTypeFilter(type=4, match_sub_type=True, sub_type=3)]), world(), True),
    ("trace other sub-type", F(event_type=[EventTypeFilter(type=4, match_sub_type=True, sub_type=0)]), world(), False),
    ("sub-type 0 only matches when asked", F(event_type=[EventTypeFilter(type=4)]), world(), True),
    ("protocol", F(protocol=["TCP"]), drop(), True),
    ("icmp covers icmpv4", F(protocol=["icmp"]), world(), True),
    ("l7 protocol", F(protocol=["http"]), http(), True),
    ("l7 protocol on l4 flow", F(protocol=["dns"]), drop(), False),
    ("destination port", F(destination_port=["80"]), drop(), True),
    ("source port", F(source_port=["80"]), drop(), False),
    ("no ports on icmp", F(destination_port=["0"]), world(), False),
    ("http method any case", F(http_method=["get"]), http(), True),
    ("http path is the unescaped path", F(http_path=["^/v1/request-landing$"]), http(), True),
    ("http url", F(http_url=["x=1"]), http(), True),
    ("http header", F(http_header=[HTTPHeader(key="x-trace", value="abc")]), http(), True),
    ("http status prefix", F(http_status_code=["2+"]), http(200), True),
    ("http status exact", F(http_status_code=["200"]), http(200), True),
    ("http status other", F(http_status_code=["4+"]), http(200), False),
    ("http status on a request", F(http_status_code=["2+"]), http(), False),
    ("dns query regex", F(dns_query=["cilium"]), dns(), True),
    ("dns query no", F(dns_query=["^kube"]), dns(), False),
    ("tcp flags all of one set", F(tcp_flags=[TCPFlags(SYN=True)]), drop(), True),
    ("tcp flags missing one", F(tcp_flags=[TCPFlags(SYN=True, ACK=True)]), drop(), False),
    ("tcp flags sets ORed", F(tcp_flags=[TCPFlags(FIN=True), TCPFlags(ACK=True, PSH=True)]), http(), True),
    ("node name", F(node_name=["node1"]), drop(), True),
    ("node name wildcard", F(node_name=["node*"]), drop(), True),
    ("node name in the default cluster", F(node_name=["default/node1"]), drop(), True),
    ("node name other cluster", F(node_name=["cluster-a/"]), http(), True),
    ("node name wrong cluster", F(node_name=["cluster-b/*"]), http(), False),
    ("reply false matches a drop without direction", F(reply=[False]), drop(), True),
    ("reply true", F(reply=[True]), http(200), True),
    ("reply unknown and not dropped", F(reply=[False]), Flow(), False),
    ("traffic direction", F(traffic_direction=[INGRESS]), drop(), True),
    ("workload name", F(source_workload=[Workload(name="xwing")]), drop(), True),
    ("workload kind", F(source_workload=[Workload(kind="StatefulSet")]), drop(), False),
    ("cluster name", F(destination_cluster_name=["default"]), drop(), True),
    ("uuid", F(uuid=["u-dns", "u-drop"]), drop(), True),
    ("ip version", F(ip_version=[IPv4]), drop(), True),
    ("trace id", F(trace_id=["t-1"]), http(), True),
    ("interface", F(interface=[NetworkInterface(name="lxc1234")]), drop(), True),
    ("interface index", F(interface=[NetworkInterface(index=13)]), drop(), False),
    ("encrypted", F(encrypted=[False]), drop(), True),
    ("fields ANDed", F(source_pod=["xwing"], verdict=[FORWARDED]), drop(), False),
    ("fields ANDed, all match", F(source_pod=["xwing"], verdict=[DROPPED], destination_port=["80"]), drop(), True),
    ("empty filter matches all", F(), dns(), True),
]


@pytest.mark.parametrize(("flt", "flow", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_flow_filter_field(flt: FlowFilter, flow: Flow, expected: bool) -> None:
    assert compile_filter(flt)(flow) is expected


INVALID: list[tuple[FlowFilter, str]] = [
    (F(source_ip=["10.0.0.300"]), "invalid IP address"),
    (F(source_ip=["10.0.0.0/33"]), "invalid IP prefix"),
    (F(source_pod=[""]), "name must not be empty"),
    (F(source_fqdn=["bad name"]), "invalid rune"),
    (F(node_name=["a/b/c"]), "too many slashes"),
    (F(protocol=["quic"]), "unknown protocol"),
    (F(destination_port=["http"]), "invalid port"),
    (F(http_status_code=["600"]), "invalid status code"),
    (F(http_path=["("]), "invalid http path filter"),
    (F(source_label=["app in (a"]), "invalid source label filter"),
    (F(http_method=["GET"], event_type=[EventTypeFilter(type=1)]), "requires the event type filter"),
    (F(source_cluster_name=[""]), "name must not be empty"),
]


@pytest.mark.parametrize(("flt", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_filters_are_refused(flt: FlowFilter, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        compile_filter(flt)


def test_whitelist_is_any_of_and_blacklist_is_none_of() -> None:
    flows = {"drop": drop(), "http": http(), "dns": dns(), "world": world()}

    def selected(**lists: Any) -> list[str]:
        matcher = FlowMatcher.build(lists.get("whitelist", ()), lists.get("blacklist", ()))
        return [name for name, flow in flows.items() if matcher(flow)]

    assert selected() == ["drop", "http", "dns", "world"]
    assert selected(whitelist=[F(verdict=[DROPPED]), F(protocol=["dns"])]) == ["drop", "dns"]
    assert selected(blacklist=[F(verdict=[DROPPED]), F(protocol=["dns"])]) == ["http", "world"]
    assert selected(whitelist=[F(source_pod=["default/"])], blacklist=[F(source_pod=["tie"])]) == ["drop"]


def test_label_selector_grammar() -> None:
    reqs = parse_label_selector("k8s:app=web, !team, tier in (a,b), env notin (x), x>3")
    assert [(r.key, r.operator, r.values) for r in reqs] == [
        ("k8s.app", "=", ("web",)), ("any.team", "!exists", ()), ("any.tier", "in", ("a", "b")),
        ("any.env", "notin", ("x",)), ("any.x", "gt", ("3",))]
    assert parse_label_selector("") == ()
