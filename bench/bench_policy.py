"""Policy at cluster size: 1,000 policies and 5,000 identities in a one-node lab's store.

The load is the synthetic cluster of ``tests/unit/test_policy_scale.py`` (policies in 50
namespaces, identities written straight to the store's identity keys, policies through
``ObjectClient.apply``). Three pods: ``bp-server`` (tcprr and iperf3 servers), ``bp-client``
(allowed to the server by ``bp-allow``) and ``bp-other`` (allowed nowhere). Reported:

1. pod-to-pod TCP stream / TCP_RR / TCP_CRR with the load and ``bp-allow`` present (the server's
   endpoint enforced) against the same pods with no policy at all, interleaved within each run;
2. compile + render + ``nft -f`` of the full node table for the load, in-process with the engine
   and a throwaway ``mbbp-…`` namespace (110 local endpoints, as the scale test); plus the lab
   agent's own reaction to the load (store write → kernel, from its status); and the same for a
   second load, 1,000 NetworkPolicies with 1,000 ipBlock peers (every tenth with 10 excepts),
   which land in the address maps ``pol_in_addr``/``pol_out_addr`` (element counts reported);
3. ``membrane pod run`` of a pod selected by a policy → enforced (``bp-client`` connects and
   ``bp-other``'s SYN is dropped), p50/p99 over ``NEW_PODS`` pods;
4. one policy apply/delete → a probe from ``bp-other`` flips, p50/p99 over ``CHANGES`` changes.

Probes run in persistent prober processes in the client pods (one ``membrane pod exec`` each):
"open" tries a connect every 2 ms until one succeeds, "closed" until a SYN goes unanswered
(0.1 s timeout: a policy drop, where a missing server would answer with a reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from bench.cluster import (
    bench_cluster,
    membrane,
    require_membrane,
    require_root,
    require_tools,
    sigterm_cleans_up,
    wait_pod_ip,
)
from bench.harness import BenchContext, BenchResult, Metric, median, percentile
from bench.netpath import (
    IPERF_PORT,
    TCPRR_PORT,
    NetnsPlace,
    PinnedPlace,
    PodPlace,
    membrane_argv,
    remove_namespaces,
    run_in,
    tcp_stream_gbits,
    tcprr_tps,
    traffic_cpu,
    unique_netns_prefix,
    wait_listening,
)
from membrane.api.cilium import CiliumNetworkPolicy
from membrane.api.k8s import Namespace, NetworkPolicy
from membrane.api.meta import ApiObject
from membrane.cni.client import AgentClient
from membrane.datapath.nft.render import render_table
from membrane.datapath.policy import PolicyRenderer, render_policy
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, build_ruleset
from membrane.identity.ipcache import IpcacheEntry
from membrane.identity.labels import canonical
from membrane.identity.reserved import WORLD
from membrane.lab import Lab
from membrane.lab.host import IpNetns
from membrane.lab.plan import IpBatch
from membrane.policy.engine import compile_policies
from membrane.policy.ipcache import flatten_ipcache, with_cidr_identities
from membrane.store import keys, open_store
from membrane.store.base import Put, Store
from membrane.store.objects import ObjectClient

TITLE = "policy at scale: 1,000 policies / 5,000 identities, datapath cost and time to enforcement (1 node)"
LAB_PREFIX = "y"
NETNS_BASE = "mbbp-"
NAMESPACE = "default"
IDENTITY_BASE = 20_000  # far above what the lab's own pods get allocated (256 upwards)
NEW_PODS = 20
CHANGES = 10
PROBE_TIMEOUT = 15.0
SYNC_TIMEOUT = 60.0
CLI_SAMPLES = 5
METRICS = (("tcp_stream", "Gbit/s"), ("tcp_rr", "trans/s"), ("tcp_crr", "trans/s"))
SCALE_TEST = Path(__file__).resolve().parent.parent / "tests" / "unit" / "test_policy_scale.py"
IPBLOCK_POLICIES = 1000
IPBLOCK_EXCEPTS = 10  # on every tenth policy

# One line in: "open|closed IP PORT TIMEOUT". One JSON line out: the CLOCK_MONOTONIC time at which
# the port was seen open (connect done) or closed (start of the attempt whose SYN went unanswered).
PROBER = textwrap.dedent("""
    import json, socket, sys, time
    for line in sys.stdin:
        mode, ip, port, timeout = line.split()
        deadline = time.monotonic() + float(timeout)
        attempts = 0
        while True:
            attempts += 1
            sock = socket.socket()
            sock.settimeout(0.1)
            started = time.monotonic()
            try:
                sock.connect((ip, int(port)))
                seen = mode == "open"
                at = time.monotonic()
            except socket.timeout:
                seen, at = mode == "closed", started
            except OSError:
                seen, at = False, 0.0
            sock.close()
            if seen or time.monotonic() > deadline:
                print(json.dumps({"ok": seen, "t": at, "attempts": attempts}), flush=True)
                break
            time.sleep(0.002)
