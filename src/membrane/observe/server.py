"""The observer gRPC server (grpc.aio): Hubble's ``observer.Observer`` and the gRPC health service.

One server listens on TCP (127.0.0.1:4244 by default) and on a unix socket
(/run/membrane/observer.sock, mode 0600), so Hubble's CLI, the relay and ``membrane observe`` all
talk to it. The RPCs adapt :mod:`membrane.observe.observer`; an invalid request is answered with
INVALID_ARGUMENT and Hubble's message. Extra services (a relay's peer service, say) can be added
with ``handlers``.

Primitives: :class:`ObserverServer`, :func:`grpc_target`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from membrane.core.config import DEFAULT_RUN_DIR
from membrane.core.errors import InvalidInput, MembraneError
from membrane.observe import observer
from membrane.observe.model import GetNamespacesResponse, GetNodesResponse, Namespace
from membrane.observe.pb.health import health_pb2
from membrane.observe.pb.observer import observer_pb2
from membrane.observe.ring import Ring

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:4244"
DEFAULT_SOCKET = DEFAULT_RUN_DIR / "observer.sock"
HEALTH_SERVICE = "grpc.health.v1.Health"
# The service name Hubble's CLI asks the health service about.
HEALTH_CHECKED_NAME = "hubble.server.Observer"

NamespacesProvider = Callable[[], Sequence[Namespace]]


def grpc_target(address: str) -> str:
    """A gRPC target for ``unix:PATH``, ``unix:///PATH``, a bare absolute path, or ``host:port``."""
    if address.startswith("/"):
        return "unix:" + address
    return address


def _unary(fn: Callable[..., Any], request_type: Any) -> Any:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString())


def _stream(fn: Callable[..., Any], request_type: Any) -> Any:
    return grpc.unary_stream_rpc_method_handler(
        fn, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString())


class ObserverServer:
    """Serves one ring. ``listen=None`` or ``unix_socket=None`` turns that listener off."""

    def __init__(self, ring: Ring, node_name: str, *, namespaces: NamespacesProvider | None = None,
                 listen: str | None = DEFAULT_LISTEN, unix_socket: Path | None = DEFAULT_SOCKET,
                 cluster_name: str = "default", version: str | None = None,
                 handlers: Sequence[Any] = (), clock: Callable[[], int] = time.time_ns) -> None:
        self.ring = ring
        self.node_name = node_name
        self.listen = listen
        self.unix_socket = unix_socket
        self.cluster_name = cluster_name
        self.version = version or observer.server_version()
        self._namespaces = namespaces or (lambda: observer.ring_namespaces(ring, cluster_name))
        self._extra = list(handlers)
        self._clock = clock
        self._started_ns = clock()
        self._server: Any = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        """host:port of the TCP listener (what GetNodes reports), or the unix socket."""
        if self.listen and self.port:
            return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"
        return f"unix:{self.unix_socket}" if self.unix_socket else ""

    async def start(self) -> None:
        # gRPC shares ports by default (SO_REUSEPORT): a second agent must fail, not split the traffic.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(observer.OBSERVER_SERVICE, {
                "GetFlows": _stream(self._get_flows, observer_pb2.GetFlowsRequest),
                "GetAgentEvents": _stream(self._no_events, observer_pb2.GetAgentEventsRequest),
                "GetDebugEvents": _stream(self._no_events, observer_pb2.GetDebugEventsRequest),
                "GetNodes": _unary(self._get_nodes, observer_pb2.GetNodesRequest),
                "GetNamespaces": _unary(self._get_namespaces, observer_pb2.GetNamespacesRequest),
                "ServerStatus": _unary(self._server_status, observer_pb2.ServerStatusRequest),
            }),
            grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
                "Check": _unary(self._health_check, health_pb2.HealthCheckRequest),
                "Watch": _stream(self._health_watch, health_pb2.HealthCheckRequest),
            }),
            *self._extra,
        ))
        try:
            if self.listen:
                self.port = server.add_insecure_port(self.listen)
            if self.unix_socket:
                self._prepare_socket(self.unix_socket)
                server.add_insecure_port(f"unix:{self.unix_socket}")
            await server.start()
        except (RuntimeError, OSError) as exc:
            await server.stop(None)
            raise MembraneError(f"observer: cannot listen on {self.listen or self.unix_socket}: {exc}") from None
        if self.unix_socket:
            os.chmod(self.unix_socket, 0o600)  # flows show what every pod talks to
        self._server = server
        self._started_ns = self._clock()
        listeners = [self.address] if self.listen else []
        listeners += [str(self.unix_socket)] if self.unix_socket else []
        log.info("observer listening on %s", ", ".join(listeners))

    @staticmethod
    def _prepare_socket(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # left over by a previous run

    async def close(self, grace: float | None = 1.0) -> None:
        if self._server is None:
            return
        await self._server.stop(grace)
        self._server = None
        if self.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                self.unix_socket.unlink()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- RPCs -----------------------------------------------------------------------------------

    async def _get_flows(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for response in observer.get_flows(self.ring, request, node_name=self.node_name):
                yield response
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _no_events(self, request: Any, context: Any) -> AsyncIterator[Any]:
        # Agent and debug events are not recorded: the stream ends at once, empty.
        return
        yield

    async def _server_status(self, request: Any, context: Any) -> Any:
        return observer.server_status(self.ring, started_ns=self._started_ns, now_ns=self._clock(),
                                      version=self.version)

    async def _get_nodes(self, request: Any, context: Any) -> Any:
        node = observer.node_info(self.ring, name=self.node_name, address=self.address,
                                  started_ns=self._started_ns, now_ns=self._clock(), version=self.version)
        return GetNodesResponse(nodes=[node])

    async def _get_namespaces(self, request: Any, context: Any) -> Any:
        return GetNamespacesResponse(namespaces=list(self._namespaces()))

    def _health_status(self, service: str) -> Any:
        if service in ("", HEALTH_CHECKED_NAME, observer.OBSERVER_SERVICE):
            return health_pb2.HealthCheckResponse.SERVING
        return None

    async def _health_check(self, request: Any, context: Any) -> Any:
        status = self._health_status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service}")
        return health_pb2.HealthCheckResponse(status=status)

    async def _health_watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        status = self._health_status(request.service)
        yield health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status)
        await asyncio.Event().wait()  # nothing changes until the server stops
