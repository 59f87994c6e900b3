"""New pod to reachable across nodes: ``membrane pod run`` on node1 until a pod on node2 connects.

A two-node lab (VXLAN) with the real agents. A client pod on node2 hosts a prober (one Python
process, started once through ``membrane pod exec`` and fed over a pipe). For each of ``PODS``
pods, one after another:

- t0: ``membrane pod run cp-NNN --node node1 -- tcprr -s …`` is invoked;
- t1: the command returns, having seen the pod Running (it prints the pod's address);
- t2: the prober, given that address at t1, completes a TCP connect to the pod's server. It tries
  every few milliseconds with a short connect timeout, so a dropped SYN costs one short timeout,
  not the kernel's 1 s SYN retransmit.

Reported: t2 - t0 (new pod to reachable from the other node), split into t1 - t0 (CLI → Running)
and t2 - t1 (Running → reachable), p50/p99 over the pods. While the command runs, the benchmark
reads the Pod object from the store every few milliseconds (in-process, no CLI), which splits
t1 - t0 further: CLI start → Pod object stored (the CLI's start-up, validation and write) and
Pod object stored → Running in the store (the node's agent: watch, IPAM, CNI ADD, identity,
process start, status write). All clocks are CLOCK_MONOTONIC of one machine.
There is no baseline to run: the baseline column carries the goal, Cilium's "< 600 ms per new
endpoint" (policy enforced per new endpoint at 1,000 nodes / 50k pods).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from bench.cluster import (
    bench_cluster,
    membrane,
    require_membrane,
    require_root,
    require_tools,
    run_pod,
    sigterm_cleans_up,
    wait_pod_ip,
)
from bench.harness import BenchContext, BenchResult, Metric, median, percentile
from bench.netpath import TCPRR_PORT, PodPlace, membrane_argv
from membrane.lab import Lab
from membrane.store import keys, open_store
from membrane.store.base import Store

TITLE = "new pod on node1 to reachable from a pod on node2 (pod run -> TCP connect), 2-node lab"
LAB_PREFIX = "x"
NAMESPACE = "default"
PODS = 50
WARMUP_PODS = 1  # first-use costs (page cache, first endpoint of the node) are not what is measured
GOAL_MS = 600.0
PROBE_TIMEOUT = 30.0
POD_RUN_TIMEOUT = 60.0
STORE_POLL = 0.005  # seconds between store reads while a pod starts: the resolution of the split
CLI_SAMPLES = 5
SLOWEST = 3  # pods logged with their split, to see where outliers come from

# One line in: "IP PORT TIMEOUT". One JSON line out when a connect succeeds or the time is up:
# the CLOCK_MONOTONIC time of the success, attempts, and the errors seen before it.
PROBER = textwrap.dedent("""
    import json, socket, sys, time
    for line in sys.stdin:
        ip, port, timeout = line.split()
        deadline = time.monotonic() + float(timeout)
        attempts, errors = 0, {}
        while True:
            attempts += 1
            sock = socket.socket()
            sock.settimeout(0.1)
            try:
                sock.connect((ip, int(port)))
                done = time.monotonic()
                sock.close()
                print(json.dumps({"ok": True, "t": done, "attempts": attempts, "errors": errors}), flush=True)
                break
            except OSError as exc:
                sock.close()
                kind = type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                if time.monotonic() > deadline:
                    print(json.dumps({"ok": False, "attempts": attempts, "errors": errors}), flush=True)
                    break
                time.sleep(0.002)
""")
_CREATED = re.compile(r"\((?P<ip>\d+\.\d+\.\d+\.\d+) on ")


@dataclass(frozen=True)
class Sample:
    """One pod, in seconds from the CLI's start: Pod object stored, Running in the store, the CLI
    returned (having seen Running), reachable from node2."""

    stored: float
    running_in_store: float
    running: float
    reachable: float
    attempts: int
    errors: tuple[tuple[str, int], ...]


class StoreReader:
    """Reads the lab's store from this process (its own event loop), to time a pod's progress."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._store: Store = self._loop.run_until_complete(open_store(url))
        except BaseException:
            self._loop.close()
            raise

    def pod_phase(self, namespace: str, name: str) -> str | None:
        """None while the Pod object does not exist; else its phase ("" before the agent sets one)."""
        kv = self._loop.run_until_complete(self._store.get(keys.object_key("pods", namespace, name)))
        if kv is None:
            return None
        return str((json.loads(kv.value).get("status") or {}).get("phase") or "")

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._store.close())
        finally:
            self._loop.close()


