"""Services at scale: connection setup with 10 vs 10,000 services, ClusterIP vs direct, full sync,
one backend change reaching every node.

1. **Connection setup** (TCP_CRR: connect, 1-byte request/response, close; p50/p99 per
   transaction and the rate) from one pod to another through a ClusterIP, with 10 services loaded
   and with 10,000, interleaved in each run. The pods are the hand-wired pair of
   :mod:`bench.netpath`; the node namespace holds membrane's table, computed by the agent's own
   modules in this process (intent tables → :class:`~membrane.agent.services.ServicesController`
   → ``frontends`` → :class:`~membrane.agent.datapath.DatapathController` → ``nft`` rows →
   :class:`~membrane.datapath.reconcilers.NftReconciler` running ``nft`` in that namespace). The
   measured service is one of the 10 or 10,000 (every service has 10 backends: a verdict-map
   element and a chain each; the others' backends are addresses nothing answers on).
2. **Throughput** (iperf3, one stream) through the ClusterIP vs straight to the backend pod, the
   10,000 services loaded in both cases.
3. **Full sync** of 10,000 services x 10 backends (selectorless services and their EndpointSlices
   in the agent's intent tables) into an empty table in a fresh namespace, each stage timed; and
   one backend change (one slice rewritten) through the same stages with the 10,000 loaded.
4. **One backend change → every node's kernel**: a three-node lab with ``LAB_SERVICES`` services
   (10 backends each) written through the store; ``CHANGES`` times one EndpointSlice's endpoint is
   replaced by a new address, from the store write until every node's ``svc_<id>`` chain holds it
   (``nft monitor`` in each node's namespace timestamps the rule as the kernel commits it).

The goals are labelled as goals (ratio ≤ 1.05 for setup latency, ≥ 0.95 for throughput, full sync
≤ 1 s, change p99 ≤ 500 ms); nothing passes or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bench.cluster import bench_cluster, membrane, require_membrane, require_root, require_tools, sigterm_cleans_up
from bench.harness import BenchContext, BenchResult, Metric, median, percentile
from bench.netpath import (
    IPERF_PORT,
    POD_IPS,
    ROUTER_IP,
    TCPRR_PORT,
    NetnsPlace,
    PinnedPlace,
    Place,
    hand_wired_pods,
    remove_namespaces,
    run_in,
    start_servers,
    tcp_stream_gbits,
    traffic_cpu,
    unique_netns_prefix,
)
from membrane.agent.datapath import DatapathController, NftObject, ServiceInputs, ruleset_of
from membrane.agent.intent import IntentTables
from membrane.agent.services import ServicesController
from membrane.api import k8s
from membrane.api.endpoint import EndpointRecord
from membrane.core.statedb import StateDB, Table
from membrane.datapath.netns import if_nametoindex
from membrane.datapath.nft.objects import TableContents
from membrane.datapath.nft.runner import NftCommand
from membrane.datapath.nft.transaction import Transaction
from membrane.datapath.reconcilers import NftReconciler
from membrane.lab.host import IpNetns
from membrane.lab.plan import IpBatch
from membrane.loadbalancer.model import Frontend

TITLE = "services: 10 vs 10,000 services (TCP_CRR), ClusterIP vs direct, full sync, one change -> all nodes"
NETNS_BASE = "msb-"
LAB_PREFIX = "msb"
NODE = "node1"
NAMESPACE = "bench"
MEASURED = "svc-measured"
SMALL, LARGE = 10, 10_000
BACKENDS = 10
LAB_SERVICES = 1000
CHANGES = 50
CHANGE_TIMEOUT = 30.0
SERVICE_BASE = int(IPv4Address("10.96.0.0"))
BACKEND_BASE = int(IPv4Address("10.200.0.0"))  # 10 backends per filler service, never answered
BACKEND_PORT = 8080


# -- the load -------------------------------------------------------------------------------------
def service(name: str, cluster_ip: str | None, ports: Sequence[tuple[str, int]]) -> k8s.Service:
    spec: dict[str, Any] = {"type": "ClusterIP",
                            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports]}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = [cluster_ip]
    return k8s.Service.model_validate({"apiVersion": "v1", "kind": "Service",
                                       "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec})


def endpoint_slice(service_name: str, addresses: Sequence[str], ports: Sequence[tuple[str, int]],
                   nodes: Sequence[str] = (NODE,)) -> k8s.EndpointSlice:
    return k8s.EndpointSlice.model_validate({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{service_name}-1", "namespace": NAMESPACE,
                     "labels": {k8s.SERVICE_NAME_LABEL: service_name}},
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": nodes[i % len(nodes)]}
                      for i, a in enumerate(addresses)],
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    })


def filler_backends(n: int) -> list[str]:
    return [str(IPv4Address(BACKEND_BASE + n * BACKENDS + j)) for j in range(BACKENDS)]


def filler(n: int, with_ip: bool = True, nodes: Sequence[str] = (NODE,)) -> tuple[k8s.Service, k8s.EndpointSlice]:
    """Filler service ``n``: port 80 → 10 backends on 8080."""
    name = f"svc-{n:05d}"
    ip = str(IPv4Address(SERVICE_BASE + 16 + n)) if with_ip else None
    return (service(name, ip, [("http", 80)]),
            endpoint_slice(name, filler_backends(n), [("http", BACKEND_PORT)], nodes))


MEASURED_IP = str(IPv4Address(SERVICE_BASE + 10))
MEASURED_PORTS = (("rr", TCPRR_PORT), ("stream", IPERF_PORT))


def load(count: int) -> tuple[list[k8s.Service], list[k8s.EndpointSlice]]:
    """``count`` services: the measured one (to the second hand-wired pod) and ``count - 1`` fillers."""
    services = [service(MEASURED, MEASURED_IP, MEASURED_PORTS)]
    slices = [endpoint_slice(MEASURED, [POD_IPS[1]], MEASURED_PORTS)]
    for n in range(count - 1):
        svc, eps = filler(n)
        services.append(svc)
        slices.append(eps)
    return services, slices


# -- the agent's service path, in this process ----------------------------------------------------
class TimedRunner:
    """An nft runner that keeps how long the last transaction took (render + ``nft -f``)."""

    def __init__(self, inner: NftCommand) -> None:
        self.inner = inner
        self.seconds = 0.0

    async def apply(self, transaction: Transaction) -> None:
        started = time.perf_counter()
        try:
            await self.inner.apply(transaction)
        finally:
            self.seconds = time.perf_counter() - started

    async def read_table(self, family: str, table: str) -> TableContents | None:
        return await self.inner.read_table(family, table)


@dataclass
class Stages:
    services: float = 0.0  # ServicesController.compute: intent → frontends
    datapath: float = 0.0  # DatapathController.compute: frontends → nft rows
    plan: float = 0.0  # the reconciler: rows → ruleset → the transaction to send
    nft: float = 0.0  # render + nft -f
    kind: str = ""

    @property
    def total(self) -> float:
        return self.services + self.datapath + self.plan + self.nft

    def line(self) -> str:
        return (f"services {self.services * 1000:.0f} ms, datapath {self.datapath * 1000:.0f} ms, "
                f"reconciler plan {self.plan * 1000:.0f} ms, nft {self.nft * 1000:.0f} ms ({self.kind}): "
                f"{self.total * 1000:.0f} ms")


@dataclass
class Pipeline:
    """Intent tables → services controller → frontends → datapath controller → nft reconciler."""

    netns: str
    endpoints: Sequence[EndpointRecord] = ()
    db: StateDB = field(default_factory=StateDB)

    def __post_init__(self) -> None:
        self.intent = IntentTables.create(self.db)
        self._services_writer = self.intent.services.writer("bench")
        self._slices_writer = self.intent.endpointslices.writer("bench")
        self.frontends: Table[Frontend] = self.db.table("frontends", primary=lambda f: f.address,
                                                        indexes={"service": lambda f: [f.service]})
        local: Table[EndpointRecord] = self.db.table("local_endpoints", primary=lambda r: r.key)
        local.writer("bench").replace_all(self.endpoints)
        self.nft: Table[NftObject] = self.db.table("nft", primary=lambda r: r.name)
        self.services_controller = ServicesController(self.intent, self.frontends, NODE)
        self.datapath_controller = DatapathController(
            local, None, self.nft, None, None, self.intent.cluster,
            ServiceInputs(self.frontends, IPv4Address(ROUTER_IP), IPv4Address(ROUTER_IP)))
        self.runner = TimedRunner(NftCommand(self.netns))
        self.reconciler = NftReconciler(self.runner)
        self.loop = asyncio.new_event_loop()

    def set_intent(self, services: Sequence[k8s.Service], slices: Sequence[k8s.EndpointSlice]) -> None:
        self._services_writer.replace_all(services)
        self._slices_writer.replace_all(slices)

    def upsert_slice(self, eps: k8s.EndpointSlice) -> None:
        self._slices_writer.upsert(eps)

    def sync(self) -> Stages:
        stages = Stages()
        t0 = time.perf_counter()
        self.services_controller.compute()
        t1 = time.perf_counter()
        self.loop.run_until_complete(self._datapath())
        t2 = time.perf_counter()
        self.runner.seconds = 0.0
        result = self.loop.run_until_complete(self.reconciler.sync(ruleset_of(list(self.nft.snapshot()))))
        t3 = time.perf_counter()
        stages.services, stages.datapath = t1 - t0, t2 - t1
        stages.nft = self.runner.seconds
        stages.plan, stages.kind = t3 - t2 - stages.nft, result.kind
        return stages

    async def _datapath(self) -> None:
        self.datapath_controller.compute()  # sets an asyncio.Event: needs a running loop's context

    def close(self) -> None:
        self.loop.close()


def hand_wired_endpoints(node: NetnsPlace) -> list[EndpointRecord]:
    """The two hand-wired pods as ready endpoints behind lxca/lxcb (their anti-spoofing entries)."""
    records = []
    for i, ip in enumerate(POD_IPS):
        lxc = f"lxc{'ab'[i]}"
        index = if_nametoindex(node.netns, [lxc])[lxc]
        records.append(EndpointRecord(
            container_id=f"bench{i}", endpoint_id=i + 1, node=NODE, namespace=NAMESPACE, pod=f"pod{i}",
            ifname="eth0", netns="", ipv4=IPv4Address(ip), identity=0, labels=(), origin="cni",
            state="ready", host_ifname=lxc, host_ifindex=index))
    return records


@contextlib.contextmanager
def throwaway_netns() -> Iterator[str]:
    name = f"{unique_netns_prefix(NETNS_BASE)}nft"
    try:
        IpNetns().apply(IpBatch(None, (f"netns add {name}",)))
        yield name
    finally:
        remove_namespaces([name])


def kernel_counts(netns: str) -> tuple[int, int]:
    """(elements of the ``services`` verdict map, ``svc_`` chains) as the kernel lists them."""
    out = json.loads(run_in(NetnsPlace(netns), ["nft", "-j", "list", "table", "inet", "membrane"], timeout=120).stdout)
    elements = chains = 0
    for item in out.get("nftables", []):
        if "map" in item and item["map"]["name"] == "services":
            elements = len(item["map"].get("elem", []))
        if "chain" in item and item["chain"]["name"].startswith("svc_") and item["chain"]["name"] != "svc_no_backend":
            chains += 1
    return elements, chains


def tcprr_latency(client: Place, tcprr: str, ip: str, duration: float) -> dict[str, float]:
    cmd = [tcprr, "-c", ip, "-p", str(TCPRR_PORT), "-m", "crr", "-t", f"{duration:g}"]
    out = run_in(client, cmd, timeout=duration + 60)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if "p50_us" not in report:
        raise RuntimeError("tcprr does not report latencies (an old build)")
    return {"tps": float(report["tps"]), "p50": float(report["p50_us"]), "p99": float(report["p99_us"])}


# -- 4: one change across a lab -------------------------------------------------------------------
class Monitor:
    """``nft monitor rules`` in one node's namespace; tells when a rule naming some text appeared."""

    def __init__(self, argv: list[str]) -> None:
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      bufsize=1)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.put((time.monotonic(), line))

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no rule with {text!r} within {timeout:g} s") from None
            if text in line:
                return at

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.lines.get_nowait()

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def node_frontend_ids(lab: Any, nodes: int, frontends: int) -> list[dict[str, int]]:
    """Per node: frontend address → id, once every node lists ``frontends`` frontends."""
    out: list[dict[str, int]] = []
    for k in range(1, nodes + 1):
        deadline = time.monotonic() + 120
        while True:
            listed = json.loads(membrane(lab, "service", "list", "--node", f"node{k}", "-o", "json",
                                         timeout=120).stdout)
            if len(listed) >= frontends or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        out.append({e["frontend"]: int(e["id"]) for e in listed})
    return out


