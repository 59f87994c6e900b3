"""The relay: merging per-node streams by time, node status, aggregation — pure parts first,
then a real relay over gRPC in front of two agents' observer servers (unix sockets, no root)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from membrane.core.errors import InvalidInput
from membrane.observe.client import ObserverClient, ObserverUnavailable
from membrane.observe.model import (
    NODE_CONNECTED,
    NODE_ERROR,
    NODE_UNAVAILABLE,
    Flow,
    GetFlowsRequest,
    GetFlowsResponse,
    ServerStatusResponse,
    flow_response,
    set_time,
)
from membrane.observe.relay import (
    Relay,
    RelayServer,
    aggregate_status,
    merge_by_time,
    merge_follow,
    node_status_response,
    peer_target,
    peers_from_nodes,
)
from membrane.observe.ring import Ring
from membrane.observe.server import ObserverServer
from membrane.store import keys
from membrane.store.base import KeyValue
from membrane.store.memory import MemoryStore

S = 1_000_000_000
T0 = (time.time_ns() // S - 60) * S  # recent: namespaces are listed for an hour after their last flow


def response(node: str, time_ns: int, pod: str = "") -> GetFlowsResponse:
    flow = Flow(node_name=node)
    flow.source.pod_name = pod or f"{node}-{time_ns}"
    set_time(flow, time_ns)
    return flow_response(flow)


async def stream(*items: GetFlowsResponse | BaseException, then_wait: bool = False) -> AsyncIterator[GetFlowsResponse]:
    for item in items:
        await asyncio.sleep(0)
        if isinstance(item, BaseException):
            raise item
        yield item
    if then_wait:
        await asyncio.Event().wait()


def error_event(name: str, error: BaseException) -> GetFlowsResponse:
    return node_status_response(NODE_ERROR, [name], relay_name="relay", message=str(error))


def times(responses: list[GetFlowsResponse]) -> list[tuple[str, int]]:
    return [(r.node_name, r.flow.time.seconds * S + r.flow.time.nanos) for r in responses if r.HasField("flow")]


# -- pure parts -------------------------------------------------------------------------------------------
async def test_finite_streams_merge_in_time_order() -> None:
    a = stream(response("a", T0 + 1), response("a", T0 + 4), response("a", T0 + 5))
    b = stream(response("b", T0 + 2), response("b", T0 + 3), response("b", T0 + 6))
    merged = [r async for r in merge_by_time({"a": a, "b": b}, error_event)]
    assert times(merged) == [("a", T0 + 1), ("b", T0 + 2), ("b", T0 + 3), ("a", T0 + 4), ("a", T0 + 5),
                             ("b", T0 + 6)]


async def test_a_failing_node_is_reported_and_the_others_go_on() -> None:
    a = stream(response("a", T0 + 1), ObserverUnavailable("connection reset"))
    b = stream(response("b", T0 + 2), response("b", T0 + 3))
    merged = [r async for r in merge_by_time({"a": a, "b": b}, error_event)]
    errors = [r.node_status for r in merged if r.HasField("node_status")]
    assert [(e.state_change, list(e.node_names)) for e in errors] == [(NODE_ERROR, ["a"])]
    assert "connection reset" in errors[0].message
    assert times(merged) == [("a", T0 + 1), ("b", T0 + 2), ("b", T0 + 3)]


async def test_a_bad_request_ends_the_whole_call() -> None:
    with pytest.raises(InvalidInput):
        async for _ in merge_by_time({"a": stream(InvalidInput(["bad filter"]))}, error_event):
            pass


async def test_following_holds_flows_for_the_delay_and_sorts_them() -> None:
    now = time.time_ns()
    # b's flow happened first but arrives last, within the delay: it still comes out first.
    a = stream(response("a", now + 2_000_000), then_wait=True)
    b = stream(response("b", now), then_wait=True)
    merged = merge_follow({"a": a, "b": b}, error_event, delay_ns=200_000_000)
    first, second = await anext(merged), await anext(merged)
    await merged.aclose()
    assert times([first, second]) == [("b", now), ("a", now + 2_000_000)]


async def test_following_emits_at_once_when_the_buffer_is_full() -> None:
    now = time.time_ns()
    a = stream(*(response("a", now + i) for i in range(5)), then_wait=True)
    merged = merge_follow({"a": a}, error_event, delay_ns=3600 * S, max_buffer=2)
    got = [await anext(merged) for _ in range(3)]
    await merged.aclose()
    assert times(got) == [("a", now), ("a", now + 1), ("a", now + 2)]


async def test_following_ends_when_every_stream_has_ended() -> None:
    a = stream(response("a", T0 + 2))
    b = stream(response("b", T0 + 1), ObserverUnavailable("gone"))
    merged = [r async for r in merge_follow({"a": a, "b": b}, error_event, delay_ns=3600 * S)]
    assert times(merged) == [("b", T0 + 1), ("a", T0 + 2)]
    assert [r.node_status.state_change for r in merged if r.HasField("node_status")] == [NODE_ERROR]


def test_status_sums_connected_nodes_and_counts_the_rest() -> None:
    total = aggregate_status({
        "a": ServerStatusResponse(num_flows=3, max_flows=4095, seen_flows=10, uptime_ns=5 * S, flows_rate=0.5),
        "b": ServerStatusResponse(num_flows=4, max_flows=4095, seen_flows=4, uptime_ns=9 * S, flows_rate=0.25),
        "c": None,
    }, version="1.0")
    assert (total.num_flows, total.max_flows, total.seen_flows, total.uptime_ns) == (7, 8190, 14, 9 * S)
    assert total.flows_rate == 0.75
    assert (total.num_connected_nodes.value, total.num_unavailable_nodes.value) == (2, 1)
    assert list(total.unavailable_nodes) == ["c"]


def node_kv(name: str, observer: dict[str, str] | None) -> KeyValue:
    obj: dict[str, object] = {"metadata": {"name": name}}
    if observer is not None:
        obj["status"] = {"observer": observer}
    return KeyValue(keys.object_key("ciliumnodes", None, name), json.dumps(obj).encode(), 1, 1)


def test_peers_prefer_the_local_socket_then_the_address() -> None:
    here = {"/run/a/observer.sock"}
    nodes = [node_kv("a", {"socket": "/run/a/observer.sock", "address": "10.0.0.1:4244"}),
             node_kv("b", {"socket": "/elsewhere/observer.sock", "address": "10.0.0.2:4244"}),
             node_kv("c", None), node_kv("d", {"socket": "/nowhere"})]
    assert peers_from_nodes(nodes, here.__contains__) == {
        "a": "/run/a/observer.sock", "b": "10.0.0.2:4244", "c": None, "d": None}
    assert peer_target({}, here.__contains__) is None


# -- a real relay over gRPC ------------------------------------------------------------------------------
class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = MemoryStore()
        self.rings: dict[str, Ring] = {}
        self.servers: list[ObserverServer] = []

    async def add_agent(self, name: str) -> Ring:
        ring = Ring(63)
        sock = self.tmp / f"{name}.sock"
        server = ObserverServer(ring, name, listen=None, unix_socket=sock)
        await server.start()
        self.servers.append(server)
        self.rings[name] = ring
        await self.store.put(keys.object_key("ciliumnodes", None, name),
                             json.dumps({"metadata": {"name": name}, "status": {"observer": {"socket": str(sock)}}})
                             .encode())
        return ring

    async def close(self) -> None:
        for server in self.servers:
            await server.close(None)
        await self.store.close()


def write(ring: Ring, node: str, time_ns: int, namespace: str = "default") -> None:
    flow = Flow(node_name=node)
    flow.source.namespace = namespace
    flow.source.pod_name = f"{node}-{time_ns % S}"
    flow.Summary = "TCP Flags: SYN"
    set_time(flow, time_ns)
    ring.write(flow)


@pytest.fixture
async def relay_setup(tmp_path: Path) -> AsyncIterator[tuple[Cluster, ObserverClient, Relay]]:
    cluster = Cluster(tmp_path)
    ring_a, ring_b = await cluster.add_agent("node-a"), await cluster.add_agent("node-b")
    await cluster.store.put(keys.object_key("ciliumnodes", None, "node-c"),
                            json.dumps({"metadata": {"name": "node-c"},
                                        "status": {"observer": {"socket": str(tmp_path / "gone.sock")}}}).encode())
    for i, (ring, node) in enumerate([(ring_a, "node-a"), (ring_b, "node-b")] * 3):
        write(ring, node, T0 + i * 1000, namespace="shop" if node == "node-b" else "default")
    relay = Relay(cluster.store, name="relay", delay_ns=100_000_000, probe_timeout=2)
    follower = asyncio.create_task(relay.run())
    await relay.synced.wait()
    server = RelayServer(relay, "127.0.0.1:0")
    await server.start()
    client = ObserverClient(server.address)
    try:
        yield cluster, client, relay
    finally:
        await client.close()
        await server.close(None)
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await cluster.close()


async def test_the_relay_returns_every_node_in_time_order(
        relay_setup: tuple[Cluster, ObserverClient, Relay]) -> None:
    _, client, _ = relay_setup
    responses = [r async for r in client.get_flows(GetFlowsRequest(number=10))]
    statuses = [(r.node_status.state_change, list(r.node_status.node_names))
                for r in responses if r.HasField("node_status")]
    assert statuses == [(NODE_CONNECTED, ["node-a", "node-b"]), (NODE_UNAVAILABLE, ["node-c"])]
    assert times(responses) == [("node-a" if i % 2 == 0 else "node-b", T0 + i * 1000) for i in range(6)]


async def test_number_applies_per_node(relay_setup: tuple[Cluster, ObserverClient, Relay]) -> None:
    _, client, _ = relay_setup
    responses = [r async for r in client.get_flows(GetFlowsRequest(number=1))]
    assert times(responses) == [("node-a", T0 + 4000), ("node-b", T0 + 5000)]


async def test_following_through_the_relay(relay_setup: tuple[Cluster, ObserverClient, Relay]) -> None:
    cluster, client, _ = relay_setup
    now = time.time_ns()
    request = GetFlowsRequest(follow=True)
    # From a moment ago: flows written while the relay opens the node streams are not missed.
    request.since.seconds, request.since.nanos = divmod(now - S, S)
    flows = client.get_flows(request)
    try:
        first = await anext(flows)
        assert first.node_status.state_change == NODE_CONNECTED
        second = await anext(flows)
        assert second.node_status.state_change == NODE_UNAVAILABLE
        write(cluster.rings["node-b"], "node-b", now + 1_000_000)
        write(cluster.rings["node-a"], "node-a", now)
        got = [await asyncio.wait_for(anext(flows), 10) for _ in range(2)]
    finally:
        await flows.aclose()  # type: ignore[attr-defined]
    assert times(got) == [("node-a", now), ("node-b", now + 1_000_000)]


async def test_status_nodes_and_namespaces_cover_the_cluster(
        relay_setup: tuple[Cluster, ObserverClient, Relay]) -> None:
    _, client, _ = relay_setup
    status = await client.server_status()
    assert (status.num_flows, status.max_flows, status.seen_flows) == (6, 126, 6)
    assert (status.num_connected_nodes.value, status.num_unavailable_nodes.value) == (2, 1)
    assert list(status.unavailable_nodes) == ["node-c"]
    nodes = {n.name: n for n in (await client.get_nodes()).nodes}
    assert {name: n.state for name, n in nodes.items()} == {
        "node-a": NODE_CONNECTED, "node-b": NODE_CONNECTED, "node-c": NODE_UNAVAILABLE}
    assert nodes["node-a"].num_flows == 3 and nodes["node-a"].max_flows == 63
    namespaces = (await client.get_namespaces()).namespaces
    assert [(n.cluster, n.namespace) for n in namespaces] == [("default", "default"), ("default", "shop")]
    assert await client.health() == "SERVING"


async def test_an_agent_that_goes_away_is_reported_and_seen_again_when_it_is_back(
        relay_setup: tuple[Cluster, ObserverClient, Relay]) -> None:
    cluster, client, _ = relay_setup
    gone = cluster.servers.pop(0)  # node-a
    sock = gone.unix_socket
    await gone.close(None)
    status = await client.server_status()
    assert list(status.unavailable_nodes) == ["node-a", "node-c"]
    assert (status.num_connected_nodes.value, status.num_flows) == (1, 3)  # node-b is still served
    # Restarted on the same socket (as a supervisor restarts an agent), with an empty buffer.
    again = ObserverServer(Ring(63), "node-a", listen=None, unix_socket=sock)
    await again.start()
    cluster.servers.append(again)
    nodes = {n.name: n.state for n in (await client.get_nodes()).nodes}
    assert nodes == {"node-a": NODE_CONNECTED, "node-b": NODE_CONNECTED, "node-c": NODE_UNAVAILABLE}


async def test_a_bad_request_is_refused_as_by_an_agent(relay_setup: tuple[Cluster, ObserverClient, Relay]) -> None:
    _, client, _ = relay_setup
    with pytest.raises(InvalidInput, match="first cannot be specified with follow"):
        async for _ in client.get_flows(GetFlowsRequest(first=True, follow=True)):
            pass


def test_the_relay_command_is_registered() -> None:
    from click.testing import CliRunner

    from membrane.cli.main import cli

    result = CliRunner().invoke(cli, ["relay", "--help"])
    assert result.exit_code == 0
    assert "--listen" in result.output and "127.0.0.1:4245" in result.output
