"""The flow model: Hubble's protobuf messages, the monitor's names for them, and flow builders.

A flow *is* the generated ``flow.Flow`` message, so what the API sends, what the printers show and
what the export files hold are one and the same object. Producers build flows with the protobuf
constructors and the helpers here:

    flow = Flow(IP=IP(source=..., destination=..., ipVersion=IPv4), l4=..., source=Endpoint(...), ...)
    set_time(flow, time_ns); mark_trace(flow, "to-endpoint"); fill_summary(flow)

Primitives: the message classes and enum values re-exported from ``pb``; the monitor message types
(``MSG_*``) and name tables (trace observation points, drop reasons, policy match types, reserved
identities, DNS types and response codes); :func:`timestamp_ns`, :func:`flow_time_ns`,
:func:`set_time`, :func:`mark_trace`, :func:`mark_drop`, :func:`mark_translation`,
:func:`mark_policy_verdict`, :func:`mark_l7`,
:func:`set_reply`, :func:`l34_summary`, :func:`http_summary`, :func:`dns_summary`, :func:`fill_summary`,
:func:`flow_protocol`, :func:`flow_response`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from membrane.observe.pb.flow import flow_pb2
from membrane.observe.pb.observer import observer_pb2
from membrane.observe.pb.relay import relay_pb2

# --- messages --------------------------------------------------------------------------------------

Flow = flow_pb2.Flow
Endpoint = flow_pb2.Endpoint
Workload = flow_pb2.Workload
IP = flow_pb2.IP
Ethernet = flow_pb2.Ethernet
Layer4 = flow_pb2.Layer4
TCP = flow_pb2.TCP
TCPFlags = flow_pb2.TCPFlags
UDP = flow_pb2.UDP
SCTP = flow_pb2.SCTP
ICMPv4 = flow_pb2.ICMPv4
ICMPv6 = flow_pb2.ICMPv6
Layer7 = flow_pb2.Layer7
HTTP = flow_pb2.HTTP
HTTPHeader = flow_pb2.HTTPHeader
DNS = flow_pb2.DNS
Service = flow_pb2.Service
Policy = flow_pb2.Policy
NetworkInterface = flow_pb2.NetworkInterface
CiliumEventType = flow_pb2.CiliumEventType
EventTypeFilter = flow_pb2.EventTypeFilter
FlowFilter = flow_pb2.FlowFilter
LostEvent = flow_pb2.LostEvent
IPTraceID = flow_pb2.IPTraceID
GetFlowsRequest = observer_pb2.GetFlowsRequest
GetFlowsResponse = observer_pb2.GetFlowsResponse
ServerStatusResponse = observer_pb2.ServerStatusResponse
GetNodesResponse = observer_pb2.GetNodesResponse
GetNamespacesResponse = observer_pb2.GetNamespacesResponse
Node = observer_pb2.Node
Namespace = observer_pb2.Namespace
NodeStatusEvent = relay_pb2.NodeStatusEvent

# --- enum values (the proto enums are plain ints in Python) ---------------------------------------

VERDICT_UNKNOWN = flow_pb2.VERDICT_UNKNOWN
FORWARDED = flow_pb2.FORWARDED
DROPPED = flow_pb2.DROPPED
ERROR = flow_pb2.ERROR
AUDIT = flow_pb2.AUDIT
REDIRECTED = flow_pb2.REDIRECTED
TRACED = flow_pb2.TRACED
TRANSLATED = flow_pb2.TRANSLATED

L3_L4 = flow_pb2.L3_L4
L7 = flow_pb2.L7

IP_NOT_USED = flow_pb2.IP_NOT_USED
IPv4 = flow_pb2.IPv4
IPv6 = flow_pb2.IPv6

TRAFFIC_DIRECTION_UNKNOWN = flow_pb2.TRAFFIC_DIRECTION_UNKNOWN
INGRESS = flow_pb2.INGRESS
EGRESS = flow_pb2.EGRESS

REQUEST = flow_pb2.REQUEST
RESPONSE = flow_pb2.RESPONSE

PERF_EVENT_RING_BUFFER = flow_pb2.PERF_EVENT_RING_BUFFER
OBSERVER_EVENTS_QUEUE = flow_pb2.OBSERVER_EVENTS_QUEUE
HUBBLE_RING_BUFFER = flow_pb2.HUBBLE_RING_BUFFER

NODE_CONNECTED = relay_pb2.NODE_CONNECTED
NODE_UNAVAILABLE = relay_pb2.NODE_UNAVAILABLE
NODE_GONE = relay_pb2.NODE_GONE
NODE_ERROR = relay_pb2.NODE_ERROR


def enum_name(enum: object, value: int) -> str:
    """The enum value's name, or the number when the value is unknown (as Go's String() does)."""
    try:
        return str(enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:
        return str(value)


VerdictEnum = flow_pb2.Verdict
DropReasonEnum = flow_pb2.DropReason
TrafficDirectionEnum = flow_pb2.TrafficDirection
TraceObservationPointEnum = flow_pb2.TraceObservationPoint
TraceReasonEnum = flow_pb2.TraceReason
IPVersionEnum = flow_pb2.IPVersion
LostEventSourceEnum = flow_pb2.LostEventSource
L7FlowTypeEnum = flow_pb2.L7FlowType
DebugCapturePointEnum = flow_pb2.DebugCapturePoint
SocketTranslationPointEnum = flow_pb2.SocketTranslationPoint
AuthTypeEnum = flow_pb2.AuthType
NodeStateEnum = relay_pb2.NodeState

# --- monitor message types (event_type.type) ------------------------------------------------------

MSG_DROP = 1
MSG_DEBUG = 2
MSG_CAPTURE = 3
MSG_TRACE = 4
MSG_POLICY_VERDICT = 5
MSG_TRACE_SOCK = 7
MSG_ACCESS_LOG = 129
MSG_AGENT = 130

# The names `--type` accepts.
MESSAGE_TYPE_NAMES: dict[str, int] = {
    "drop": MSG_DROP,
    "debug": MSG_DEBUG,
    "capture": MSG_CAPTURE,
    "trace": MSG_TRACE,
    "l7": MSG_ACCESS_LOG,
    "agent": MSG_AGENT,
    "policy-verdict": MSG_POLICY_VERDICT,
    "trace-sock": MSG_TRACE_SOCK,
}

# Trace sub-types as the monitor numbers them (event_type.sub_type of a trace event), with the
# TraceObservationPoint enum value the flow's trace_observation_point carries for each.
TRACE_POINTS: dict[int, tuple[str, flow_pb2.TraceObservationPoint]] = {
    0: ("to-endpoint", flow_pb2.TO_ENDPOINT),
    1: ("to-proxy", flow_pb2.TO_PROXY),
    2: ("to-host", flow_pb2.TO_HOST),
    3: ("to-stack", flow_pb2.TO_STACK),
    4: ("to-overlay", flow_pb2.TO_OVERLAY),
    5: ("from-endpoint", flow_pb2.FROM_ENDPOINT),
    6: ("from-proxy", flow_pb2.FROM_PROXY),
    7: ("from-host", flow_pb2.FROM_HOST),
    8: ("from-stack", flow_pb2.FROM_STACK),
    9: ("from-overlay", flow_pb2.FROM_OVERLAY),
    10: ("from-network", flow_pb2.FROM_NETWORK),
    11: ("to-network", flow_pb2.TO_NETWORK),
    12: ("from-crypto", flow_pb2.FROM_CRYPTO),
    13: ("to-crypto", flow_pb2.TO_CRYPTO),
}
TRACE_POINT_BY_NAME: dict[str, int] = {name: sub for sub, (name, _) in TRACE_POINTS.items()}


def trace_point_name(sub_type: int) -> str:
    entry = TRACE_POINTS.get(sub_type & 0xFF)
    return entry[0] if entry else str(sub_type & 0xFF)


# The datapath's drop texts, by code (what the compact format prints as the type of a drop).
DROP_REASON_TEXT: dict[int, str] = {
    0: "Success", 2: "Invalid packet", 3: "Interface", 4: "Interface Decrypted",
    5: "LB, sock cgroup: No backend slot entry found", 6: "LB, sock cgroup: No backend entry found",
    7: "LB, sock cgroup: Reverse entry update failed", 8: "LB, sock cgroup: Reverse entry stale",
    9: "Fragmented packet", 10: "Fragmented packet entry update failed",
    11: "Missed tail call to custom program", 12: "Interface Decrypting", 13: "Interface Encrypting",
    14: "LB: sock cgroup: Reverse entry delete succeeded", 15: "MTU error message",
    130: "Invalid source mac", 131: "Invalid destination mac", 132: "Invalid source ip",
    133: "Policy denied", 134: "Invalid packet", 135: "CT: Truncated or invalid header",
    136: "Fragmentation needed", 137: "CT: Unknown L4 protocol", 138: "CT: Can't create entry from packet",
    139: "Unsupported L3 protocol", 140: "Missed tail call", 141: "Error writing to packet",
    142: "Unknown L4 protocol", 143: "Unknown ICMPv4 code", 144: "Unknown ICMPv4 type",
    145: "Unknown ICMPv6 code", 146: "Unknown ICMPv6 type", 147: "Error retrieving tunnel key",
    148: "Error retrieving tunnel options", 149: "Invalid Geneve option", 150: "Unknown L3 target address",
    151: "Stale or unroutable IP", 152: "No matching local container found",
    153: "Error while correcting L3 checksum", 154: "Error while correcting L4 checksum",
    155: "CT: Map insertion failed", 156: "Invalid IPv6 extension header", 157: "IP fragmentation not supported",
    158: "Service backend not found", 160: "No tunnel/encapsulation endpoint (datapath BUG!)",
    161: "NAT 46/64 not enabled", 162: "Reached EDT rate-limiting drop horizon",
    163: "Unknown connection tracking state", 164: "Local host is unreachable",
    165: "No configuration available to perform policy decision", 166: "Unsupported L2 protocol",
    167: "No mapping for NAT masquerade", 168: "Unsupported protocol for NAT masquerade",
    169: "FIB lookup failed", 170: "Encapsulation traffic is prohibited", 171: "Invalid identity",
    172: "Unknown sender", 173: "NAT not needed", 174: "Is a ClusterIP",
    175: "First logical datagram fragment not found", 176: "Forbidden ICMPv6 message",
    177: "Denied by LB src range check", 178: "Socket lookup failed", 179: "Socket assign failed",
    180: "Proxy redirection not supported for protocol", 181: "Policy denied by denylist",
    182: "VLAN traffic disallowed by VLAN filter", 183: "Incorrect VNI from VTEP",
    184: "Failed to update or lookup TC buffer", 185: "No SID was found for the IP address",
    186: "SRv6 state was removed during tail call", 187: "L3 translation from IPv4 to IPv6 failed (NAT46)",
    188: "L3 translation from IPv6 to IPv4 failed (NAT64)", 189: "Authentication required",
    190: "No conntrack map found", 191: "No nat map found", 192: "Invalid ClusterID",
    193: "Unsupported packet protocol for DSR encapsulation", 194: "No egress gateway found",
    195: "Traffic is unencrypted", 196: "TTL exceeded", 197: "No node ID found", 198: "Rate limited",
    199: "IGMP handled", 200: "IGMP subscribed", 201: "Multicast handled", 202: "Host datapath not ready",
    203: "Endpoint policy program not available", 204: "No Egress IP configured", 205: "Punt to proxy",
}


def drop_reason_text(code: int) -> str:
    """The monitor's text for a drop code; unknown codes print as "<code>, 0" like the monitor does."""
    code &= 0xFF
    return DROP_REASON_TEXT.get(code, f"{code}, 0")


