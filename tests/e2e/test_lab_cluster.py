"""A three-node lab as its user sees it: the whole cluster's flows by default (the lab's relay),
agents that come back by themselves, ``lab restart``, and a node that vanishes."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from membrane.lab import Lab
from membrane.lab.state import LabDirs
from membrane.testing.netns import kernel_test_skip_reason, wait_until
from membrane.testing.probes import TCP_ECHO

pytestmark = pytest.mark.e2e

PORT = 7000
# One connection, 2 s to answer: prints ok, or the reason it got none.
ECHO_ONCE = textwrap.dedent(f"""
    import socket, sys
    try:
        sock = socket.create_connection((sys.argv[1], {PORT}), timeout=2)
        sock.sendall(b"ping"); assert sock.recv(16) == b"ping"; sock.close(); print("ok")
    except OSError as exc:
        print("no reply:", exc)
""")
POLICY = textwrap.dedent(f"""
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: friends-only, namespace: default}}
    spec:
      endpointSelector: {{matchLabels: {{app: echo}}}}
      ingress:
      - fromEndpoints: [{{matchLabels: {{app: friend}}}}]
        toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
""")

Run = Callable[..., subprocess.CompletedProcess[str]]
T = TypeVar("T")


@pytest.fixture
def cluster() -> Iterator[tuple[Lab, Run]]:
    if (reason := kernel_test_skip_reason("nft", "nsenter", "ss")) is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="mblo-"))  # short: unix socket paths live under it
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    for var in ("MEMBRANE_STORE", "MEMBRANE_RELAY", "MEMBRANE_LAB"):
        env.pop(var, None)
    name = "mblo" + "".join(random.choices(string.ascii_lowercase + string.digits, k=6))

    def membrane(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "membrane", "--lab", name, *args], env=env, input=input,
                                capture_output=True, text=True, timeout=90)
        if check:
            assert result.returncode == 0, f"membrane {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    try:
        with Lab.up(name, 3, dirs=dirs) as built:
            yield built, membrane
            supervisors = [built.supervisor(n) for n in ("node1", "node2", "node3", "relay")]
        # lab down left no supervisor, agent or relay of this lab behind.
        assert not [s for s in supervisors if s and Path(f"/proc/{s.pid}").exists()
                    and str(dirs.state_base) in Path(f"/proc/{s.pid}/cmdline").read_text(errors="replace")]
        assert not [n for n in os.listdir("/run/netns") if n.startswith(f"{name}-")]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def poll(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Every command is a process start: poll at a pace the machine shares well."""
    return wait_until(predicate, timeout=timeout, interval=0.3, what=what)


def status_row(membrane: Run, node: str) -> str:
    found = re.search(rf"^{node}\s.*$", membrane("lab", "status").stdout, re.M)
    assert found is not None
    return found.group(0)


def echo(membrane: Run, pod: str, server_ip: str) -> str:
    return str(membrane("pod", "exec", f"default/{pod}", "--", sys.executable, "-c", ECHO_ONCE,
                        server_ip).stdout.strip())


def drops(membrane: Run) -> list[str]:
    return [line for line in membrane("observe", "--verdict", "DROPPED", "--print-node-name").stdout.splitlines()
            if "Policy denied DROPPED" in line]


