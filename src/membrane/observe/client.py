"""A client of the observer API (an agent's or a relay's): what the CLI and the relay use.

    async with ObserverClient("unix:/run/membrane/observer.sock") as client:
        async for response in client.get_flows(GetFlowsRequest(number=20)):
            ...

Addresses are ``unix:PATH``, ``unix:///PATH``, an absolute path, or ``host:port``. gRPC failures
become :class:`ObserverError` (its ``code`` is the gRPC status name); a bad request is
InvalidInput, an unreachable server :class:`ObserverUnavailable`.

Primitives: :class:`ObserverClient`, :class:`ObserverError`, :class:`ObserverUnavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc

from membrane.core.errors import InvalidInput, MembraneError
from membrane.observe.model import (
    GetFlowsRequest,
    GetFlowsResponse,
    GetNamespacesResponse,
    GetNodesResponse,
    ServerStatusResponse,
)
from membrane.observe.observer import OBSERVER_SERVICE
from membrane.observe.pb.health import health_pb2
from membrane.observe.pb.observer import observer_pb2
from membrane.observe.server import HEALTH_CHECKED_NAME, HEALTH_SERVICE, grpc_target


class ObserverError(MembraneError):
    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class ObserverUnavailable(ObserverError):
    """The server does not answer (not running, wrong address, no permission on the socket)."""


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


class ObserverClient:
    def __init__(self, address: str, *, timeout: float = 12.0) -> None:
        self.address = address
        self.target = grpc_target(address)
        self.timeout = timeout
        self._channel: Any = grpc.aio.insecure_channel(self.target)

    async def __aenter__(self) -> ObserverClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _error(self, exc: Any) -> MembraneError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput([details])
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            # gRPC's text nests the cause ("… connect failed: addr: … error: No such file or directory").
            reason = details.rsplit("error: ", 1)[-1].rsplit(": ", 1)[-1]
            return ObserverUnavailable(f"cannot reach the observer at {self.address}: {reason}", code.name)
        return ObserverError(details, code.name)

    async def _unary(self, service: str, method: str, request: Any, response_type: Any) -> Any:
        call = self._channel.unary_unary(f"/{service}/{method}", request_serializer=_serialize,
                                         response_deserializer=response_type.FromString)
        try:
            return await call(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    async def get_flows(self, request: GetFlowsRequest) -> AsyncIterator[GetFlowsResponse]:
        """Stream GetFlows; ends when the server ends the stream, runs until cancelled with follow."""
        call = self._channel.unary_stream(f"/{OBSERVER_SERVICE}/GetFlows", request_serializer=_serialize,
                                          response_deserializer=observer_pb2.GetFlowsResponse.FromString)
        stream = call(request)
        try:
            async for response in stream:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            stream.cancel()

    async def server_status(self) -> ServerStatusResponse:
        response: ServerStatusResponse = await self._unary(
            OBSERVER_SERVICE, "ServerStatus", observer_pb2.ServerStatusRequest(), observer_pb2.ServerStatusResponse)
        return response

    async def get_nodes(self) -> GetNodesResponse:
        response: GetNodesResponse = await self._unary(
            OBSERVER_SERVICE, "GetNodes", observer_pb2.GetNodesRequest(), observer_pb2.GetNodesResponse)
        return response

    async def get_namespaces(self) -> GetNamespacesResponse:
        response: GetNamespacesResponse = await self._unary(
            OBSERVER_SERVICE, "GetNamespaces", observer_pb2.GetNamespacesRequest(),
            observer_pb2.GetNamespacesResponse)
        return response

    async def health(self, service: str = HEALTH_CHECKED_NAME) -> str:
        """The gRPC health status name of ``service`` (``SERVING`` when all is well)."""
        response = await self._unary(HEALTH_SERVICE, "Check", health_pb2.HealthCheckRequest(service=service),
                                     health_pb2.HealthCheckResponse)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
