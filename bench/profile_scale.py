"""In-process profile of the agent's controllers on a large cluster (no kernel, no subprocess).

``python -m bench.profile_scale [--nodes N] [--endpoints N] [--memory]``

Fills a SQLite store the way the scale benchmark does (``bench_scale.fill_store``: N CiliumNodes,
their endpoint records and Pod objects, a few hundred identities), reflects it into the intent
tables with the agent's own reflectors, builds this node's policy, datapath, observer and routing
controllers on fakes, then times each one's computation on single changes:

- a new remote node (what ``remote node -> route`` measures);
- a new endpoint (and its pod) on one remote node;
- a remote endpoint deleted.

The nft step is the reconciler's planning of the transaction (``plan_sync``) against the ruleset it
applied last. ``--memory`` traces the allocations of the reflected tables (tracemalloc: slow, so
it is a separate run) and prints them per cluster endpoint.

The figures are in-process and single-threaded, so they hold steady on a busy machine where the
end-to-end benchmark does not.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bench_scale import _node_object, _pod_object, fill_store
from membrane.agent.datapath import DatapathController, NftObject, ruleset_of
from membrane.agent.intent import IntentReflector, IntentTables, reflectors
from membrane.agent.observer import AgentObserver, ObserverSettings
from membrane.agent.policy import PolicyController, PolicyTables
from membrane.agent.routing import LocalNode, peers_from_nodes
from membrane.api.endpoint import EndpointRecord
from membrane.core.config import ClusterConfig
from membrane.core.statedb import StateDB, Table
from membrane.datapath.nft.transaction import plan_sync
from membrane.datapath.ruleset import FlowLog
from membrane.store import keys, open_store
from membrane.store.base import KeyValue, Store

LOCAL = "local"


@dataclass
class Agent:
    """The controllers of one agent over reflected intent tables."""

    store: Store
    db: StateDB
    intent: IntentTables
    reflectors: list[IntentReflector]
    local: Table[EndpointRecord]
    policy: PolicyController
    datapath: DatapathController
    nft: Table[NftObject]
    observer: AgentObserver
    local_node: LocalNode
    applied: Any = None

    def plan(self) -> None:
        desired = ruleset_of(list(self.nft.snapshot()))
        plan_sync(self.applied, desired)
        self.applied = desired

    def routing(self) -> None:
        peers_from_nodes(self.intent.nodes.snapshot(), self.local_node,
                         [ipaddress.IPv4Network("10.128.0.0/9"), ipaddress.IPv4Network("10.127.0.0/16")])

    def steps(self) -> list[tuple[str, Callable[[], object]]]:
        return [("routing", self.routing), ("policy", self.policy.compute), ("datapath", self.datapath.compute),
                ("nft plan", self.plan), ("observer", self.observer.rebuild_state)]

    def reflector(self, prefix: str) -> IntentReflector:
        return next(r for r in self.reflectors if r.prefix == prefix)


async def _reflect(store: Store) -> tuple[StateDB, IntentTables, list[IntentReflector], list[asyncio.Task[None]]]:
    db = StateDB()
    intent = IntentTables.create(db)
    found = reflectors(store, intent, local_node=LOCAL)
    tasks = [asyncio.create_task(r.run()) for r in found]
    await asyncio.gather(*(r.synced.wait() for r in found))
    return db, intent, found, tasks


def _agent(store: Store, db: StateDB, intent: IntentTables, found: list[IntentReflector]) -> Agent:
    local: Table[EndpointRecord] = db.table("local_endpoints", primary=lambda r: r.key)
    local.writer("profile")
    policy = PolicyController(intent, local, PolicyTables.create(db), LOCAL)
    nft: Table[NftObject] = db.table("nft", primary=lambda r: r.name)
    datapath = DatapathController(local, policy.tables, nft, None, FlowLog(), intent.cluster)
    observer = AgentObserver(ObserverSettings(enabled=False), node_name=LOCAL, endpoints=intent.endpoints,
                             nodes=intent.nodes, tunnel_ifindex=lambda: 0)
    node = LocalNode(LOCAL, ipaddress.IPv4Address("10.199.0.1"), "eth0", 1500, ipaddress.IPv4Network("10.126.0.0/24"))
    return Agent(store, db, intent, found, local, policy, datapath, nft, observer, node)


def _kv(key: str, value: bytes, revision: int) -> KeyValue:
    return KeyValue(key=key, value=value, create_revision=revision, mod_revision=revision, version=1)


def _changes(agent: Agent, count: int) -> list[tuple[str, Callable[[int], None]]]:
    """Changes applied through the reflectors' decoding (store revisions made up, far ahead)."""
    nodes = agent.reflector(keys.objects_prefix("ciliumnodes"))
    endpoints = agent.reflector(keys.ENDPOINTS)
    pods = agent.reflector(keys.objects_prefix("pods"))
    base = 10_000_000

    def new_node(i: int) -> None:
        name = f"new{i:03d}"
        kv = _kv(keys.object_key("ciliumnodes", None, name),
                 _node_object(name, f"10.201.0.{i + 10}", f"10.127.{i}.0/24"), base + i)
        nodes.writer.upsert(nodes._decode(kv))

    def new_endpoint(i: int) -> None:
        node, ip = "sim0007", ipaddress.IPv4Address("10.128.7.200") + i
        record = EndpointRecord(f"{node}-x{i}", 900 + i, node, "scale", f"{node}-x{i}", "eth0", "/run/netns/x",
                                ip, 300, ("k8s:app=app300", "k8s:io.kubernetes.pod.namespace=scale"), "runner",
                                "ready", f"lxcx{i:010x}", 900 + i, "02:00:00:00:00:01")
        pod = _kv(keys.object_key("pods", "scale", record.pod), _pod_object(record.pod, node, str(ip), "app300"),
                  base + 100 + i)
        pods.writer.upsert(pods._decode(pod))
        endpoints.writer.upsert(endpoints._decode(_kv(record.key, record.to_json(), base + 100 + i)))

    def delete_endpoint(i: int) -> None:
        node = f"sim{100 + i:04d}"
        endpoints.writer.delete(f"{keys.ENDPOINTS}{node}/{node}-c3")

    return [("new remote node", new_node), ("new remote endpoint", new_endpoint),
            ("remote endpoint deleted", delete_endpoint)][:count]


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


