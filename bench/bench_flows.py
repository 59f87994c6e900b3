"""Flow events: how many the agent's pipeline takes with zero loss, and what flow logging costs.

Both parts use the hand-wired pod path (:mod:`bench.netpath`: two pods behind ``lxca``/``lxcb``
in a node namespace) with membrane's real ruleset applied in the node namespace, and the agent's
flow pipeline in a separate process inside the node namespace (so its CPU time is its own):
``NflogReader`` → enrichment → ring → metrics (:class:`membrane.agent.observer.AgentObserver`).

- ``tcp_rr`` / ``tcp_crr``: baseline = the ruleset without log rules (flow logging off);
  membrane = with flow logging, the pipeline reading every event (TCP_CRR makes four events per
  transaction: SYN, SYN-ACK and two FINs). Measured in turn within each run.
- ``events_zero_loss``: the highest paced event rate (steps of :data:`RATES`, ``ctx.duration``
  each) at which every event is delivered (received = sent, no NFLOG sequence gap) while the
  reader uses at most one core. Events: a paced UDP stream from pod a to pod b, logged by one
  extra rule per packet with a trace prefix (untracked, so conntrack does not limit the rate).
  baseline = NFLOG decoding alone; membrane = the whole pipeline.
- ``reader_cpu``: the reader's CPU per event (µs) at :data:`CPU_RATE` events/s, both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from bench.cluster import require_root, require_tools
from bench.harness import BENCH_DIR, BenchContext, BenchResult, Metric, Skip, measure
from bench.netpath import NetnsPlace, hand_wired_pods, run_in, start_servers, tcprr_tps

TITLE = "flow events: zero-loss ingest rate, and TCP_RR/TCP_CRR with flow logging off vs on"
RATES = (10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 125_000, 150_000, 200_000)
CPU_RATE = 20_000
EVENT_PORT = 9
READY_TIMEOUT = 30.0

SENDER = textwrap.dedent("""
    import json, socket, sys, time
    ip, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    dst, payload, sent, failed = (ip, 9), b"x" * 16, 0, 0
    start = time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        due = min(int((now - start) * rate), int(seconds * rate))
        if sent + failed >= due:
            time.sleep(0.0002)
            continue
        while sent + failed < due:
            try:
                s.sendto(payload, dst); sent += 1
            except OSError:
                failed += 1
    print(json.dumps({"sent": sent, "failed": failed, "seconds": time.perf_counter() - start}))
