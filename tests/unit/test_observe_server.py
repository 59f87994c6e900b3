"""The observer API end to end: a real gRPC server on a unix socket in a temp dir, a real client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from membrane.core.errors import InvalidInput, MembraneError
from membrane.observe.client import ObserverClient, ObserverError, ObserverUnavailable
from membrane.observe.model import (
    DROPPED,
    FORWARDED,
    HUBBLE_RING_BUFFER,
    NODE_CONNECTED,
    Flow,
    FlowFilter,
    GetFlowsRequest,
    GetFlowsResponse,
    set_time,
)
from membrane.observe.observer import FlowPublisher, NamespaceTracker, flows_rate, get_flows, server_status
from membrane.observe.ring import Ring
from membrane.observe.server import ObserverServer

T0 = 1_700_000_000 * 10**9


def flow(n: int, *, verdict: int = FORWARDED, ns: str = "default") -> Flow:
    f = Flow(uuid=f"f{n}", verdict=verdict, node_name="node1")  # type: ignore[arg-type]
    f.source.namespace, f.source.pod_name = ns, f"pod{n}"
    return set_time(f, T0 + n * 10**9)


def uuids(responses: list[GetFlowsResponse]) -> list[str]:
    return [r.flow.uuid if r.HasField("flow") else f"lost:{r.lost_events.num_events_lost}" for r in responses]


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Ring, ObserverClient, Clock]]:
    clock = Clock(T0 + 100 * 10**9)
    ring = Ring(15, clock=clock)
    for n in range(10):
        ring.write(flow(n, verdict=DROPPED if n % 3 == 0 else FORWARDED, ns="kube-system" if n == 4 else "default"))
    server = ObserverServer(ring, "node1", listen="127.0.0.1:0", unix_socket=tmp_path / "observer.sock",
                            clock=clock)
    await server.start()
    client = ObserverClient(f"unix:{tmp_path / 'observer.sock'}", timeout=10)
    try:
        yield ring, client, clock
    finally:
        await client.close()
        await server.close(None)
    assert not (tmp_path / "observer.sock").exists()


async def collect(client: ObserverClient, request: GetFlowsRequest) -> list[GetFlowsResponse]:
    return [r async for r in client.get_flows(request)]


async def test_last_first_and_all(served: tuple[Ring, ObserverClient, Clock]) -> None:
    _, client, _ = served
    assert uuids(await collect(client, GetFlowsRequest(number=3))) == ["f7", "f8", "f9"]
    assert uuids(await collect(client, GetFlowsRequest(number=2, first=True))) == ["f0", "f1"]
    assert len(await collect(client, GetFlowsRequest())) == 10


async def test_filters_apply_before_counting(served: tuple[Ring, ObserverClient, Clock]) -> None:
    _, client, _ = served
    dropped = GetFlowsRequest(number=2, whitelist=[FlowFilter(verdict=[DROPPED])])
    assert uuids(await collect(client, dropped)) == ["f6", "f9"]
    not_default = GetFlowsRequest(number=20, blacklist=[FlowFilter(source_pod=["default/"])])
    assert uuids(await collect(client, not_default)) == ["f4"]


async def test_time_window(served: tuple[Ring, ObserverClient, Clock]) -> None:
    _, client, _ = served
    request = GetFlowsRequest()
    request.since.seconds = (T0 + 3 * 10**9) // 10**9
    request.until.seconds = (T0 + 5 * 10**9) // 10**9
    assert uuids(await collect(client, request)) == ["f3", "f4", "f5"]


async def test_follow_sends_the_last_flow_then_every_new_one(served: tuple[Ring, ObserverClient, Clock]) -> None:
    ring, client, _ = served
    received: list[str] = []
    stream = client.get_flows(GetFlowsRequest(number=1, follow=True))
    received.append((await anext(stream)).flow.uuid)  # the stream is set up once the buffered flow arrived
    for n in range(10, 13):
        ring.write(flow(n))
    for _ in range(3):
        received.append((await asyncio.wait_for(anext(stream), 10)).flow.uuid)
    await stream.aclose()
    assert received == ["f9", "f10", "f11", "f12"]


async def test_field_mask_returns_only_the_listed_fields(served: tuple[Ring, ObserverClient, Clock]) -> None:
    _, client, _ = served
    request = GetFlowsRequest(number=1)
    request.field_mask.paths.extend(["uuid", "source.pod_name"])
    (response,) = await collect(client, request)
    assert response.flow == Flow(uuid="f9", source={"pod_name": "pod9"})


async def test_invalid_requests_are_refused_with_hubbles_message(served: tuple[Ring, ObserverClient, Clock]) -> None:
    _, client, _ = served
    with pytest.raises(InvalidInput, match="first cannot be specified with follow"):
        await collect(client, GetFlowsRequest(first=True, follow=True))
    with pytest.raises(InvalidInput, match="unknown protocol"):
        await collect(client, GetFlowsRequest(whitelist=[FlowFilter(protocol=["quic"])]))


async def test_server_status_nodes_namespaces_and_health(served: tuple[Ring, ObserverClient, Clock]) -> None:
    ring, client, clock = served
    for n in range(10, 20):  # 20 written, the ring holds 15
        ring.write(flow(n))
    clock.now += 5 * 10**9
    status = await client.server_status()
    assert (status.num_flows, status.max_flows, status.seen_flows) == (15, 15, 20)
    assert status.uptime_ns == 5 * 10**9 and status.version
    assert not status.HasField("num_connected_nodes")  # only a relay reports nodes
    (node,) = (await client.get_nodes()).nodes
    assert (node.name, node.state, node.num_flows, node.seen_flows) == ("node1", NODE_CONNECTED, 15, 20)
    assert node.address.startswith("127.0.0.1:")
    namespaces = (await client.get_namespaces()).namespaces
    assert [(n.cluster, n.namespace) for n in namespaces] == [("default", "default")]  # f4 was overwritten
    assert await client.health() == "SERVING"  # asked as Hubble asks: "hubble.server.Observer"
    assert await client.health("observer.Observer") == "SERVING"
    with pytest.raises(ObserverError, match="unknown service"):
        await client.health("nonsense")


async def test_unreachable_server(tmp_path: Path) -> None:
    async with ObserverClient(f"unix:{tmp_path / 'nothing.sock'}", timeout=2) as client:
        with pytest.raises(ObserverUnavailable, match="cannot reach the observer"):
            await client.server_status()


async def test_a_follower_overrun_by_the_writer_gets_a_lost_event() -> None:
    ring = Ring(3)
    for n in range(3):
        ring.write(flow(n))
    stream = get_flows(ring, GetFlowsRequest(number=1, follow=True), node_name="node1")
    assert (await anext(stream)).flow.uuid == "f2"
    for n in range(3, 10):  # the follower is at position 3; positions 3..6 get overwritten
        ring.write(flow(n))
    received = [await anext(stream) for _ in range(4)]
    assert uuids(received) == ["lost:4", "f7", "f8", "f9"]
    assert received[0].lost_events.source == HUBBLE_RING_BUFFER and received[0].node_name == "node1"
    await stream.aclose()


def test_flows_rate_covers_the_last_minute_or_the_buffered_span() -> None:
    ring = Ring(7)
    for n in range(4):
        ring.write(flow(n * 30))  # at 0, 30, 60, 90 s
    assert flows_rate(ring, T0 + 100 * 10**9) == pytest.approx(2 / 60)  # 60 s and 90 s are within the minute
    full = Ring(3)
    for n in range(10):
        full.write(flow(90 + n))  # the ring holds 97..99 s: rate over that span
    assert flows_rate(full, T0 + 100 * 10**9) == pytest.approx(3 / 3)
    assert server_status(full, started_ns=T0, now_ns=T0 + 100 * 10**9, version="v").seen_flows == 10


def test_publisher_fans_out_and_names_the_node() -> None:
    ring = Ring(7)
    tracker = NamespaceTracker(clock=lambda: T0)
    publisher = FlowPublisher(ring, node_name="node9", sinks=[tracker])
    unnamed = flow(1, ns="shop")
    unnamed.node_name = ""
    publisher.publish(unnamed)
    stored = ring.get(0).flow
    assert stored is not None and stored.node_name == "node9" and stored.Summary == "Ethernet"
    assert [n.namespace for n in tracker.namespaces()] == ["shop"]


async def test_a_taken_port_is_an_error_and_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "observer.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))  # what a killed agent leaves behind
    leftover.close()
    first = ObserverServer(Ring(), "a", listen="127.0.0.1:0", unix_socket=stale)
    await first.start()
    try:
        async with ObserverClient(str(stale)) as client:
            assert (await client.server_status()).max_flows == 4095
        second = ObserverServer(Ring(), "b", listen=f"127.0.0.1:{first.port}", unix_socket=None)
        with pytest.raises(MembraneError, match=r"cannot listen on 127\.0\.0\.1:"):
            await second.start()
    finally:
        await first.close(None)
