"""Enrichment, pure: an NFLOG record + what the agent knows → a Hubble ``flow.Flow``.

The record says what the kernel saw (addresses, ports, flags, interfaces, hook) and, through its
log prefix (:mod:`membrane.datapath.flowcodes`), why it was logged. :class:`EnrichmentState` is the
agent's knowledge at that moment, rebuilt whenever endpoints or nodes change:

- local endpoints by host veth index (endpoint ID, pod, namespace, labels, identity);
- the ipcache: every pod address of the cluster (from the store's endpoint records), node
  addresses and router IPs (``host`` for this node, ``remote-node`` for the others), and
  ``world`` for anything else.

Where a packet was seen decides the observation point and the direction (Hubble's rule: the event
belongs to one local endpoint; EGRESS when that endpoint sent the packet, flipped for replies)::

    event     seen at → leaving through        point            event endpoint
    trace     forward/output → a pod's veth    to-endpoint      destination
    trace     forward → the tunnel             to-overlay       source
    trace     forward → anything else          to-stack         source
    trace     input (to this node)             to-host          source
    translation  a frontend's NAT chain        pre-xlate-fwd    none (Hubble's socket LB event:
                                                                 the frontend, before DNAT)
    drop      any hook                         (drop reason)    the side the rule names (``:e`` or
    verdict   any hook                         policy-verdict   ``:i``), else the pod whose veth
                                                                the packet came in through

A packet that came in through a local pod's veth is attributed to that pod even when its source
address says otherwise (a spoofed packet names its real sender).

Which policy decided (``egress_allowed_by``, ``ingress_allowed_by``, ``egress_denied_by``,
``ingress_denied_by``) is asked of a :class:`PolicyLookup`, a narrow callable the agent backs with
its compiled policy, for the sides that are this node's endpoints::

    flow                                   side(s) asked                     filled when the answer is
    trace FORWARDED, original direction    egress at a local source,         allow → *_allowed_by
                                           ingress at a local destination
    policy drop (133, 181) / verdict       the side the code names           deny → *_denied_by

Replies are not attributed (conntrack lets them through, not a rule). A default-deny drop has no
deciding rule: it stays DROPPED with reason ``Policy denied`` and no ``*_denied_by``.

Primitives: :class:`EndpointInfo`, :class:`NodeAddress`, :class:`EnrichmentState`,
:class:`PolicyRef`, :class:`PolicyDecision`, :class:`PolicyLookup`, :func:`enrich` and
:class:`FlowIds` (cheap unique flow UUIDs).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

from membrane.datapath.flowcodes import (
    CodeVerdict,
    Direction,
    DropReason,
    EventKind,
    FlowCode,
    TraceReason,
    parse_prefix,
)
from membrane.identity.reserved import HOST, REMOTE_NODE, WORLD
from membrane.observe.model import (
    AUDIT,
    DROPPED,
    EGRESS,
    FORWARDED,
    INGRESS,
    REDIRECTED,
    TRAFFIC_DIRECTION_UNKNOWN,
    Endpoint,
    Flow,
    IPv4,
    IPv6,
    fill_summary,
    mark_drop,
    mark_policy_verdict,
    mark_trace,
    mark_translation,
    set_reply,
)
from membrane.observe.nflog import (
    HOOK_INPUT,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_CWR,
    TCP_ECE,
    TCP_FIN,
    TCP_NS,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    NflogRecord,
)
from membrane.observe.pb.flow import flow_pb2

WORKLOAD_KIND = "Pod"  # bare pods are their own workload
MAX_TEMPLATES = 16384  # static flow parts cached per state (endpoint pairs x event kinds)


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One side of a flow as the ipcache knows it. ``endpoint_id``, ``ifindex`` and ``ifname`` are
    set for this node's endpoints only (endpoint IDs are node-local, as in Cilium)."""

    ip: str
    identity: int
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    endpoint_id: int = 0
    node: str = ""
    ifindex: int = 0
    ifname: str = ""


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A node's addresses that flows may show: its underlay IP and its router IP."""

    name: str
    node_ip: str
    router_ip: str = ""


