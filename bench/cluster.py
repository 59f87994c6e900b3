"""The membrane side of the benchmarks: a one-node lab, pods through the CLI, the CNI plugin.

Everything goes through the user-facing contract (``membrane --lab NAME pod run|exec``,
``get pod -o json``, the ``membrane-cni`` executable), so a benchmark measures what users get.
When a piece is not there, :func:`require_membrane` / :func:`require_cni_plugin` raise
:class:`~bench.harness.Skip` naming it.

Multi-node benchmarks use :func:`bench_cluster`: a lab in private state/run dirs
(``MEMBRANE_LAB_STATE_DIR``/``MEMBRANE_LAB_RUN_DIR`` set for this process and every CLI it runs,
as a user would in a shell), so it never meets the machine's other labs.

Primitives: :func:`require_root`, :func:`require_tools`, :func:`require_membrane`,
:func:`require_cni_plugin`, :func:`bench_lab`, :func:`bench_cluster`, :func:`private_lab_dirs`,
:func:`sigterm_cleans_up`, :func:`run_pod`, :func:`wait_pod_ip`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.harness import BenchContext, Skip
from bench.netpath import membrane_argv
from membrane.core.errors import MembraneError
from membrane.lab import Lab, LabDirs
from membrane.lab.plan import Routing
from membrane.lab.state import RUN_DIR_ENV, STATE_DIR_ENV

LAB_HEALTH_TIMEOUT = 120.0
POD_READY_TIMEOUT = 120.0


def require_root() -> None:
    if os.geteuid() != 0:
        raise Skip("needs root (network namespaces)")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise Skip(f"missing tools: {', '.join(missing)}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def require_membrane(*commands: str) -> None:
    """Skip unless each ``membrane COMMAND --help`` works (the agent and the CLI parts we drive)."""
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "membrane", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise Skip(f"`membrane {command}` is not available: {_last_line(result.stderr)}")


def cni_plugin_path() -> Path:
    beside = Path(sys.executable).parent / "membrane-cni"
    if beside.exists():
        return beside
    found = shutil.which("membrane-cni")
    if found is None:
        raise Skip("the membrane-cni executable is not installed")
    return Path(found)


def require_cni_plugin() -> Path:
    plugin = cni_plugin_path()
    result = subprocess.run(
        [str(plugin)],
        input='{"cniVersion": "1.0.0"}',
        env={**os.environ, "CNI_COMMAND": "VERSION"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        reply = json.loads(result.stdout)
    except ValueError:
        reply = None
    if result.returncode != 0 or not isinstance(reply, dict) or "supportedVersions" not in reply:
        raise Skip(f"membrane-cni does not answer VERSION: {_last_line(result.stderr or result.stdout)}")
    return plugin


@contextlib.contextmanager
def bench_lab(ctx: BenchContext) -> Iterator[Lab]:
    """A fresh one-node lab with the real agent, removed on exit."""
    name = f"mbb{secrets.token_hex(3)}"
    ctx.log(f"lab {name}: building (1 node)")
    try:
        lab = Lab.up(name, 1, health_timeout=LAB_HEALTH_TIMEOUT)
    except MembraneError as exc:
        raise Skip(f"the lab's agent did not start: {_last_line(str(exc))}") from None
    with lab:
        yield lab


@contextlib.contextmanager
def sigterm_cleans_up() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit, so ``finally`` blocks remove labs and namespaces."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def private_lab_dirs(prefix: str) -> Iterator[LabDirs]:
    """Fresh lab state/run dirs, exported to this process's environment; restored and removed on exit.

    Not re-entrant: the environment holds one pair of dirs at a time.
    """
    saved = {key: os.environ.get(key) for key in (STATE_DIR_ENV, RUN_DIR_ENV)}
    base = Path(tempfile.mkdtemp(prefix=prefix))
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    os.environ[STATE_DIR_ENV], os.environ[RUN_DIR_ENV] = str(dirs.state_base), str(dirs.run_base)
    try:
        yield dirs
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def bench_cluster(ctx: BenchContext, nodes: int, routing: Routing, name_prefix: str) -> Iterator[Lab]:
    """A fresh lab of ``nodes`` nodes in private dirs (:func:`private_lab_dirs`), removed on exit.

    Lab names are ``<name_prefix><6 hex>``; the CLI finds the lab through the exported dirs.
    """
    name = f"{name_prefix}{secrets.token_hex(3)}"
    with private_lab_dirs(f"{name}-") as dirs:
        ctx.log(f"lab {name}: building ({nodes} nodes, {routing} routing)")
        try:
            lab = Lab.up(name, nodes, routing=routing, health_timeout=LAB_HEALTH_TIMEOUT, dirs=dirs)
        except MembraneError as exc:
            raise Skip(f"the lab's agents did not start: {_last_line(str(exc))}") from None
        with lab:
            yield lab


def membrane(lab: Lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(membrane_argv(lab.name, *args), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"membrane {' '.join(args)}: {_last_line(result.stderr)}")
    return result


def run_pod(lab: Lab, namespace: str, name: str, cmd: Sequence[str], node: str | None = None) -> str:
    """``membrane pod run`` (on ``node`` when given); returns what it printed (address, node, phase)."""
    placement = ("--node", node) if node else ()
    return membrane(lab, "pod", "run", name, "-n", namespace, *placement, "--", *cmd).stdout.strip()


def wait_pod_ip(lab: Lab, namespace: str, name: str, timeout: float = POD_READY_TIMEOUT) -> str:
    """The pod's IP once it runs (``status.podIP``, ``status.phase == Running``)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pod = json.loads(membrane(lab, "get", "pod", name, "-n", namespace, "-o", "json").stdout)
        last = pod.get("status") or {}
        if last.get("podIP") and last.get("phase") == "Running":
            return str(last["podIP"])
        time.sleep(0.2)
    raise RuntimeError(f"pod {namespace}/{name} not running after {timeout:g} s (status {last})")
