"""Service names for flows: which frontend a connection went through (pure: no I/O, no clock).

Trace events are logged at priority 200 of the filter hooks, after DNAT, so their packet names the
backend. NFLOG could carry conntrack's original tuple (``NFULNL_CFG_F_CONNTRACK``), but not on a
kernel without CONFIG_NETFILTER_NETLINK_GLUE_CT, where the bind is refused (see
:mod:`membrane.testing.nflog_contract`). Instead the datapath logs a connection's first packet in
its frontend's chain, before DNAT (NAT chains see nothing else), and the observer pairs the two
events of that packet::

    svc_<id>  (nat, dstnat)       log "mb:x:T:0:31"   client:port → frontend   ┐ the same packet, one
    flow_*    (filter, prio 200)  log "mb:t:F:n:1"    client:port → backend    ┘ NFLOG group: in order

:class:`ServiceFlows` keeps the first as *pending* under (protocol, client address, client port);
the next new-connection trace or drop from that client socket to another address binds the
connection (client, backend) to the service. Every later event of the connection is named:

    original direction (client → backend)   destination_service
    reply (backend → client)                source_service   (as the client sees it, the reply
                                                              comes from the frontend: Hubble names
                                                              the side whose address is a service)

The translation event itself becomes Hubble's socket translation flow (``pre-xlate-fwd``, verdict
TRACED) whose destination is the frontend address and port. Events whose own address is a frontend
(a refused connection: SERVICE_BACKEND_NOT_FOUND) are named by address, as Hubble's parser does.
A node port frontend (address 0.0.0.0) matches a translation event by protocol and port.

The same client socket sending to two frontends at once (an unconnected UDP socket) could pair
wrongly; a lost NFLOG batch leaves its connections unnamed. Both tables are bounded: the oldest
entries go first.

Primitives: :class:`FrontendIndex`, :class:`ServiceFlows`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from membrane.datapath.flowcodes import EventKind, FlowCode, TraceReason, parse_prefix
from membrane.loadbalancer.model import ANY_ADDRESS, Frontend, ServiceRef
from membrane.observe.model import Flow
from membrane.observe.nflog import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, NflogRecord

_PROTOCOLS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP}

Connection = tuple[int, str, int, str, int]  # protocol, source, source port, destination, destination port


@dataclass(frozen=True)
class FrontendIndex:
    """This node's frontends, by (address, protocol number, port); node ports by (protocol, port)."""

    by_address: Mapping[tuple[str, int, int], ServiceRef] = field(default_factory=dict)
    nodeports: Mapping[tuple[int, int], ServiceRef] = field(default_factory=dict)

    @classmethod
    def build(cls, frontends: Iterable[Frontend]) -> FrontendIndex:
        by_address: dict[tuple[str, int, int], ServiceRef] = {}
        nodeports: dict[tuple[int, int], ServiceRef] = {}
        for frontend in frontends:
            addr = frontend.address
            proto = _PROTOCOLS[addr.protocol]
            if addr.address == ANY_ADDRESS:
                nodeports[(proto, addr.port)] = frontend.service
            else:
                by_address[(str(addr.address), proto, addr.port)] = frontend.service
        return cls(by_address, nodeports)

    def __bool__(self) -> bool:
        return bool(self.by_address or self.nodeports)

    def translated(self, address: str, proto: int, port: int) -> ServiceRef | None:
        """The service of a packet a frontend's chain logged: by address, else a node port."""
        return self.by_address.get((address, proto, port)) or self.nodeports.get((proto, port))


@dataclass(frozen=True, slots=True)
class _Pending:
    service: ServiceRef
    frontend: str
    port: int


def _set(message: object, ref: ServiceRef) -> None:
    message.namespace, message.name = ref  # type: ignore[attr-defined]


class ServiceFlows:
    """Names the service of flows (``source_service`` / ``destination_service``); see the module doc."""

    def __init__(self, index: FrontendIndex | None = None, *, max_connections: int = 65536,
                 max_pending: int = 4096) -> None:
        self.index = index or FrontendIndex()
        self.max_connections = max_connections
        self.max_pending = max_pending
        self._pending: dict[tuple[int, str, int], _Pending] = {}
        self._connections: dict[Connection, ServiceRef] = {}

    def __len__(self) -> int:
        """How many connections are known to go through a frontend."""
        return len(self._connections)

    def annotate(self, record: NflogRecord, flow: Flow, code: FlowCode | None = None) -> None:
        """Fill the flow's service fields from ``record`` (the event ``flow`` was enriched from)."""
        packet = record.packet
        if packet is None or not (self.index or self._connections):
            return  # no frontends on this node: nothing to name (the common fast path)
        if code is None:
            code = parse_prefix(record.prefix)
            if code is None:
                return
        proto, src, sport, dst, dport = (packet.protocol, packet.source, packet.source_port, packet.destination,
                                         packet.destination_port)
        if code.kind is EventKind.TRANSLATION:
            service = self.index.translated(dst, proto, dport)
            if service is not None:
                waiting = self._pending
                waiting.pop((proto, src, sport), None)
                waiting[(proto, src, sport)] = _Pending(service, dst, dport)
                if len(waiting) > self.max_pending:
                    del waiting[next(iter(waiting))]
                _set(flow.destination_service, service)
            return
        key = (proto, src, sport, dst, dport)
        connections = self._connections
        if code.kind is EventKind.DROP or code.reason is TraceReason.NEW:
            pending = self._pending.pop((proto, src, sport), None) if self._pending else None
            if pending is not None and (pending.frontend, pending.port) != (dst, dport):
                connections.pop(key, None)
                connections[key] = pending.service
                if len(connections) > self.max_connections:
                    del connections[next(iter(connections))]
            elif code.reason is TraceReason.NEW:
                connections.pop(key, None)  # a new connection that reused the tuple, not through a frontend
        if connections:
            service = connections.get(key)
            if service is not None:
                _set(flow.destination_service, service)
                return
            service = connections.get((proto, dst, dport, src, sport))
            if service is not None:
                _set(flow.source_service, service)
                return
        by_address = self.index.by_address
        if by_address:
            service = by_address.get((dst, proto, dport))
            if service is not None:
                _set(flow.destination_service, service)
            service = by_address.get((src, proto, sport))
            if service is not None:
                _set(flow.source_service, service)
