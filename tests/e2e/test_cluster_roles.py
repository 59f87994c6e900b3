"""Cluster-wide duties survive failures: the operator role moves when its agent dies, a silent node
turns NotReady, and a three-member etcd losing a member keeps the agents converging."""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from signal import SIGKILL

import pytest

from membrane.lab import Lab
from membrane.lab.host import HostProcesses
from membrane.lab.state import LabDirs
from membrane.store import keys, open_store
from membrane.testing.etcd import etcd_skip_reason
from membrane.testing.netns import kernel_test_skip_reason, wait_until

pytestmark = pytest.mark.e2e

HEARTBEAT_TTL = 10.0  # the agent's default lease TTL


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, dict[str, str]]]:
    if (reason := kernel_test_skip_reason("nft", "nsenter") or etcd_skip_reason()) is not None:
        pytest.skip(reason)
    dirs = LabDirs(state_base=tmp_path / "state", run_base=tmp_path / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "c" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    with Lab.up(name, 2, store="etcd", etcd_members=3, dirs=dirs) as built:
        yield built, env


def membrane(lab: Lab, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "membrane", "--lab", lab.name, *args], capture_output=True,
                            text=True, env=env, timeout=90)
    assert result.returncode == 0, f"membrane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def operator_holder(lab: Lab) -> str:
    async def read() -> str:
        store = await open_store(lab.store_url)
        try:
            kv = await store.get(keys.role_key("operator"))
            return kv.value.decode() if kv else ""
        finally:
            await store.close()

    return asyncio.run(read())


def test_operator_role_moves_and_a_silent_node_turns_not_ready(lab: tuple[Lab, dict[str, str]]) -> None:
    built, env = lab
    holder = wait_until(lambda: operator_holder(built), timeout=10, what="an operator")
    survivor = "node2" if holder == "node1" else "node1"
    # The holder's node goes silent: its supervisor first (or it would start the agent again), then its agent.
    supervisor, agent = built.supervisor(holder), built.agent(holder)
    assert supervisor is not None and agent is not None
    HostProcesses().signal(supervisor, SIGKILL)
    HostProcesses().signal(agent, SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: operator_holder(built) == survivor, timeout=HEARTBEAT_TTL + 6, interval=0.2,
               what=f"the operator role to move to {survivor}")
    moved_after = time.monotonic() - killed
    assert moved_after < HEARTBEAT_TTL + 6
    nodes = membrane(built, env, "node", "list").stdout
    rows = {line.split()[0]: line.split()[4] for line in nodes.splitlines()[1:]}
    assert rows == {holder: "NotReady", survivor: "Ready"}
    # The survivor, now operator, still places and runs new pods.
    membrane(built, env, "pod", "run", "after", "-n", "default", "--", "sleep", "600")
    pod = json.loads(membrane(built, env, "get", "pod", "after", "-n", "default", "-o", "json").stdout)
    assert pod["spec"]["nodeName"] == survivor and pod["status"]["phase"] == "Running"


def test_agents_keep_converging_when_one_etcd_member_is_lost(lab: tuple[Lab, dict[str, str]]) -> None:
    built, env = lab
    assert built.record.etcd is not None and len(built.record.etcd.members) == 3
    member = built.record.etcd.members[0].process
    assert member is not None
    HostProcesses().signal(member, SIGKILL)
    for k in (1, 2):
        membrane(built, env, "pod", "run", f"p{k}", "-n", "default", "--node", f"node{k}", "--timeout", "60", "--",
                 "sleep", "600")
    ips = [json.loads(membrane(built, env, "get", "pod", f"p{k}", "-n", "default", "-o", "json").stdout)
           ["status"]["podIP"] for k in (1, 2)]
    status = membrane(built, env, "status").stdout
    assert "2/2 nodes ready" in status
    assert len(set(ips)) == 2
