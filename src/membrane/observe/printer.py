"""Hubble's output formats for flows, lost events, node status, server status and node lists.

Byte for byte what ``hubble observe`` / ``hubble status`` / ``hubble list nodes`` print for the same
messages:

    compact  <time>[ [<node>]]: <src> <src-id> <arrow> <dst> <dst-id> <type> <verdict> (<summary>)
    dict     "  TIMESTAMP: …" blocks separated by "------------"
    table    tab-aligned TIMESTAMP [NODE] SOURCE DESTINATION TYPE VERDICT SUMMARY, written on close()
    jsonpb   one GetFlowsResponse per line (``json`` is the same)

Replies (``is_reply`` true) are printed with source and destination swapped and ``<-`` so the
client stays on the left; an unknown direction prints ``<>``. Terminal control characters in the
data are neutralised (ESC → ``^[``, CR → ``\\r``) except the colour sequences the printer adds.

Primitives: :class:`PrinterOptions`, :class:`Printer`, :func:`tabwrite`, :func:`flow_type`,
:func:`format_server_status`, :func:`format_nodes`, :func:`node_state_name`.
"""

from __future__ import annotations

import enum
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from membrane.observe import gotime
from membrane.observe.jsonpb import to_json
from membrane.observe.model import (
    AUDIT,
    DROPPED,
    EGRESS,
    ERROR,
    FORWARDED,
    INGRESS,
    MSG_CAPTURE,
    MSG_DROP,
    MSG_POLICY_VERDICT,
    MSG_TRACE,
    MSG_TRACE_SOCK,
    NODE_CONNECTED,
    NODE_ERROR,
    NODE_GONE,
    NODE_UNAVAILABLE,
    REDIRECTED,
    RESERVED_IDENTITY_NAMES,
    TRACED,
    TRANSLATED,
    AuthTypeEnum,
    DebugCapturePointEnum,
    Flow,
    GetFlowsResponse,
    L7FlowTypeEnum,
    LostEventSourceEnum,
    Node,
    NodeStateEnum,
    Policy,
    ServerStatusResponse,
    SocketTranslationPointEnum,
    TrafficDirectionEnum,
    VerdictEnum,
    drop_reason_text,
    enum_name,
    flow_time_ns,
    policy_match_name,
    timestamp_ns,
    trace_point_name,
)


class Output(enum.Enum):
    COMPACT = "compact"
    DICT = "dict"
    TABLE = "table"
    JSONPB = "jsonpb"

    @classmethod
    def parse(cls, name: str) -> Output:
        """``compact``, ``dict``, ``table``/``tab``, ``json``/``jsonpb`` (json is an alias, as in Hubble)."""
        aliases = {"compact": cls.COMPACT, "dict": cls.DICT, "table": cls.TABLE, "tab": cls.TABLE,
                   "json": cls.JSONPB, "jsonpb": cls.JSONPB}
        output = aliases.get("json" if name == "JSON" else name)
        if output is None:
            raise ValueError(f"invalid output format: {name}")
        return output


@dataclass(frozen=True)
class PrinterOptions:
    output: Output = Output.COMPACT
    time_format: str = "StampMilli"
    ip_translation: bool = True
    node_name: bool = False
    policy_names: bool = False
    color: bool = False
    # Also print informational node-status events (e.g. "Receiving flows from …").
    debug: bool = False