POLICY_MATCH_TYPES: dict[int, str] = {
    0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto", 6: "Proto-Only",
}


def policy_match_name(match_type: int) -> str:
    return POLICY_MATCH_TYPES.get(match_type, "unknown")


# Reserved identities as Hubble prints them: "(host)", "(world)", … — identity 0 is "(unknown)".
RESERVED_IDENTITY_NAMES: dict[int, str] = {
    0: "unknown", 1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node",
    7: "kube-apiserver", 8: "ingress", 9: "world-ipv4", 10: "world-ipv6",
}
RESERVED_IDENTITY_BY_NAME: dict[str, int] = {n: i for i, n in RESERVED_IDENTITY_NAMES.items() if i != 0}

# --- time ------------------------------------------------------------------------------------------


def timestamp_ns(timestamp: Any) -> int:
    """A google.protobuf.Timestamp in ns since the epoch."""
    return int(timestamp.seconds) * 1_000_000_000 + int(timestamp.nanos)


def flow_time_ns(flow: flow_pb2.Flow) -> int | None:
    """The flow's event time in ns since the epoch, or None when it has none."""
    return timestamp_ns(flow.time) if flow.HasField("time") else None


def set_time(flow: flow_pb2.Flow, time_ns: int) -> flow_pb2.Flow:
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    flow.time.seconds = seconds
    flow.time.nanos = nanos
    return flow