@dataclass(frozen=True, slots=True)
class PolicyRef:
    """One policy that decided a flow, as Hubble's ``flow.Policy`` shows it."""

    name: str
    namespace: str
    kind: str
    labels: tuple[str, ...] = ()
    revision: int = 0


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """What an endpoint's policy says about a packet: ``allow`` or ``deny`` and the deciding
    policies (empty when only a default applies)."""

    verdict: Literal["allow", "deny"]
    policies: tuple[PolicyRef, ...] = ()


class PolicyLookup(Protocol):
    """The deciding policies for a packet at one of this node's endpoints: ``direction`` is the
    endpoint's side, ``remote_*`` the other end, ``port`` the destination port (ICMP: the type).
    None: no policy entry covers the packet."""

    def __call__(self, endpoint: EndpointInfo, direction: Direction, remote_identity: int, remote_ip: str,
                  proto: int, port: int) -> PolicyDecision | None: ...


WORLD_INFO = EndpointInfo(ip="", identity=WORLD.id, labels=("reserved:world",))


def _endpoint_message(info: EndpointInfo, cluster_name: str) -> flow_pb2.Endpoint:
    message = Endpoint(ID=info.endpoint_id, identity=info.identity, namespace=info.namespace,
                       labels=list(info.labels), pod_name=info.pod_name)
    if info.pod_name:
        message.cluster_name = cluster_name
        message.workloads.add(name=info.pod_name, kind=WORKLOAD_KIND)
    return message


@dataclass(frozen=True)
class EnrichmentState:
    """What the agent knows, indexed for one dict lookup per flow side. Build with :meth:`build`."""

    node_name: str
    cluster_name: str = "default"
    local_by_ifindex: Mapping[int, EndpointInfo] = field(default_factory=dict)
    by_ip: Mapping[str, EndpointInfo] = field(default_factory=dict)
    tunnel_ifindex: int = 0
    # Pre-built Endpoint messages, by the identity of the info they were built from (the state
    # holds every info, so ids stay valid): copying one is much cheaper than filling fields.
    _messages: dict[int, flow_pb2.Endpoint] = field(default_factory=dict, repr=False, compare=False)
    _templates: dict[tuple[object, ...], flow_pb2.Flow] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, node_name: str, endpoints: Iterable[EndpointInfo], nodes: Iterable[NodeAddress] = (), *,
              cluster_name: str = "default", tunnel_ifindex: int = 0) -> EnrichmentState:
        by_ip: dict[str, EndpointInfo] = {}
        for node in nodes:
            reserved = HOST if node.name == node_name else REMOTE_NODE
            for ip in (node.node_ip, node.router_ip):
                if ip:
                    by_ip[ip] = EndpointInfo(ip=ip, identity=reserved.id, labels=(f"reserved:{reserved.name}",),
                                             node=node.name)
        local: dict[int, EndpointInfo] = {}
        for info in endpoints:
            by_ip[info.ip] = info  # a pod address is more specific than anything a node claims
            if info.node == node_name and info.ifindex:
                local[info.ifindex] = info
        return cls(node_name, cluster_name, local, by_ip, tunnel_ifindex)

    @property
    def node_label(self) -> str:
        """The flow's ``node_name``: ``cluster/node`` outside the default cluster, as Hubble does."""
        return self.node_name if self.cluster_name == "default" else f"{self.cluster_name}/{self.node_name}"

    def lookup(self, ip: str) -> EndpointInfo:
        """The ipcache entry for ``ip``; the shared world entry for addresses nobody claims."""
        return self.by_ip.get(ip, WORLD_INFO)

    def owns(self, info: EndpointInfo) -> bool:
        """Whether ``info`` is one this state keeps alive (so its ``id`` can key a cache)."""
        return info is WORLD_INFO or self.by_ip.get(info.ip) is info or self.local_by_ifindex.get(info.ifindex) is info

    def message(self, info: EndpointInfo) -> flow_pb2.Endpoint:
        message = self._messages.get(id(info))
        if message is None:
            message = _endpoint_message(info, self.cluster_name)
            if self.owns(info):
                self._messages[id(info)] = message
        return message


