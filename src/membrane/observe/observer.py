"""The local observer: Hubble's GetFlows, ServerStatus, GetNodes and GetNamespaces over one ring.

GetFlows picks a start position, then reads forward::

    first N         from the oldest flow; stop after N matches
    last N          rewind from the newest until N flows match, then read forward to the end
    since/until     rewind to the first flow at or after ``since``; stop at the first after ``until``
    follow          after the buffered part, wait for new flows (number 0: new flows only)

Lost-events notices are passed through unfiltered and never count towards N. These are plain
async generators and functions over :class:`~membrane.observe.ring.Ring`, so the gRPC server
(and the relay) only adapt them. :class:`FlowPublisher` is the one entry point producers use: it
fans a flow out to the ring, the namespace tracker, the metrics and the exporters.

Primitives: :func:`get_flows`, :func:`start_position`, :func:`server_status`, :func:`flows_rate`,
:func:`node_info`, :class:`NamespaceTracker`, :func:`ring_namespaces`, :class:`FlowPublisher`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Protocol

from google.protobuf import field_mask_pb2

from membrane.core.errors import InvalidInput
from membrane.observe.filters import FlowMatcher
from membrane.observe.model import (
    NODE_CONNECTED,
    Flow,
    GetFlowsRequest,
    GetFlowsResponse,
    LostEventSourceEnum,
    Namespace,
    Node,
    ServerStatusResponse,
    fill_summary,
    flow_response,
    timestamp_ns,
)
from membrane.observe.ring import Ring, RingEvent

NS = 1_000_000_000
OBSERVER_SERVICE = "observer.Observer"


def server_version() -> str:
    try:
        return metadata.version("membrane")
    except metadata.PackageNotFoundError:
        return "0.0.0"



@dataclass(frozen=True)
class FlowsPlan:
    """A validated GetFlowsRequest: where to start reading and when to stop."""

    start: int
    matcher: FlowMatcher
    number: int
    follow: bool
    since_ns: int | None
    until_ns: int | None
    mask: field_mask_pb2.FieldMask | None


def start_position(ring: Ring, matcher: FlowMatcher, *, number: int, first: bool, follow: bool,
                   since_ns: int | None) -> int:
    """Where a GetFlows read begins (see the module docstring)."""
    if first and since_ns is None:
        return ring.oldest
    if follow and number == 0 and since_ns is None:
        return ring.written
    matched = 0
    for position in range(ring.written - 1, ring.oldest - 1, -1):
        event = ring.get(position)
        if event.flow is None or not matcher(event.flow):
            continue
        matched += 1
        if since_ns is not None:
            if event.time_ns < since_ns:
                return position + 1
        elif matched == number:
            return position
    return ring.oldest


def plan_flows(ring: Ring, request: GetFlowsRequest, now_ns: int) -> FlowsPlan:
    """Validate ``request`` against ``ring``; InvalidInput names what is wrong."""
    if request.first and request.follow:
        raise InvalidInput(["first cannot be specified with follow"])
    matcher = FlowMatcher.build(request.whitelist, request.blacklist)
    since_ns = timestamp_ns(request.since) if request.HasField("since") else None
    until_ns = timestamp_ns(request.until) if request.HasField("until") else None
    if since_ns is not None and until_ns is None and not request.follow:
        until_ns = now_ns  # a window that starts in the past ends now
    mask = None
    if request.HasField("field_mask") and request.field_mask.paths:
        mask = request.field_mask
        if not mask.IsValidForDescriptor(Flow.DESCRIPTOR):
            raise InvalidInput([f"invalid field mask: {', '.join(mask.paths)}"])
    start = start_position(ring, matcher, number=request.number, first=request.first, follow=request.follow,
                           since_ns=since_ns)
    return FlowsPlan(start, matcher, request.number, request.follow, since_ns, until_ns, mask)


def _lost_response(event: RingEvent, node_name: str) -> GetFlowsResponse:
    response = GetFlowsResponse(node_name=node_name)
    response.lost_events.CopyFrom(event.lost)
    seconds, nanos = divmod(event.time_ns, NS)
    response.time.seconds, response.time.nanos = seconds, nanos
    return response


def _masked(flow: Flow, mask: field_mask_pb2.FieldMask | None) -> Flow:
    if mask is None:
        return flow
    copy = Flow()
    mask.MergeMessage(flow, copy)
    return copy


async def get_flows(ring: Ring, request: GetFlowsRequest, *, node_name: str,
                    now_ns: int | None = None) -> AsyncIterator[GetFlowsResponse]:
    """GetFlows over the ring. Raises InvalidInput before the first response for a bad request."""
    plan = plan_flows(ring, request, ring.now_ns() if now_ns is None else now_ns)
    reader = ring.reader(plan.start)
    sent = 0
    while True:
        if plan.follow:
            event: RingEvent | None = await reader.next_follow()
        else:
            if plan.number and sent >= plan.number:
                return
            event = reader.next()
        if event is None:
            return
        if event.lost is not None:
            yield _lost_response(event, node_name)
            continue
        assert event.flow is not None
        if plan.until_ns is not None and event.time_ns > plan.until_ns:
            return
        if plan.since_ns is not None and event.time_ns < plan.since_ns:
            continue
        if not plan.matcher(event.flow):
            continue
        sent += 1
        yield flow_response(_masked(event.flow, plan.mask))


def flows_rate(ring: Ring, now_ns: int) -> float:
    """Flows per second over the last minute (over the buffered span when the ring holds less)."""
    since = now_ns - 60 * NS
    count = 0
    last_seen: int | None = None
    for position in range(ring.written - 1, ring.oldest - 1, -1):
        event = ring.get(position)
        if event.flow is None:
            continue
        if event.time_ns < since:
            break
        last_seen = event.time_ns
        count += 1
    else:
        if ring.oldest > 0 and last_seen is not None:
            since = last_seen  # the minute reaches past what the ring still holds
    elapsed = (now_ns - since) / NS
    return count / elapsed if elapsed > 0 else 0.0


def server_status(ring: Ring, *, started_ns: int, now_ns: int, version: str) -> ServerStatusResponse:
    return ServerStatusResponse(num_flows=len(ring), max_flows=ring.capacity, seen_flows=ring.seen_flows,
                                uptime_ns=max(0, now_ns - started_ns), version=version,
                                flows_rate=flows_rate(ring, now_ns))


def node_info(ring: Ring, *, name: str, address: str, started_ns: int, now_ns: int, version: str) -> Node:
    """This agent as GetNodes describes a node (a relay lists every node the same way)."""
    node = Node(name=name, version=version, address=address, state=NODE_CONNECTED,
                uptime_ns=max(0, now_ns - started_ns), num_flows=len(ring), max_flows=ring.capacity,
                seen_flows=ring.seen_flows)
    node.tls.enabled = False
    return node


NAMESPACE_TTL_NS = 3600 * NS


class NamespaceTracker:
    """Namespaces seen in flows, kept for an hour after their last flow (what GetNamespaces lists)."""

    def __init__(self, cluster_name: str = "default", *, ttl_ns: int = NAMESPACE_TTL_NS,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.cluster_name = cluster_name
        self.ttl_ns = ttl_ns
        self._clock = clock
        self._seen: dict[tuple[str, str], int] = {}

    def observe(self, flow: Flow) -> None:
        now = self._clock()
        for endpoint in (flow.source, flow.destination):
            if endpoint.namespace:
                self._seen[(endpoint.cluster_name or self.cluster_name, endpoint.namespace)] = now

    def namespaces(self) -> list[Namespace]:
        cutoff = self._clock() - self.ttl_ns
        self._seen = {key: seen for key, seen in self._seen.items() if seen >= cutoff}
        return [Namespace(cluster=cluster, namespace=namespace) for cluster, namespace in sorted(self._seen)]


def ring_namespaces(ring: Ring, cluster_name: str = "default") -> list[Namespace]:
    """Namespaces of the flows of the last hour still in the ring (when no tracker is wired)."""
    cutoff = ring.now_ns() - NAMESPACE_TTL_NS
    found: set[tuple[str, str]] = set()
    for position in range(ring.oldest, ring.written):
        event = ring.get(position)
        if event.flow is None or event.time_ns < cutoff:
            continue
        for endpoint in (event.flow.source, event.flow.destination):
            if endpoint.namespace:
                found.add((endpoint.cluster_name or cluster_name, endpoint.namespace))
    return [Namespace(cluster=cluster, namespace=namespace) for cluster, namespace in sorted(found)]


class FlowSink(Protocol):
    def observe(self, flow: Flow) -> None: ...


class FlowPublisher:
    """Where producers hand flows over: the ring, then every sink (namespaces, metrics, exporters).

    Flows get the node's name if they carry none and a Summary if the producer left it empty.
    Must be called on the ring's event loop.
    """

    def __init__(self, ring: Ring, *, node_name: str = "", sinks: Sequence[FlowSink] = (),
                 on_lost: Callable[[int, int], None] | None = None) -> None:
        self.ring = ring
        self.node_name = node_name
        self.sinks = list(sinks)
        if on_lost is not None:
            ring.on_lost = on_lost

    def publish(self, flow: Flow) -> None:
        if self.node_name and not flow.node_name:
            flow.node_name = self.node_name
        fill_summary(flow)
        self.ring.write(flow)
        for sink in self.sinks:
            sink.observe(flow)

    def publish_lost(self, source: LostEventSourceEnum | int, count: int, *, cpu: int | None = None) -> None:
        """Events lost before they became flows (PERF_EVENT_RING_BUFFER, OBSERVER_EVENTS_QUEUE)."""
        self.ring.write_lost(source, count, cpu=cpu)
