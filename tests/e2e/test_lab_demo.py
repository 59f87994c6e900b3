"""The main job as a user runs it (``make demo``): a two-node lab with the real agents, the Star Wars
demo across it (a policy lets the TIE fighter land and drops the X-wing; the drop is shown through the
lab's relay), and lab down."""

from __future__ import annotations

import os
import random
import re
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
    name = "mblo" + "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(tmp_path / "state"),
           "MEMBRANE_LAB_RUN_DIR": str(tmp_path / "run")}
    env.pop("MEMBRANE_STORE", None)
    try:
        up = membrane(env, "lab", "up", "--nodes", "2", "--name", name)
        assert f"lab {name} is up" in up.stdout
        relay = re.search(r"^  relay +(127\.0\.0\.1:\d+) ", up.stdout, re.M)
        assert relay is not None, up.stdout
        demo = membrane(env, "--lab", name, "lab", "demo", "starwars").stdout
        placed = dict(re.findall(r"^  (\w+) +Running +[\d.]+ +on (node\d)$", demo, re.M))
        assert placed == {"deathstar": "node1", "tiefighter": "node2", "xwing": "node2"}, demo
        before, after = demo.split("CiliumNetworkPolicy/rule1 created", 1)
        assert before.count("Ship landed") == 2, demo  # no policy: both ships land
        assert "tiefighter POST /v1/request-landing  (an Empire ship asks to land): Ship landed" in after, demo
        assert "xwing POST /v1/request-landing  (an Alliance ship asks to land): no reply: timed out" in after, demo
        assert "Panic: deathstar exploded" in after  # L3/L4 cannot stop this
        # The demo ran the observe command it prints: the drop, seen through the relay.
        command = f"membrane --lab {name} observe --verdict DROPPED --to-label org=empire"
        assert f"$ {command}\n" in demo and f"  {command}\n" in demo
        shown = demo.split(f"$ {command}\n", 1)[1]
        assert re.match(r"\w{3} +\d+ [\d:.]+: default/xwing:\d+ \(ID:\d+\) <> default/deathstar:80 \(ID:\d+\) "
                        r"Policy denied DROPPED \(TCP Flags: SYN\)\n", shown), demo
        # A user running it gets the same, from the relay (as would `hubble observe --server RELAY`).
        observed = membrane(env, "--lab", name, "observe", "--verdict", "DROPPED", "--to-label", "org=empire",
                            "--print-node-name").stdout
        assert "[node1]: default/xwing:" in observed and "Policy denied DROPPED" in observed
        same = membrane(env, "observe", "--server", relay.group(1), "--verdict", "DROPPED").stdout
        assert "default/xwing:" in same
        status = membrane(env, "--lab", name, "status").stdout
        assert "Cluster health:        2/2 nodes ready" in status
        pods = membrane(env, "--lab", name, "get", "pods", "-o", "wide").stdout
        assert pods.count("Running") == 3
    finally:
        membrane(env, "lab", "down", "--name", name, check=False)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{name}-" not in namespaces
    assert not (tmp_path / "state" / name).exists()
