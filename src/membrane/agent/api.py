"""The agent's API: JSON over HTTP/1.1 on a unix socket, for the CNI plugin and the CLI.

Primitives: :class:`AgentApiServer`, :func:`parse_cni_request` (the wire body -> ``CniRequest``),
:func:`parse_request_head` (sans-io), :func:`http_status_for` (CNI code -> HTTP status) and the
optional :class:`SupportsCniGc` an endpoint service may implement.

Routes::

    POST /v1/cni      {"command","containerID","netns","ifname","args","netconf"}
                      ADD -> 200 CNI result; DEL/CHECK/GC -> 200 {}; failure -> 4xx/5xx
                      {"code","msg","details"} with the CNI error code
    GET  /v1/healthz  -> {"status": "ok"}
    GET  /v1/status   -> whatever the status provider returns

Every error, including a malformed request, is answered with that same error object. One request
per connection (the reply says ``Connection: close``); the head and body are bounded, reads time
out, and no exception escapes a connection handler, so a bad client cannot hurt the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from membrane.agent.contract import (
    CNI_ERR_AGENT_UNAVAILABLE,
    CNI_ERR_DATAPATH,
    CNI_ERR_DECODE,
    CNI_ERR_INVALID_ENV,
    CNI_ERR_INVALID_NETCONF,
    CNI_ERR_TRY_AGAIN,
    CNI_ERR_UNKNOWN_CONTAINER,
    CniFailure,
    CniRequest,
    EndpointService,
)
from membrane.cni.types import (
    ERR_INTERNAL,
    ERR_LIMITED_CONNECTIVITY,
    ERR_PLUGIN_NOT_AVAILABLE,
    CniError,
    validate_container_id,
    validate_ifname,
)
from membrane.core.errors import DatapathError, InvalidInput, MembraneError, StoreError

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024  # a netconf with prevResult and runtimeConfig is a few KiB
READ_TIMEOUT = 30.0  # seconds a client may take to send its whole request
CNI_COMMANDS = ("ADD", "DEL", "CHECK", "GC")
# Fields a command cannot do without (the CNI_* variables the plugin checked already).
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "ADD": ("containerID", "netns", "ifname"),
    "CHECK": ("containerID", "netns", "ifname"),
    "DEL": ("containerID", "ifname"),
}

StatusProvider = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@runtime_checkable
class SupportsCniGc(Protocol):
    """Optional: an endpoint service that can forget attachments the runtime no longer knows."""

    async def cni_gc(self, request: CniRequest, valid_attachments: list[tuple[str, str]]) -> None:
        """Remove endpoints of this network whose (containerID, ifname) is not in the list."""
        ...


class HttpError(Exception):
    """A request refused before it reached a route: HTTP status plus the CNI error object."""

    def __init__(self, status: int, code: int, msg: str, details: str = "") -> None:
        self.status = status
        self.failure = CniFailure(code, msg, details)
        super().__init__(msg)


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names

    @property
    def content_length(self) -> int:
        raw = self.headers.get("content-length")
        if raw is None:
            return 0
        if not raw.isdigit():
            raise HttpError(400, CNI_ERR_DECODE, "invalid Content-Length", raw)
        return int(raw)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse ``METHOD PATH HTTP/1.x`` and the header lines (without the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise HttpError(400, CNI_ERR_DECODE, "request head is not text") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise HttpError(400, CNI_ERR_DECODE, "malformed HTTP request line", lines[0][:200])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, CNI_ERR_DECODE, "malformed HTTP header line", line[:200])
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(400, CNI_ERR_DECODE, "chunked bodies are not supported; send Content-Length")
    return RequestHead(parts[0], parts[1].split("?", 1)[0], headers)


def http_status_for(code: int) -> int:
    """The HTTP status that carries a CNI error code (the body holds the code itself)."""
    if code == CNI_ERR_UNKNOWN_CONTAINER:
        return 404
    if code in (CNI_ERR_TRY_AGAIN, ERR_PLUGIN_NOT_AVAILABLE, ERR_LIMITED_CONNECTIVITY, CNI_ERR_AGENT_UNAVAILABLE):
        return 503  # transient, or the agent cannot serve now
    if 1 <= code <= 99:
        return 400  # the request (version, env, netconf) is wrong
    return 500


def parse_cni_request(body: object) -> CniRequest:
    """The JSON body of POST /v1/cni (also the format of a queued DEL) -> CniRequest.

    Raises CniFailure with code 4 for a bad command/container/ifname (they come from the CNI_*
    environment) and 7 for a netconf that is not an object.
    """
    if not isinstance(body, dict):
        raise CniFailure(CNI_ERR_DECODE, "request body must be a JSON object")
    command = body.get("command")
    if command not in CNI_COMMANDS:
        raise CniFailure(CNI_ERR_INVALID_ENV, "unknown or missing command", repr(command))
    fields: dict[str, str] = {}
    for key in ("containerID", "netns", "ifname"):
        value = body.get(key, "")
        if not isinstance(value, str):
            raise CniFailure(CNI_ERR_INVALID_ENV, f"{key} must be a string", repr(value))
        fields[key] = value
    missing = [k for k in _REQUIRED_FIELDS.get(command, ()) if not fields[k]]
    if missing:
        raise CniFailure(CNI_ERR_INVALID_ENV, f"{command} needs {', '.join(missing)}")
    if command != "GC":
        # Not only the plugin calls this API: the checks it makes are repeated here, as services
        # derive names (files, links) from these values.
        try:
            validate_container_id(fields["containerID"])
            validate_ifname(fields["ifname"])
        except CniError as exc:
            raise CniFailure(exc.code, exc.msg, exc.details) from None
    args = body.get("args")
    args = {} if args is None else args
    if not isinstance(args, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in args.items()):
        raise CniFailure(CNI_ERR_INVALID_ENV, "args must be an object of strings")
    netconf = body.get("netconf")
    netconf = {} if netconf is None else netconf
    if not isinstance(netconf, dict):
        raise CniFailure(CNI_ERR_INVALID_NETCONF, "netconf must be a JSON object")
    return CniRequest(
        command=command,
        container_id=fields["containerID"],
        netns=fields["netns"],
        ifname=fields["ifname"],
        args=dict(args),
        netconf=netconf,
    )


def _valid_attachments(netconf: Mapping[str, Any]) -> list[tuple[str, str]]:
    raw = netconf.get("cni.dev/valid-attachments") or []
    if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
        raise CniFailure(CNI_ERR_INVALID_NETCONF, "cni.dev/valid-attachments must be a list of objects")
    return [(str(a.get("containerID", "")), str(a.get("ifname", ""))) for a in raw]


def failure_from_exception(exc: Exception) -> CniFailure:
    """The CNI error a runtime sees for an exception out of the endpoint service."""
    if isinstance(exc, CniFailure):
        return exc
    if isinstance(exc, InvalidInput):
        return CniFailure(CNI_ERR_INVALID_NETCONF, "invalid request", "; ".join(exc.problems))
    if isinstance(exc, StoreError):
        return CniFailure(CNI_ERR_TRY_AGAIN, "the cluster store is unavailable, try again later", str(exc))
    if isinstance(exc, DatapathError):
        return CniFailure(CNI_ERR_DATAPATH, "the kernel refused the endpoint's datapath", str(exc))
    if isinstance(exc, MembraneError):
        return CniFailure(ERR_INTERNAL, str(exc))
    return CniFailure(ERR_INTERNAL, f"internal error in the agent: {type(exc).__name__}: {exc}")


class AgentApiServer:
    """Serves the API on ``socket_path`` (mode 0600) until :meth:`close`."""

    def __init__(
        self,
        socket_path: str | Path,
        service: EndpointService,
        status_provider: StatusProvider,
        *,
        read_timeout: float = READ_TIMEOUT,
        close_grace: float = 10.0,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.service = service
        self.status_provider = status_provider
        self.read_timeout = read_timeout
        self.close_grace = close_grace
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and listen. Raises MembraneError if another agent already answers on the socket."""
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # chmod before listen(): until then connects are refused, so no client ever meets
            # the socket with the umask's wider mode.
            os.chmod(path, 0o600)
            self._inode = os.stat(path).st_ino
            self._server = await asyncio.start_unix_server(self._on_connection, sock=sock, limit=MAX_HEAD_BYTES)
        except BaseException:
            sock.close()
            raise
        log.info("agent API listening on %s", path)

    async def close(self) -> None:
        """Stop accepting, give requests in flight ``close_grace`` seconds, remove the socket file."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        # Handlers first: from Python 3.12 on, wait_closed() also waits for open connections.
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=self.close_grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._inode:  # never remove a successor's socket
                self.socket_path.unlink()

    async def __aenter__(self) -> AgentApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- connection handling -------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve_one(reader, writer)
        except asyncio.CancelledError:
            # close() gave up on this request. The task ends here either way; re-raising would
            # only make asyncio's stream callback log it as an error (Python 3.11).
            log.warning("agent API: a request was cancelled at shutdown")
        except Exception:  # a handler must never take the agent down
            log.exception("agent API: unexpected error while serving a connection")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status: int
        payload: object
        try:
            read = await asyncio.wait_for(self._read_request(reader), self.read_timeout)
        except TimeoutError:
            status, payload = 408, CniFailure(CNI_ERR_DECODE, "request not received in time").to_json()
        except HttpError as exc:
            status, payload = exc.status, exc.failure.to_json()
        else:
            if read is None:
                return  # the client connected and left
            head, body = read
            status, payload = await self.handle(head.method, head.path, body)
        await self._write_response(writer, status, payload)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[RequestHead, bytes] | None:
        try:
            raw_head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None
            raise HttpError(400, CNI_ERR_DECODE, "incomplete HTTP request") from None
        except asyncio.LimitOverrunError:
            raise HttpError(431, CNI_ERR_DECODE, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
        head = parse_request_head(raw_head[:-4])
        length = head.content_length
        if length > MAX_BODY_BYTES:
            raise HttpError(413, CNI_ERR_DECODE, f"request body larger than {MAX_BODY_BYTES} bytes")
        if head.method == "POST" and "content-length" not in head.headers:
            raise HttpError(411, CNI_ERR_DECODE, "POST needs a Content-Length")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise HttpError(400, CNI_ERR_DECODE, "request body shorter than its Content-Length") from None
        return head, body

    async def _write_response(self, writer: asyncio.StreamWriter, status: int, payload: object) -> None:
        try:
            body = json.dumps(payload, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            log.error("agent API: reply is not JSON-serialisable: %s", exc)
            status = 500
            body = json.dumps(CniFailure(ERR_INTERNAL, f"reply is not JSON: {exc}").to_json()).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        try:
            writer.write(head + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client is gone; nothing to tell it

    # -- routes ----------------------------------------------------------------------------

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        """Route one request; returns (HTTP status, JSON payload). Never raises."""
        routes: dict[str, tuple[str, Callable[[bytes], Awaitable[tuple[int, object]]]]] = {
            "/v1/cni": ("POST", self._cni),
            "/v1/healthz": ("GET", self._healthz),
            "/v1/status": ("GET", self._status),
        }
        route = routes.get(path.rstrip("/") or "/")
        if route is None:
            return 404, CniFailure(CNI_ERR_INVALID_ENV, f"no such route: {path}").to_json()
        allowed, handler = route
        if method != allowed:
            return 405, CniFailure(CNI_ERR_INVALID_ENV, f"{path} takes {allowed}, not {method}").to_json()
        try:
            return await handler(body)
        except Exception as exc:  # the routes catch their own; this is the last line
            log.exception("agent API: %s %s failed", method, path)
            return 500, failure_from_exception(exc).to_json()

    async def _healthz(self, _body: bytes) -> tuple[int, object]:
        return 200, {"status": "ok"}

    async def _status(self, _body: bytes) -> tuple[int, object]:
        result = self.status_provider()
        if inspect.isawaitable(result):
            result = await result
        return 200, dict(result)

    async def _cni(self, body: bytes) -> tuple[int, object]:
        try:
            decoded = json.loads(body)
        except ValueError as exc:
            return 400, CniFailure(CNI_ERR_DECODE, "request body is not JSON", str(exc)).to_json()
        try:
            request = parse_cni_request(decoded)
        except CniFailure as bad:
            return http_status_for(bad.code), bad.to_json()
        cni_version = str(request.netconf.get("cniVersion") or "1.0.0")
        started = time.monotonic()
        try:
            result = await self._dispatch(request)
        except Exception as exc:
            failure = failure_from_exception(exc)
            if failure.code == ERR_INTERNAL:
                log.exception("cni %s %s: unexpected failure", request.command, request.container_id)
            else:
                log.warning("cni %s %s: %s", request.command, request.container_id, failure)
            return http_status_for(failure.code), failure.to_json(cni_version)
        log.info(
            "cni %s container=%s ifname=%s ok in %.0f ms",
            request.command,
            request.container_id,
            request.ifname,
            (time.monotonic() - started) * 1000,
        )
        return 200, result

    async def _dispatch(self, request: CniRequest) -> dict[str, Any]:
        if request.command == "ADD":
            result = await self.service.cni_add(request)
            if not isinstance(result, dict):
                raise CniFailure(ERR_INTERNAL, "endpoint service returned no CNI result")
            return result
        if request.command == "DEL":
            await self.service.cni_del(request)
        elif request.command == "CHECK":
            await self.service.cni_check(request)
        elif isinstance(self.service, SupportsCniGc):
            await self.service.cni_gc(request, _valid_attachments(request.netconf))
        # A service without GC keeps nothing a runtime could leak: GC is then a no-op.
        return {}


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody answers on; refuse to touch a live socket or another file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise MembraneError(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log.info("removed stale agent socket %s", path)
        return
    except OSError:
        pass  # a live listener with a full backlog, say: treat it as in use
    finally:
        probe.close()
    raise MembraneError(f"another agent is already serving {path}")