""")


def _scale_module() -> ModuleType:
    """The synthetic load generator of the policy scale test (one definition of the load)."""
    spec = importlib.util.spec_from_file_location("_policy_scale_load", SCALE_TEST)
    if spec is None or spec.loader is None or not SCALE_TEST.exists():
        from bench.harness import Skip

        raise Skip(f"the synthetic policy load ({SCALE_TEST.name}) is not there")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the lab's store, from this process ---------------------------------------------------------
class LabStore:
    """The lab's store and an ObjectClient on a private event loop (blocking calls)."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.store: Store = self._loop.run_until_complete(open_store(url))
        except BaseException:
            self._loop.close()
            raise
        self.client = ObjectClient(self.store)

    def revision(self) -> int:
        return self._loop.run_until_complete(self.store.list(keys.ROOT + "none/"))[1]

    def put_many(self, ops: Sequence[Put], batch: int = 2000) -> None:
        for i in range(0, len(ops), batch):
            self._loop.run_until_complete(self.store.txn([], list(ops[i : i + batch])))

    def apply(self, objects: Sequence[ApiObject]) -> int:
        """The store revision of the write (objects must change: an unchanged apply writes nothing)."""
        results = self._loop.run_until_complete(self.client.apply(objects))
        return max(int(r.object.metadata.resourceVersion or 0) for r in results)

    def delete(self, objects: Sequence[ApiObject]) -> int:
        """The store revision of the delete, assuming no other writer in between (the agent's status
        writes come later: it writes them after syncing)."""
        before = self.revision()
        deleted, _ = self._loop.run_until_complete(self.client.delete_objects(objects))
        return before + 1 if deleted else before

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self.store.close())
        finally:
            self._loop.close()


@contextlib.contextmanager
def lab_store(url: str) -> Iterator[LabStore]:
    store = LabStore(url)
    try:
        yield store
    finally:
        store.close()


def identity_ops(scale: ModuleType) -> list[Put]:
    ops = []
    for n, labels in enumerate(scale.synthetic_identities().values()):
        identity, canon = IDENTITY_BASE + n, canonical(labels)
        ops.append(Put(keys.identity_id_key(identity), json.dumps(canon).encode()))
        ops.append(Put(keys.identity_labels_key(canon), str(identity).encode()))
    return ops


def namespaces(scale: ModuleType) -> list[ApiObject]:
    return [
        Namespace.model_validate({"apiVersion": "v1", "kind": "Namespace",
                                  "metadata": {"name": f"ns-{n}", "labels": {"team": f"team-{n % 7}"}}})
        for n in range(scale.NAMESPACES)
    ]


def allow(name: str, selected: dict[str, str], peer: str, ports: Sequence[int]) -> ApiObject:
    return CiliumNetworkPolicy.model_validate({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"endpointSelector": {"matchLabels": selected},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": peer}}],
                              "toPorts": [{"ports": [{"port": str(p), "protocol": "TCP"} for p in ports]}]}]},
    })


def policy_status(lab: Lab) -> dict[str, Any]:
    status = AgentClient(str(lab.record.node(1).socket), timeout=30).status()
    return dict(status.get("policy") or {})


