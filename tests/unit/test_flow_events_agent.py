"""The agent's observer wiring without a kernel: a fake event source, the store, the real ring,
Observer API (on a unix socket) and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from membrane.agent.intent import IntentTables
from membrane.agent.observer import AgentObserver, ObserverSettings
from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.core.lifecycle import Lifecycle
from membrane.core.statedb import StateDB, Table
from membrane.datapath.flowcodes import DROP_SPOOFED_SOURCE, TRACE_NEW, TRACE_SERVICE_TRANSLATION, TRACE_TCP_REPLY
from membrane.datapath.ruleset import FlowLog
from membrane.loadbalancer.model import Backend, Frontend, L4Addr
from membrane.observe.client import ObserverClient
from membrane.observe.model import PERF_EVENT_RING_BUFFER, FlowFilter, GetFlowsRequest
from membrane.observe.nflog import (
    HOOK_FORWARD,
    HOOK_PREROUTING,
    IPPROTO_TCP,
    TCP_ACK,
    TCP_SYN,
    FakeFlowEventSource,
    NflogRecord,
    Packet,
)
from membrane.testing.netns import async_wait_until

NODE = "node1"


def endpoint(container: str, pod: str, ip: str, identity: int, ifindex: int) -> EndpointRecord:
    return EndpointRecord(container, ifindex, NODE, "default", pod, "eth0", f"/run/netns/{pod}", IPv4Address(ip),
                          identity, (f"k8s:app={pod}",), "runner", "ready", f"lxc{container:0<11}", ifindex)


def record(prefix: str, src: str, dst: str, flags: int, indev: int, outdev: int, seq: int,
           hook: int = HOOK_FORWARD) -> NflogRecord:
    return NflogRecord(prefix, 1_700_000_000_000_000_000 + seq, hook, indev, outdev, 0, seq,
                       Packet(4, src, dst, IPPROTO_TCP, 60, 40000, 80, tcp_flags=flags))


@pytest.fixture
async def observer(tmp_path: Path) -> AsyncIterator[tuple[AgentObserver, FakeFlowEventSource]]:
    intent = IntentTables.create(StateDB())
    endpoints, nodes = intent.endpoints.writer("test"), intent.nodes.writer("test")
    endpoints.upsert(endpoint("aaa", "client", "10.244.1.10", 1001, 7))
    node = {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": NODE},
            "spec": {"addresses": [{"type": "InternalIP", "ip": "172.31.0.11"}],
                     "ipam": {"podCIDRs": ["10.244.1.0/24"]}}}
    nodes.upsert(CiliumNode.model_validate(node))
    source = FakeFlowEventSource()
    settings = ObserverSettings(listen=None, unix_socket=tmp_path / "observer.sock", metrics_listen="127.0.0.1:0",
                                capacity=63)
    agent_observer = AgentObserver(settings, node_name=NODE, endpoints=intent.endpoints, nodes=intent.nodes,
                                   source=source, tunnel_ifindex=lambda: 0)
    lifecycle = Lifecycle()
    await agent_observer.start(lifecycle)
    assert 7 in agent_observer.state.local_by_ifindex  # the tables as they were at start
    endpoints.upsert(endpoint("bbb", "server", "10.244.1.11", 1002, 9))  # and as they change
    await async_wait_until(lambda: 9 in agent_observer.state.local_by_ifindex, what="the new endpoint in the state")
    try:
        yield agent_observer, source
    finally:
        await agent_observer.close()
        await lifecycle.stop()


async def test_events_become_flows_served_over_the_observer_socket(
        observer: tuple[AgentObserver, FakeFlowEventSource]) -> None:
    agent_observer, source = observer
    source.push([record(TRACE_NEW.prefix(), "10.244.1.10", "10.244.1.11", TCP_SYN, 7, 9, 0),
                 record(TRACE_TCP_REPLY.prefix(), "10.244.1.11", "10.244.1.10", TCP_SYN | TCP_ACK, 9, 7, 1)])
    await async_wait_until(lambda: len(agent_observer.ring) == 2, what="two flows in the ring")
    assert agent_observer.settings.unix_socket is not None
    async with ObserverClient(str(agent_observer.settings.unix_socket)) as client:
        flows = [r.flow async for r in client.get_flows(GetFlowsRequest(number=10))]
        status = await client.server_status()
    assert [(f.source.pod_name, f.destination.pod_name, f.Summary) for f in flows] == [
        ("client", "server", "TCP Flags: SYN"), ("server", "client", "TCP Flags: SYN, ACK")]
    assert all(f.node_name == NODE for f in flows)
    assert (status.num_flows, status.max_flows, status.seen_flows) == (2, 63, 2)
    assert agent_observer.advertised() == {"socket": str(agent_observer.settings.unix_socket)}
    assert agent_observer.status()["flows"] == 2


async def test_lost_events_reach_readers_and_metrics(observer: tuple[AgentObserver, FakeFlowEventSource]) -> None:
    agent_observer, source = observer
    source.push([record(DROP_SPOOFED_SOURCE.prefix(), "10.244.1.99", "10.244.1.11", TCP_SYN, 7, 0, 5,
                        hook=HOOK_PREROUTING)], lost=5)
    await async_wait_until(lambda: agent_observer.ring.seen_flows == 1, what="the drop in the ring")
    events = [agent_observer.ring.get(p) for p in range(agent_observer.ring.oldest, agent_observer.ring.written)]
    assert events[0].lost is not None
    assert (events[0].lost.source, events[0].lost.num_events_lost) == (PERF_EVENT_RING_BUFFER, 5)
    assert events[1].flow is not None and events[1].flow.source.pod_name == "client"
    assert agent_observer.metrics_server is not None and agent_observer.metrics_server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", agent_observer.metrics_server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    assert 'hubble_lost_events_total{source="perf_event_ring_buffer"} 5' in body
    assert 'hubble_drop_total{protocol="TCP",reason="INVALID_SOURCE_IP"} 1' in body
    assert agent_observer.status()["lostEvents"] == 5


async def test_a_prefix_from_a_newer_datapath_is_counted_not_fatal(
        observer: tuple[AgentObserver, FakeFlowEventSource]) -> None:
    agent_observer, source = observer
    source.push([record("mb:t:F:?:1", "10.244.1.10", "10.244.1.11", TCP_SYN, 7, 9, 0),
                 record(TRACE_NEW.prefix(), "10.244.1.10", "10.244.1.11", TCP_SYN, 7, 9, 1)])
    await async_wait_until(lambda: agent_observer.ring.seen_flows == 1, what="the good flow")
    assert agent_observer.malformed == 1


def test_turned_off_it_asks_for_no_log_rules() -> None:
    intent = IntentTables.create(StateDB())
    settings = ObserverSettings(enabled=False)
    observer = AgentObserver(settings, node_name=NODE, endpoints=intent.endpoints, nodes=intent.nodes,
                             source=FakeFlowEventSource())
    assert observer.flow_log is None
    assert observer.status() == {"summary": "Disabled"}
    assert AgentObserver(ObserverSettings(), node_name=NODE, endpoints=intent.endpoints, nodes=intent.nodes,
                         source=FakeFlowEventSource()).flow_log == FlowLog()


def test_the_enrichment_index_follows_changes_like_a_full_rebuild() -> None:
    from membrane.agent.observer import EnrichmentIndex, enrichment_state

    db = StateDB()
    tables = IntentTables.create(db)
    endpoints, nodes = tables.endpoints.writer("test"), tables.nodes.writer("test")

    def record(name: str, node: str, ip: str, identity: int, ifindex: int = 0) -> EndpointRecord:
        return EndpointRecord(name, 1, node, "x", name, "eth0", "/ns", IPv4Address(ip), identity, ("k8s:app=a",),
                              "cni", "ready", f"lxc{name}" if ifindex else "", ifindex)

    def node(name: str, ip: str, cidr: str) -> CiliumNode:
        spec = {"addresses": [{"type": "InternalIP", "ip": ip}], "ipam": {"podCIDRs": [cidr]}}
        return CiliumNode.model_validate({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                                          "metadata": {"name": name}, "spec": spec})

    index = EnrichmentIndex("n1")
    steps = [
        lambda: (endpoints.upsert(record("a", "n1", "10.0.1.5", 300, 7), record("b", "n2", "10.0.2.5", 301)),
                 nodes.upsert(node("n1", "172.31.0.1", "10.0.1.0/24"), node("n2", "172.31.0.2", "10.0.2.0/24"))),
        lambda: endpoints.upsert(record("c", "n2", "10.0.2.6", 302)),
        lambda: endpoints.delete("/membrane/endpoints/n2/b"),
        lambda: nodes.upsert(node("n2", "172.31.0.9", "10.0.2.0/24")),
        lambda: endpoints.upsert(record("a", "n1", "10.0.1.6", 303, 7)),
    ]
    for step in steps:
        step()
        got = index.state(tables.endpoints.snapshot(), tables.nodes.snapshot(), 0)
        want = enrichment_state("n1", tables.endpoints.snapshot(), tables.nodes.snapshot())
        assert dict(got.by_ip) == dict(want.by_ip) and dict(got.local_by_ifindex) == dict(want.local_by_ifindex)
    assert "10.0.2.5" not in got.by_ip and got.by_ip["172.31.0.9"].node == "n2"
    assert got.local_by_ifindex[7].ip == "10.0.1.6"


async def test_flows_through_a_frontend_name_the_service_over_the_api(tmp_path: Path) -> None:
    db = StateDB()
    intent = IntentTables.create(db)
    intent.endpoints.writer("test").upsert(endpoint("aaa", "client", "10.244.1.10", 1001, 7))
    frontends: Table[Frontend] = db.table("frontends", primary=lambda f: f.address)
    source = FakeFlowEventSource()
    settings = ObserverSettings(listen=None, unix_socket=tmp_path / "observer.sock", metrics_listen=None)
    agent_observer = AgentObserver(settings, node_name=NODE, endpoints=intent.endpoints, nodes=intent.nodes,
                                   source=source, tunnel_ifindex=lambda: 0, frontends=frontends)
    lifecycle = Lifecycle()
    await agent_observer.start(lifecycle)
    try:
        backend = Backend(IPv4Address("10.244.1.11"), 80, NODE)
        # The frontends change while the observer runs: it follows them.
        frontends.writer("test").upsert(Frontend(1, ("default", "web"), "http", "ClusterIP",
                                                 L4Addr(IPv4Address("10.96.0.10"), "TCP", 80), (backend,), (backend,)))
        await async_wait_until(lambda: bool(agent_observer.services.index), what="the frontend in the observer")
        source.push([record(TRACE_SERVICE_TRANSLATION.prefix(), "10.244.1.10", "10.96.0.10", TCP_SYN, 7, 0, 0,
                            hook=HOOK_PREROUTING),
                     record(TRACE_NEW.prefix(), "10.244.1.10", "10.244.1.11", TCP_SYN, 7, 9, 1),
                     record(TRACE_NEW.prefix(), "10.244.1.10", "10.244.1.12", TCP_SYN, 7, 11, 2)])
        await async_wait_until(lambda: len(agent_observer.ring) == 3, what="three flows in the ring")
        assert settings.unix_socket is not None
        async with ObserverClient(str(settings.unix_socket)) as client:
            request = GetFlowsRequest(number=10, whitelist=[FlowFilter(destination_service=["default/web"])])
            flows = [r.flow async for r in client.get_flows(request)]
        assert [(f.IP.destination, f.destination_service.name) for f in flows] == [
            ("10.96.0.10", "web"), ("10.244.1.11", "web")]
    finally:
        await agent_observer.close()
        await lifecycle.stop()