def test_the_whole_cluster_by_default_supervised_agents_and_a_vanished_node(cluster: tuple[Lab, Run]) -> None:
    built, membrane = cluster
    membrane("pod", "run", "server", "-n", "default", "--node", "node3", "-l", "app=echo", "--",
             sys.executable, "-c", TCP_ECHO, str(PORT))
    membrane("pod", "run", "client", "-n", "default", "--node", "node1", "-l", "app=client", "--", "sleep", "3600")
    membrane("pod", "run", "friend", "-n", "default", "--node", "node2", "-l", "app=friend", "--", "sleep", "3600")
    server_ip = json.loads(membrane("get", "pod", "server", "-n", "default", "-o", "json").stdout)["status"]["podIP"]
    poll(lambda: f":{PORT} " in membrane("pod", "exec", "default/server", "--", "ss", "-Htln").stdout,
               timeout=15, what="the echo server")
    poll(lambda: echo(membrane, "client", server_ip) == "ok", timeout=20, what="node1 to reach node3's pod")

    # A policy on node3 lets only app=friend in: the client on node1 is dropped there.
    membrane("apply", "-f", "-", input=POLICY)

    def enforcing() -> bool:
        cnp = json.loads(membrane("get", "cnp", "friends-only", "-n", "default", "-o", "json").stdout)
        return bool(((cnp.get("status") or {}).get("nodes") or {}).get("node3", {}).get("enforcing"))

    poll(enforcing, timeout=30, what="node3 to enforce the policy")
    assert echo(membrane, "client", server_ip).startswith("no reply")
    assert echo(membrane, "friend", server_ip) == "ok"
    # No --server: the lab's relay, which sees node3's drop from wherever the command runs.
    seen = poll(lambda: drops(membrane), timeout=10, what="the drop through the relay")
    assert all(re.search(rf"\[node3\]: default/client:\d+ \(ID:\d+\) <> default/server:{PORT} ", line)
               for line in seen), seen
    nodes = membrane("flows", "nodes").stdout
    assert all(re.search(rf"^{n}\s+Connected\s", nodes, re.M) for n in ("node1", "node2", "node3")), nodes

    # node2's agent is killed: its supervisor starts it again, and the cluster goes on converging.
    killed = built.agent("node2")
    assert killed is not None
    os.kill(killed.pid, signal.SIGKILL)
    poll(lambda: re.search(r"\shealthy\s+1\s+", status_row(membrane, "node2")), timeout=30,
               what="node2's agent to be back")
    back = built.agent("node2")
    assert back is not None and back.pid != killed.pid
    assert "killed by SIGKILL" in status_row(membrane, "node2") or "exited" in status_row(membrane, "node2")
    membrane("pod", "run", "friend2", "-n", "default", "--node", "node2", "-l", "app=friend", "--", "sleep", "3600")
    poll(lambda: echo(membrane, "friend2", server_ip) == "ok", timeout=20,
               what="a pod started on the restarted node to reach node3")
    assert echo(membrane, "friend", server_ip) == "ok"

    # A restart on purpose is counted apart.
    restarted = membrane("lab", "restart", "node2").stdout
    assert restarted.startswith("node2: agent restarted")
    assert re.search(r"\shealthy\s+1 \(\+1 by lab restart\)", status_row(membrane, "node2"))
    poll(lambda: re.search(r"^node2\s+Connected\s", membrane("flows", "nodes").stdout, re.M), timeout=15,
               what="the relay to see node2 again")

    # node2 vanishes (its supervisor and its agent): reported unavailable, never silently missing.
    supervisor, agent = built.supervisor("node2"), built.agent("node2")
    assert supervisor is not None and agent is not None
    os.kill(supervisor.pid, signal.SIGKILL)
    os.kill(agent.pid, signal.SIGKILL)
    poll(lambda: re.search(r"^node2\s+Unavailable\s", membrane("flows", "nodes").stdout, re.M), timeout=15,
               what="node2 reported unavailable")
    assert "Connected Nodes: 2/3" in membrane("flows", "status").stdout
    assert re.search(r"^node2\s.*stopped, unsupervised", membrane("lab", "status").stdout, re.M)
    # The others still serve flows: a new drop on node3 arrives, and observe names the missing node.
    before = len(drops(membrane))
    assert echo(membrane, "client", server_ip).startswith("no reply")
    poll(lambda: len(drops(membrane)) > before, timeout=10, what="the new drop")
    observed = membrane("observe", "--verdict", "DROPPED")
    assert "1 nodes are unavailable: node2" in observed.stderr