""")


def bench_table(group: int, prefix: str) -> str:
    """One log rule per packet of the event stream, untracked so conntrack is not the limit."""
    return textwrap.dedent(f"""
        table inet mbbench {{
            chain raw {{
                type filter hook prerouting priority raw; policy accept;
                iifname "lxca" udp dport {EVENT_PORT} notrack
            }}
            chain forward {{
                type filter hook forward priority 300; policy accept;
                iifname "lxca" udp dport {EVENT_PORT} log prefix "{prefix}" group {group} snaplen 128
            }}
        }}
    """)


# -- the reader process ---------------------------------------------------------------------------
@dataclass
class ReaderStats:
    received: int
    lost: int
    flows: int
    cpu: float
    wall: float


class ReaderProcess:
    """The flow pipeline in its own process inside the node namespace; ``stats()`` asks it."""

    def __init__(self, node: NetnsPlace, mode: str, group: int, pods: str) -> None:
        cmd = [sys.executable, "-m", "bench.bench_flows", "--reader", mode, "--group", str(group), "--pods", pods]
        self.process = subprocess.Popen(node.argv(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=BENCH_DIR.parent)
        line = self._readline(READY_TIMEOUT)
        if line != "ready":
            self.close()
            raise RuntimeError(f"flow reader did not start: {line!r}")

    def _readline(self, timeout: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return ""
        return self.process.stdout.readline().strip()

    def stats(self) -> ReaderStats:
        assert self.process.stdin is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        line = self._readline(10)
        if not line:
            raise RuntimeError("flow reader stopped answering")
        return ReaderStats(**json.loads(line))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def reader(node: NetnsPlace, mode: str, group: int, pods: str) -> Iterator[ReaderProcess]:
    process = ReaderProcess(node, mode, group, pods)
    try:
        yield process
    finally:
        process.close()


async def _serve_reader(mode: str, group: int, pods: str) -> None:
    from membrane.agent.intent import IntentTables
    from membrane.agent.observer import AgentObserver, ObserverSettings
    from membrane.core.statedb import StateDB
    from membrane.observe.enrich import EndpointInfo, EnrichmentState
    from membrane.observe.nflog import NflogReader

    source = NflogReader(group)
    counted = 0
    observer = None
    if mode == "full":
        intent = IntentTables.create(StateDB())
        observer = AgentObserver(ObserverSettings(listen=None, metrics_listen=None), node_name="bench",
                                 endpoints=intent.endpoints, nodes=intent.nodes, source=source)
        infos = []
        for i, item in enumerate(pods.split(",")):
            ifindex, ip, name = item.split(":")
            infos.append(EndpointInfo(ip=ip, identity=1000 + i, namespace="default", pod_name=name,
                                      labels=(f"k8s:app={name}",), endpoint_id=i + 1, node="bench",
                                      ifindex=int(ifindex), ifname=f"lxc{name}"))
        observer.state = EnrichmentState.build("bench", infos)
        sink = observer.ingest
    else:
        def sink(records: Any) -> None:
            nonlocal counted
            counted += len(records)

    def report() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        flows = observer.ring.seen_flows if observer is not None else counted
        print(json.dumps({"received": source.stats.received, "lost": source.stats.lost, "flows": flows,
                          "cpu": usage.ru_utime + usage.ru_stime, "wall": time.monotonic()}), flush=True)

    task = asyncio.create_task(source.run(sink))
    await asyncio.wait_for(source.bound.wait(), READY_TIMEOUT)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if not line:
            done.set()
        elif line.strip() == "stats":
            report()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    await done.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- measurements ---------------------------------------------------------------------------------
def _ifindex(node: NetnsPlace, name: str) -> int:
    return int(json.loads(run_in(node, ["ip", "-j", "link", "show", name], timeout=10).stdout)[0]["ifindex"])


def _apply(node: NetnsPlace, text: str) -> None:
    subprocess.run(node.argv(["nft", "-f", "-"]), input=text, text=True, check=True, capture_output=True,
                   timeout=30)


def _send(pod: NetnsPlace, ip: str, rate: int, seconds: float) -> dict[str, Any]:
    out = run_in(pod, [sys.executable, "-c", SENDER, ip, str(rate), str(seconds)], timeout=seconds + 60)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _settle(proc: ReaderProcess, timeout: float = 30.0) -> ReaderStats:
    """Stats once the reader has been idle for a moment (nothing new read or lost)."""
    last = proc.stats()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = proc.stats()
        if (now.received, now.lost) == (last.received, last.lost):
            return now
        last = now
    return last


@dataclass
class Step:
    rate: int
    sent: int
    delivered: int
    lost: int
    cores: float
    achieved: float

    @property
    def clean(self) -> bool:
        # Delivered may exceed sent by stray events of the pods' own traffic; lost may not be > 0.
        return self.lost == 0 and self.delivered >= self.sent and self.cores <= 1.0


def _step(proc: ReaderProcess, pod: NetnsPlace, ip: str, rate: int, seconds: float) -> Step:
    before = proc.stats()
    sent = _send(pod, ip, rate, seconds)
    deadline = time.monotonic() + 3.0
    after = proc.stats()
    while after.received + after.lost - before.received - before.lost < sent["sent"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the last batch is flushed by the kernel's 10 ms timer
        after = proc.stats()
    delivered = after.received - before.received
    busy = after.cpu - before.cpu
    return Step(rate, sent["sent"], delivered, max(sent["sent"] - delivered, after.lost - before.lost, 0),
                busy / max(sent["seconds"], 1e-9), sent["sent"] / max(sent["seconds"], 1e-9))


def _max_clean_rate(ctx: BenchContext, proc: ReaderProcess, pod: NetnsPlace, ip: str, label: str) -> float:
    best = 0.0
    for rate in RATES:
        step = _step(proc, pod, ip, rate, ctx.duration)
        ctx.log(f"{label} {rate:,}/s: sent {step.sent:,} ({step.achieved:,.0f}/s), delivered {step.delivered:,}, "
                f"lost {step.lost:,}, reader {step.cores:.2f} cores")
        if not step.clean:
            break
        best = step.achieved
        if step.achieved < 0.9 * rate:
            break  # the sender is the limit from here on
    return best


def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    require_root()
    require_tools("nsenter", "ip", "ss", "nft", "sysctl")
    try:
        from membrane.datapath.flowcodes import TRACE_NEW
        from membrane.datapath.nft.render import render_transaction
        from membrane.datapath.nft.transaction import full_sync
        from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, FlowLog, build_ruleset
    except ImportError as exc:
        raise Skip(f"membrane's flow pipeline is not available: {exc}") from None
    tcprr = ctx.tool("tcprr")
    flow_log = FlowLog()
    samples: dict[str, dict[str, list[float]]] = {
        m: {"baseline": [], "membrane": []} for m in ("tcp_rr", "tcp_crr", "events_zero_loss", "reader_cpu")}
    crr_events: list[tuple[int, int]] = []  # (read, lost) per run
    with hand_wired_pods(1500) as path:
        node, (pod_a, pod_b) = path.node, path.pods
        ip_a, ip_b = path.ips
        index_a, index_b = _ifindex(node, "lxca"), _ifindex(node, "lxcb")
        pods = f"{index_a}:{ip_a}:a,{index_b}:{ip_b}:b"
        endpoints = (EndpointAddress(index_a, IPv4Address(ip_a)), EndpointAddress(index_b, IPv4Address(ip_b)))

        def ruleset(on: bool) -> str:
            desired = DesiredDatapath.from_endpoints(endpoints, flow_log=flow_log if on else None)
            return render_transaction(full_sync(build_ruleset(desired)))

        with start_servers(pod_b, tcprr, ip_b), reader(node, "full", flow_log.group, pods) as proc:
            for i in range(ctx.runs):
                for side, on in (("baseline", False), ("membrane", True)):
                    _apply(node, ruleset(on))
                    label = f"run {i + 1}/{ctx.runs} {'flow log on' if on else 'flow log off'}"
                    for mode in ("rr", "crr"):
                        before = proc.stats()
                        tps = measure(ctx, f"{label} tcp_{mode}", tcprr_tps, pod_a, tcprr, ip_b, mode, ctx.duration)
                        samples[f"tcp_{mode}"][side].append(tps)
                        # Let the reader finish the backlog: it must not compete with the next
                        # measurement, and losses only show once later events arrive.
                        after = _settle(proc)
                        events, lost = after.received - before.received, after.lost - before.lost
                        ctx.log(f"{label} tcp_{mode}: {events:,} events read, {lost:,} lost, "
                                f"reader CPU {after.cpu - before.cpu:.2f} s")
                        if on and mode == "crr":
                            crr_events.append((events, lost))

        # Ingest: the real ruleset (logging on) plus the paced, untracked event stream.
        _apply(node, ruleset(True))
        _apply(node, bench_table(flow_log.group, TRACE_NEW.prefix()))
        sink = _socket_in(pod_b, ip_b)  # takes the stream without answering it
        try:
            for i in range(ctx.runs):
                for side, mode in (("baseline", "decode"), ("membrane", "full")):
                    with reader(node, mode, flow_log.group, pods) as proc:
                        label = f"run {i + 1}/{ctx.runs} {'decode only' if mode == 'decode' else 'full pipeline'}"
                        samples["events_zero_loss"][side].append(_max_clean_rate(ctx, proc, pod_a, ip_b, label))
                        step = _step(proc, pod_a, ip_b, CPU_RATE, ctx.duration)
                        per_event = step.cores / max(step.achieved, 1) * 1e6
                        ctx.log(f"{label} at {CPU_RATE:,}/s: {per_event:.1f} µs of reader CPU per event")
                        samples["reader_cpu"][side].append(per_event)
        finally:
            sink.close()

    metrics = (
        Metric("tcp_rr", "trans/s", tuple(samples["tcp_rr"]["baseline"]), tuple(samples["tcp_rr"]["membrane"])),
        Metric("tcp_crr", "trans/s", tuple(samples["tcp_crr"]["baseline"]), tuple(samples["tcp_crr"]["membrane"])),
        Metric("events_zero_loss", "events/s", tuple(samples["events_zero_loss"]["baseline"]),
               tuple(samples["events_zero_loss"]["membrane"])),
        Metric("reader_cpu", "µs/event", tuple(samples["reader_cpu"]["baseline"]),
               tuple(samples["reader_cpu"]["membrane"]), higher_is_better=False),
    )
    return BenchResult(
        name="flows",
        title=TITLE,
        status="ok",
        baseline_label="baseline",
        subject_label="membrane",
        metrics=metrics,
        notes={
            "tcp_rr/tcp_crr": "baseline = membrane ruleset without log rules; membrane = flow logging on, "
                              "the agent's flow pipeline reading",
            "events_zero_loss/reader_cpu": "baseline = NFLOG decoding only; membrane = decode + enrich + ring + "
                                           f"metrics; steps {', '.join(f'{r // 1000}k' for r in RATES)}/s, "
                                           "at most one core",
            "events during tcp_crr (read/lost)": ", ".join(f"{r:,}/{lost:,}" for r, lost in crr_events) or "-",
            "per run": f"{ctx.duration:g} s per metric, step and side",
        },
        seconds=time.monotonic() - started,
    )


def _socket_in(place: NetnsPlace, ip: str) -> socket.socket:
    from membrane.datapath.netns import run_in_netns
    from membrane.lab.host import netns_path

    sock = run_in_netns(str(netns_path(place.netns)), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind((ip, EVENT_PORT))
    return sock


def _main() -> None:
    parser = argparse.ArgumentParser(description="the flow pipeline, as a benchmark's helper process")
    parser.add_argument("--reader", choices=("decode", "full"), required=True)
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--pods", required=True)
    args = parser.parse_args()
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(_serve_reader(args.reader, args.group, args.pods))


if __name__ == "__main__":
    _main()
