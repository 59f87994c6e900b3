"""The membrane side of the benchmarks: a one-node lab, pods through the CLI, the CNI plugin.

Everything goes through the user-facing contract (``membrane --lab NAME pod run|exec``,
``get pod -o json``, the ``membrane-cni`` executable), so a benchmark measures what users get.
When a piece is not there, :func:`require_membrane` / :func:`require_cni_plugin` raise
:class:`~bench.harness.Skip` naming it.

Primitives: :func:`require_root`, :func:`require_tools`, :func:`require_membrane`,
:func:`require_cni_plugin`, :func:`bench_lab`, :func:`run_pod`, :func:`wait_pod_ip`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.harness import BenchContext, Skip
from bench.netpath import membrane_argv
from membrane.core.errors import MembraneError
from membrane.lab import Lab

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


def membrane(lab: Lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(membrane_argv(lab.name, *args), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"membrane {' '.join(args)}: {_last_line(result.stderr)}")
    return result


def run_pod(lab: Lab, namespace: str, name: str, cmd: Sequence[str]) -> None:
    membrane(lab, "pod", "run", name, "-n", namespace, "--", *cmd)


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