class FlowIds:
    """Unique flow UUIDs without a random draw per flow: a random per-process UUID whose last 48
    bits count up (still a well-formed version 4 UUID string)."""

    def __init__(self) -> None:
        self._prefix = str(uuid.uuid4())[:24]
        self._counter = itertools.count(int.from_bytes(uuid.uuid4().bytes[:6], "big"))

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


_VERDICTS = {
    CodeVerdict.FORWARDED: FORWARDED,
    CodeVerdict.DROPPED: DROPPED,
    CodeVerdict.AUDIT: AUDIT,
    CodeVerdict.REDIRECTED: REDIRECTED,
    CodeVerdict.TRACED: flow_pb2.TRACED,
}
_TRACE_REASONS = {
    TraceReason.NEW: flow_pb2.NEW,
    TraceReason.ESTABLISHED: flow_pb2.ESTABLISHED,
    TraceReason.REPLY: flow_pb2.REPLY,
}
_TCP_FLAGS = (
    (TCP_FIN, "FIN"), (TCP_SYN, "SYN"), (TCP_RST, "RST"), (TCP_PSH, "PSH"), (TCP_ACK, "ACK"),
    (TCP_URG, "URG"), (TCP_ECE, "ECE"), (TCP_CWR, "CWR"), (TCP_NS, "NS"),
)


_FLAGS: dict[int, flow_pb2.TCPFlags] = {}
_SUMMARIES: dict[tuple[int, int, int, int, int], str] = {}


def _tcp_flags(bits: int) -> flow_pb2.TCPFlags:
    """The TCPFlags message for a flags byte, built once per distinct value (9 bits: 512 at most)."""
    flags = _FLAGS.get(bits)
    if flags is None:
        flags = flow_pb2.TCPFlags(**{name: True for bit, name in _TCP_FLAGS if bits & bit})
        _FLAGS[bits] = flags
    return flags


def _set_l4(flow: flow_pb2.Flow, record: NflogRecord) -> None:
    packet = record.packet
    assert packet is not None
    proto = packet.protocol
    if proto == IPPROTO_TCP:
        tcp = flow.l4.TCP
        tcp.source_port = packet.source_port
        tcp.destination_port = packet.destination_port
        tcp.flags.CopyFrom(_tcp_flags(packet.tcp_flags))
    elif proto == IPPROTO_UDP:
        flow.l4.UDP.source_port = packet.source_port
        flow.l4.UDP.destination_port = packet.destination_port
    elif proto == IPPROTO_SCTP:
        flow.l4.SCTP.source_port = packet.source_port
        flow.l4.SCTP.destination_port = packet.destination_port
    elif proto == IPPROTO_ICMP:
        flow.l4.ICMPv4.type = packet.icmp_type
        flow.l4.ICMPv4.code = packet.icmp_code
    elif proto == IPPROTO_ICMPV6:
        flow.l4.ICMPv6.type = packet.icmp_type
        flow.l4.ICMPv6.code = packet.icmp_code


def _direction(event_endpoint_is_source: bool | None, is_reply: bool | None) -> flow_pb2.TrafficDirection:
    if event_endpoint_is_source is None:
        return TRAFFIC_DIRECTION_UNKNOWN
    return EGRESS if event_endpoint_is_source != bool(is_reply) else INGRESS