def color_wanted(mode: str, stream: TextIO) -> bool:
    """``--color auto|always|never``; auto colours a terminal unless NO_COLOR is set or TERM is dumb."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_RESET = "\x1b[0m"
_CODES = {"red": 31, "green": 32, "yellow": 33, "blue": 34, "magenta": 35, "cyan": 36}


class Colorer:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def paint(self, color: str, text: str) -> str:
        return f"\x1b[{_CODES[color]}m{text}{_RESET}" if self.enabled else text

    def sequences(self) -> list[str]:
        if not self.enabled:
            return []
        return [f"\x1b[{code}m" for code in _CODES.values()] + [_RESET]


class TerminalEscaper:
    """Replace ESC with ``^[`` and CR with ``\\r``, keeping the printer's own colour sequences."""

    def __init__(self, allowed: Sequence[str]) -> None:
        alternatives = [re.escape(s) for s in allowed] + ["\x1b", "\r"]
        self._pattern = re.compile("|".join(alternatives))
        self._allowed = set(allowed)

    def __call__(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            found = match.group(0)
            if found in self._allowed:
                return found
            return "^[" if found == "\x1b" else "\\r"

        return self._pattern.sub(replace, text)


def tabwrite(text: str, minwidth: int = 2, padding: int = 3) -> str:
    """Go's text/tabwriter (padchar ' ', no flags): align tab-terminated cells per column block.

    The text after a line's last tab is not part of any column. A column's width is taken over the
    run of adjacent lines that all have a cell in that column.
    """
    lines = text.split("\n")
    trailing_newline = lines and lines[-1] == ""
    if trailing_newline:
        lines = lines[:-1]
    cells = [line.split("\t") for line in lines]
    widths: list[list[int]] = [[0] * (len(row) - 1) for row in cells]
    for index, row in enumerate(cells):
        for column in range(len(row) - 1):
            if widths[index][column]:
                continue
            end = index
            while end < len(cells) and len(cells[end]) - 1 > column:
                end += 1
            width = max([minwidth] + [len(cells[i][column]) + padding for i in range(index, end)])
            for i in range(index, end):
                widths[i][column] = width
    out = []
    for row, row_widths in zip(cells, widths, strict=True):
        out.append("".join(cell.ljust(width) for cell, width in zip(row, row_widths, strict=False)) + row[-1])
    return "\n".join(out) + ("\n" if trailing_newline else "")


def _join_host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _path_join(*parts: str) -> str:
    joined = "/".join(p for p in parts if p)
    return posixpath.normpath(joined) if joined else ""


def flow_ports(flow: Flow) -> tuple[str, str]:
    which = flow.l4.WhichOneof("protocol") if flow.HasField("l4") else None
    if which in ("TCP", "UDP", "SCTP"):
        l4 = getattr(flow.l4, which)
        return str(l4.source_port), str(l4.destination_port)
    return "", ""


_SOCK_POINTS = {1: "pre-xlate-fwd", 2: "post-xlate-fwd", 3: "pre-xlate-rev", 4: "post-xlate-rev"}


def flow_type(flow: Flow) -> str:
    """The TYPE column: ``to-endpoint``, ``Policy denied``, ``http-request``, ``policy-verdict:L3-L4 INGRESS``."""
    if flow.HasField("l7"):
        l7 = flow.l7
        protocol = "l7"
        l7_type = enum_name(L7FlowTypeEnum, l7.type).lower()
        record = l7.WhichOneof("record")
        if record == "http":
            protocol = "http"
        elif record == "dns":
            protocol = "dns"
            l7_type += " " + l7.dns.observation_source
        elif record == "kafka":
            protocol = "kafka"
        return f"{protocol}-{l7_type}"
    kind = flow.event_type.type
    if kind == MSG_TRACE:
        return trace_point_name(flow.event_type.sub_type)
    if kind == MSG_DROP:
        return drop_reason_text(flow.event_type.sub_type)
    if kind == MSG_POLICY_VERDICT:
        return (f"policy-verdict:{policy_match_name(flow.policy_match_type)} "
                f"{enum_name(TrafficDirectionEnum, flow.traffic_direction)}")
    if kind == MSG_CAPTURE:
        return enum_name(DebugCapturePointEnum, flow.debug_capture_point)
    if kind == MSG_TRACE_SOCK:
        return _SOCK_POINTS.get(flow.sock_xlate_point) or enum_name(SocketTranslationPointEnum, flow.sock_xlate_point)
    return "UNKNOWN"


def _policy_names(policies: Sequence[Policy]) -> str:
    named = [f"{p.name} ({p.kind})" for p in policies if p.kind and p.name]
    return " BY " + ", ".join(named) if named else ""


def _join_with_cutoff(items: Sequence[str], sep: str, target: int) -> str:
    length, end = 0, len(items)
    for i, item in enumerate(items):
        length += len(item) + len(sep)
        if length > target and i > 0:
            end = i
            break
    joined = sep.join(items[:end])
    omitted = len(items) - end
    return joined if not omitted else f"{joined} (and {omitted} more)"


def _go_quote(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


DICT_SEPARATOR = "------------"


class Printer:
    """Writes GetFlowsResponses to ``out`` (node-status events to ``err``) in one of Hubble's formats."""

    def __init__(self, options: PrinterOptions, out: TextIO, err: TextIO) -> None:
        self.options = options
        self.out = out
        self.err = err
        # The table format is aligned over all rows, so it is written on close(), as Hubble's tabwriter does.
        self.color = Colorer(options.color and options.output in (Output.COMPACT, Output.DICT))
        self.escape = TerminalEscaper(self.color.sequences())
        self.line = 0
        self._table: list[str] = []

    def close(self) -> None:
        if self._table:
            self.out.write(tabwrite("".join(self._table)))
            self._table = []
        self.out.flush()

    # -- pieces -----------------------------------------------------------------------------------

    def _time(self, time_ns: int | None) -> str:
        return gotime.format_time(time_ns, self.options.time_format)

    def hostname(self, ip: str, port: str, namespace: str, pod: str, service: str, names: Sequence[str]) -> str:
        host = ip
        if self.options.ip_translation:
            if pod:
                host = _path_join(namespace, pod)
            elif service:
                host = _path_join(namespace, service)
            elif names:
                host = ",".join(names)
        if port and port != "0":
            return _join_host_port(host, self.color.paint("yellow", port))
        return host

    def host_names(self, flow: Flow) -> tuple[str, str]:
        if not flow.HasField("IP"):
            if flow.HasField("ethernet"):
                return (self.color.paint("cyan", flow.ethernet.source),
                        self.color.paint("cyan", flow.ethernet.destination))
            return "", ""
        src_ns, src_pod, src_svc = flow.source.namespace, flow.source.pod_name, ""
        dst_ns, dst_pod, dst_svc = flow.destination.namespace, flow.destination.pod_name, ""
        if flow.HasField("source_service"):
            src_ns, src_svc = flow.source_service.namespace, flow.source_service.name
        if flow.HasField("destination_service"):
            dst_ns, dst_svc = flow.destination_service.namespace, flow.destination_service.name
        src_port, dst_port = flow_ports(flow)
        src = self.hostname(flow.IP.source, src_port, src_ns, src_pod, src_svc, list(flow.source_names))
        dst = self.hostname(flow.IP.destination, dst_port, dst_ns, dst_pod, dst_svc, list(flow.destination_names))
        return self.color.paint("cyan", src), self.color.paint("cyan", dst)

    def identity(self, identity: int) -> str:
        name = RESERVED_IDENTITY_NAMES.get(identity)
        return self.color.paint("magenta", f"({name})" if name is not None else f"(ID:{identity})")

    def verdict(self, flow: Flow) -> str:
        verdict = flow.verdict
        text = enum_name(VerdictEnum, verdict)
        policy_verdict = flow.event_type.type == MSG_POLICY_VERDICT
        direction = flow.traffic_direction
        if verdict in (FORWARDED, REDIRECTED):
            if policy_verdict:
                text = "ALLOWED"
                if self.options.policy_names and direction == EGRESS:
                    text += _policy_names(flow.egress_allowed_by)
                elif self.options.policy_names and direction == INGRESS:
                    text += _policy_names(flow.ingress_allowed_by)
            return self.color.paint("green", text)
        if verdict in (DROPPED, ERROR):
            if policy_verdict:
                text = "DENIED"
                if self.options.policy_names and direction == EGRESS:
                    text += _policy_names(flow.egress_denied_by)
                elif self.options.policy_names and direction == INGRESS:
                    text += _policy_names(flow.ingress_denied_by)
            return self.color.paint("red", text)
        if verdict == AUDIT:
            return self.color.paint("yellow", "AUDITED" if policy_verdict else text)
        if verdict in (TRACED, TRANSLATED):
            return self.color.paint("yellow", text)
        return text

    def summary(self, flow: Flow) -> str:
        text = ""
        if flow.HasField("ip_trace_id") and flow.ip_trace_id.trace_id > 0:
            text = f"IP Trace ID: {flow.ip_trace_id.trace_id}; "
        text += flow.Summary
        if flow.auth_type:
            name = enum_name(AuthTypeEnum, flow.auth_type)
            text += "; Auth: " + self.color.paint("red" if name == "TEST_ALWAYS_FAIL" else "green", name)
        return text

    # -- events -----------------------------------------------------------------------------------

    def write(self, response: GetFlowsResponse) -> None:
        """Print one GetFlowsResponse: a flow, a lost-events notice or a node-status event."""
        kind = response.WhichOneof("response_types")
        if kind == "flow":
            self.write_flow(response)
        elif kind == "lost_events":
            self.write_lost(response)
        elif kind == "node_status":
            self.write_node_status(response)

    def _emit(self, text: str) -> None:
        self.out.write(self.escape(text))

    def _table_row(self, cells: Sequence[str]) -> None:
        self._table.append(self.escape("\t".join(cells) + "\n"))

    def _table_header(self) -> None:
        if self.line == 0:
            header = ["TIMESTAMP"] + (["NODE"] if self.options.node_name else [])
            self._table_row([*header, "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"])

    def write_flow(self, response: GetFlowsResponse) -> None:
        flow = response.flow
        output = self.options.output
        if output is Output.JSONPB:
            self.out.write(to_json(response) + "\n")
            return
        src, dst = self.host_names(flow)
        when = self._time(flow_time_ns(flow))
        if output is Output.TABLE:
            self._table_header()
            nodes = [flow.node_name] if self.options.node_name else []
            self._table_row([when, *nodes, src, dst, flow_type(flow), self.verdict(flow), self.summary(flow)])
        elif output is Output.DICT:
            text = f"{DICT_SEPARATOR}\n" if self.line else ""
            text += f"  TIMESTAMP: {when}\n"
            if self.options.node_name:
                text += f"       NODE: {flow.node_name}\n"
            text += (f"     SOURCE: {src}\nDESTINATION: {dst}\n       TYPE: {flow_type(flow)}\n"
                     f"    VERDICT: {self.verdict(flow)}\n    SUMMARY: {self.summary(flow)}\n")
            self._emit(text)
        else:
            src_id = self.identity(flow.source.identity)
            dst_id = self.identity(flow.destination.identity)
            node = f" [{flow.node_name}]" if self.options.node_name else ""
            arrow = "->"
            if not flow.HasField("is_reply"):
                arrow = "<>"
            elif flow.is_reply.value:
                src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
            self._emit(f"{when}{node}: {src} {src_id} {arrow} {dst} {dst_id} {flow_type(flow)} "
                       f"{self.verdict(flow)} ({self.summary(flow)})\n")
        self.line += 1

    def write_lost(self, response: GetFlowsResponse) -> None:
        lost = response.lost_events
        output = self.options.output
        if output is Output.JSONPB:
            self.out.write(to_json(response) + "\n")
            return
        when = self._time(timestamp_ns(response.time) if response.HasField("time") else None)
        source = enum_name(LostEventSourceEnum, lost.source)
        cpu = lost.cpu.value if lost.HasField("cpu") else 0
        window = ""
        if lost.HasField("first") and lost.HasField("last"):
            window = (f" (first: {self._time(timestamp_ns(lost.first))}, last: {self._time(timestamp_ns(lost.last))})")
        node = response.node_name or "-"
        if output is Output.TABLE:
            self._table_header()
            nodes = [node] if self.options.node_name else []
            self._table_row([when, *nodes, source, "-", "EVENTS LOST", "-",
                             f"CPU({cpu}) - {lost.num_events_lost}{window}"])
        elif output is Output.DICT:
            text = f"{DICT_SEPARATOR}\n" if self.line else ""
            text += f"  TIMESTAMP: {when}\n"
            if self.options.node_name:
                text += f"       NODE: {node}\n"
            text += (f"     SOURCE: {source}\n       TYPE: EVENTS LOST\n    VERDICT: -\n"
                     f"    SUMMARY: CPU({cpu}) - {lost.num_events_lost}{window}\n")
            self._emit(text)
        else:
            self._emit(f"{when} EVENTS LOST: {source} CPU({cpu}) {lost.num_events_lost}{window}\n")
        self.line += 1

    def write_node_status(self, response: GetFlowsResponse) -> None:
        status = response.node_status
        state = status.state_change
        if not self.options.debug and state not in (NODE_ERROR, NODE_UNAVAILABLE):
            return  # informational events only with debug, as in Hubble
        output = self.options.output
        if output is Output.JSONPB:
            self.err.write(to_json(response) + "\n")
            return
        when = self._time(timestamp_ns(response.time) if response.HasField("time") else None)
        names = _join_with_cutoff(list(status.node_names), ", ", 50)
        if output is Output.DICT:
            text = ""
            if self.line:
                text = DICT_SEPARATOR + "\n"
            else:
                self.line += 1
            message = _go_quote(status.message) if status.message else "N/A"
            text += (f"  TIMESTAMP: {when}\n      STATE: {enum_name(NodeStateEnum, state)}\n"
                     f"      NODES: {names}\n    MESSAGE: {message}\n")
            self.err.write(self.escape(text))
            return
        count = len(status.node_names)
        prefix = f"{when} [{response.node_name}]"
        texts = {
            NODE_CONNECTED: f"{prefix}: Receiving flows from {count} nodes: {names}",
            NODE_UNAVAILABLE: f"{prefix}: {count} nodes are unavailable: {names}",
            NODE_GONE: f"{prefix}: {count} nodes removed from cluster: {names}",
            NODE_ERROR: f"{prefix}: Error {_go_quote(status.message)} on {count} nodes: {names}",
        }
        text = texts.get(state, f"{prefix}: unknown node status event: {enum_name(NodeStateEnum, state)}")
        self.err.write(self.escape(text + "\n"))



# --- server status and nodes ----------------------------------------------------------------------------


def format_server_status(status: ServerStatusResponse, output: Output) -> str:
    """``hubble status`` after its health-check line (compact), or as table, dict or JSON."""
    connected = str(status.num_connected_nodes.value) if status.HasField("num_connected_nodes") else "N/A"
    unavailable = str(status.num_unavailable_nodes.value) if status.HasField("num_unavailable_nodes") else "N/A"
    rate = f"{status.flows_rate:.2f}" if status.flows_rate > 0 else "N/A"
    if output is Output.JSONPB:
        return to_json(status) + "\n"
    if output is Output.TABLE:
        return tabwrite(
            "NUM FLOWS\tMAX FLOWS\tSEEN FLOWS\tFLOWS PER SECOND\tUPTIME\tNUM CONNECTED NODES\t"
            "NUM UNAVAILABLE NODES\tVERSION\n"
            f"{status.num_flows:,}\t{status.max_flows:,}\t{status.seen_flows:,}\t{rate}\t"
            f"{gotime.format_duration(status.uptime_ns)}\t{connected}\t{unavailable}\t{status.version}\n")
    if output is Output.DICT:
        return (f"          NUM FLOWS: {status.num_flows:,}\n          MAX FLOWS: {status.max_flows:,}\n"
                f"         SEEN FLOWS: {status.seen_flows:,}\n   FLOWS PER SECOND: {rate}\n"
                f"             UPTIME: {gotime.format_duration(status.uptime_ns)}\n"
                f"NUM CONNECTED NODES: {connected}\n NUM UNAVAIL. NODES: {unavailable}\n"
                f"            VERSION: {status.version}\n")
    ratio = f" ({status.num_flows / status.max_flows * 100:.2f}%)" if status.max_flows else ""
    text = f"Current/Max Flows: {status.num_flows:,}/{status.max_flows:,}{ratio}\n"
    uptime_s = status.uptime_ns / 1e9
    if rate == "N/A" and uptime_s > 0:
        rate = f"{status.seen_flows / uptime_s:.2f}"
    text += f"Flows/s: {rate}\n"
    if status.HasField("num_connected_nodes"):
        total = ""
        if status.HasField("num_unavailable_nodes"):
            total = f"/{status.num_unavailable_nodes.value + status.num_connected_nodes.value}"
        text += f"Connected Nodes: {status.num_connected_nodes.value}{total}\n"
    if status.HasField("num_unavailable_nodes") and status.num_unavailable_nodes.value > 0:
        missing = sorted(status.unavailable_nodes)
        count = status.num_unavailable_nodes.value
        if missing:
            if count > len(missing):
                missing.append(f"and {count - len(missing)} more...")
            text += f"Unavailable Nodes: {count}\n  - " + "\n  - ".join(missing) + "\n"
        else:
            text += f"Unavailable Nodes: {count}\n"
    return text


_NODE_STATES: dict[int, str] = {NODE_CONNECTED: "connected", NODE_UNAVAILABLE: "unavailable", NODE_GONE: "gone",
                                NODE_ERROR: "error"}


def node_state_name(state: int) -> str:
    return _NODE_STATES.get(state, "unknown")


def format_nodes(nodes: Sequence[Node], wide: bool = False) -> str:
    """``hubble list nodes``: NAME STATUS AGE FLOWS/S CURRENT/MAX-FLOWS [VERSION ADDRESS TLS]."""
    header = "NAME\tSTATUS\tAGE\tFLOWS/S\tCURRENT/MAX-FLOWS" + ("\tVERSION\tADDRESS\tTLS" if wide else "")
    rows = [header + "\n"]
    for node in sorted(nodes, key=lambda n: n.name):
        age = rate = ratio = "N/A"
        uptime_s = (node.uptime_ns + 500_000_000) // 1_000_000_000  # rounded to whole seconds
        if uptime_s > 0:
            age = gotime.format_duration(uptime_s * 1_000_000_000)
            rate = f"{node.seen_flows / uptime_s:.2f}"
        if node.max_flows > 0:
            ratio = f"{node.num_flows}/{node.max_flows} ({node.num_flows / node.max_flows * 100:6.2f}%)"
        row = f"{node.name}\t{node_state_name(node.state).title()}\t{age}\t{rate}\t{ratio}"
        if wide:
            tls = "N/A"
            if node.HasField("tls"):
                tls = "Enabled" if node.tls.enabled else "Disabled"
            row += f"\t{node.version or 'N/A'}\t{node.address}\t{tls}"
        rows.append(row + "\n")
    return tabwrite("".join(rows))
