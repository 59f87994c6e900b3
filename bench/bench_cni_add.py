"""CNI ADD and DEL latency, as a container runtime sees it: one plugin process per call.

Subject: the ``membrane-cni`` executable run inside the node namespace of a one-node lab,
against its agent, once per fresh pod namespace (``CNI_NETNS``). Baseline: the reference ``ptp``
plugin with ``host-local`` IPAM (containernetworking-plugins), run the same way inside a fresh
``mbbn-…`` node namespace: a veth pod path without any policy, identity or store. Each run
attaches then detaches ``PODS`` pods; p50/p99 are per run, medians over runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.cluster import bench_lab, require_cni_plugin, require_membrane, require_root, require_tools
from bench.harness import BenchContext, BenchResult, Metric, percentile
from bench.netpath import NetnsPlace, remove_namespaces, unique_netns_prefix
from membrane.lab.host import IpNetns, netns_path
from membrane.lab.plan import IpBatch

TITLE = "CNI ADD/DEL latency per pod: membrane-cni (agent in a lab) vs ptp + host-local"
PODS = 100
REFERENCE_PLUGINS = Path("/usr/lib/cni")
PLUGIN_TIMEOUT = 120.0


def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    require_root()
    require_tools("nsenter", "ip")
    require_membrane("agent")
    plugin = require_cni_plugin()
    ptp = REFERENCE_PLUGINS / "ptp"
    has_baseline = ptp.exists() and (REFERENCE_PLUGINS / "host-local").exists()
    add: dict[str, list[list[float]]] = {"baseline": [], "membrane": []}
    delete: dict[str, list[list[float]]] = {"baseline": [], "membrane": []}

    with bench_lab(ctx) as lab, tempfile.TemporaryDirectory(prefix="mbbn-ipam-") as ipam_dir:
        node = lab.record.nodes[0]
        membrane_conf = {
            "cniVersion": "1.0.0",
            "name": "membrane",
            "type": "membrane-cni",
            "agentSocket": str(node.socket),
            "delQueueDir": str(node.run_dir / "cni-del-queue"),
        }
        ptp_conf = {
            "cniVersion": "1.0.0",
            "name": "mbbn-ptp",
            "type": "ptp",
            "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.251.0.0/16"}]], "dataDir": ipam_dir},
        }
        baseline_node = f"{unique_netns_prefix()}node"
        IpNetns().apply(IpBatch(None, (f"netns add {baseline_node}",)))
        try:
            for i in range(ctx.runs):
                times = cni_cycle(NetnsPlace(node.netns), plugin, membrane_conf, PODS)
                _record(ctx, f"run {i + 1}/{ctx.runs} membrane", times, add["membrane"], delete["membrane"])
                if has_baseline:
                    times = cni_cycle(NetnsPlace(baseline_node), ptp, ptp_conf, PODS)
                    _record(ctx, f"run {i + 1}/{ctx.runs} ptp", times, add["baseline"], delete["baseline"])
        finally:
            remove_namespaces([baseline_node])

    metrics = tuple(
        Metric(
            f"{what}_{q}",
            "ms",
            tuple(percentile(run, pct) for run in runs["baseline"]),
            tuple(percentile(run, pct) for run in runs["membrane"]),
            higher_is_better=False,
        )
        for what, runs in (("add", add), ("del", delete))
        for q, pct in (("p50", 50.0), ("p99", 99.0))
    )
    return BenchResult(
        name="cni_add",
        title=TITLE,
        status="ok",
        baseline_label="ptp",
        subject_label="membrane-cni",
        metrics=metrics,
        notes={
            "per run": f"{PODS} pods attached, then detached, one plugin process per call",
            **({} if has_baseline else {"baseline": f"not measured: no ptp/host-local in {REFERENCE_PLUGINS}"}),
        },
        seconds=time.monotonic() - started,
    )


def _record(
    ctx: BenchContext,
    label: str,
    times: tuple[list[float], list[float]],
    adds: list[list[float]],
    dels: list[list[float]],
) -> None:
    adds.append(times[0])
    dels.append(times[1])
    ctx.log(
        f"{label}: ADD p50 {percentile(times[0], 50):.1f} ms p99 {percentile(times[0], 99):.1f} ms, "
        f"DEL p50 {percentile(times[1], 50):.1f} ms"
    )


def cni_cycle(
    place: NetnsPlace, plugin: Path, netconf: Mapping[str, Any], pods: int
) -> tuple[list[float], list[float]]:
    """ADD ``pods`` fresh pod namespaces, then DEL them; each call's wall time in ms."""
    prefix = unique_netns_prefix()
    names = [f"{prefix}p{i:03d}" for i in range(pods)]
    IpNetns().apply(IpBatch(None, tuple(f"netns add {n}" for n in names)))
    attached: list[str] = []
    try:
        adds = []
        for i, name in enumerate(names):
            reply, ms = call_plugin(place, plugin, netconf, "ADD", _container_id(prefix, i), name, i)
            if not reply.get("ips"):
                raise RuntimeError(f"{plugin.name} ADD gave no IP: {reply}")
            attached.append(name)
            adds.append(ms)
        dels = []
        for i, name in enumerate(names):
            dels.append(call_plugin(place, plugin, netconf, "DEL", _container_id(prefix, i), name, i)[1])
            attached.remove(name)
        return adds, dels
    finally:
        for name in attached:  # a failed run: detach what it attached, so nothing stays routed
            i = names.index(name)
            subprocess.run(
                place.argv([str(plugin)]),
                input=json.dumps(netconf),
                env=_env(plugin, "DEL", _container_id(prefix, i), name, i),
                capture_output=True,
                timeout=PLUGIN_TIMEOUT,
                check=False,
            )
        remove_namespaces(names)


def _container_id(prefix: str, i: int) -> str:
    return f"{prefix}{i:03d}".replace("-", "")


def _env(plugin: Path, command: str, container_id: str, netns: str, i: int) -> dict[str, str]:
    return {
        **os.environ,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": str(netns_path(netns)),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(plugin.parent),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=p{i:03d}",
    }


def call_plugin(
    place: NetnsPlace, plugin: Path, netconf: Mapping[str, Any], command: str, container_id: str, netns: str, i: int
) -> tuple[dict[str, Any], float]:
    argv: Sequence[str] = place.argv([str(plugin)])
    env = _env(plugin, command, container_id, netns, i)
    started = time.perf_counter()
    result = subprocess.run(
        argv, input=json.dumps(netconf), env=env, capture_output=True, text=True, timeout=PLUGIN_TIMEOUT, check=False
    )
    ms = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"{plugin.name} {command} {container_id}: {result.stdout.strip() or result.stderr.strip()}")
    reply = json.loads(result.stdout) if result.stdout.strip() else {}
    return reply, ms
