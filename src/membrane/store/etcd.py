"""The cluster store: an etcd v3 cluster, reached over its HTTP/JSON gateway with ``etcd3gw``.

URL: ``etcd://HOST[:PORT][,HOST[:PORT]…][?cacert=PATH&cert=PATH&key=PATH]`` (port 2379 by
default). Any TLS parameter switches every endpoint to https: ``cacert`` verifies the members'
certificates, ``cert`` + ``key`` are the client certificate a member with ``--client-cert-auth``
asks for. etcd 3.4 or later is required (the ``/v3/`` gateway path).

etcd already has the store's semantics (:mod:`membrane.store.base` was modelled on it), so the
mapping is direct:

- a compare ``mod_revision == 0`` ("absent") becomes etcd's ``create_revision == 0`` compare, any
  other a ``mod_revision ==`` compare; a failed txn reads the compared keys in its failure branch,
  so :class:`CompareFailed` names what it found without a second round trip;
- a watch asks for ``prev_kv`` (DELETE events carry the deleted key, as in every backend) and
  starts at an explicit revision: ``watch(prefix, 0)`` first reads the store revision, so "now"
  is the moment the watch was asked for, not the moment the stream got connected;
- etcd cancels a watch whose start revision it compacted away: that is :class:`Compacted`;
- lease TTLs are whole seconds (rounded up) and etcd raises a TTL below its minimum (1.5 election
  timeouts, 2 s with default settings) to that minimum; expiry is noticed by the leader's lessor
  within about half a second after the TTL.

**Threads.** etcd3gw is synchronous. Unary calls of one :class:`EtcdStore` run one at a time on
one worker thread, in the order the coroutines made them (as over one gRPC connection; it also
keeps each ``requests`` session on one thread). Every watch is a streaming request read by its
own daemon thread that hands decoded events to an asyncio queue. :meth:`EtcdStore.close` ends
running watches at once (their generators return) and shuts their sockets down, which unblocks
the reading threads.

**Fail-over.** Endpoints are tried in order, starting with the last one that answered. A request
that provably never left (connection refused, connect timeout) moves on to the next endpoint;
so does one etcd refused before proposing it ("no leader"), and one that is safe to repeat
(reads, plain puts, lease grants and keepalives). Any other write whose fate is unknown
(connection lost after sending, "request timed out, possibly due to previous leader failure")
is never repeated behind the caller's back: a txn that did apply would then report a failed
compare. It raises :class:`StoreError` saying so. A member may spend :data:`SERVER_DEADLINE`
seconds on a request, and while a cluster elects a leader requests are retried for up to
:data:`RETRY_WINDOW` seconds. A watch whose connection breaks resumes on the
next endpoint from the revision after the last event it delivered, so nothing is lost or repeated.

Primitives: :class:`EtcdTarget` and :func:`parse_etcd_url` (pure), the JSON codec
(:func:`encode_key`, :func:`key_range`, :func:`decode_kv`, :func:`decode_event`,
:func:`txn_request`), and :class:`EtcdStore`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import math
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError

from membrane.core.errors import CompareFailed, InvalidInput, StoreError
from membrane.store.base import (
    Compacted,
    Compare,
    Delete,
    EventType,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    TxnResult,
    WatchEvent,
)
from membrane.store.memory import (
    check_ttl,
    describe_failed_compare,
    tombstone,
    validate_key,
    validate_txn,
)

DEFAULT_PORT = 2379
API_PATH = "/v3/"
#: Seconds to establish a TCP (and TLS) connection to one member before trying the next.
CONNECT_TIMEOUT = 2.0
#: Seconds to wait for a member's answer (it gives up itself after SERVER_DEADLINE).
READ_TIMEOUT = 10.0
#: How long a member may work on one unary request (the gateway's ``Grpc-Timeout`` header). A
#: proposal sent towards a leader that just died is otherwise held for etcd's own request timeout
#: (5 s + 2 election timeouts) before the client may try again.
SERVER_DEADLINE = 3
_DEADLINE = {"Grpc-Timeout": f"{SERVER_DEADLINE}S"}
#: How long requests are retried while no member can serve them (a leader election).
RETRY_WINDOW = 8.0
#: How long a watch keeps reconnecting without any member accepting it before it fails.
WATCH_GIVE_UP = 30.0
#: Keys per range request when listing; pages are read at one pinned revision.
LIST_PAGE = 2000
#: TCP keepalive on every connection (idle, interval, count): a watch on a member that vanished
#: from the network, rather than closing its sockets, is noticed in about 25 s.
TCP_KEEPALIVE = (10, 5, 3)

_TLS_PARAMS = ("cacert", "cert", "key")


# --- the URL -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EtcdTarget:
    """Where the members are and how to talk to them."""

    endpoints: tuple[tuple[str, int], ...]
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def tls(self) -> bool:
        return any((self.cacert, self.cert, self.key))

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def endpoint_url(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"{self.scheme}://{_host_literal(host)}:{port}"


def _host_literal(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_etcd_url(url: str) -> EtcdTarget:
    """``etcd://h1:p1,h2:p2?cacert=…&cert=…&key=…`` → :class:`EtcdTarget`; InvalidInput if malformed."""
    scheme, sep, rest = url.partition("://")
    if scheme != "etcd" or not sep:
        raise InvalidInput([f"store URL {url!r} is not an etcd:// URL"])
    hosts, _, query = rest.partition("?")
    hosts = hosts.rstrip("/")
    if "/" in hosts:
        raise InvalidInput([f"store URL {url!r}: an etcd URL takes no path (etcd://HOST:PORT[,HOST:PORT…])"])
    if not hosts:
        raise InvalidInput([f"store URL {url!r} names no etcd endpoint (etcd://HOST:PORT[,HOST:PORT…])"])
    endpoints = tuple(_parse_endpoint(url, part) for part in hosts.split(","))
    params: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in _TLS_PARAMS:
            raise InvalidInput([f"store URL {url!r}: unknown parameter {name!r} (known: {', '.join(_TLS_PARAMS)})"])
        if not value:
            raise InvalidInput([f"store URL {url!r}: {name}= needs a file path"])
        params[name] = value
    if ("cert" in params) != ("key" in params):
        raise InvalidInput([f"store URL {url!r}: a client certificate needs both cert= and key="])
    return EtcdTarget(endpoints, params.get("cacert"), params.get("cert"), params.get("key"))