def wait_synced(lab: Lab, revision: int, timeout: float = SYNC_TIMEOUT) -> float:
    """Seconds until the agent reports a datapath sync reflecting every store change up to ``revision``."""
    started = time.monotonic()
    while True:
        synced = policy_status(lab).get("syncedRevisions") or {}
        if synced and max(int(v) for v in synced.values()) >= revision:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the agent did not sync store revision {revision} in {timeout:g} s ({synced})")
        time.sleep(0.01)


# -- probers ------------------------------------------------------------------------------------
class Prober:
    def __init__(self, place: PodPlace) -> None:
        self.label = place.label
        self._proc = subprocess.Popen(place.argv([sys.executable, "-c", PROBER]), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)

    def ask(self, mode: str, ip: str, port: int = TCPRR_PORT, timeout: float = PROBE_TIMEOUT) -> None:
        stdin: IO[str] | None = self._proc.stdin
        assert stdin is not None
        stdin.write(f"{mode} {ip} {port} {timeout:g}\n")
        stdin.flush()

    def answer(self, what: str) -> float:
        stdout: IO[str] | None = self._proc.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the prober in {self.label} exited (status {self._proc.poll()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{self.label}: {what} not seen in {PROBE_TIMEOUT:g} s")
        return float(reply["t"])

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


@contextlib.contextmanager
def probers(*places: PodPlace) -> Iterator[list[Prober]]:
    started: list[Prober] = []
    try:
        for place in places:
            started.append(Prober(place))
        yield started
    finally:
        for p in started:
            p.close()


# -- 2: compile + render + nft apply in-process ------------------------------------------------
def ipblock_policies(namespaces: int, count: int = IPBLOCK_POLICIES, seed: int = 3) -> list[ApiObject]:
    """``count`` NetworkPolicies with one ipBlock peer each (a /24 of 100.64.0.0/10 per policy, every
    tenth with ``IPBLOCK_EXCEPTS`` /32 excepts), half ingress and half egress, some with ports,
    selecting a tier or (every fourth) every pod of a namespace of the synthetic load."""
    rng = random.Random(seed)
    policies: list[ApiObject] = []
    for n in range(count):
        block = f"100.{64 + n // 256}.{n % 256}"
        ip_block: dict[str, Any] = {"cidr": f"{block}.0/24"}
        if n % 10 == 0:
            ip_block["except"] = [f"{block}.{10 * k + 1}/32" for k in range(IPBLOCK_EXCEPTS)]
        peer: dict[str, Any] = {"ipBlock": ip_block}
        item: dict[str, Any] = {}
        if n % 3:
            item["ports"] = [{"port": rng.choice([80, 443, 5432])}]
        ingress = n % 2 == 0
        item["from" if ingress else "to"] = [peer]
        selector = {} if n % 4 == 0 else {"matchLabels": {"tier": rng.choice(["web", "api", "db"])}}
        spec: dict[str, Any] = {"podSelector": selector, "policyTypes": ["Ingress" if ingress else "Egress"],
                                "ingress" if ingress else "egress": [item]}
        policies.append(NetworkPolicy.model_validate({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"ipb-{n}", "namespace": f"ns-{rng.randrange(namespaces)}"}, "spec": spec,
        }))
    return policies


@dataclass(frozen=True)
class CompileTimes:
    compile: float
    render: float
    apply: float
    elements: int
    table_bytes: int
    address_elements: int = 0  # of them in pol_in_addr / pol_out_addr

    @property
    def total(self) -> float:
        return self.compile + self.render + self.apply


def compile_render_apply(scale: ModuleType, netns: str, policies: Sequence[ApiObject] | None = None) -> CompileTimes:
    """The node's full table for the load (``policies``: the synthetic load of the scale test by
    default), from policy objects to the kernel (nft -f in ``netns``)."""
    identities = scale.synthetic_identities()
    policies = scale.synthetic_policies() if policies is None else policies
    endpoints = scale.local_endpoints(random.Random(2))
    base = [IpcacheEntry(IPv4Network("0.0.0.0/0"), WORLD.id, "reserved")]
    base += [IpcacheEntry(IPv4Network((int(scale.pod_address(i)), 32)), i, "custom-resource") for i in identities]

    t0 = time.perf_counter()
    compiled = compile_policies(policies, identities, endpoints)
    t1 = time.perf_counter()
    ifindex = {key: 10 + n for n, key in enumerate(compiled.endpoints)}
    ipcache = flatten_ipcache(with_cidr_identities(base, compiled.cidr_identities))
    by_ifindex = {ifindex[k]: p for k, p in compiled.endpoints.items()}
    policy = render_policy(by_ifindex, ipcache, PolicyRenderer())
    addresses = [EndpointAddress(i, IPv4Address(int(IPv4Address("10.0.0.10")) + n))
                 for n, i in enumerate(ifindex.values())]
    text = render_table(build_ruleset(DesiredDatapath.from_endpoints(addresses, policy=policy)))
    t2 = time.perf_counter()
    run_in(NetnsPlace(netns), ["nft", "flush", "ruleset"], timeout=30)
    result = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "nft", "-f", "-"], input=text,
                            capture_output=True, text=True, timeout=120, check=False)
    t3 = time.perf_counter()
    if result.returncode != 0:
        raise RuntimeError(f"nft -f of the rendered table failed: {result.stderr.strip()[-300:]}")
    addresses_count = len(policy.ingress_addresses) + len(policy.egress_addresses)
    count = len(policy.ipcache) + len(policy.ingress) + len(policy.egress) + addresses_count
    return CompileTimes(t1 - t0, t2 - t1, t3 - t2, count, len(text), addresses_count)


