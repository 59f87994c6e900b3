"""The main job as a user runs it: a one-node lab with the real agent, the demo, and lab down."""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def membrane(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "membrane", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"membrane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_lab_up_demo_and_down_leave_nothing_behind(tmp_path: Path) -> None:
    name = "t" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(tmp_path / "state"),
           "MEMBRANE_LAB_RUN_DIR": str(tmp_path / "run")}
    env.pop("MEMBRANE_STORE", None)
    try:
        up = membrane(env, "lab", "up", "--nodes", "1", "--name", name)
        assert f"lab {name} is up" in up.stdout
        demo = membrane(env, "--lab", name, "lab", "demo", "starwars")
        assert demo.stdout.count("Ship landed") == 2, demo.stdout
        assert "Panic: deathstar exploded" in demo.stdout
        status = membrane(env, "--lab", name, "status").stdout
        assert "Endpoints:" in status and "3/3 ready" in status
        pods = membrane(env, "--lab", name, "get", "pods", "-o", "wide").stdout
        assert pods.count("Running") == 3
    finally:
        membrane(env, "lab", "down", "--name", name, check=False)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{name}-" not in namespaces
    assert not (tmp_path / "state" / name).exists()