def _static_part(record: NflogRecord, code: FlowCode, state: EnrichmentState, source: EndpointInfo,
                 destination: EndpointInfo, local_in: EndpointInfo | None, local_out: EndpointInfo | None) -> Flow:
    """Everything of a flow that does not change from one packet to the next of the same kind
    between the same two endpoints: endpoints, event type, verdict, direction, interface."""
    flow = Flow(node_name=state.node_label)
    flow.IP.ipVersion = IPv6 if record.packet is not None and record.packet.ip_version == 6 else IPv4
    flow.source.CopyFrom(state.message(source))
    flow.destination.CopyFrom(state.message(destination))
    is_reply = code.is_reply
    event_is_source: bool | None
    interface: EndpointInfo | None
    if code.kind is EventKind.TRACE:
        if record.hook == HOOK_INPUT:
            point, event_is_source, interface = "to-host", True, None
        elif local_out is not None:
            point, event_is_source, interface = "to-endpoint", False, local_out
        else:
            tunnel = state.tunnel_ifindex and record.out_ifindex == state.tunnel_ifindex
            point, event_is_source, interface = ("to-overlay" if tunnel else "to-stack"), True, None
            if local_in is None:
                event_is_source = None  # neither side is ours: no direction to speak of
        mark_trace(flow, point, verdict=_VERDICTS[code.verdict], reason=_TRACE_REASONS[cast(TraceReason, code.reason)])
    elif code.kind is EventKind.TRANSLATION:
        # Hubble's socket translation event: no direction, no reply flag, no interface.
        mark_translation(flow)
        event_is_source, interface, is_reply = None, None, None
    else:
        # Drops and policy verdicts happen at one endpoint: the side the rule names, else the pod
        # the packet came from through its veth, else the one it was going to.
        if code.direction is Direction.EGRESS:
            interface, event_is_source = local_in, True
        elif code.direction is Direction.INGRESS:
            interface, event_is_source = local_out, False
        else:
            interface = local_in or local_out
            event_is_source = None if interface is None else interface is local_in
        if code.kind is EventKind.POLICY_VERDICT:
            verdict = _VERDICTS[code.verdict]
            mark_policy_verdict(flow, verdict=verdict, direction=_direction(event_is_source, False), match_type=0,
                                drop_reason=code.drop_reason if verdict == DROPPED else 0)
            is_reply = False  # a verdict is taken on a connection's first packet
        else:
            mark_drop(flow, code.drop_reason)
            flow.verdict = _VERDICTS[code.verdict]
    flow.traffic_direction = _direction(event_is_source, is_reply)
    set_reply(flow, is_reply)
    if interface is not None and interface.ifname:
        flow.interface.index = interface.ifindex
        flow.interface.name = interface.ifname
    return flow


_POLICY_MESSAGES: dict[PolicyRef, flow_pb2.Policy] = {}
_POLICY_DROPS = (DropReason.POLICY_DENIED, DropReason.POLICY_DENY)


def _policy_message(ref: PolicyRef) -> flow_pb2.Policy:
    message = _POLICY_MESSAGES.get(ref)
    if message is None:
        message = flow_pb2.Policy(name=ref.name, namespace=ref.namespace, labels=list(ref.labels),
                                  revision=ref.revision, kind=ref.kind)
        if len(_POLICY_MESSAGES) >= 4096:  # bounded: revisions grow with every policy change
            _POLICY_MESSAGES.clear()
        _POLICY_MESSAGES[ref] = message
    return message


