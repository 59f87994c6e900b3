"""Pod to pod on one node: TCP stream, TCP_RR and TCP_CRR, membrane pods vs the hand-wired path.

Baseline: two namespaces wired by hand exactly as the agent wires pods (see :mod:`bench.netpath`),
with no nft table and no agent, at the membrane pods' MTU. Subject: two pods made with
``membrane pod run`` in a one-node lab; the client runs through ``membrane pod exec``. The two
sides are measured in turn within each run, so drift on the machine spreads over both.
"""

from __future__ import annotations

import json
import time

from bench.cluster import bench_lab, require_membrane, require_root, require_tools, run_pod, wait_pod_ip
from bench.harness import BenchContext, BenchResult, Metric, measure
from bench.netpath import (
    IPERF_PORT,
    TCPRR_PORT,
    PinnedPlace,
    Place,
    PodPlace,
    hand_wired_pods,
    run_in,
    start_servers,
    tcp_stream_gbits,
    tcprr_tps,
    traffic_cpu,
    wait_listening,
)

TITLE = "pod-to-pod on one node: membrane pods vs hand-wired veth routing"
NAMESPACE = "default"
METRICS = (("tcp_stream", "Gbit/s"), ("tcp_rr", "trans/s"), ("tcp_crr", "trans/s"))


def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    require_root()
    require_tools("nsenter", "ip", "ss", "iperf3", "sysctl")
    require_membrane("agent", "pod")
    tcprr = ctx.tool("tcprr")
    # Both ends on one CPU on both sides: otherwise the scheduler's placement of the two ends on
    # the two vCPUs, not the datapath, decides TCP_RR (see PinnedPlace).
    cpu = traffic_cpu()
    with bench_lab(ctx) as lab:
        server_cmd = f"{tcprr} -s -b 0.0.0.0 -p {TCPRR_PORT} & exec iperf3 -s -p {IPERF_PORT}"
        run_pod(lab, NAMESPACE, "bench-server", ["taskset", "-c", str(cpu), "sh", "-c", server_cmd])
        run_pod(lab, NAMESPACE, "bench-client", ["sleep", "infinity"])
        server_ip = wait_pod_ip(lab, NAMESPACE, "bench-server")
        wait_pod_ip(lab, NAMESPACE, "bench-client")
        server = PodPlace(lab.name, NAMESPACE, "bench-server")
        client = PodPlace(lab.name, NAMESPACE, "bench-client")
        wait_listening(server, {TCPRR_PORT, IPERF_PORT})
        link = json.loads(run_in(client, ["ip", "-j", "link", "show", "eth0"], timeout=60).stdout)
        mtu = int(link[0]["mtu"])
        ctx.log(f"membrane pods up: server {server_ip}, pod MTU {mtu}")

        with hand_wired_pods(mtu) as path, start_servers(PinnedPlace(path.pods[1], cpu), tcprr, path.ips[1]):
            sides: dict[str, tuple[Place, str]] = {
                "baseline": (PinnedPlace(path.pods[0], cpu), path.ips[1]),
                "membrane": (PinnedPlace(client, cpu), server_ip),
            }
            samples: dict[str, dict[str, list[float]]] = {m: {s: [] for s in sides} for m, _ in METRICS}
            for i in range(ctx.runs):
                for side, (place, ip) in sides.items():
                    label = f"run {i + 1}/{ctx.runs} {side}"
                    stream = measure(ctx, f"{label} tcp_stream", tcp_stream_gbits, place, ip, ctx.duration)
                    samples["tcp_stream"][side].append(stream)
                    for mode in ("rr", "crr"):
                        tps = measure(ctx, f"{label} tcp_{mode}", tcprr_tps, place, tcprr, ip, mode, ctx.duration)
                        samples[f"tcp_{mode}"][side].append(tps)

    metrics = tuple(
        Metric(name, unit, tuple(samples[name]["baseline"]), tuple(samples[name]["membrane"])) for name, unit in METRICS
    )
    return BenchResult(
        name="datapath_node",
        title=TITLE,
        status="ok",
        baseline_label="hand-wired",
        subject_label="membrane",
        metrics=metrics,
        notes={"pod MTU": str(mtu), "per run": f"{ctx.duration:g} s per metric and side, one stream/connection"},
        seconds=time.monotonic() - started,
    )
