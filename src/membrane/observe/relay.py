"""The relay: one Observer API for the whole cluster, over every node's observer.

    store: ciliumnodes ──reflector──► peers {node: address}      (status.observer: socket, address)
    GetFlows ─► probe every peer (ServerStatus) ─► node_status: NODE_CONNECTED [..], NODE_UNAVAILABLE [..]
             ─► the same request to each connected peer (``number`` applies per node, as in Hubble)
             ─► merged by time:  finite request → exact k-way merge of the (time-ordered) streams
                                 follow         → bounded-delay merge: a flow is held until it is
                                                  ``delay`` old (or the buffer is full), so flows
                                                  from nodes that report a little late still sort
             ─► a peer failing mid-stream: a NODE_ERROR node_status, the others go on
    ServerStatus / GetNodes / GetNamespaces ─► every peer, aggregated (sums, connected/unavailable)

Peers are found through the store, so a relay needs nothing but the store URL. The agent's unix
socket is preferred when it exists on this host (labs, single hosts); otherwise its TCP address.

Primitives: :func:`peer_target`, :func:`peers_from_nodes`, :func:`merge_by_time`,
:func:`merge_follow`, :func:`node_status_response`, :func:`aggregate_status`, :class:`Relay`,
:class:`RelayServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from membrane.core.errors import InvalidInput, MembraneError
from membrane.observe.client import ObserverClient
from membrane.observe.model import (
    NODE_CONNECTED,
    NODE_ERROR,
    NODE_UNAVAILABLE,
    GetFlowsRequest,
    GetFlowsResponse,
    GetNamespacesResponse,
    GetNodesResponse,
    Namespace,
    Node,
    ServerStatusResponse,
)
from membrane.observe.observer import OBSERVER_SERVICE, server_version
from membrane.observe.pb.health import health_pb2
from membrane.observe.pb.observer import observer_pb2
from membrane.observe.server import HEALTH_CHECKED_NAME, HEALTH_SERVICE
from membrane.store import keys
from membrane.store.base import KeyValue, Store
from membrane.store.reflector import Reflector

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:4245"
NODES = keys.objects_prefix("ciliumnodes")
NS = 1_000_000_000
DEFAULT_DELAY_NS = NS // 2
DEFAULT_MAX_BUFFER = 1024
PROBE_TIMEOUT = 3.0


# -- peers --------------------------------------------------------------------------------------------
def peer_target(observer: Mapping[str, Any], exists: Callable[[str], bool] = os.path.exists) -> str | None:
    """How to reach an agent's observer from here: its unix socket if this host has it, else its
    TCP address, else None (the node advertises no observer)."""
    path = observer.get("socket")
    if isinstance(path, str) and path and exists(path):
        return path
    address = observer.get("address")
    return address if isinstance(address, str) and address else None


def peers_from_nodes(nodes: Iterable[KeyValue],
                     exists: Callable[[str], bool] = os.path.exists) -> dict[str, str | None]:
    """Node name → observer target for every CiliumNode (None: it advertises no reachable observer)."""
    peers: dict[str, str | None] = {}
    for kv in nodes:
        try:
            obj = json.loads(kv.value)
        except ValueError:
            continue
        name = (obj.get("metadata") or {}).get("name")
        if name:
            observer = (obj.get("status") or {}).get("observer") or {}
            peers[name] = peer_target(observer, exists) if isinstance(observer, dict) else None
    return peers


# -- merging ------------------------------------------------------------------------------------------
def response_time_ns(response: GetFlowsResponse) -> int:
    if response.HasField("time"):
        return int(response.time.seconds) * NS + int(response.time.nanos)
    if response.HasField("flow") and response.flow.HasField("time"):
        return int(response.flow.time.seconds) * NS + int(response.flow.time.nanos)
    return 0


def node_status_response(state: int, names: Sequence[str], *, relay_name: str, message: str = "",
                         time_ns: int | None = None) -> GetFlowsResponse:
    response = GetFlowsResponse(node_name=relay_name)
    response.node_status.state_change = state  # type: ignore[assignment]
    response.node_status.node_names.extend(sorted(names))
    if message:
        response.node_status.message = message
    seconds, nanos = divmod(time.time_ns() if time_ns is None else time_ns, NS)
    response.time.seconds, response.time.nanos = seconds, nanos
    return response


class StreamError:
    """A peer's stream failed (not a bad request: those end the whole call)."""

    __slots__ = ("error", "name")

    def __init__(self, name: str, error: BaseException) -> None:
        self.name = name
        self.error = error


