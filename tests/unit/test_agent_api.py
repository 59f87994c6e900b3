"""The agent's API socket: routes, error mapping, and robustness against bad clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.agent.api import AgentApiServer, http_status_for, parse_request_head
from membrane.agent.contract import CniFailure
from membrane.cni.client import AgentClient, AgentNotRunning, AgentRequestFailed
from membrane.core.errors import DatapathError, MembraneError, StoreError
from membrane.testing.cnitool import FakeEndpointService


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mbcni-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def server(short_dir: Path) -> AsyncIterator[AgentApiServer]:
    status = {"node": "node1", "endpoints": {"total": 2, "ready": 2}}
    api = AgentApiServer(short_dir / "run" / "membrane" / "agent.sock", FakeEndpointService(), lambda: status)
    await api.start()
    try:
        yield api
    finally:
        await api.close()


def service_of(api: AgentApiServer) -> FakeEndpointService:
    assert isinstance(api.service, FakeEndpointService)
    return api.service


async def raw_exchange(path: Path, data: bytes, *, half_close: bool = True) -> tuple[int, dict[str, Any]]:
    """Send raw bytes, read the whole reply; (HTTP status, JSON body)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    if half_close and writer.can_write_eof():
        writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def http(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def cni_body(command: str = "ADD", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command": command,
        "containerID": "c1",
        "netns": "/run/netns/c1",
        "ifname": "eth0",
        "args": {"K8S_POD_NAMESPACE": "shop"},
        "netconf": {"cniVersion": "1.0.0", "name": "membrane", "type": "membrane-cni"},
    }
    body.update(overrides)
    return body


# -- socket --------------------------------------------------------------------------------


async def test_socket_is_private_and_removed_on_close(short_dir: Path) -> None:
    path = short_dir / "run" / "membrane" / "agent.sock"  # parent directories do not exist yet
    api = AgentApiServer(path, FakeEndpointService(), dict)
    await api.start()
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    await api.close()
    assert not path.exists()
    await api.close()  # a second close is harmless


async def test_stale_socket_file_is_replaced(short_dir: Path) -> None:
    path = short_dir / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed agent leaves
    async with AgentApiServer(path, FakeEndpointService(), dict):
        assert await asyncio.to_thread(AgentClient(str(path)).healthz) == {"status": "ok"}


async def test_a_live_agent_socket_is_not_taken_over(server: AgentApiServer) -> None:
    second = AgentApiServer(server.socket_path, FakeEndpointService(), dict)
    with pytest.raises(MembraneError, match="already serving"):
        await second.start()
    assert await asyncio.to_thread(AgentClient(str(server.socket_path)).healthz) == {"status": "ok"}


async def test_a_regular_file_in_the_way_is_not_removed(short_dir: Path) -> None:
    path = short_dir / "agent.sock"
    path.write_text("not a socket")
    with pytest.raises(MembraneError, match="not a socket"):
        await AgentApiServer(path, FakeEndpointService(), dict).start()
    assert path.read_text() == "not a socket"


# -- routes through the real client ---------------------------------------------------------


async def test_healthz_status_and_add_through_the_client(server: AgentApiServer) -> None:
    client = AgentClient(str(server.socket_path))
    assert await asyncio.to_thread(client.healthz) == {"status": "ok"}
    assert await asyncio.to_thread(client.status) == {"node": "node1", "endpoints": {"total": 2, "ready": 2}}
    result = await asyncio.to_thread(client.cni, cni_body())
    assert result["ips"][0]["address"] == "10.244.1.23/32"
    assert result["interfaces"][1]["sandbox"] == "/run/netns/c1"
    [request] = service_of(server).requests
    assert (request.command, request.container_id, request.pod_namespace) == ("ADD", "c1", "shop")


async def test_async_status_provider_is_awaited(short_dir: Path) -> None:
    async def status() -> dict[str, Any]:
        return {"ready": True}

    async with AgentApiServer(short_dir / "a.sock", FakeEndpointService(), status) as api:
        assert await asyncio.to_thread(AgentClient(str(api.socket_path)).status) == {"ready": True}


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
async def test_del_and_check_answer_an_empty_object(server: AgentApiServer, command: str) -> None:
    client = AgentClient(str(server.socket_path))
    await asyncio.to_thread(client.cni, cni_body("ADD"))
    assert await asyncio.to_thread(client.cni, cni_body(command)) == {}
    assert service_of(server).commands()[-1] == (command, "c1")


@pytest.mark.parametrize(
    ("exc", "http_status", "code"),
    [
        (CniFailure(100, "pool exhausted", "10.244.1.0/24"), 500, 100),
        (CniFailure(3, "no such container"), 404, 3),
        (CniFailure(11, "busy"), 503, 11),
        (StoreError("etcd unreachable"), 503, 11),
        (DatapathError("nft: syntax error"), 500, 102),
        (RuntimeError("boom"), 500, 999),
    ],
)
async def test_service_failures_become_cni_errors(
    server: AgentApiServer, exc: Exception, http_status: int, code: int
) -> None:
    service_of(server).failures["ADD"] = exc
    with pytest.raises(AgentRequestFailed) as err:
        await asyncio.to_thread(AgentClient(str(server.socket_path)).cni, cni_body())
    assert (err.value.status, err.value.code) == (http_status, code)
    assert err.value.msg
    # the agent keeps serving
    assert await asyncio.to_thread(AgentClient(str(server.socket_path)).healthz) == {"status": "ok"}


async def test_unexpected_exception_message_reaches_the_runtime(server: AgentApiServer) -> None:
    service_of(server).failures["ADD"] = RuntimeError("veth vanished")
    status, body = await raw_exchange(server.socket_path, http("POST", "/v1/cni", json.dumps(cni_body()).encode()))
    assert status == 500
    assert body["code"] == 999 and "veth vanished" in body["msg"]


async def test_gc_passes_the_valid_attachments(server: AgentApiServer) -> None:
    body = cni_body("GC", containerID="", netns="", ifname="")
    body["netconf"]["cni.dev/valid-attachments"] = [{"containerID": "c1", "ifname": "eth0"}]
    assert await asyncio.to_thread(AgentClient(str(server.socket_path)).cni, body) == {}
    assert service_of(server).gc_calls == [[("c1", "eth0")]]


# -- malformed requests -----------------------------------------------------------------------

MALFORMED = [
    pytest.param(http("POST", "/v1/cni", b"{nope"), 400, 6, id="body-not-json"),
    pytest.param(http("POST", "/v1/cni", b"[1]"), 400, 6, id="body-not-object"),
    pytest.param(http("POST", "/v1/cni", json.dumps(cni_body("FROB")).encode()), 400, 4, id="bad-command"),
    pytest.param(http("POST", "/v1/cni", json.dumps(cni_body(containerID="")).encode()), 400, 4, id="no-container"),
    pytest.param(http("POST", "/v1/cni", json.dumps(cni_body(args={"a": 1})).encode()), 400, 4, id="args-not-strings"),
    pytest.param(
        http("POST", "/v1/cni", json.dumps(cni_body(containerID="../../etc")).encode()),
        400,
        4,
        id="container-id-with-path",
    ),
    pytest.param(http("POST", "/v1/cni", json.dumps(cni_body("DEL", ifname="a/b")).encode()), 400, 4, id="bad-ifname"),
    pytest.param(http("POST", "/v1/cni", json.dumps(cni_body(netconf=[])).encode()), 400, 7, id="netconf-empty-list"),
    pytest.param(http("POST", "/v1/cni", json.dumps(cni_body(netconf="x")).encode()), 400, 7, id="netconf-not-object"),
    pytest.param(http("GET", "/v1/cni"), 405, 4, id="wrong-method"),
    pytest.param(http("GET", "/v2/everything"), 404, 4, id="unknown-route"),
    pytest.param(b"HELLO\r\n\r\n", 400, 6, id="not-http"),
    pytest.param(b"POST /v1/cni HTTP/1.1\r\nHost: x\r\n\r\n", 411, 6, id="post-without-length"),
    pytest.param(b"GET /v1/healthz HTTP/1.1\r\nBroken header\r\n\r\n", 400, 6, id="bad-header"),
    pytest.param(b"POST /v1/cni HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, 6, id="chunked"),
    pytest.param(b"POST /v1/cni HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, 6, id="body-too-large"),
    pytest.param(b"GET /v1/healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, 6, id="head-too-large"),
    pytest.param(b"POST /v1/cni HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}", 400, 6, id="body-cut-short"),
]


@pytest.mark.parametrize(("request_bytes", "http_status", "code"), MALFORMED)
async def test_malformed_requests_get_a_json_error_and_the_agent_keeps_serving(
    server: AgentApiServer, request_bytes: bytes, http_status: int, code: int
) -> None:
    status, body = await raw_exchange(server.socket_path, request_bytes)
    assert (status, body["code"]) == (http_status, code)
    assert body["msg"]
    assert service_of(server).requests == []
    assert await asyncio.to_thread(AgentClient(str(server.socket_path)).healthz) == {"status": "ok"}


async def test_a_client_that_hangs_up_early_does_not_disturb_others(server: AgentApiServer) -> None:
    for partial in (b"", b"POST /v1/cni HTTP/1.1\r\nContent-Len", http("POST", "/v1/cni", b'{"comm')[:-3]):
        _, writer = await asyncio.open_unix_connection(str(server.socket_path))
        writer.write(partial)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    assert await asyncio.to_thread(AgentClient(str(server.socket_path)).healthz) == {"status": "ok"}


async def test_a_slow_client_gets_a_timeout_reply(short_dir: Path) -> None:
    async with AgentApiServer(short_dir / "a.sock", FakeEndpointService(), dict, read_timeout=0.2) as api:
        # never finishes its head, never half-closes: the server must give up on it by itself
        status, body = await raw_exchange(api.socket_path, b"GET /v1/healthz HTTP/1.1\r\n", half_close=False)
    assert (status, body["code"]) == (408, 6)


async def test_close_waits_for_a_request_in_flight(short_dir: Path) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    class SlowService(FakeEndpointService):
        async def cni_del(self, request: Any) -> None:
            entered.set()
            await release.wait()
            await super().cni_del(request)

    service = SlowService()
    api = AgentApiServer(short_dir / "a.sock", service, dict)
    await api.start()
    reply = asyncio.create_task(
        raw_exchange(api.socket_path, http("POST", "/v1/cni", json.dumps(cni_body("DEL")).encode()))
    )
    await asyncio.wait_for(entered.wait(), 10)
    closing = asyncio.create_task(api.close())
    done, _ = await asyncio.wait({closing}, timeout=0.2)
    assert not done  # close() waits for the handler
    release.set()
    await closing
    assert await reply == (200, {})


async def test_close_cancels_a_request_that_outlasts_the_grace_period(short_dir: Path) -> None:
    entered = asyncio.Event()

    class StuckService(FakeEndpointService):
        async def cni_add(self, request: Any) -> dict[str, Any]:
            entered.set()
            await asyncio.Event().wait()  # never returns
            return {}

    api = AgentApiServer(short_dir / "a.sock", StuckService(), dict, close_grace=0.05)
    await api.start()
    reader, writer = await asyncio.open_unix_connection(str(api.socket_path))
    writer.write(http("POST", "/v1/cni", json.dumps(cni_body()).encode()))
    await asyncio.wait_for(entered.wait(), 10)
    await asyncio.wait_for(api.close(), 10)
    assert await reader.read() == b""  # the connection ended without a reply
    writer.close()
    await writer.wait_closed()
    assert not api.socket_path.exists()


async def test_client_reports_a_missing_socket_as_agent_not_running(short_dir: Path) -> None:
    path = short_dir / "agent.sock"
    with pytest.raises(AgentNotRunning) as err:
        AgentClient(str(path)).healthz()
    assert str(err.value).startswith(f"agent not running (socket {path})")


# -- pure parts ----------------------------------------------------------------------------------


def test_request_head_parsing() -> None:
    head = parse_request_head(b"POST /v1/cni?x=1 HTTP/1.1\r\nContent-Length: 12\r\nHost: a")
    assert (head.method, head.path, head.content_length, head.headers["host"]) == ("POST", "/v1/cni", 12, "a")


def test_http_status_for_cni_codes() -> None:
    assert [http_status_for(c) for c in (1, 3, 4, 7, 11, 50, 100, 102, 999)] == [
        400,
        404,
        400,
        400,
        503,
        503,
        500,
        500,
        500,
    ]
