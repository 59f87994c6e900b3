"""Hubble's flow metrics in the Prometheus text format, served on 127.0.0.1:9965/metrics.

:class:`FlowMetrics` is fed every flow (and every loss) and keeps Hubble's series:

    hubble_flows_processed_total{protocol,subtype,type,verdict}   every flow
    hubble_drop_total{protocol,reason}                            DROPPED flows
    hubble_tcp_flags_total{family,flag}                           FORWARDED TCP: SYN, SYN-ACK, FIN, RST
    hubble_policy_verdicts_total{action,direction,match}          policy-verdict events and L7 verdicts
    hubble_lost_events_total{source}                              losses, by source
    hubble_http_requests_total{method,protocol,reporter,status}   HTTP responses (httpV2)
    hubble_http_request_duration_seconds{method,reporter}         HTTP latency histogram
    hubble_dns_queries_total / hubble_dns_responses_total{ips_returned,qtypes,rcode}

Label names are sorted and series ordered by their label values, as Prometheus' Go client writes
them. The exposition is written here; :class:`MetricsServer` is a minimal asyncio HTTP server.

Primitives: :class:`FlowMetrics`, :class:`MetricsServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from membrane.core.errors import MembraneError
from membrane.observe.model import (
    DROPPED,
    FORWARDED,
    MSG_ACCESS_LOG,
    MSG_CAPTURE,
    MSG_DROP,
    MSG_POLICY_VERDICT,
    MSG_TRACE,
    RESPONSE,
    DropReasonEnum,
    Flow,
    IPVersionEnum,
    LostEventSourceEnum,
    TrafficDirectionEnum,
    VerdictEnum,
    dns_rcode_name,
    enum_name,
    flow_protocol,
    policy_match_name,
    trace_point_name,
)

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9965"
# Prometheus' default histogram buckets (seconds).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _number(value: float) -> str:
    """A sample value as Go's strconv.FormatFloat(v, 'g', -1, 64): ``3``, ``0.005``, ``1e+06``."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == 0:
        return "0"
    sign, digits, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    text = "".join(map(str, digits))
    exp10 = len(digits) + int(exponent) - 1
    prefix = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if exp10 < 0:
        return f"{prefix}0.{'0' * (-exp10 - 1)}{text}"
    whole = text[:exp10 + 1].ljust(exp10 + 1, "0")
    frac = text[exp10 + 1:]
    return f"{prefix}{whole}{'.' + frac if frac else ''}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in sorted(zip(names, values, strict=True))]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


@dataclass
class Counter:
    name: str
    help: str
    label_names: tuple[str, ...]
    series: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, *values: str, amount: float = 1) -> None:
        self.series[values] = self.series.get(values, 0) + amount

    def get(self, *values: str) -> float:
        return self.series.get(values, 0)

    def render(self) -> list[str]:
        if not self.series:
            return []
        order = sorted(range(len(self.label_names)), key=lambda i: self.label_names[i])
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for values in sorted(self.series, key=lambda v: [v[i] for i in order]):
            lines.append(f"{self.name}{_labels(self.label_names, values)} {_number(self.series[values])}")
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    label_names: tuple[str, ...]
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    series: dict[tuple[str, ...], list[float]] = field(default_factory=dict)  # per bucket counts, +Inf, sum

    def observe(self, value: float, *values: str) -> None:
        state = self.series.setdefault(values, [0.0] * (len(self.buckets) + 2))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                state[i] += 1
        state[-2] += 1
        state[-1] += value

    def render(self) -> list[str]:
        if not self.series:
            return []
        order = sorted(range(len(self.label_names)), key=lambda i: self.label_names[i])
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for values in sorted(self.series, key=lambda v: [v[i] for i in order]):
            state = self.series[values]
            for bound, count in zip((*self.buckets, float("inf")), state[:-1], strict=True):
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, values, le)} {_number(count)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, values)} {_number(state[-1])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, values)} {_number(state[-2])}")
        return lines


_FLOW_TYPES = {MSG_DROP: "Drop", MSG_CAPTURE: "Capture", MSG_TRACE: "Trace", MSG_POLICY_VERDICT: "PolicyVerdict"}


def _reporter(flow: Flow) -> str:
    return {1: "server", 2: "client"}.get(int(flow.traffic_direction), "unknown")


