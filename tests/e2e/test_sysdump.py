"""``membrane sysdump`` on a 2-node lab: every node's pieces in one archive, secrets redacted, and a
dump that still completes (naming what is missing) when one node's agent is dead."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.lab import Lab
from membrane.lab.state import LabDirs
from membrane.store import open_store

pytestmark = pytest.mark.e2e

SECRET_VALUE = "aHVudGVyMi1zZWNyZXQ="


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, dict[str, str]]]:
    base = Path(tempfile.mkdtemp(prefix="mbht-"))  # short: unix socket paths live under it
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "mbht" + "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
    try:
        with Lab.up(name, 2, dirs=dirs) as built:
            asyncio.run(_put_secrets(built.store_url))
            _send_a_datagram(built, env)
            yield built, env
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _send_a_datagram(built: Lab, env: dict[str, str]) -> None:
    """One UDP datagram from a pod on node2 to a pod on node1: a flow on each node's observer."""
    def membrane(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "membrane", "--lab", built.name, *args], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"membrane {' '.join(args)}:\n{result.stderr}"
        return result.stdout

    membrane("pod", "run", "server", "-n", "default", "--node", "node1", "--", "sleep", "3600")
    membrane("pod", "run", "client", "-n", "default", "--node", "node2", "--", "sleep", "3600")
    server_ip = json.loads(membrane("get", "pod", "server", "-n", "default", "-o", "json"))["status"]["podIP"]
    send = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ({server_ip!r}, 7000))"
    membrane("pod", "exec", "default/client", "--", sys.executable, "-c", send)


async def _put_secrets(store_url: str) -> None:
    store = await open_store(store_url)
    try:
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": "default"},
                  "data": {"password": SECRET_VALUE}}
        await store.put("/membrane/objects/secrets/default/db", json.dumps(secret).encode())
        await store.put("/membrane/config/join-token", SECRET_VALUE.encode())
    finally:
        await store.close()


def sysdump(built: Lab, env: dict[str, str], output: Path) -> tuple[dict[str, bytes], dict[str, object]]:
    result = subprocess.run([sys.executable, "-m", "membrane", "--lab", built.name, "sysdump", "--output",
                             str(output)], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(output)
    with tarfile.open(output) as tar:
        files = {}
        for member in tar.getmembers():
            data = tar.extractfile(member)
            if data is not None:
                files[member.name.split("/", 1)[1]] = data.read()
    return files, json.loads(files["summary.json"])


def test_the_dump_holds_every_nodes_datapath_log_status_and_a_redacted_store(
    lab: tuple[Lab, dict[str, str]], tmp_path: Path
) -> None:
    built, env = lab
    files, summary = sysdump(built, env, tmp_path / "dump.tar.gz")
    assert summary["nodes"] == ["node1", "node2"]
    for node in ("node1", "node2"):
        assert b"table inet membrane" in files[f"nodes/{node}/nft.txt"]
        assert b"dev eth0" in files[f"nodes/{node}/routes.txt"]
        assert b"membrane_vxlan" in files[f"nodes/{node}/links.txt"]
        assert f"nodes/{node}/fdb.txt" in files
        assert files[f"nodes/{node}/agent.log"]  # the lab's log file of that agent
        assert json.loads(files[f"nodes/{node}/status.json"])["node"] == node
        flows = [json.loads(line) for line in files[f"nodes/{node}/flows.jsonl"].splitlines()]
        assert any(f["flow"]["node_name"] == node for f in flows), flows
        assert f"nodes/{node}/endpoints.txt" in files
    # Each node's FDB names the other node's address (the VXLAN peer).
    assert built.node_ip(2).encode() in files["nodes/node1/fdb.txt"]
    store = {e["key"]: e["value"] for e in json.loads(files["cluster/store.json"])}
    assert "/membrane/objects/ciliumnodes/node1" in store
    assert store["/membrane/objects/secrets/default/db"]["data"] == {"password": "<redacted>"}
    assert store["/membrane/config/join-token"] == "<redacted>"
    assert not any(SECRET_VALUE.encode() in data for data in files.values())
    assert summary["errors"] == []


def test_with_one_agent_dead_the_dump_completes_and_names_what_is_missing(
    lab: tuple[Lab, dict[str, str]], tmp_path: Path
) -> None:
    built, env = lab
    agent = built.record.node(2).agent
    assert agent is not None
    os.kill(agent.pid, signal.SIGKILL)
    files, summary = sysdump(built, env, tmp_path / "dump.tar.gz")
    missing = {e["item"]: e["reason"] for e in summary["errors"]}  # type: ignore[attr-defined]
    assert "nodes/node2/status.json" in missing
    assert "agent not running" in missing["nodes/node2/status.json"]
    assert "nodes/node2/flows.jsonl" in missing
    assert not any(item.startswith("nodes/node1/") for item in missing)
    # The dead agent's datapath and log are still there to read.
    assert b"table inet membrane" in files["nodes/node2/nft.txt"]
    assert files["nodes/node2/agent.log"]
    assert "nodes/node2/status.json: agent not running" in files["errors.txt"].decode()