Streams = Mapping[str, AsyncIterator[GetFlowsResponse]]
ErrorReport = Callable[[str, BaseException], GetFlowsResponse]


async def _advance(name: str, stream: AsyncIterator[GetFlowsResponse]) -> GetFlowsResponse | StreamError | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except InvalidInput:
        raise
    except (MembraneError, OSError, grpc.RpcError) as exc:
        return StreamError(name, exc)


async def merge_by_time(streams: Streams, on_error: ErrorReport) -> AsyncIterator[GetFlowsResponse]:
    """K-way merge of time-ordered streams (what a finite GetFlows returns per node)."""
    order = itertools.count()
    heap: list[tuple[int, int, str, GetFlowsResponse]] = []
    names = list(streams)
    heads = await asyncio.gather(*(_advance(n, streams[n]) for n in names))
    for name, head in zip(names, heads, strict=True):
        if isinstance(head, StreamError):
            yield on_error(name, head.error)
        elif head is not None:
            heapq.heappush(heap, (response_time_ns(head), next(order), name, head))
    while heap:
        _, _, name, response = heapq.heappop(heap)
        yield response
        following = await _advance(name, streams[name])
        if isinstance(following, StreamError):
            yield on_error(name, following.error)
        elif following is not None:
            heapq.heappush(heap, (response_time_ns(following), next(order), name, following))


async def merge_follow(streams: Streams, on_error: ErrorReport, *, delay_ns: int = DEFAULT_DELAY_NS,
                       max_buffer: int = DEFAULT_MAX_BUFFER,
                       clock: Callable[[], int] = time.time_ns) -> AsyncIterator[GetFlowsResponse]:
    """Bounded-delay merge of endless streams: every response waits in a time-ordered buffer until
    it is ``delay_ns`` old by ``clock`` (or the buffer holds more than ``max_buffer``), so a flow is
    never held longer than the delay, and flows that arrive within it come out in time order."""
    queue: asyncio.Queue[tuple[str, GetFlowsResponse | StreamError | None]] = asyncio.Queue()

    async def pump(name: str, stream: AsyncIterator[GetFlowsResponse]) -> None:
        while True:
            item = await _advance(name, stream)
            await queue.put((name, item))
            if not isinstance(item, GetFlowsResponse):
                return

    pumps = [asyncio.create_task(pump(n, s), name=f"relay stream {n}") for n, s in streams.items()]
    active = len(pumps)
    order = itertools.count()
    heap: list[tuple[int, int, GetFlowsResponse]] = []
    getter: asyncio.Future[tuple[str, GetFlowsResponse | StreamError | None]] | None = None
    try:
        while active or heap:
            if active and getter is None:
                getter = asyncio.ensure_future(queue.get())
            timeout = None
            if heap:
                timeout = max(0.0, (heap[0][0] + delay_ns - clock()) / NS)
            if getter is not None:
                done, _ = await asyncio.wait({getter}, timeout=timeout)
                if done:
                    name, item = getter.result()
                    getter = None
                    if isinstance(item, GetFlowsResponse):
                        heapq.heappush(heap, (response_time_ns(item), next(order), item))
                    else:
                        active -= 1
                        if isinstance(item, StreamError):
                            yield on_error(name, item.error)
            elif timeout:
                await asyncio.sleep(timeout)
            now = clock()
            while heap and (heap[0][0] + delay_ns <= now or len(heap) > max_buffer or not active):
                yield heapq.heappop(heap)[2]
    finally:
        if getter is not None:
            getter.cancel()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


# -- aggregation ----------------------------------------------------------------------------------------
def aggregate_status(statuses: Mapping[str, ServerStatusResponse | None], *, version: str) -> ServerStatusResponse:
    """Sums over the connected nodes; ``None`` marks an unavailable node."""
    total = ServerStatusResponse(version=version)
    unavailable = sorted(name for name, status in statuses.items() if status is None)
    connected = [status for status in statuses.values() if status is not None]
    for status in connected:
        total.num_flows += status.num_flows
        total.max_flows += status.max_flows
        total.seen_flows += status.seen_flows
        total.flows_rate += status.flows_rate
        total.uptime_ns = max(total.uptime_ns, status.uptime_ns)
    total.num_connected_nodes.value = len(connected)
    total.num_unavailable_nodes.value = len(unavailable)
    total.unavailable_nodes.extend(unavailable[:10])  # a partial list, as Hubble sends
    return total