class FlowMetrics:
    """Hubble's flow metrics, fed by :meth:`observe` (every flow) and :meth:`lost` (every loss)."""

    #: ``hubble-metrics`` names → the families they turn on (lost events are always served).
    FAMILIES = {"flow": ("flows",), "drop": ("drops",), "tcp": ("tcp_flags",), "policy": ("policy",),
                "dns": ("dns_queries", "dns_responses"), "http": ("http_requests", "http_duration")}

    def __init__(self, enabled: Iterable[str] | None = None) -> None:
        #: The ``hubble-metrics`` names served (None: all); changed live with :meth:`enable`.
        self.enabled: frozenset[str] = frozenset(self.FAMILIES if enabled is None else enabled)
        self.flows = Counter("hubble_flows_processed_total", "Total number of flows processed",
                             ("protocol", "type", "subtype", "verdict"))
        self.drops = Counter("hubble_drop_total", "Number of drops", ("reason", "protocol"))
        self.tcp_flags = Counter("hubble_tcp_flags_total", "TCP flag occurrences", ("flag", "family"))
        self.policy = Counter("hubble_policy_verdicts_total", "Total number of Cilium network policy verdicts",
                              ("direction", "match", "action"))
        self.lost_events = Counter("hubble_lost_events_total", "Number of lost events", ("source",))
        self.http_requests = Counter("hubble_http_requests_total", "Count of HTTP requests",
                                     ("method", "protocol", "status", "reporter"))
        self.http_duration = Histogram("hubble_http_request_duration_seconds",
                                       "Median, 90th and 99th percentile of request duration",
                                       ("method", "reporter"))
        self.dns_queries = Counter("hubble_dns_queries_total", "Number of DNS queries observed",
                                   ("rcode", "qtypes", "ips_returned"))
        self.dns_responses = Counter("hubble_dns_responses_total", "Number of DNS responses observed",
                                     ("rcode", "qtypes", "ips_returned"))

    def observe(self, flow: Flow) -> None:
        kind = flow.event_type.type
        protocol = flow_protocol(flow)
        verdict = enum_name(VerdictEnum, flow.verdict)
        record = flow.l7.WhichOneof("record") if flow.HasField("l7") else None
        subtype = ""
        if kind == MSG_ACCESS_LOG:
            type_name = "L7"
            subtype = {"dns": "DNS", "http": "HTTP"}.get(record or "", "")
        elif kind in _FLOW_TYPES:
            type_name = _FLOW_TYPES[kind]
            if kind == MSG_TRACE:
                subtype = trace_point_name(flow.event_type.sub_type)
        else:
            type_name, subtype = "Unknown", str(kind)
        self.flows.inc(protocol, type_name, subtype, verdict)

        if flow.verdict == DROPPED:
            self.drops.inc(enum_name(DropReasonEnum, flow.drop_reason_desc), protocol)

        if (flow.verdict == FORWARDED and flow.HasField("IP") and flow.l4.HasField("TCP")
                and flow.l4.TCP.HasField("flags")):
            flags, family = flow.l4.TCP.flags, enum_name(IPVersionEnum, flow.IP.ipVersion)
            if flags.FIN:
                self.tcp_flags.inc("FIN", family)
            if flags.SYN:
                self.tcp_flags.inc("SYN-ACK" if flags.ACK else "SYN", family)
            if flags.RST:
                self.tcp_flags.inc("RST", family)

        direction = enum_name(TrafficDirectionEnum, flow.traffic_direction).lower()
        action = verdict.lower()
        if kind == MSG_POLICY_VERDICT and flow.source.identity != 1:  # the host may reach any local pod
            self.policy.inc(direction, policy_match_name(flow.policy_match_type).lower(), action)
        elif kind == MSG_ACCESS_LOG:
            self.policy.inc(direction, f"l7/{record or ''}", action)

        if record == "http" and flow.l7.type == RESPONSE:
            http = flow.l7.http
            self.http_requests.inc(http.method, http.protocol, str(http.code), _reporter(flow))
            self.http_duration.observe(flow.l7.latency_ns / 1e9, http.method, _reporter(flow))
        elif record == "dns":
            dns = flow.l7.dns
            qtypes = ",".join(dns.qtypes)
            if flow.l7.type == RESPONSE:
                self.dns_responses.inc(dns_rcode_name(dns.rcode).strip(), qtypes, str(len(dns.ips)))
            else:
                self.dns_queries.inc("", qtypes, "0")

    def lost(self, source: int, count: int) -> None:
        self.lost_events.inc(enum_name(LostEventSourceEnum, source).lower(), amount=count)

    def enable(self, names: Iterable[str]) -> None:
        """Serve these metric families from now on (what they counted meanwhile is kept)."""
        self.enabled = frozenset(names)

    def render(self) -> str:
        lines: list[str] = []
        families: list[Counter | Histogram] = [self.lost_events] + [
            getattr(self, attribute) for name in sorted(self.enabled) for attribute in self.FAMILIES.get(name, ())]
        for family in sorted(families, key=lambda f: f.name):  # the Go client sorts families by name
            lines += family.render()
        return "\n".join(lines) + "\n" if lines else ""


class MetricsServer:
    """GET /metrics over HTTP/1.1 (one request per connection); anything else is a 404."""

    def __init__(self, metrics: FlowMetrics, listen: str = DEFAULT_LISTEN) -> None:
        self.metrics = metrics
        self.listen = listen
        self.port: int | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        try:
            self._server = await asyncio.start_server(self._handle, host or "127.0.0.1", int(port))
        except OSError as exc:
            raise MembraneError(f"metrics: cannot listen on {self.listen}: {exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path = [*request.split(b"\r\n", 1)[0].split(b" "), b"", b""][:2]
            if method in (b"GET", b"HEAD") and path.split(b"?")[0] == b"/metrics":
                body = self.metrics.render().encode()
                status, ctype = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"404 page not found\n", b"404 Not Found", b"text/plain; charset=utf-8"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                         + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if method == b"HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
