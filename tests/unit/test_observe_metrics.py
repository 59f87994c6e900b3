"""Hubble's flow metrics: series names and labels, the text exposition, and the /metrics server."""

from __future__ import annotations

import asyncio
import difflib
import os
from pathlib import Path

import pytest

from membrane.observe.metrics import FlowMetrics, MetricsServer
from membrane.observe.model import (
    DROPPED,
    EGRESS,
    FORWARDED,
    HUBBLE_RING_BUFFER,
    INGRESS,
    PERF_EVENT_RING_BUFFER,
    REQUEST,
    RESPONSE,
    Flow,
    IPv4,
    mark_drop,
    mark_l7,
    mark_policy_verdict,
    mark_trace,
)
from membrane.observe.ring import Ring

GOLDEN = Path(__file__).parent / "golden" / "observe"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN"):
        path.write_text(text)
    expected = path.read_text() if path.exists() else ""
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), text.splitlines(keepends=True),
                                            f"golden/observe/{name}", "actual"))
        pytest.fail(f"output differs from golden/observe/{name} (MEMBRANE_UPDATE_GOLDEN=1 rewrites it):\n{diff}")


def tcp(flags: str, verdict: int = FORWARDED) -> Flow:
    flow = Flow()
    flow.IP.ipVersion = IPv4
    for name in flags.split(","):
        setattr(flow.l4.TCP.flags, name, True)
    return mark_trace(flow, "to-endpoint", verdict=verdict)  # type: ignore[arg-type]


def sample_metrics() -> FlowMetrics:
    metrics = FlowMetrics()
    metrics.observe(tcp("SYN"))
    metrics.observe(tcp("SYN,ACK"))
    metrics.observe(tcp("ACK,FIN"))
    metrics.observe(tcp("RST", verdict=DROPPED))  # flags are only counted for forwarded flows
    dropped = Flow()
    dropped.l4.UDP.destination_port = 53
    metrics.observe(mark_drop(dropped, 133))
    verdict = Flow()
    verdict.source.identity = 5000
    verdict.l4.TCP.destination_port = 80
    metrics.observe(mark_policy_verdict(verdict, verdict=DROPPED, direction=INGRESS, match_type=2))
    from_host = Flow()
    from_host.source.identity = 1
    metrics.observe(mark_policy_verdict(from_host, verdict=FORWARDED, direction=INGRESS, match_type=4))
    response = Flow(traffic_direction=INGRESS)
    mark_l7(response, RESPONSE)
    response.l7.latency_ns = 30_000_000
    response.l7.http.method, response.l7.http.code, response.l7.http.protocol = "GET", 200, "HTTP/1.1"
    metrics.observe(response)
    query = Flow(traffic_direction=EGRESS)
    mark_l7(query, REQUEST)
    query.l7.dns.qtypes.append("A")
    metrics.observe(query)
    answer = Flow(traffic_direction=EGRESS)
    mark_l7(answer, RESPONSE)
    answer.l7.dns.qtypes.append("A")
    answer.l7.dns.ips.extend(["1.2.3.4", "5.6.7.8"])
    metrics.observe(answer)
    metrics.lost(HUBBLE_RING_BUFFER, 3)
    metrics.lost(PERF_EVENT_RING_BUFFER, 1_000_000)
    return metrics


def test_series_and_labels_are_hubbles() -> None:
    m = sample_metrics()
    assert m.flows.get("TCP", "Trace", "to-endpoint", "FORWARDED") == 3
    assert m.flows.get("UDP", "Drop", "", "DROPPED") == 1
    assert m.flows.get("HTTP", "L7", "HTTP", "FORWARDED") == 1
    assert m.drops.get("POLICY_DENIED", "UDP") == 1
    assert m.drops.get("POLICY_DENIED", "TCP") == 1  # the denied verdict
    assert m.drops.get("DROP_REASON_UNKNOWN", "TCP") == 1  # the dropped trace carries no reason
    assert (m.tcp_flags.get("SYN", "IPv4"), m.tcp_flags.get("SYN-ACK", "IPv4"), m.tcp_flags.get("FIN", "IPv4"),
            m.tcp_flags.get("RST", "IPv4")) == (1, 1, 1, 0)
    assert m.policy.get("ingress", "l3-l4", "dropped") == 1
    assert m.policy.get("ingress", "all", "forwarded") == 0  # verdicts for the host are not counted
    assert m.policy.get("ingress", "l7/http", "forwarded") == 1
    assert m.http_requests.get("GET", "HTTP/1.1", "200", "server") == 1
    assert m.dns_queries.get("", "A", "0") == 1
    assert m.dns_responses.get("No Error", "A", "2") == 1
    assert m.lost_events.get("hubble_ring_buffer") == 3


def test_exposition_text() -> None:
    text = sample_metrics().render()
    assert text.startswith("# HELP hubble_dns_queries_total Number of DNS queries observed\n"
                           "# TYPE hubble_dns_queries_total counter\n"
                           'hubble_dns_queries_total{ips_returned="0",qtypes="A",rcode=""} 1\n')
    assert ('hubble_flows_processed_total{protocol="HTTP",subtype="HTTP",type="L7",verdict="FORWARDED"} 1\n'
            'hubble_flows_processed_total{protocol="TCP",subtype="",type="PolicyVerdict",verdict="DROPPED"} 1\n'
            ) in text
    assert 'hubble_http_request_duration_seconds_bucket{method="GET",reporter="server",le="0.025"} 0\n' in text
    assert 'hubble_http_request_duration_seconds_bucket{method="GET",reporter="server",le="0.05"} 1\n' in text
    assert 'hubble_http_request_duration_seconds_bucket{method="GET",reporter="server",le="+Inf"} 1\n' in text
    assert 'hubble_http_request_duration_seconds_sum{method="GET",reporter="server"} 0.03\n' in text
    assert 'hubble_lost_events_total{source="perf_event_ring_buffer"} 1e+06\n' in text
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert families == sorted(families)
    assert FlowMetrics().render() == ""
    assert_golden("metrics.txt", text)


def test_ring_losses_reach_the_metrics() -> None:
    metrics = FlowMetrics()
    ring = Ring(1, on_lost=metrics.lost)
    reader = ring.reader(0)
    for _ in range(3):
        ring.write(Flow())
    assert reader.next().lost is not None  # type: ignore[union-attr]
    assert metrics.lost_events.get("hubble_ring_buffer") == 2


async def test_metrics_endpoint() -> None:
    metrics = sample_metrics()
    server = MetricsServer(metrics, "127.0.0.1:0")
    await server.start()
    try:
        async def get(path: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            return data

        ok = await get("/metrics")
        head, _, body = ok.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"text/plain; version=0.0.4" in head
        assert body.decode() == metrics.render()
        assert (await get("/")).startswith(b"HTTP/1.1 404")
    finally:
        await server.close()