# --- event kinds -----------------------------------------------------------------------------------


def mark_trace(flow: flow_pb2.Flow, point: str, *, verdict: flow_pb2.Verdict = FORWARDED,
               reason: flow_pb2.TraceReason = flow_pb2.TRACE_REASON_UNKNOWN) -> flow_pb2.Flow:
    """A trace event observed at ``point`` ("to-endpoint", "to-stack", "from-network", …)."""
    sub_type = TRACE_POINT_BY_NAME[point]
    flow.event_type.type = MSG_TRACE
    flow.event_type.sub_type = sub_type
    flow.trace_observation_point = TRACE_POINTS[sub_type][1]
    flow.trace_reason = reason
    flow.verdict = verdict
    flow.Type = L3_L4
    return flow


def mark_drop(flow: flow_pb2.Flow, reason: int) -> flow_pb2.Flow:
    """A drop with datapath code ``reason`` (133 policy denied, 181 denied by denylist, …)."""
    flow.event_type.type = MSG_DROP
    flow.event_type.sub_type = reason
    flow.verdict = DROPPED
    flow.drop_reason = reason
    flow.drop_reason_desc = drop_reason_enum(reason)
    flow.Type = L3_L4
    return flow


def mark_translation(flow: flow_pb2.Flow, point: flow_pb2.SocketTranslationPoint = (
        flow_pb2.SOCK_XLATE_POINT_PRE_DIRECTION_FWD)) -> flow_pb2.Flow:
    """A service translation event as Hubble's socket LB reports one (``pre-xlate-fwd``: the
    destination is the service frontend; ``post-xlate-fwd``: the backend it was translated to)."""
    flow.event_type.type = MSG_TRACE_SOCK
    flow.event_type.sub_type = point
    flow.sock_xlate_point = point
    pre = point in (flow_pb2.SOCK_XLATE_POINT_PRE_DIRECTION_FWD, flow_pb2.SOCK_XLATE_POINT_PRE_DIRECTION_REV)
    flow.verdict = TRACED if pre else TRANSLATED
    flow.Type = flow_pb2.SOCK
    return flow