def _parse_endpoint(url: str, part: str) -> tuple[str, int]:
    part = part.strip()
    if part.startswith("["):  # [v6]:port
        host, _, tail = part[1:].partition("]")
        port_text = tail.removeprefix(":") if tail else ""
        if tail and not tail.startswith(":"):
            host = ""
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise InvalidInput([f"store URL {url!r}: endpoint {part!r} has no host"])
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidInput([f"store URL {url!r}: endpoint {part!r} has an invalid port"])
    return host, int(port_text)


# --- the JSON codec (pure) ----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_key(key: str) -> str:
    """Keys are UTF-8 on the wire (etcd3gw's own helpers would encode them as Latin-1)."""
    return _b64(key.encode())


def key_range(prefix: str) -> tuple[str, str]:
    """``key`` and ``range_end`` (base64) of every key starting with ``prefix``.

    The end is the prefix with its last byte incremented; UTF-8 never contains 0xFF, so there
    is no carry. The empty prefix is etcd's "every key": ``\\0`` to ``\\0``.
    """
    raw = prefix.encode()
    if not raw:
        return _b64(b"\0"), _b64(b"\0")
    return _b64(raw), _b64(raw[:-1] + bytes([raw[-1] + 1]))


def _int(value: object) -> int:
    # The gateway renders int64 as strings and omits zero values altogether.
    return int(cast(str | int, value)) if value is not None else 0


