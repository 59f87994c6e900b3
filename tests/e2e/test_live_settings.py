"""Live cluster settings on a three-node lab: ``membrane config set policyAuditMode=true`` turns a
policy drop into an AUDIT verdict within 2 s, applied by every agent (each reports the revision),
while an established connection through the same policy keeps flowing; fixed settings are refused.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.cni.client import AgentClient
from membrane.lab.lab import Lab
from membrane.lab.state import LabDirs
from membrane.testing.netns import kernel_test_skip_reason, wait_until
from membrane.testing.probes import CONNECT, TCP_ECHO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PORT = 7000
POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: server-in, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: friend}}}}]
    toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
"""


class Cluster:
    def __init__(self, lab: Lab, env: dict[str, str]) -> None:
        self.lab, self.env = lab, env

    def membrane(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "membrane", "--lab", self.lab.name, *args],
                                capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"membrane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def status(self, k: int) -> dict[str, Any]:
        return dict(AgentClient(str(self.lab.record.node(k).socket), timeout=5).status())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if (reason := kernel_test_skip_reason("nft", "nsenter")) is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("live")
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "l" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    with Lab.up(name, 3, dirs=dirs) as lab:
        yield Cluster(lab, env)


def test_audit_mode_set_live_turns_the_drop_into_audit_on_every_node(cluster: Cluster, tmp_path: Path) -> None:
    run = [sys.executable, "-c", TCP_ECHO, str(PORT)]
    cluster.membrane("pod", "run", "server", "-n", "default", "--node", "node3", "-l", "app=server", "--", *run)
    for pod in ("friend", "stranger"):
        cluster.membrane("pod", "run", pod, "-n", "default", "--node", "node1", "-l", f"app={pod}", "--",
                         "sleep", "3600")
    server_ip = json.loads(cluster.membrane("get", "pod", "server", "-n", "default", "-o", "json").stdout)[
        "status"]["podIP"]
    manifest = tmp_path / "policy.yaml"
    manifest.write_text(POLICY)
    cluster.membrane("apply", "-f", str(manifest))

    def connect(pod: str) -> str:
        return cluster.membrane("pod", "exec", f"default/{pod}", "--", sys.executable, "-c", CONNECT, server_ip,
                                str(PORT)).stdout.strip()

    wait_until(lambda: connect("stranger") == "blocked" and connect("friend") == "ok", timeout=20,
               what="the policy enforced on node3")

    # An established connection of the friend, kept open across the change.
    go = tmp_path / "go"
    keeper = textwrap.dedent(f"""
        import os, socket, time
        sock = socket.create_connection(("{server_ip}", {PORT}), timeout=5)
        sock.sendall(b"before"); assert sock.recv(16) == b"before"
        print("connected", flush=True)
        while not os.path.exists("{go}"):
            time.sleep(0.02)
        sock.sendall(b"after"); print(sock.recv(16).decode(), flush=True)
    """)
    argv = [sys.executable, "-m", "membrane", "--lab", cluster.lab.name, "pod", "exec", "default/friend", "--",
            sys.executable, "-c", keeper]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=cluster.env) as client:
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "connected"
            result = cluster.membrane("config", "set", "policyAuditMode=true")
            revision = int(result.stdout.split("revision ")[1].split(":")[0])
            started = time.monotonic()
            wait_until(lambda: all(cluster.status(k)["clusterConfig"]["appliedRevision"] >= revision
                                   for k in (1, 2, 3)), timeout=10, interval=0.05,
                       what="every agent to apply the settings")
            applied_after = time.monotonic() - started
            assert connect("stranger") == "ok"  # audited: forwarded, and reported
            go.touch()
            assert client.stdout.readline().strip() == "after"
            assert client.wait(timeout=10) == 0
        finally:
            client.kill()
    assert applied_after < 2.0, f"applied after {applied_after:.2f} s"

    sock = str(cluster.lab.record.node(3).run_dir / "observer.sock")
    out = cluster.membrane("observe", "--server", sock, "--all", "--verdict", "AUDIT", "-o", "json").stdout
    audited = [json.loads(line)["flow"] for line in out.splitlines() if line.strip() and "flow" in json.loads(line)]
    assert any(f["source"].get("pod_name") == "stranger" and f["destination"].get("pod_name") == "server"
               for f in audited), out
    assert cluster.membrane("config", "get", "policyAuditMode").stdout.strip() == "true"

    # Back to enforcing: the stranger is dropped again.
    cluster.membrane("config", "set", "policyAuditMode=false")
    wait_until(lambda: connect("stranger") == "blocked", timeout=10, what="enforcement back on")


def test_a_setting_that_cannot_change_live_is_refused(cluster: Cluster) -> None:
    result = cluster.membrane("config", "set", "routingMode=native", check=False)
    assert result.returncode == 1
    assert "routingMode: cannot change in a running cluster" in result.stderr
    assert cluster.membrane("config", "get", "routingMode").stdout.strip() == "vxlan"