# -- the relay ------------------------------------------------------------------------------------------
class PeerClient(Protocol):
    async def server_status(self) -> ServerStatusResponse: ...

    def get_flows(self, request: GetFlowsRequest) -> AsyncIterator[GetFlowsResponse]: ...

    async def get_nodes(self) -> GetNodesResponse: ...

    async def get_namespaces(self) -> GetNamespacesResponse: ...

    async def close(self) -> None: ...


@dataclass
class _Peer:
    target: str
    client: PeerClient


class Relay:
    """Discovers peers from the store and answers the Observer API for all of them."""

    def __init__(self, store: Store, *, name: str | None = None,
                 connect: Callable[[str], PeerClient] | None = None,
                 exists: Callable[[str], bool] = os.path.exists, delay_ns: int = DEFAULT_DELAY_NS,
                 probe_timeout: float = PROBE_TIMEOUT, clock: Callable[[], int] = time.time_ns) -> None:
        self.name = name or socket.gethostname()
        self.version = server_version()
        self.delay_ns = delay_ns
        self.probe_timeout = probe_timeout
        self._connect = connect or (lambda target: ObserverClient(target, timeout=probe_timeout))
        self._exists = exists
        self._clock = clock
        self._nodes = Reflector(store, NODES, name="relay nodes")
        self._peers: dict[str, _Peer] = {}
        self.started_ns = clock()

    @property
    def synced(self) -> asyncio.Event:
        return self._nodes.synced

    async def run(self) -> None:
        """Follow the store's nodes until cancelled."""
        try:
            await self._nodes.run()
        finally:
            await self.close()

    async def close(self) -> None:
        peers, self._peers = self._peers, {}
        for peer in peers.values():
            with contextlib.suppress(Exception):
                await peer.client.close()

    def peers(self) -> dict[str, str | None]:
        """Every known node and how it is reached (None: no observer advertised)."""
        return peers_from_nodes(self._nodes.snapshot.values(), self._exists)

    async def _client(self, name: str, target: str) -> PeerClient:
        peer = self._peers.get(name)
        if peer is None or peer.target != target:
            if peer is not None:  # the agent moved (restarted elsewhere): a new channel
                with contextlib.suppress(Exception):
                    await peer.client.close()
            peer = _Peer(target, self._connect(target))
            self._peers[name] = peer
        return peer.client

    async def _probe(self, name: str, target: str | None) -> ServerStatusResponse | None:
        if target is None:
            return None
        try:
            client = await self._client(name, target)
            return await asyncio.wait_for(client.server_status(), self.probe_timeout)
        except (TimeoutError, MembraneError, OSError, grpc.RpcError) as exc:
            log.debug("node %s (%s) unavailable: %s", name, target, exc)
            # A fresh channel next time: a restarted agent is seen at the next call, not after the
            # old channel's reconnect back-off.
            if (peer := self._peers.pop(name, None)) is not None:
                with contextlib.suppress(Exception):
                    await peer.client.close()
            return None

    async def probe_all(self) -> dict[str, ServerStatusResponse | None]:
        peers = self.peers()
        names = sorted(peers)
        results = await asyncio.gather(*(self._probe(n, peers[n]) for n in names))
        return dict(zip(names, results, strict=True))

    def _error_event(self, name: str, error: BaseException) -> GetFlowsResponse:
        log.info("node %s: flow stream failed: %s", name, error)
        return node_status_response(NODE_ERROR, [name], relay_name=self.name, message=str(error))

    async def get_flows(self, request: GetFlowsRequest) -> AsyncIterator[GetFlowsResponse]:
        if request.first and request.follow:
            raise InvalidInput(["first cannot be specified with follow"])
        statuses = await self.probe_all()
        connected = [name for name, status in statuses.items() if status is not None]
        unavailable = [name for name, status in statuses.items() if status is None]
        if connected:
            yield node_status_response(NODE_CONNECTED, connected, relay_name=self.name)
        if unavailable:
            yield node_status_response(NODE_UNAVAILABLE, unavailable, relay_name=self.name)
        peers = {name: self._peers[name].client for name in connected}
        streams = {name: client.get_flows(request) for name, client in peers.items()}
        try:
            if request.follow:
                merged = merge_follow(streams, self._error_event, delay_ns=self.delay_ns, clock=self._clock)
            else:
                merged = merge_by_time(streams, self._error_event)
            async for response in merged:
                yield response
        finally:
            for stream in streams.values():
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()

    async def server_status(self) -> ServerStatusResponse:
        return aggregate_status(await self.probe_all(), version=self.version)

    async def get_nodes(self) -> GetNodesResponse:
        peers = self.peers()
        statuses = await self.probe_all()
        response = GetNodesResponse()
        for name in sorted(statuses):
            status = statuses[name]
            node = Node(name=name, address=peers.get(name) or "")
            node.tls.enabled = False
            if status is None:
                node.state = NODE_UNAVAILABLE
            else:
                node.state = NODE_CONNECTED
                node.version = status.version
                node.uptime_ns = status.uptime_ns
                node.num_flows = status.num_flows
                node.max_flows = status.max_flows
                node.seen_flows = status.seen_flows
            response.nodes.append(node)
        return response

    async def get_namespaces(self) -> GetNamespacesResponse:
        statuses = await self.probe_all()
        names = [name for name, status in statuses.items() if status is not None]

        async def one(name: str) -> list[Namespace]:
            try:
                reply = await self._peers[name].client.get_namespaces()
            except (MembraneError, OSError, grpc.RpcError):
                return []
            return list(reply.namespaces)

        found = {(ns.cluster, ns.namespace) for batch in await asyncio.gather(*(one(n) for n in names))
                 for ns in batch}
        return GetNamespacesResponse(namespaces=[Namespace(cluster=c, namespace=n) for c, n in sorted(found)])