def drop_reason_enum(code: int) -> flow_pb2.DropReason:
    """The DropReason for a datapath drop code (DROP_REASON_UNKNOWN for codes the enum lacks)."""
    return cast(flow_pb2.DropReason, code if code in DropReasonEnum.values() else 0)


def mark_policy_verdict(flow: flow_pb2.Flow, *, verdict: flow_pb2.Verdict, direction: flow_pb2.TrafficDirection,
                        match_type: int, drop_reason: int = 0) -> flow_pb2.Flow:
    """A policy decision: ``match_type`` is 0 none, 1 L3-only, 2 L3-L4, 3 L4-only, 4 all, ….

    Hubble reports denied verdicts with their drop reason and allowed ones as "not a reply".
    """
    flow.event_type.type = MSG_POLICY_VERDICT
    flow.event_type.sub_type = 0
    flow.verdict = verdict
    flow.traffic_direction = direction
    flow.policy_match_type = match_type
    flow.Type = L3_L4
    if verdict == DROPPED:
        flow.drop_reason = drop_reason or 133
        flow.drop_reason_desc = drop_reason_enum(flow.drop_reason)
    return flow


def mark_l7(flow: flow_pb2.Flow, l7_type: flow_pb2.L7FlowType, *,
            verdict: flow_pb2.Verdict = FORWARDED) -> flow_pb2.Flow:
    """An L7 access-log record (REQUEST or RESPONSE); fill ``flow.l7.http`` or ``flow.l7.dns``."""
    flow.event_type.type = MSG_ACCESS_LOG
    flow.event_type.sub_type = 0
    flow.l7.type = l7_type
    flow.verdict = verdict
    flow.Type = L7
    return flow


def set_reply(flow: flow_pb2.Flow, is_reply: bool | None) -> flow_pb2.Flow:
    """Set ``is_reply`` (None: unknown, as for drops) and the deprecated ``reply`` with it."""
    if is_reply is None:
        flow.ClearField("is_reply")
        flow.reply = False
    else:
        flow.is_reply.value = is_reply
        flow.reply = is_reply
    return flow


# --- summaries (the text compact output prints in parentheses) -----------------------------------

TCP_FLAG_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")


def tcp_flags(names: Iterable[str]) -> flow_pb2.TCPFlags:
    flags = TCPFlags()
    for name in names:
        setattr(flags, name.upper(), True)
    return flags