def decode_kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(data["key"]).decode(),
        value=base64.b64decode(data.get("value", "")),
        create_revision=_int(data.get("create_revision")),
        mod_revision=_int(data.get("mod_revision")),
        version=_int(data.get("version")),
        lease=_int(data.get("lease")),
    )


def decode_event(data: dict[str, Any]) -> WatchEvent:
    kv = decode_kv(data["kv"])
    prev = decode_kv(data["prev_kv"]) if data.get("prev_kv") else None
    if data.get("type") == "DELETE":
        # etcd sends the key and the deletion's revision; normalise to the shape every backend uses.
        return WatchEvent(EventType.DELETE, tombstone(kv.key, kv.mod_revision), prev)
    return WatchEvent(EventType.PUT, kv, prev)


def _compare(c: Compare) -> dict[str, Any]:
    if c.mod_revision == 0:
        return {"key": encode_key(c.key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
    return {"key": encode_key(c.key), "target": "MOD", "result": "EQUAL", "mod_revision": str(c.mod_revision)}


def _request(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": encode_key(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    return {"request_delete_range": {"key": encode_key(op.key)}}


def txn_request(compares: Sequence[Compare], ops: Sequence[Op]) -> dict[str, Any]:
    """The ``/v3/kv/txn`` body; the failure branch reads every compared key (see the module doc)."""
    return {
        "compare": [_compare(c) for c in compares],
        "success": [_request(op) for op in ops],
        "failure": [{"request_range": {"key": encode_key(c.key)}} for c in compares],
    }


def _failed_lookup(response: dict[str, Any]) -> Callable[[str], KeyValue | None]:
    found: dict[str, KeyValue] = {}
    for item in response.get("responses", []):
        for raw in item.get("response_range", {}).get("kvs", []):
            kv = decode_kv(raw)
            found[kv.key] = kv
    return found.get


def _revision(response: dict[str, Any]) -> int:
    return _int(response.get("header", {}).get("revision"))


# --- transport errors ----------------------------------------------------------------------------

_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (cause, context, urllib3's ``reason``, args)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(e for e in linked if isinstance(e, BaseException))


def _never_sent(exc: BaseException) -> bool:
    """True when no byte of the request reached a member: repeating it elsewhere is always safe."""
    for e in _chain(exc):
        # NewConnectionError (refused, unreachable) is a ConnectTimeoutError in urllib3 2.
        if isinstance(e, ConnectTimeoutError | NameResolutionError | requests.exceptions.ConnectTimeout):
            return True
    return False


def _transport_reason(exc: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}" for e in _chain(exc))
    if match := _ERRNO_RE.search(text):
        return match.group(1).strip().lower()
    if "timed out" in text.lower():
        return "timed out"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the member closed the connection"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _tls_reason(exc: BaseException, target: EtcdTarget) -> str:
    """What went wrong in a TLS handshake, and which URL parameter fixes it."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = e.verify_message or "verification failed"
            return f"the member's certificate does not verify against cacert= ({detail})"
    if not target.cert:
        # Go ends the handshake without a word when a required client certificate is missing.
        return "the member ended the handshake: it requires a client certificate (add cert=PATH&key=PATH)"
    return "the member refused the handshake: is the client certificate (cert=) signed by a CA it trusts?"


def _is_tls_problem(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLError | requests.exceptions.SSLError) for e in _chain(exc))


#: gRPC status codes after which a request may succeed elsewhere or a moment later.
_UNAVAILABLE, _DEADLINE_EXCEEDED = 14, 4


@dataclass(frozen=True, slots=True)
class _GatewayError:
    """An answer of a member that is not a success: the gRPC status code and etcd's message."""

    code: int
    message: str


def _gateway_error(exc: Etcd3Exception) -> _GatewayError | None:
    """The member's answer inside an etcd3gw exception; None when there was no answer at all."""
    text = exc.detail_text
    if text is None or any(isinstance(e, requests.exceptions.RequestException) for e in _chain(exc)):
        return None
    try:
        body = json.loads(text)
        message, code = str(body.get("message") or body.get("error") or text), int(body.get("code", 0))
    except (ValueError, TypeError, AttributeError):  # not etcd's JSON: a proxy, a plain HTTP server
        message, code = text.strip() or str(exc.args[0] if exc.args else "error"), 0
    return _GatewayError(code, message.removeprefix("etcdserver: "))


#: Answers after which etcd has certainly not applied the request (the proposal was never made).
_NOT_APPLIED = ("no leader", "not capable", "too many requests", "not started", "stopped")
#: Answers after which a write may or may not have been applied.
_UNCERTAIN = ("leader changed", "timed out", "deadline exceeded", "unhealthy cluster")


# --- the synchronous side (worker threads) -------------------------------------------------------


class _KeepAliveAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        idle, interval, count = TCP_KEEPALIVE
        kwargs["socket_options"] = [
            *HTTPConnection.default_socket_options,
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count),
        ]
        super().init_poolmanager(*args, **kwargs)


def _client(target: EtcdTarget, index: int) -> Etcd3Client:
    session = requests.Session()
    # The URL says everything: REQUESTS_CA_BUNDLE would silently replace cacert=, and a proxy
    # from the environment has no business between an agent and its store.
    session.trust_env = False
    session.mount("http://", _KeepAliveAdapter())
    session.mount("https://", _KeepAliveAdapter())
    if target.cacert:
        session.verify = target.cacert
    if target.cert and target.key:
        session.cert = (target.cert, target.key)
    host, port = target.endpoints[index]
    # A (connect, read) pair: requests accepts it although etcd3gw's annotation says float.
    timeout = cast(Any, (CONNECT_TIMEOUT, READ_TIMEOUT))
    return Etcd3Client(host, port, target.scheme, timeout=timeout, api_path=API_PATH, session=session)


class _Gateway:
    """One client per endpoint, the fail-over rules and the mapping of etcd's errors.

    Used from one thread at a time (the store's worker); ``preferred`` is shared with watches.
    """

    def __init__(self, url: str, target: EtcdTarget) -> None:
        self.url = url
        self.target = target
        self._clients = [_client(target, i) for i in range(len(target.endpoints))]
        self.preferred = 0

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    def call(self, path: str, body: dict[str, Any], *, repeatable: bool) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first member that serves it (see the module doc).

        ``repeatable``: sending the request twice does no harm (a read, a plain put)."""
        deadline = time.monotonic() + RETRY_WINDOW
        backoff = 0.05
        while True:
            unreachable: list[str] = []  # no answer at all from these
            last = ""  # the last "not now" answer of a member that is up
            count = len(self._clients)
            for offset in range(count):
                index = (self.preferred + offset) % count
                client = self._clients[index]
                try:
                    result = cast(dict[str, Any], client.post(client.get_url(path), json=body, headers=_DEADLINE))
                except Etcd3Exception as exc:
                    answer = _gateway_error(exc)
                    if answer is None:  # no answer: the connection failed
                        where = self.target.endpoint_url(index)
                        if _is_tls_problem(exc):
                            raise StoreError(self.tls_message(where, exc)) from None
                        reason = _transport_reason(exc)
                        if _never_sent(exc):
                            unreachable.append(f"{where}: {reason}")
                            continue
                        if not repeatable:
                            raise StoreError(
                                f"etcd store {self.url}: lost the connection to {where} during a write "
                                f"({reason}); it may or may not have been applied"
                            ) from None
                        unreachable.append(f"{where}: {reason}{self._plain_hint(reason)}")
                        continue
                    if (error := self._answer_error(answer, index, repeatable)) is not None:
                        raise error from None
                    last = f"{self.target.endpoint_url(index)}: {answer.message}"
                    continue
                self.preferred = index
                return result
            if len(unreachable) == count:
                # No member answered at all: waiting would not help. Only a member that is up but
                # cannot serve yet (an election) is worth the retry window.
                raise StoreError(f"etcd store {self.url} is unreachable: {'; '.join(unreachable)}")
            if time.monotonic() > deadline:
                raise StoreError(f"etcd store {self.url} did not answer within {RETRY_WINDOW:g} s: {last}")
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    def _answer_error(self, answer: _GatewayError, index: int, repeatable: bool) -> StoreError | InvalidInput | None:
        """The error an answer means, or None when the request may be tried again."""
        message = answer.message
        lowered = message.lower()
        if "lease not found" in lowered:
            return LeaseNotFound(f"lease not found (expired or revoked): {message}")
        if "compacted" in lowered:
            return Compacted(f"etcd store {self.url}: {message}")
        if "http request to an https server" in lowered:
            return StoreError(
                f"etcd store {self.url}: {self.target.endpoint_url(index)} speaks TLS: "
                "add cacert=PATH (and cert=PATH&key=PATH) to the store URL"
            )
        if "duplicate key" in lowered:
            return InvalidInput([f"txn names a key more than once: {message}"])
        retryable = answer.code in (_UNAVAILABLE, _DEADLINE_EXCEEDED)
        if retryable and any(m in lowered for m in _NOT_APPLIED):
            return None
        if retryable and any(m in lowered for m in _UNCERTAIN):
            if not repeatable:
                return StoreError(f"etcd store {self.url}: {message}; the write may or may not have been applied")
            return None
        return StoreError(f"etcd store {self.url}: {message}")

    def tls_message(self, where: str, exc: BaseException) -> str:
        return f"etcd store {self.url}: TLS with {where} failed: {_tls_reason(exc, self.target)}"

    def _plain_hint(self, reason: str) -> str:
        if self.target.tls or "closed the connection" not in reason:
            return ""
        return " (if the members use TLS, add cacert=PATH&cert=PATH&key=PATH to the store URL)"

    def watch_client(self, index: int) -> Etcd3Client:
        """A client with a session of its own, for one streaming watch request."""
        return _client(self.target, index)

    @property
    def endpoint_count(self) -> int:
        return len(self._clients)


_END = object()  # the watch queue's "no more events" sentinel


def _json_lines(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The gateway's stream: one JSON message per line; chunks need not align with lines."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield cast(dict[str, Any], json.loads(line))


class _WatchStream:
    """One watch: a daemon thread reading the gateway's stream, reconnecting as needed.

    Items reach the asyncio side through ``queue``: a list of events (one gateway message), an
    exception to raise, or :data:`_END`. :meth:`stop` is called on the event loop.
    """

    def __init__(self, gateway: _Gateway, prefix: str, start_revision: int, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self._gateway = gateway
        self._prefix = prefix
        self._next = start_revision
        self._loop = loop
        self._lock = threading.Lock()
        self._stopped = False
        self._response: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, name=f"etcd watch {prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            response = self._response
        self.queue.put_nowait(_END)
        if response is not None:
            _shutdown(response)

    def _deliver(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self) -> None:
        count = self._gateway.endpoint_count
        index = self._gateway.preferred
        failing_since: float | None = None
        backoff = 0.05
        problem = ""
        while not self._stopped:
            client = self._gateway.watch_client(index)
            where = self._gateway.target.endpoint_url(index)
            try:
                outcome = self._follow(client)
            except Exception as exc:  # the connection failed or broke: resume elsewhere
                if _is_tls_problem(exc) and not self._stopped:
                    self._deliver(StoreError(self._gateway.tls_message(where, exc)))
                    return
                outcome = f"{where}: {_transport_reason(exc)}"
            finally:
                client.session.close()
            if outcome is None or self._stopped:
                return
            if outcome == "":  # it was connected for a while: a fresh start of the patience
                failing_since, backoff = None, 0.05
            else:
                problem = outcome
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > WATCH_GIVE_UP:
                self._deliver(StoreError(f"etcd store {self._gateway.url}: watch of {self._prefix!r} lost: {problem}"))
                return
            index = (index + 1) % count
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _follow(self, client: Etcd3Client) -> str | None:
        """Read one stream. None: the watch ended for good; "": connected, then the stream broke;
        anything else says why it could not be set up."""
        key, range_end = key_range(self._prefix)
        create: dict[str, Any] = {
            "key": key,
            "range_end": range_end,
            "start_revision": str(self._next),
            "prev_kv": True,
        }
        response = client.session.post(
            client.get_url("/watch"),
            json={"create_request": create},
            stream=True,
            timeout=(CONNECT_TIMEOUT, None),  # an idle watch may stay silent for ever
        )
        with self._lock:
            if self._stopped:
                response.close()
                return None
            self._response = response
        try:
            if response.status_code != 200:
                return f"{client.base_url}: HTTP {response.status_code} {response.text.strip()[:200]}"
            created = False
            for message in _json_lines(response):
                if "error" in message:
                    error = message["error"]
                    detail = error.get("message", error) if isinstance(error, dict) else error
                    return f"{client.base_url}: {detail}"
                result = message.get("result", {})
                compacted = _int(result.get("compact_revision"))
                if compacted:
                    self._deliver(
                        Compacted(
                            f"watch of {self._prefix!r} from revision {self._next}: the store has "
                            f"compacted its history up to revision {compacted}"
                        )
                    )
                    return None
                if result.get("canceled"):
                    reason = result.get("cancel_reason") or "canceled by the server"
                    self._deliver(StoreError(f"etcd store {self._gateway.url}: watch of {self._prefix!r}: {reason}"))
                    return None
                if result.get("created"):
                    created = True
                    continue
                events = [decode_event(e) for e in result.get("events", [])]
                if events:
                    self._next = events[-1].revision + 1
                    self._deliver(events)
            return "" if created else f"{client.base_url}: the stream ended before the watch was created"
        finally:
            with self._lock:
                self._response = None
            response.close()


def _shutdown(response: requests.Response) -> None:
    """Unblock a thread reading ``response`` by shutting its socket down (on a dup of the fd, so
    a TLS wrapper is left alone for the reading thread to fail on)."""
    with contextlib.suppress(Exception):
        sock = response.raw.connection.sock
        dup = socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


# --- the store -----------------------------------------------------------------------------------


class EtcdStore:
    """A :class:`~membrane.store.base.Store` on an etcd v3 cluster (see the module doc)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.target = parse_etcd_url(url)
        self._gateway = _Gateway(url, self.target)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="etcd")
        self._streams: set[_WatchStream] = set()
        self._closed = False

    async def _call(self, path: str, body: dict[str, Any], *, repeatable: bool = True) -> dict[str, Any]:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._gateway.call(path, body, repeatable=repeatable))

    # -- reads

    async def get(self, key: str) -> KeyValue | None:
        if not key:
            return None
        response = await self._call("/kv/range", {"key": encode_key(key)})
        kvs = response.get("kvs", [])
        return decode_kv(kvs[0]) if kvs else None

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        key, range_end = key_range(prefix)
        body: dict[str, Any] = {"key": key, "range_end": range_end, "limit": str(LIST_PAGE)}
        kvs: list[KeyValue] = []
        revision = 0
        while True:
            response = await self._call("/kv/range", body)
            page = [decode_kv(raw) for raw in response.get("kvs", [])]
            kvs.extend(page)
            revision = revision or _revision(response)
            if not response.get("more") or not page:
                return kvs, revision
            # The next page starts right after the last key, at the first page's revision.
            body = {**body, "key": _b64(page[-1].key.encode() + b"\0"), "revision": str(revision)}

    async def revision(self) -> int:
        response = await self._call("/kv/range", {"key": _b64(b"\0"), "count_only": True})
        return _revision(response)

    # -- writes

    async def put(self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None) -> int:
        validate_key(key)
        if expect_mod_revision is None:
            body: dict[str, Any] = {"key": encode_key(key), "value": _b64(bytes(value))}
            if lease:
                body["lease"] = str(lease)
            # Repeatable: a second identical put leaves the same value (and one more revision).
            return _revision(await self._call("/kv/put", body))
        compares = [Compare(key, expect_mod_revision)]
        response = await self._txn(compares, [Put(key, value, lease)])
        if not response.get("succeeded"):
            raise CompareFailed(describe_failed_compare(compares, _failed_lookup(response)))
        return _revision(response)

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        validate_key(key)
        if expect_mod_revision is None:
            response = await self._call("/kv/deleterange", {"key": encode_key(key)}, repeatable=False)
            return _int(response.get("deleted")) > 0
        compares = [Compare(key, expect_mod_revision)]
        response = await self._txn(compares, [Delete(key)])
        if not response.get("succeeded"):
            raise CompareFailed(describe_failed_compare(compares, _failed_lookup(response)))
        deleted = response.get("responses", [{}])[0].get("response_delete_range", {})
        return _int(deleted.get("deleted")) > 0

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        response = await self._txn(compares, ops)
        return TxnResult(bool(response.get("succeeded")), _revision(response))

    async def _txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> dict[str, Any]:
        validate_txn(compares, ops)
        return await self._call("/kv/txn", txn_request(compares, ops), repeatable=not ops)

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision``: watches from an older revision raise Compacted.

        etcd keeps ``revision`` itself watchable (other backends compact *through* it), but a
        DELETE at exactly ``revision`` may be gone from it: resume watches after it.
        """
        await self._call("/kv/compaction", {"revision": str(revision), "physical": True}, repeatable=False)

    # -- leases

    async def grant_lease(self, ttl: float) -> int:
        check_ttl(ttl)
        # Repeatable: a second grant only leaves a lease nobody uses, which expires on its own.
        response = await self._call("/lease/grant", {"TTL": str(math.ceil(ttl))})
        if response.get("error"):
            raise StoreError(f"etcd store {self.url}: cannot grant a lease: {response['error']}")
        return _int(response.get("ID"))

    async def keepalive(self, lease: int) -> None:
        response = await self._call("/lease/keepalive", {"ID": str(lease)})
        # An expired lease is answered with no TTL at all (etcd's "TTL <= 0").
        if _int(response.get("result", {}).get("TTL")) <= 0:
            raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)")

    async def revoke_lease(self, lease: int) -> None:
        try:
            await self._call("/kv/lease/revoke", {"ID": str(lease)}, repeatable=False)
        except LeaseNotFound:
            raise LeaseNotFound(f"lease {lease:x} not found (expired or revoked)") from None

    # -- watch

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        if start_revision <= 0:
            # Read "now" through the ordered worker, so it precedes any write the caller makes
            # after starting the watch.
            start_revision = await self.revision() + 1
        elif self._closed:
            raise StoreError(f"store {self.url} is closed")
        stream = _WatchStream(self._gateway, prefix, start_revision, asyncio.get_running_loop())
        self._streams.add(stream)
        stream.start()
        try:
            while True:
                item = await stream.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                for event in cast(list[WatchEvent], item):
                    yield event
        finally:
            stream.stop()
            self._streams.discard(stream)

    # -- lifecycle

    async def close(self) -> None:
        """Close the store; running watches end (return) and other calls raise StoreError."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams):
            stream.stop()
        # Calls already queued finish (each is bounded by its timeouts); then the sessions close.
        self._executor.submit(self._gateway.close)
        self._executor.shutdown(wait=False)