# -- serving --------------------------------------------------------------------------------------------
def _unary(fn: Callable[..., Any], request_type: Any) -> Any:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString())


def _stream(fn: Callable[..., Any], request_type: Any) -> Any:
    return grpc.unary_stream_rpc_method_handler(
        fn, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString())


class RelayServer:
    """The relay's Observer API (and gRPC health) on a TCP address."""

    def __init__(self, relay: Relay, listen: str = DEFAULT_LISTEN) -> None:
        self.relay = relay
        self.listen = listen
        self.port: int | None = None
        self._server: Any = None

    @property
    def address(self) -> str:
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}" if self.port else self.listen

    async def start(self) -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(OBSERVER_SERVICE, {
                "GetFlows": _stream(self._get_flows, observer_pb2.GetFlowsRequest),
                "GetAgentEvents": _stream(self._no_events, observer_pb2.GetAgentEventsRequest),
                "GetDebugEvents": _stream(self._no_events, observer_pb2.GetDebugEventsRequest),
                "GetNodes": _unary(self._get_nodes, observer_pb2.GetNodesRequest),
                "GetNamespaces": _unary(self._get_namespaces, observer_pb2.GetNamespacesRequest),
                "ServerStatus": _unary(self._server_status, observer_pb2.ServerStatusRequest),
            }),
            grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
                "Check": _unary(self._health, health_pb2.HealthCheckRequest),
            }),
        ))
        try:
            self.port = server.add_insecure_port(self.listen)
            await server.start()
        except (RuntimeError, OSError) as exc:
            await server.stop(None)
            raise InvalidInput([f"relay: cannot listen on {self.listen}: {exc}"]) from None
        self._server = server
        log.info("relay listening on %s", self.address)

    async def close(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _get_flows(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for response in self.relay.get_flows(request):
                yield response
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _no_events(self, request: Any, context: Any) -> AsyncIterator[Any]:
        return
        yield

    async def _server_status(self, request: Any, context: Any) -> Any:
        return await self.relay.server_status()

    async def _get_nodes(self, request: Any, context: Any) -> Any:
        return await self.relay.get_nodes()

    async def _get_namespaces(self, request: Any, context: Any) -> Any:
        return await self.relay.get_namespaces()

    async def _health(self, request: Any, context: Any) -> Any:
        if request.service not in ("", HEALTH_CHECKED_NAME, OBSERVER_SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