def lab_changes(ctx: BenchContext, nodes: int = 3) -> tuple[list[float], list[float], str]:
    """(change → every node, change → first node) seconds for ``CHANGES`` backend changes."""
    from bench.bench_policy import lab_store

    with sigterm_cleans_up(), bench_cluster(ctx, nodes, "vxlan", LAB_PREFIX) as lab, \
            lab_store(lab.store_url) as store:
        node_names = [f"node{k}" for k in range(1, nodes + 1)]
        store.apply([k8s.Namespace.model_validate({"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": NAMESPACE}})])
        pairs = [filler(n, with_ip=False, nodes=node_names) for n in range(LAB_SERVICES)]
        t0 = time.monotonic()
        for i in range(0, LAB_SERVICES, 200):
            store.apply([s for s, _ in pairs[i:i + 200]])
            store.apply([e for _, e in pairs[i:i + 200]])
        ids = node_frontend_ids(lab, nodes, LAB_SERVICES)
        ctx.log(f"lab {lab.name}: {LAB_SERVICES} services x {BACKENDS} backends on {nodes} nodes in "
                f"{time.monotonic() - t0:.1f} s")
        listed = json.loads(membrane(lab, "get", "svc", "-n", NAMESPACE, "-o", "json", timeout=120).stdout)
        items = listed.get("items", listed) if isinstance(listed, dict) else listed
        cluster_ips = {i["metadata"]["name"]: i["spec"]["clusterIP"] for i in items}
        monitors = [Monitor(lab.exec_argv(f"node{k}", ["nft", "monitor", "rules"])) for k in range(1, nodes + 1)]
        everywhere: list[float] = []
        first: list[float] = []
        rng = random.Random(5)
        try:
            time.sleep(1.0)  # the monitors subscribe
            for change in range(CHANGES):
                n = rng.randrange(LAB_SERVICES)
                name = f"svc-{n:05d}"
                frontend = f"{cluster_ips[name]}:80/TCP"
                new = str(IPv4Address(int(IPv4Address("10.220.0.0")) + change))
                addresses = [*filler_backends(n)[:-1], new]
                eps = endpoint_slice(name, addresses, [("http", BACKEND_PORT)], node_names)
                for m in monitors:
                    m.drain()
                started = time.monotonic()
                store.apply([eps])
                seen = [m.wait_for(f"svc_{ids[k][frontend]} ", CHANGE_TIMEOUT) for k, m in enumerate(monitors)]
                # The rule seen must hold the new address (a chain is rewritten whole).
                everywhere.append(max(seen) - started)
                first.append(min(seen) - started)
            for m in monitors:
                m.close()
            for k in range(1, nodes + 1):  # every node's kernel holds the last change
                chain = f"svc_{ids[k - 1][frontend]}"
                text = lab.exec(f"node{k}", ["nft", "list", "chain", "inet", "membrane", chain],
                                capture_output=True, check=True).stdout
                if new not in text:
                    raise RuntimeError(f"node{k}: {chain} lacks {new} after the monitor saw it")
        finally:
            for m in monitors:
                m.close()
        return everywhere, first, lab.name