@contextmanager
def store_reader(url: str) -> Iterator[StoreReader]:
    reader = StoreReader(url)
    try:
        yield reader
    finally:
        reader.close()


class Prober:
    """The prober process in the client pod; ``reach`` returns the monotonic time of a connect."""

    def __init__(self, place: PodPlace) -> None:
        self._proc = subprocess.Popen(place.argv([sys.executable, "-c", PROBER]), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)

    def reach(self, ip: str, port: int, timeout: float) -> tuple[float, int, dict[str, int]]:
        stdin: IO[str] | None = self._proc.stdin
        stdout: IO[str] | None = self._proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(f"{ip} {port} {timeout:g}\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the prober exited (status {self._proc.poll()})")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"{ip}:{port} not reachable from node2 after {timeout:g} s: {answer['errors']}")
        return float(answer["t"]), int(answer["attempts"]), dict(answer["errors"])

    def close(self) -> None:
        """Close its stdin (it exits); kill it by PID if it does not."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


@contextmanager
def prober(place: PodPlace) -> Iterator[Prober]:
    p = Prober(place)
    try:
        yield p
    finally:
        p.close()


def new_pod(lab: Lab, name: str, server: list[str], probe: Prober, reader: StoreReader) -> Sample:
    argv = membrane_argv(lab.name, "pod", "run", name, "-n", NAMESPACE, "--node", "node1", "--", *server)
    finished: list[float] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # A thread takes the exact moment the command returns while this one reads the store.
        def wait() -> None:
            proc.wait()
            finished.append(time.monotonic())

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        stored = running_in_store = None
        while running_in_store is None and not (finished and time.monotonic() - finished[0] > 1.0):
            phase = reader.pod_phase(NAMESPACE, name)
            now = time.monotonic()
            if phase is not None and stored is None:
                stored = now
            if phase == "Running":
                running_in_store = now
            if now - t0 > POD_RUN_TIMEOUT:
                raise RuntimeError(f"pod {name}: not Running after {POD_RUN_TIMEOUT:g} s")
            time.sleep(STORE_POLL)
        out, err = proc.communicate(timeout=POD_RUN_TIMEOUT)
        waiter.join()
    finally:
        if proc.poll() is None:  # only on an error above: do not leave the CLI behind
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"membrane pod run {name}: {err.strip() or out.strip()}")
    if stored is None or running_in_store is None:
        raise RuntimeError(f"pod {name}: the store never showed it Running")
    t1 = finished[0]
    match = _CREATED.search(out)
    ip = match["ip"] if match else wait_pod_ip(lab, NAMESPACE, name)
    t2, attempts, errors = probe.reach(ip, TCPRR_PORT, PROBE_TIMEOUT)
    return Sample(stored - t0, running_in_store - t0, t1 - t0, t2 - t0, attempts, tuple(sorted(errors.items())))


def cli_read_seconds(lab: Lab, pod: str) -> float:
    """Median time of ``membrane get pod``: the CLI's start-up plus one store read."""
    times = []
    for _ in range(CLI_SAMPLES):
        t0 = time.monotonic()
        membrane(lab, "get", "pod", pod, "-n", NAMESPACE, "-o", "json")
        times.append(time.monotonic() - t0)
    return median(times)


