"""Client of the agent's API socket, for the CNI plugin and the CLI.

Primitives: :class:`AgentClient` (``cni``, ``healthz``, ``status``) and its errors
:class:`AgentNotRunning`, :class:`AgentTimeout`, :class:`AgentProtocolError`,
:class:`AgentRequestFailed` (all :class:`AgentClientError`).

One request per connection: the client sends ``Connection: close`` and reads the reply to its
Content-Length. The HTTP/1.1 exchange is written out here rather than taken from
``http.client``, whose import (it pulls in ``ssl`` and ``email``) costs about 15 ms, more than
the rest of the plugin's start-up together; the agent's replies are small and well-formed.
"""

from __future__ import annotations

import json
import socket

from membrane.cni.types import DEFAULT_AGENT_SOCKET

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

MAX_REPLY_BYTES = 16 * 1024 * 1024  # a CNI result is a few hundred bytes; status a few KiB


class AgentClientError(Exception):
    """The agent could not be asked, or did not answer usefully."""

    def __init__(self, socket_path: str, message: str) -> None:
        self.socket_path = socket_path
        super().__init__(message)


class AgentNotRunning(AgentClientError):
    """Nothing listens on the socket (missing file, or a stale one whose agent is gone)."""

    def __init__(self, socket_path: str, reason: str) -> None:
        self.reason = reason
        super().__init__(socket_path, f"agent not running (socket {socket_path}): {reason}")


class AgentTimeout(AgentClientError):
    """The agent accepted the request but did not answer in time."""


class AgentProtocolError(AgentClientError):
    """The connection broke mid-exchange, or the reply was not the JSON over HTTP expected."""


class AgentRequestFailed(AgentClientError):
    """The agent answered with an error: ``status`` (HTTP) and the CNI ``code``/``msg``/``details``."""

    def __init__(self, socket_path: str, status: int, code: int, msg: str, details: str = "") -> None:
        self.status = status
        self.code = code
        self.msg = msg
        self.details = details
        super().__init__(socket_path, msg if not details else f"{msg}: {details}")


class AgentClient:
    """Blocking client of one agent socket. ``timeout`` bounds connect and each read, in seconds."""

    def __init__(self, socket_path: str = DEFAULT_AGENT_SOCKET, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def cni(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """POST /v1/cni: the ADD result, or ``{}`` for DEL/CHECK/GC; AgentRequestFailed on a CNI error."""
        return self._call("POST", "/v1/cni", request)

    def healthz(self) -> dict[str, Any]:
        return self._call("GET", "/v1/healthz", None)

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status", None)

    def _call(self, method: str, path: str, payload: Mapping[str, Any] | None) -> dict[str, Any]:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: membrane-agent\r\nConnection: close\r\n"
            f"Accept: application/json\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("ascii")
        sock = self._connect()
        try:
            try:
                sock.sendall(head + body)
                raw = self._read_reply(sock)
            except TimeoutError:
                raise AgentTimeout(
                    self.socket_path, f"agent did not answer {method} {path} within {self.timeout:g}s"
                ) from None
            except OSError as exc:  # reset or broken pipe: the agent went away mid-request
                raise AgentProtocolError(
                    self.socket_path, f"connection to the agent broke during {method} {path}: {exc}"
                ) from None
        finally:
            sock.close()
        status, reply = self._parse_reply(raw, f"{method} {path}")
        if status >= 400:
            raise AgentRequestFailed(
                self.socket_path,
                status,
                int(reply.get("code") or 999),
                str(reply.get("msg") or f"agent answered HTTP {status}"),
                str(reply.get("details") or ""),
            )
        return reply

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise AgentNotRunning(self.socket_path, exc.strerror or str(exc)) from None
        except TimeoutError:
            sock.close()
            # A full listen backlog: the agent exists but is not accepting.
            raise AgentTimeout(self.socket_path, f"agent did not accept within {self.timeout:g}s") from None
        except OSError as exc:  # permission denied, path too long, not a socket ...
            sock.close()
            raise AgentClientError(
                self.socket_path, f"cannot connect to the agent socket {self.socket_path}: {exc}"
            ) from None
        return sock

    def _read_reply(self, sock: socket.socket) -> bytes:
        chunks: list[bytes] = []
        size = 0
        expected = -1  # total bytes once the head (and so Content-Length) is known
        head_seen = False
        while not head_seen or expected < 0 or size < expected:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise AgentProtocolError(self.socket_path, "agent reply too large")
            if not head_seen:
                data = b"".join(chunks)
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    head_seen = True
                    length = _content_length(data[:end])
                    # Without a Content-Length the body runs to the end of the connection.
                    expected = end + 4 + length if length >= 0 else -1
        return b"".join(chunks)

    def _parse_reply(self, raw: bytes, what: str) -> tuple[int, dict[str, Any]]:
        head, sep, body = raw.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise AgentProtocolError(self.socket_path, f"agent sent no valid HTTP reply to {what}")
        status = int(parts[1])
        length = _content_length(head)
        if length < 0:
            length = len(body)
        if len(body) < length:
            raise AgentProtocolError(self.socket_path, f"agent reply to {what} was cut short")
        try:
            reply = json.loads(body[:length] or b"{}")
        except ValueError:
            raise AgentProtocolError(self.socket_path, f"agent reply to {what} is not JSON") from None
        if not isinstance(reply, dict):
            raise AgentProtocolError(self.socket_path, f"agent reply to {what} is not a JSON object")
        return status, reply


def _content_length(head: bytes) -> int:
    """The Content-Length of a reply head, -1 when absent or unreadable."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else -1
    return -1