# -- the benchmark ---------------------------------------------------------------------------------
def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    require_root()
    require_tools("nsenter", "ip", "ss", "iperf3", "nft", "taskset")
    tcprr = str(ctx.tool("tcprr"))
    cpu = traffic_cpu()
    notes: dict[str, str] = {}
    crr: dict[str, dict[str, list[float]]] = {k: {"10": [], "10k": []} for k in ("tps", "p50", "p99")}
    stream: dict[str, list[float]] = {"direct": [], "clusterip": []}
    loads = {"10": load(SMALL), "10k": load(LARGE)}

    with sigterm_cleans_up(), hand_wired_pods() as path, \
            start_servers(PinnedPlace(path.pods[1], cpu), Path(tcprr), path.ips[1]):
        pipeline = Pipeline(path.node.netns, hand_wired_endpoints(path.node))
        try:
            client = PinnedPlace(path.pods[0], cpu)
            for i in range(ctx.runs):
                for side in ("10", "10k"):
                    pipeline.set_intent(*loads[side])
                    stages = pipeline.sync()
                    elements, chains = kernel_counts(path.node.netns)
                    ctx.log(f"run {i + 1}: {side} services in the kernel ({elements} frontends, {chains} chains; "
                            f"{stages.line()})")
                    result = tcprr_latency(client, tcprr, MEASURED_IP, ctx.duration)
                    for k, v in result.items():
                        crr[k][side].append(v)
                    ctx.log(f"run {i + 1}/{ctx.runs} {side}: tcp_crr {result['tps']:,.0f}/s, "
                            f"p50 {result['p50']:.0f} us, p99 {result['p99']:.0f} us")
                    if side == "10k":
                        stream["clusterip"].append(tcp_stream_gbits(client, MEASURED_IP, ctx.duration))
                        stream["direct"].append(tcp_stream_gbits(client, path.ips[1], ctx.duration))
                        ctx.log(f"run {i + 1}/{ctx.runs}: stream via ClusterIP {stream['clusterip'][-1]:.2f}, "
                                f"direct {stream['direct'][-1]:.2f} Gbit/s")
        finally:
            pipeline.close()

    full: list[Stages] = []
    change: list[Stages] = []
    services, slices = load(LARGE)
    for i in range(max(ctx.runs, 1)):
        with throwaway_netns() as netns:
            pipeline = Pipeline(netns)
            try:
                pipeline.set_intent(services, slices)
                full.append(pipeline.sync())
                ctx.log(f"run {i + 1}: full sync of {LARGE:,} services: {full[-1].line()}")
                for n in range(5):
                    svc = n * 997 % (LARGE - 1)
                    eps = endpoint_slice(f"svc-{svc:05d}", [*filler_backends(svc)[:-1], f"10.220.1.{i * 5 + n}"],
                                         [("http", BACKEND_PORT)])
                    pipeline.upsert_slice(eps)
                    change.append(pipeline.sync())
                ctx.log(f"run {i + 1}: one change with {LARGE:,} loaded: {change[-1].line()}")
            finally:
                pipeline.close()

    require_membrane("agent", "service")
    everywhere, first, lab_name = lab_changes(ctx)
    ctx.log(f"{CHANGES} changes: every node p50 {percentile(everywhere, 50) * 1000:.0f} ms, "
            f"p99 {percentile(everywhere, 99) * 1000:.0f} ms")

    def ms(values: Sequence[float]) -> tuple[float, ...]:
        return tuple(v * 1000 for v in values)

    metrics = [
        Metric("tcp_crr p50 via ClusterIP", "us", tuple(crr["p50"]["10"]), tuple(crr["p50"]["10k"]), False),
        Metric("tcp_crr p99 via ClusterIP", "us", tuple(crr["p99"]["10"]), tuple(crr["p99"]["10k"]), False),
        Metric("tcp_crr rate via ClusterIP", "trans/s", tuple(crr["tps"]["10"]), tuple(crr["tps"]["10k"])),
        Metric("tcp_stream ClusterIP vs direct", "Gbit/s", tuple(stream["direct"]), tuple(stream["clusterip"])),
        Metric("full sync 10k x 10 (goal 1000)", "ms", (), ms([s.total for s in full]), False),
        Metric("  services controller", "ms", (), ms([s.services for s in full]), False),
        Metric("  datapath controller", "ms", (), ms([s.datapath for s in full]), False),
        Metric("  reconciler plan", "ms", (), ms([s.plan for s in full]), False),
        Metric("  render + nft -f", "ms", (), ms([s.nft for s in full]), False),
        Metric("one change, 10k loaded", "ms", (), (median([s.total for s in change]) * 1000,), False),
        Metric("  services controller", "ms", (), (median([s.services for s in change]) * 1000,), False),
        Metric("  datapath controller", "ms", (), (median([s.datapath for s in change]) * 1000,), False),
        Metric("  reconciler plan", "ms", (), (median([s.plan for s in change]) * 1000,), False),
        Metric("  render + nft -f", "ms", (), (median([s.nft for s in change]) * 1000,), False),
        Metric("change -> every node p50 (goal 500)", "ms", (), (percentile(everywhere, 50) * 1000,), False),
        Metric("change -> every node p99 (goal 500)", "ms", (), (percentile(everywhere, 99) * 1000,), False),
        Metric("  change -> first node p50", "ms", (), (percentile(first, 50) * 1000,), False),
    ]
    notes.update({
        "columns": "rows 1-3: 10 services (baseline) vs 10,000 (membrane column); row 4: direct to the pod "
                   "(baseline) vs through the ClusterIP; the rest: membrane only, goals in the names",
        "goals": "setup latency ratio <= 1.05; throughput ratio >= 0.95; full sync <= 1 s; change p99 <= 500 ms",
        "datapath": f"hand-wired pods, membrane's table in the node namespace (in-process agent modules); "
                    f"{ctx.duration:g} s per measurement, client and server pinned to CPU {cpu}",
        "full sync": f"{LARGE:,} selectorless services + EndpointSlices ({BACKENDS} backends each) in the intent "
                     "tables -> an empty table in a fresh namespace; one change = one slice rewritten",
        "lab": f"{lab_name}: 3 nodes (vxlan), {LAB_SERVICES:,} services x {BACKENDS} backends via the store; "
               f"{CHANGES} changes, each one EndpointSlice apply replacing one endpoint; the time is when "
               "`nft monitor` in each node's namespace prints the service chain's new rule",
        "machine load (1-min average)": f"{os.getloadavg()[0]:.2f}",
    })
    return BenchResult(name="services", title=TITLE, status="ok", baseline_label="10 svc / direct",
                       subject_label="10k svc / ClusterIP", metrics=tuple(metrics), notes=notes,
                       seconds=time.monotonic() - started)


if __name__ == "__main__":
    from bench.harness import render_table as render_result

    print(render_result(run(BenchContext())))