def _attribute(flow: Flow, record: NflogRecord, code: FlowCode, lookup: PolicyLookup,
               source: EndpointInfo, destination: EndpointInfo,
               local_in: EndpointInfo | None, local_out: EndpointInfo | None) -> None:
    """Fill ``*_allowed_by`` / ``*_denied_by`` for the local sides the event speaks for."""
    packet = record.packet
    assert packet is not None
    if code.kind is EventKind.TRACE:
        if code.is_reply or code.verdict is not CodeVerdict.FORWARDED:
            return
        sides = [(Direction.EGRESS, local_in), (Direction.INGRESS, local_out)]
        wanted = "allow"
    else:
        wanted = "deny"
        if code.drop_reason not in _POLICY_DROPS:
            return  # spoofing, IPv6 …: the datapath decided, not a policy
        if code.direction is Direction.EGRESS:
            sides = [(Direction.EGRESS, local_in)]
        elif code.direction is Direction.INGRESS:
            sides = [(Direction.INGRESS, local_out)]
        else:
            return
    proto = packet.protocol
    port = packet.icmp_type if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) else packet.destination_port
    for direction, endpoint in sides:
        if endpoint is None:
            continue
        remote = destination if direction is Direction.EGRESS else source
        remote_ip = packet.destination if direction is Direction.EGRESS else packet.source
        decision = lookup(endpoint, direction, remote.identity, remote_ip, proto, port)
        if decision is None or decision.verdict != wanted or not decision.policies:
            continue
        if wanted == "allow":
            target = flow.egress_allowed_by if direction is Direction.EGRESS else flow.ingress_allowed_by
        else:
            target = flow.egress_denied_by if direction is Direction.EGRESS else flow.ingress_denied_by
        target.extend(_policy_message(ref) for ref in decision.policies)


def _as_translation(flow: Flow) -> None:
    """What Hubble's socket translation events carry of L4: ports, no flags; summary the protocol."""
    which = flow.l4.WhichOneof("protocol")
    if which == "TCP":
        flow.l4.TCP.ClearField("flags")
    flow.Summary = which if which in ("TCP", "UDP") else "Unknown"


def enrich(record: NflogRecord, state: EnrichmentState, *, flow_id: str = "",
           code: FlowCode | None = None, policy: PolicyLookup | None = None) -> Flow | None:
    """The flow for ``record``; None when the record is not one of ours (a foreign prefix) or
    carries no IP header. With ``policy``, the policies that allowed or denied it are filled in.
    Raises :class:`~membrane.datapath.flowcodes.FlowCodeError` for a malformed
    prefix of ours.

    The per-packet work is a copy of a cached static part (see :func:`_static_part`) plus time,
    addresses, ports, flags and summary: about half the cost of filling every field.
    """
    if code is None:
        code = parse_prefix(record.prefix)
    packet = record.packet
    if code is None or packet is None:
        return None
    local_in = state.local_by_ifindex.get(record.in_ifindex) if record.in_ifindex else None
    local_out = state.local_by_ifindex.get(record.out_ifindex) if record.out_ifindex else None
    source = local_in if local_in is not None else state.lookup(packet.source)
    destination = local_out if local_out is not None else state.lookup(packet.destination)
    tunnel = bool(state.tunnel_ifindex) and record.out_ifindex == state.tunnel_ifindex
    key = (code, record.hook, id(source), id(destination), local_in is not None, local_out is not None, tunnel,
           packet.ip_version)
    templates = state._templates
    template = templates.get(key)
    if template is None:
        template = _static_part(record, code, state, source, destination, local_in, local_out)
        if state.owns(source) and state.owns(destination):  # ids of infos the state keeps alive
            if len(templates) >= MAX_TEMPLATES:
                templates.clear()
            templates[key] = template
    flow = Flow()
    flow.CopyFrom(template)
    flow.uuid = flow_id
    seconds, nanos = divmod(record.time_ns, 1_000_000_000)
    stamp = flow.time
    stamp.seconds, stamp.nanos = seconds, nanos
    ip = flow.IP
    ip.source = packet.source
    ip.destination = packet.destination
    _set_l4(flow, record)
    # The summary depends on the L3/L4 headers alone: computed once per distinct header shape.
    summary_key = (packet.protocol, packet.tcp_flags, packet.icmp_type, packet.icmp_code, packet.ip_version)
    summary = _SUMMARIES.get(summary_key)
    if summary is None:
        summary = fill_summary(flow).Summary
        if len(_SUMMARIES) < 4096:
            _SUMMARIES[summary_key] = summary
    flow.Summary = summary
    if code.kind is EventKind.TRANSLATION:
        _as_translation(flow)
    if policy is not None and (local_in is not None or local_out is not None):
        _attribute(flow, record, code, policy, source, destination, local_in, local_out)
    return flow