@contextlib.contextmanager
def throwaway_netns() -> Iterator[str]:
    name = f"{unique_netns_prefix(NETNS_BASE)}nft"
    try:
        IpNetns().apply(IpBatch(None, (f"netns add {name}",)))
        yield name
    finally:
        remove_namespaces([name])


# -- 3 and 4 ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewPod:
    running: float  # pod run returned (the pod Running, its address known)
    enforced: float  # bp-client connects and bp-other's SYN is dropped


def new_pod(lab: Lab, name: str, server: Sequence[str], client: Prober, other: Prober) -> NewPod:
    argv = membrane_argv(lab.name, "pod", "run", name, "-n", NAMESPACE, "-l", "role=bp-target", "--", *server)
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    t1 = time.monotonic()
    if out.returncode != 0:
        raise RuntimeError(f"membrane pod run {name}: {(out.stderr or out.stdout).strip()}")
    ip = wait_pod_ip(lab, NAMESPACE, name)  # after t1: does not count
    client.ask("open", ip)
    other.ask("closed", ip)
    opened, closed = client.answer(f"{name} open"), other.answer(f"{name} closed")
    return NewPod(t1 - t0, max(opened, closed) - t0)


def policy_change(store: LabStore, change: ApiObject, add: bool, server_ip: str, other: Prober) -> float:
    t0 = time.monotonic()
    if add:
        store.apply([change])
    else:
        store.delete([change])
    other.ask("open" if add else "closed", server_ip)
    return other.answer("policy change") - t0


def cli_seconds(lab: Lab) -> float:
    times = []
    for _ in range(CLI_SAMPLES):
        t0 = time.monotonic()
        membrane(lab, "get", "pod", "bp-client", "-n", NAMESPACE, "-o", "json")
        times.append(time.monotonic() - t0)
    return median(times)