def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    require_root()
    require_tools("nsenter", "ip")
    require_membrane("agent", "pod", "lab")
    server = [str(ctx.tool("tcprr")), "-s", "-b", "0.0.0.0", "-p", str(TCPRR_PORT)]
    samples: list[Sample] = []
    with sigterm_cleans_up(), bench_cluster(ctx, 2, "vxlan", LAB_PREFIX) as lab:
        run_pod(lab, NAMESPACE, "cp-client", ["sleep", "infinity"], node="node2")
        with prober(PodPlace(lab.name, NAMESPACE, "cp-client")) as probe, store_reader(lab.store_url) as reader:
            for i in range(WARMUP_PODS):
                warm = new_pod(lab, f"cp-warmup-{i}", server, probe, reader)
                ctx.log(f"warm-up pod: {warm.reachable * 1000:.0f} ms to reachable")
            for i in range(PODS):
                samples.append(new_pod(lab, f"cp-{i:03d}", server, probe, reader))
                if (i + 1) % 10 == 0:
                    so_far = [x.reachable * 1000 for x in samples]
                    ctx.log(f"{i + 1}/{PODS} pods: p50 {percentile(so_far, 50):.0f} ms to reachable so far")
        cli_read = cli_read_seconds(lab, "cp-client")

    for rank, slow in enumerate(sorted(samples, key=lambda x: -x.reachable)[:SLOWEST], 1):
        ctx.log(f"slowest #{rank}: {slow.reachable * 1000:.0f} ms to reachable (Pod stored at "
                f"{slow.stored * 1000:.0f}, Running in the store at {slow.running_in_store * 1000:.0f}, "
                f"pod run returned at {slow.running * 1000:.0f})")
    total = [s.reachable * 1000 for s in samples]
    running = [s.running * 1000 for s in samples]
    after = [(s.reachable - s.running) * 1000 for s in samples]
    cli_write = [s.stored * 1000 for s in samples]
    agent = [(s.running_in_store - s.stored) * 1000 for s in samples]
    cli_exit = [(s.running - s.running_in_store) * 1000 for s in samples]
    retried = [s for s in samples if s.attempts > 1]
    errors: dict[str, int] = {}
    for s in retried:
        for kind, count in s.errors:
            errors[kind] = errors.get(kind, 0) + count
    metrics = (
        Metric("pod run -> reachable p50", "ms", (GOAL_MS,), (percentile(total, 50),), higher_is_better=False),
        Metric("pod run -> reachable p99", "ms", (GOAL_MS,), (percentile(total, 99),), higher_is_better=False),
        Metric("pod run -> Running p50", "ms", (), (percentile(running, 50),), higher_is_better=False),
        Metric("pod run -> Running p99", "ms", (), (percentile(running, 99),), higher_is_better=False),
        Metric("Running -> reachable p50", "ms", (), (percentile(after, 50),), higher_is_better=False),
        Metric("Running -> reachable p99", "ms", (), (percentile(after, 99),), higher_is_better=False),
        Metric("pod run -> Pod stored p50", "ms", (), (percentile(cli_write, 50),), higher_is_better=False),
        Metric("pod run -> Pod stored p99", "ms", (), (percentile(cli_write, 99),), higher_is_better=False),
        Metric("Pod stored -> Running p50", "ms", (), (percentile(agent, 50),), higher_is_better=False),
        Metric("Pod stored -> Running p99", "ms", (), (percentile(agent, 99),), higher_is_better=False),
    )
    retried_note = f"{len(retried)} of {len(samples)}"
    if errors:
        retried_note += " (" + ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())) + ")"
    return BenchResult(
        name="control_plane",
        title=TITLE,
        status="ok",
        baseline_label="goal",
        subject_label="membrane",
        metrics=metrics,
        notes={
            "pods": f"{PODS} (after {WARMUP_PODS} warm-up), one at a time, server on node1, client pod on node2",
            "goal": "Cilium: policy enforced < 600 ms per new endpoint (1,000 nodes / 50k pods)",
            "CLI start-up + one store read (get pod)": f"{cli_read * 1000:.0f} ms (median of {CLI_SAMPLES})",
            "split": f"Pod stored / Running: read from the store every {STORE_POLL * 1000:g} ms while pod run runs",
            "Running in the store -> pod run returned": f"p50 {percentile(cli_exit, 50):.0f} ms (its poll and exit)",
            "pods needing more than one connect": retried_note,
            "machine load (1-min average)": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
        },
        seconds=time.monotonic() - started,
    )
