"""Control-plane scale by simulation: one real agent in a store holding a large cluster.

The machine cannot host 1,000 nodes, but the store can hold them. The benchmark fills a SQLite
store with ``NODES`` CiliumNode objects (pod CIDRs claimed, underlay addresses never contacted),
``ENDPOINTS`` endpoint records with their Pod objects and address reservations, and a few hundred
identities — then starts one real agent in a fresh node namespace and reports:

- initial sync: agent start until its API answers (it has listed everything and programmed the
  routes to every peer);
- memory per cluster endpoint: (agent RSS in the big cluster - agent RSS alone) / ENDPOINTS,
  against Cilium's published ~10.5 KiB per pod (goal ≤ 10 KiB);
- remote change to datapath: a new node appears in the store → its route is in the agent's
  kernel, p50/p99 over ``CHANGES`` changes (goal p99 ≤ 1 s).

Baseline column: the same agent with only itself in the cluster (sync time and RSS).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import tempfile
import time
from pathlib import Path

from bench.cluster import require_root, require_tools
from bench.harness import BenchContext, BenchResult, Metric, percentile
from membrane.api.endpoint import EndpointRecord
from membrane.core.config import ClusterConfig
from membrane.store import keys, open_store
from membrane.store.base import Put
from membrane.testing.agentnode import AgentNode

TITLE = "control plane at scale (simulated): 1,000 nodes / 50,000 endpoints in the store, one real agent"
NODES = 1000
ENDPOINTS = 50_000
IDENTITIES = 500
CHANGES = 20
BATCH = 2000
CHANGE_POOL = "10.127.0.0/16"  # where the nodes added during the run get their CIDRs


def _node_object(name: str, node_ip: str, cidr: str) -> bytes:
    return json.dumps({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 1},
        "spec": {"addresses": [{"type": "InternalIP", "ip": node_ip}], "ipam": {"podCIDRs": [cidr]}},
        "status": {"routing": "vxlan", "mtu": 1450, "device": "eth0"},
    }).encode()


def _pod_object(name: str, node: str, ip: str, app: str) -> bytes:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "scale", "uid": f"uid-{name}", "labels": {"app": app},
                     "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 1},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "hostIP": "10.200.0.1"},
    }).encode()


async def fill_store(url: str, nodes: int, endpoints: int) -> None:
    """A cluster of ``nodes`` remote nodes, each with endpoints/nodes endpoints, in batched txns."""
    store = await open_store(url)
    try:
        ops: list[Put] = []

        async def flush() -> None:
            if ops:
                await store.txn([], ops)
                ops.clear()

        pool = ipaddress.IPv4Network("10.128.0.0/9")
        # Peers are only routed when their CIDRs lie in the cluster pools: make both ranges pools.
        cluster = ClusterConfig(clusterPoolIPv4PodCIDRList=(str(pool), CHANGE_POOL))
        ops.append(Put(keys.CLUSTER_CONFIG, cluster.model_dump_json().encode()))
        per_node = endpoints // nodes if nodes else 0
        for n, cidr in zip(range(nodes), pool.subnets(new_prefix=24), strict=False):
            name = f"sim{n:04d}"
            node_ip = str(ipaddress.IPv4Address("10.200.0.0") + n + 10)
            ops.append(Put(keys.object_key("ciliumnodes", None, name), _node_object(name, node_ip, str(cidr))))
            ops.append(Put(keys.pod_cidr_key(cidr), name.encode()))
            for e in range(per_node):
                ip = cidr.network_address + 2 + e
                identity = 256 + (n * per_node + e) % IDENTITIES
                record = EndpointRecord(f"{name}-c{e}", e + 1, name, "scale", f"{name}-p{e}", "eth0",
                                        f"/run/netns/{name}-{e}", ip, identity,
                                        (f"k8s:app=app{identity}", "k8s:io.kubernetes.pod.namespace=scale"),
                                        "runner", "ready", f"lxc{e:011x}", e + 10, "02:00:00:00:00:01")
                ops.append(Put(record.key, record.to_json()))
                ops.append(Put(keys.pod_ip_key(ip), record.key.encode()))
                ops.append(Put(keys.object_key("pods", "scale", record.pod),
                               _pod_object(record.pod, name, str(ip), f"app{identity}")))
                if len(ops) >= BATCH:
                    await flush()
        for identity in range(256, 256 + IDENTITIES):
            labels = [f"k8s:app=app{identity}", "k8s:io.kubernetes.pod.namespace=scale"]
            ops.append(Put(keys.identity_id_key(identity), json.dumps(labels).encode()))
            ops.append(Put(keys.identity_labels_key(labels), str(identity).encode()))
        await flush()
    finally:
        await store.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _agent_pid(node: AgentNode) -> int:
    """The agent process inside ``nsenter`` (nsenter execs it, so the pid is the same)."""
    assert node.agent is not None
    return node.agent.pid


def _start_and_measure(node: AgentNode) -> tuple[float, int]:
    started = time.monotonic()
    node.start(wait=False)
    node.wait_ready(timeout=600)
    sync = time.monotonic() - started
    time.sleep(2.0)  # let the first reconciles settle before reading memory
    return sync, _rss_kib(_agent_pid(node))


def _route_present(node: AgentNode, cidr: str) -> bool:
    out = node.node.run("ip", "-4", "route", "show", cidr, check=False).stdout
    return bool(out.strip())


async def _remote_changes(node: AgentNode, count: int) -> list[float]:
    store = await open_store(node.store_url)
    latencies = []
    try:
        for i in range(count):
            name, cidr = f"new{i:03d}", f"10.127.{i}.0/24"
            started = time.monotonic()
            await store.put(keys.object_key("ciliumnodes", None, name),
                            _node_object(name, f"10.201.0.{i + 10}", cidr))
            deadline = started + 10
            while not _route_present(node, cidr):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.005)
            latencies.append(time.monotonic() - started)
    finally:
        await store.close()
    return latencies


def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    require_root()
    require_tools("nsenter", "ip", "nft")
    with AgentNode("mbbs") as alone:
        ctx.log("agent alone in its cluster")
        base_sync, base_rss = _start_and_measure(alone)
    with tempfile.TemporaryDirectory(prefix="mbbs-fill-"), AgentNode("mbbs") as node:
        fill_started = time.monotonic()
        asyncio.run(fill_store(node.store_url, NODES, ENDPOINTS))
        ctx.log(f"store filled with {NODES} nodes / {ENDPOINTS} endpoints in {time.monotonic() - fill_started:.1f} s")
        sync, rss = _start_and_measure(node)
        ctx.log(f"initial sync {sync:.2f} s, RSS {rss / 1024:.1f} MiB")
        routes = node.node.run("ip", "-4", "route", "show", "proto", "177").stdout.count("\n")
        latencies = asyncio.run(_remote_changes(node, CHANGES))
        node.stop()
    per_endpoint = (rss - base_rss) / ENDPOINTS
    metrics = (
        Metric("initial sync", "s", (base_sync,), (sync,), higher_is_better=False),
        Metric("agent RSS", "MiB", (base_rss / 1024,), (rss / 1024,), higher_is_better=False),
        Metric("memory per cluster endpoint", "KiB", (10.5,), (per_endpoint,), higher_is_better=False),
        Metric("remote node -> route p50", "ms", (), (percentile(latencies, 50) * 1000,), higher_is_better=False),
        Metric("remote node -> route p99", "ms", (), (percentile(latencies, 99) * 1000,), higher_is_better=False),
    )
    return BenchResult(
        name="scale", title=TITLE, status="ok", baseline_label="alone / Cilium", subject_label="simulated",
        metrics=metrics, seconds=time.monotonic() - started,
        notes={"cluster": f"{NODES} nodes, {ENDPOINTS} endpoints, {IDENTITIES} identities",
               "routes programmed": str(routes),
               "memory baseline": "Cilium's scalability report: ~10.5 KiB per pod (goal <= 10 KiB)"},
    )


if __name__ == "__main__":
    from bench.harness import render_table

    print(render_table(run(BenchContext())))