def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    require_root()
    require_tools("nsenter", "ip", "ss", "iperf3", "nft", "taskset")
    require_membrane("agent", "pod", "lab")
    scale = _scale_module()
    tcprr = ctx.tool("tcprr")
    cpu = traffic_cpu()
    notes: dict[str, str] = {}
    samples: dict[str, dict[str, list[float]]] = {m: {"none": [], "load": []} for m, _ in METRICS}
    load_sync: list[float] = []
    agent_compile: list[float] = []

    blocks = ipblock_policies(scale.NAMESPACES)
    with throwaway_netns() as netns:
        times = [compile_render_apply(scale, netns) for _ in range(max(ctx.runs, 1))]
        block_times = [compile_render_apply(scale, netns, blocks) for _ in range(max(ctx.runs, 1))]
    for t in times:
        ctx.log(f"in-process: compile {t.compile:.3f} s, render {t.render:.3f} s, nft -f {t.apply:.3f} s")
    for t in block_times:
        ctx.log(f"in-process, 1k ipBlock NetworkPolicies: compile {t.compile:.3f} s, render {t.render:.3f} s, "
                f"nft -f {t.apply:.3f} s, {t.elements:,} elements ({t.address_elements:,} by address)")

    with sigterm_cleans_up(), bench_cluster(ctx, 1, "vxlan", LAB_PREFIX) as lab, lab_store(lab.store_url) as store:
        server_cmd = f"{tcprr} -s -b 0.0.0.0 -p {TCPRR_PORT} & exec iperf3 -s -p {IPERF_PORT}"
        for name, cmd in (("bp-server", ["taskset", "-c", str(cpu), "sh", "-c", server_cmd]),
                          ("bp-client", ["sleep", "infinity"]), ("bp-other", ["sleep", "infinity"])):
            membrane(lab, "pod", "run", name, "-n", NAMESPACE, "-l", f"app={name}", "--", *cmd)
        server_ip = wait_pod_ip(lab, NAMESPACE, "bp-server")
        server = PodPlace(lab.name, NAMESPACE, "bp-server")
        client = PodPlace(lab.name, NAMESPACE, "bp-client")
        wait_listening(server, {TCPRR_PORT, IPERF_PORT})

        t0 = time.monotonic()
        store.put_many(identity_ops(scale))
        store.apply(namespaces(scale))
        ctx.log(f"{len(scale.synthetic_identities())} identities, {scale.NAMESPACES} namespaces stored "
                f"in {time.monotonic() - t0:.1f} s")
        load = [*scale.synthetic_policies(), allow("bp-allow", {"app": "bp-server"}, "bp-client",
                                                  (TCPRR_PORT, IPERF_PORT))]

        pinned = PinnedPlace(client, cpu)
        for i in range(ctx.runs):
            for side in ("none", "load"):  # each run starts by removing the previous run's load
                t0 = time.monotonic()
                revision = store.apply(load) if side == "load" else store.delete(load)
                synced = wait_synced(lab, revision)
                took = time.monotonic() - t0
                if side == "load":
                    load_sync.append(took)
                    agent_compile.append(float(policy_status(lab).get("lastCompileSeconds", 0.0)))
                ctx.log(f"run {i + 1}: {side}: policies {'applied' if side == 'load' else 'deleted'}, "
                        f"in the kernel {took:.2f} s after the write (waited {synced:.2f} s for the sync)")
                label = f"run {i + 1}/{ctx.runs} {side}"
                samples["tcp_stream"][side].append(tcp_stream_gbits(pinned, server_ip, ctx.duration))
                for mode in ("rr", "crr"):
                    samples[f"tcp_{mode}"][side].append(tcprr_tps(pinned, tcprr, server_ip, mode, ctx.duration))
                ctx.log(f"{label}: " + ", ".join(f"{m} {samples[m][side][-1]:.4g}" for m, _ in METRICS))

        # From here on the load stays (the last run may have ended without it).
        wait_synced(lab, store.apply([*load, allow("bp-target", {"role": "bp-target"}, "bp-client", (TCPRR_PORT,))]))
        news: list[NewPod] = []
        changes: list[float] = []
        pod_server = [str(tcprr), "-s", "-b", "0.0.0.0", "-p", str(TCPRR_PORT)]
        with probers(client, PodPlace(lab.name, NAMESPACE, "bp-other")) as (p_client, p_other):
            new_pod(lab, "bp-warmup", pod_server, p_client, p_other)
            for n in range(NEW_PODS):
                news.append(new_pod(lab, f"bp-new-{n:02d}", pod_server, p_client, p_other))
            ctx.log(f"{NEW_PODS} new pods: enforced p50 {percentile([x.enforced for x in news], 50) * 1000:.0f} ms")
            change = allow("bp-change", {"app": "bp-server"}, "bp-other", (TCPRR_PORT,))
            for n in range(CHANGES):
                changes.append(policy_change(store, change, n % 2 == 0, server_ip, p_other))
            ctx.log(f"{CHANGES} changes: p50 {percentile(changes, 50) * 1000:.0f} ms")
        cli = cli_seconds(lab)
        rules = policy_status(lab).get("rules")

    def ms(values: Sequence[float], q: float) -> tuple[float, ...]:
        return (percentile(values, q) * 1000,)

    enforced, running = [x.enforced for x in news], [x.running for x in news]
    after = [x.enforced - x.running for x in news]
    metrics = [
        Metric(name, unit, tuple(samples[name]["none"]), tuple(samples[name]["load"])) for name, unit in METRICS
    ]
    metrics += [
        Metric("compile+render+nft -f", "ms", (1000.0,), (median([t.total for t in times]) * 1000,), False),
        Metric("  compile", "ms", (), (median([t.compile for t in times]) * 1000,), False),
        Metric("  render", "ms", (), (median([t.render for t in times]) * 1000,), False),
        Metric("  nft -f", "ms", (), (median([t.apply for t in times]) * 1000,), False),
        Metric("1k ipBlock NPs: compile+render+nft -f", "ms", (1000.0,),
               (median([t.total for t in block_times]) * 1000,), False),
        Metric("  compile", "ms", (), (median([t.compile for t in block_times]) * 1000,), False),
        Metric("  render", "ms", (), (median([t.render for t in block_times]) * 1000,), False),
        Metric("  nft -f", "ms", (), (median([t.apply for t in block_times]) * 1000,), False),
        Metric("agent: load write -> kernel", "ms", (), (median(load_sync) * 1000,), False),
        Metric("agent: compile (its status)", "ms", (), (median(agent_compile) * 1000,), False),
        Metric("pod run -> enforced p50", "ms", (500.0,), ms(enforced, 50), False),
        Metric("pod run -> enforced p99", "ms", (500.0,), ms(enforced, 99), False),
        Metric("  pod run -> Running p50", "ms", (), ms(running, 50), False),
        Metric("  Running -> enforced p99", "ms", (), ms(after, 99), False),
        Metric("policy change -> enforced p50", "ms", (1000.0,), ms(changes, 50), False),
        Metric("policy change -> enforced p99", "ms", (1000.0,), ms(changes, 99), False),
    ]
    notes.update({
        "load": f"{scale.POLICIES} policies + bp-allow, {len(scale.synthetic_identities())} identities "
                f"(store), {scale.NAMESPACES} namespaces; agent rules compiled: {rules}",
        "datapath": f"baseline = same pods with no policy; {ctx.duration:g} s per metric, client pinned "
                    f"to CPU {cpu} with the server; sides interleaved (no policy, then the load, in each run)",
        "in-process table": f"110 local endpoints, {times[0].elements:,} map elements "
                            f"({times[0].address_elements:,} by address), "
                            f"{times[0].table_bytes / 1e6:.1f} MB of nft text, applied in a fresh namespace",
        "in-process table, 1k ipBlock NPs": f"{IPBLOCK_POLICIES} NetworkPolicies, {IPBLOCK_POLICIES} ipBlock peers "
                                            f"({IPBLOCK_POLICIES // 10} with {IPBLOCK_EXCEPTS} excepts): "
                                            f"{block_times[0].elements:,} map elements "
                                            f"({block_times[0].address_elements:,} in pol_*_addr), "
                                            f"{block_times[0].table_bytes / 1e6:.1f} MB of nft text",
        "CLI start-up + one store read (get pod)": f"{cli * 1000:.0f} ms (median of {CLI_SAMPLES}): "
                                                   "most of pod run -> Running",
        "new pods": f"{NEW_PODS} (after 1 warm-up) selected by bp-target; enforced = bp-client connects "
                    "and bp-other's SYN is dropped",
        "policy changes": f"{CHANGES} on 1 node (apply / delete of bp-change, alternating), from the store "
                          "write to the probe from bp-other flipping",
        "goals": "ratio >= 0.95; table <= 1 s; pod p99 <= 500 ms; change p99 <= 1 s",
        "machine load (1-min average)": f"{os.getloadavg()[0]:.2f}",
    })
    return BenchResult(
        name="policy", title=TITLE, status="ok", baseline_label="no policy / goal",
        subject_label="1k policies", metrics=tuple(metrics), notes=notes, seconds=time.monotonic() - started,
    )


if __name__ == "__main__":
    from bench.harness import render_table as render_result

    print(render_result(run(BenchContext())))