def tcp_flags_text(flags: flow_pb2.TCPFlags) -> str:
    return ", ".join(name for name in TCP_FLAG_ORDER if getattr(flags, name))


# ICMP type/code names as the packet decoder Hubble uses spells them.
_ICMPV4: dict[int, tuple[str, dict[int, str] | None]] = {
    0: ("EchoReply", None),
    3: ("DestinationUnreachable", {
        0: "Net", 1: "Host", 2: "Protocol", 3: "Port", 4: "FragmentationNeeded", 5: "SourceRoutingFailed",
        6: "NetUnknown", 7: "HostUnknown", 8: "SourceIsolated", 9: "NetAdminProhibited",
        10: "HostAdminProhibited", 11: "NetTOS", 12: "HostTOS", 13: "CommAdminProhibited",
        14: "HostPrecedence", 15: "PrecedenceCutoff"}),
    4: ("SourceQuench", None),
    5: ("Redirect", {0: "Net", 1: "Host", 2: "TOS+Net", 3: "TOS+Host"}),
    8: ("EchoRequest", None),
    9: ("RouterAdvertisement", None),
    10: ("RouterSolicitation", None),
    11: ("TimeExceeded", {0: "TTLExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    12: ("ParameterProblem", {0: "PointerIndicatesError", 1: "MissingOption", 2: "BadLength"}),
    13: ("TimestampRequest", None),
    14: ("TimestampReply", None),
    15: ("InfoRequest", None),
    16: ("InfoReply", None),
    17: ("AddressMaskRequest", None),
    18: ("AddressMaskReply", None),
}
_ICMPV6: dict[int, tuple[str, dict[int, str] | None]] = {
    1: ("DestinationUnreachable", {
        0: "NoRouteToDst", 1: "AdminProhibited", 2: "BeyondScopeOfSrc", 3: "AddressUnreachable",
        4: "PortUnreachable", 5: "SrcAddressFailedPolicy", 6: "RejectRouteToDst"}),
    2: ("PacketTooBig", None),
    3: ("TimeExceeded", {0: "HopLimitExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    4: ("ParameterProblem", {0: "ErroneousHeaderField", 1: "UnrecognizedNextHeader", 2: "UnrecognizedIPv6Option"}),
    128: ("EchoRequest", None),
    129: ("EchoReply", None),
    133: ("RouterSolicitation", None),
    134: ("RouterAdvertisement", None),
    135: ("NeighborSolicitation", None),
    136: ("NeighborAdvertisement", None),
    137: ("Redirect", None),
}


def _icmp_text(table: dict[int, tuple[str, dict[int, str] | None]], icmp_type: int, code: int) -> str:
    info = table.get(icmp_type)
    if info is None:
        return f"{icmp_type}({code})"
    name, codes = info
    if codes is None:
        return name if code == 0 else f"{name}(Code: {code})"
    return f"{name}({codes[code]})" if code in codes else f"{name}(Code: {code})"


def icmp_summary(version: int, icmp_type: int, code: int) -> str:
    """``ICMPv4 EchoRequest``, ``ICMPv4 DestinationUnreachable(Port)``, ``ICMPv6 EchoReply``."""
    if version == 6:
        return "ICMPv6 " + _icmp_text(_ICMPV6, icmp_type, code)
    return "ICMPv4 " + _icmp_text(_ICMPV4, icmp_type, code)


def l34_summary(flow: flow_pb2.Flow) -> str:
    """The summary of an L3/L4 packet: its TCP flags, or the name of its last decoded layer."""
    which = flow.l4.WhichOneof("protocol") if flow.HasField("l4") else None
    if which == "TCP":
        return "TCP Flags: " + tcp_flags_text(flow.l4.TCP.flags)
    if which == "ICMPv4":
        return icmp_summary(4, flow.l4.ICMPv4.type, flow.l4.ICMPv4.code)
    if which == "ICMPv6":
        return icmp_summary(6, flow.l4.ICMPv6.type, flow.l4.ICMPv6.code)
    if which is not None:
        return str(which)
    if flow.HasField("IP"):
        return "IPv6" if flow.IP.ipVersion == IPv6 else "IPv4"
    return "Ethernet"


def http_summary(flow: flow_pb2.Flow) -> str:
    """``HTTP/1.1 GET http://host/path``; responses: ``HTTP/1.1 200 5ms (GET http://host/path)``."""
    http = flow.l7.http
    request = f"{http.method} {http.url}"
    if flow.l7.type == REQUEST:
        return f"{http.protocol} {request}"
    if flow.l7.type == RESPONSE:
        return f"{http.protocol} {http.code} {flow.l7.latency_ns // 1_000_000}ms ({request})"
    return ""


DNS_TYPES: dict[int, str] = {
    1: "A", 2: "NS", 3: "MD", 4: "MF", 5: "CNAME", 6: "SOA", 7: "MB", 8: "MG", 9: "MR", 10: "NULL", 11: "WKS",
    12: "PTR", 13: "HINFO", 14: "MINFO", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV", 41: "OPT", 64: "SVCB",
    65: "HTTPS", 256: "URI",
}
DNS_RCODES: dict[int, str] = {
    0: "No Error", 1: "Format Error", 2: "Server Failure ", 3: "Non-Existent Domain", 4: "Not Implemented",
    5: "Query Refused", 6: "Name Exists when it should not", 7: "RR Set Exists when it should not",
    8: "RR Set that should exist does not", 9: "Server Not Authoritative for zone",
    10: "Name not contained in zone", 16: "Bad OPT Version", 17: "Key not recognized",
    18: "Signature out of time window", 19: "Bad TKEY Mode", 20: "Duplicate key name",
    21: "Algorithm not supported", 22: "Bad Truncation", 23: "Bad Cookie",
}


def dns_type_name(qtype: int) -> str:
    return DNS_TYPES.get(qtype, "Unknown")


def dns_rcode_name(rcode: int) -> str:
    return DNS_RCODES.get(rcode, "Unknown")


def _go_quote(text: str) -> str:
    """Go's %q for the printable ASCII texts DNS answers hold."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dns_summary(flow: flow_pb2.Flow) -> str:
    """``DNS Query cilium.io. A`` / ``DNS Answer "1.2.3.4" TTL: 30 (Proxy cilium.io. A)``."""
    dns = flow.l7.dns
    qtypes = ",".join(dns.qtypes)
    if flow.l7.type == REQUEST:
        return f"DNS Query {dns.query} {qtypes}"
    if flow.l7.type != RESPONSE:
        return ""
    if dns.rcode != 0:
        answer = f"RCode: {dns_rcode_name(dns.rcode)}"
    else:
        parts = []
        if dns.ips:
            parts.append(_go_quote(",".join(dns.ips)))
        if dns.cnames:
            parts.append("CNAMEs: " + _go_quote(",".join(dns.cnames)))
        answer = " ".join(parts)
    source = "Proxy" if dns.observation_source == "proxy" else "Query"
    return f"DNS Answer {answer} TTL: {dns.ttl} ({source} {dns.query} {qtypes})"


def fill_summary(flow: flow_pb2.Flow) -> flow_pb2.Flow:
    """Set ``Summary`` from the flow's contents unless the producer already set one."""
    if flow.Summary:
        return flow
    record = flow.l7.WhichOneof("record") if flow.HasField("l7") else None
    if record == "http":
        flow.Summary = http_summary(flow)
    elif record == "dns":
        flow.Summary = dns_summary(flow)
    else:
        flow.Summary = l34_summary(flow)
    return flow


def flow_protocol(flow: flow_pb2.Flow) -> str:
    """The protocol label of Hubble's metrics: "TCP", "UDP", "ICMPv4", "DNS", "HTTP", "Unknown L4", …"""
    kind = flow.event_type.type
    if kind == MSG_ACCESS_LOG:
        record = flow.l7.WhichOneof("record") if flow.HasField("l7") else None
        return {"dns": "DNS", "http": "HTTP", "kafka": "Kafka"}.get(record or "", "Unknown L7")
    if kind in (MSG_DROP, MSG_TRACE, MSG_POLICY_VERDICT, MSG_CAPTURE):
        which = flow.l4.WhichOneof("protocol") if flow.HasField("l4") else None
        return str(which) if which else "Unknown L4"
    return "Unknown flow"


def flow_response(flow: flow_pb2.Flow) -> observer_pb2.GetFlowsResponse:
    """The GetFlowsResponse carrying ``flow`` (node name and time copied up, as Hubble does)."""
    response = GetFlowsResponse(node_name=flow.node_name)
    response.flow.CopyFrom(flow)
    if flow.HasField("time"):
        response.time.CopyFrom(flow.time)
    return response