async def profile(nodes: int, endpoints: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mb-profile-") as tmp:
        url = f"sqlite://{Path(tmp)}/store.db"
        started = time.perf_counter()
        await fill_store(url, nodes, endpoints)
        print(f"store filled in {time.perf_counter() - started:.1f} s")
        store = await open_store(url)
        try:
            started = time.perf_counter()
            db, intent, found, tasks = await _reflect(store)
            print(f"intent synced in {time.perf_counter() - started:.2f} s")
            agent = _agent(store, db, intent, found)
            first = {name: _time(step) for name, step in agent.steps()}
            print("first computation: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in first.items()))
            for what, change in _changes(agent, 3):
                timings: dict[str, list[float]] = {name: [] for name, _ in agent.steps()}
                for i in range(rounds):
                    change(i)
                    for name, step in agent.steps():
                        timings[name].append(_time(step))
                line = ", ".join(f"{n} {statistics.median(t):.1f}" for n, t in timings.items())
                total = sum(statistics.median(t) for t in timings.values())
                print(f"{what:<24} median ms: {line}; sum {total:.0f}")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await store.close()


async def memory(nodes: int, endpoints: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mb-profile-") as tmp:
        url = f"sqlite://{Path(tmp)}/store.db"
        await fill_store(url, nodes, endpoints)
        store = await open_store(url)
        try:
            gc.collect()
            tracemalloc.start()
            db, intent, found, tasks = await _reflect(store)
            gc.collect()
            reflected, _ = tracemalloc.get_traced_memory()
            agent = _agent(store, db, intent, found)
            for _, step in agent.steps():
                step()
            gc.collect()
            computed, _ = tracemalloc.get_traced_memory()
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
            print(f"reflected intent: {reflected / 1024 / 1024:.1f} MiB, {reflected / endpoints / 1024:.2f} KiB "
                  f"per endpoint; with controllers: {computed / 1024 / 1024:.1f} MiB, "
                  f"{computed / endpoints / 1024:.2f} KiB per endpoint")
            for stat in snapshot.statistics("lineno")[:15]:
                print(f"  {stat.size / 1024 / 1024:7.1f} MiB  {stat.traceback}")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="trace the memory of the tables instead")
    args = parser.parse_args()
    ClusterConfig()  # import cost out of the figures
    if args.memory:
        asyncio.run(memory(args.nodes, args.endpoints))
    else:
        asyncio.run(profile(args.nodes, args.endpoints, args.rounds))


if __name__ == "__main__":
    main()
