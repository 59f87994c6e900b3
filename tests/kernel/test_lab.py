"""A real lab on this machine, with a stand-in agent: namespaces, underlay, exec, status, down.

The stand-in agent takes the real agent's flags, serves ``GET /v1/healthz`` on
``<run-dir>/agent.sock`` and, like the real agent's pod runner, creates a pod namespace named
``<netns-prefix>pod-<node>`` with a process in it, so ``down`` has pods to clean up.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from membrane.cli.lab_cmd import lab as lab_group
from membrane.cli.main import cli
from membrane.core.errors import AgentUnavailable
from membrane.lab import Lab, LabDirs
from membrane.lab.host import IpNetns, start_ticks
from membrane.lab.lab import AGENT_COMMAND_ENV

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "nsenter", "busybox")),
        reason="needs ip, nsenter and busybox",
    ),
]

FAKE_AGENT = textwrap.dedent(
    """
    import argparse, http.server, os, signal, socketserver, subprocess, sys

    parser = argparse.ArgumentParser()
    for flag in ("--node", "--store", "--config", "--state-dir", "--run-dir", "--netns-prefix"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    os.makedirs(args.state_dir, exist_ok=True)
    os.makedirs(args.run_dir, exist_ok=True)

    pod_netns = f"{args.netns_prefix}pod-{args.node}"
    subprocess.run(["ip", "netns", "add", pod_netns], check=True)
    pod = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{pod_netns}", "sleep", "600"], start_new_session=True
    )
    with open(os.path.join(args.state_dir, "pod.pid"), "w") as out:
        out.write(str(pod.pid))

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"status": "ok"}'
            self.send_response(200 if self.path == "/v1/healthz" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(socketserver.UnixStreamServer):
        def get_request(self):
            conn, _ = self.socket.accept()
            return conn, ("agent.sock", 0)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"stand-in agent of {args.node} on {args.store}", flush=True)
    Server(os.path.join(args.run_dir, "agent.sock"), Health).serve_forever()
    """
)


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def lab_namespaces(name: str) -> list[str]:
    netns_dir = Path("/run/netns")
    return sorted(p.name for p in netns_dir.iterdir() if p.name.startswith(f"{name}-")) if netns_dir.exists() else []


@pytest.fixture
def dirs(tmp_path: Path) -> LabDirs:
    return LabDirs(state_base=tmp_path / "state", run_base=tmp_path / "run")


@pytest.fixture
def agent(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_agent.py"
    script.write_text(FAKE_AGENT)
    return [sys.executable, str(script)]


@pytest.fixture
def name(dirs: LabDirs) -> Iterator[str]:
    lab_name = f"t{secrets.token_hex(4)}"
    try:
        yield lab_name
    finally:
        Lab.remove(lab_name, dirs=dirs)
        # Only if removal itself failed: kill what lives in the lab's namespaces, then delete them.
        if leftovers := lab_namespaces(lab_name):
            for proc in IpNetns().netns_processes(leftovers):
                if start_ticks(proc.pid) == proc.start_ticks:
                    os.kill(proc.pid, signal.SIGKILL)
            for leftover in leftovers:
                subprocess.run(["ip", "netns", "delete", leftover], check=False)


def test_a_two_node_lab_with_a_client(dirs: LabDirs, agent: list[str], name: str) -> None:
    lab = Lab.up(name, 2, client=True, agent_command=agent, dirs=dirs, health_timeout=30)
    record = lab.record
    agent_pids = [n.agent.pid for n in record.nodes if n.agent]
    pod_pids = [int((n.state_dir / "pod.pid").read_text()) for n in record.nodes]

    assert lab_namespaces(name) == sorted(
        f"{name}-{suffix}" for suffix in ("underlay", "node1", "node2", "client", "node1-pod-node1", "node2-pod-node2")
    )
    bridge = json.loads(lab.exec("underlay", ["ip", "-j", "link", "show", "br0"], capture_output=True).stdout)
    assert "UP" in bridge[0]["flags"]
    addrs = json.loads(lab.exec("node2", ["ip", "-j", "-4", "addr", "show", "eth0"], capture_output=True).stdout)
    assert [(a["local"], a["prefixlen"]) for a in addrs[0]["addr_info"]] == [(lab.node_ip(2), 24)]

    # The underlay carries traffic between every member.
    for src, dst in (("node1", lab.node_ip(2)), ("node2", lab.node_ip(1)), ("client", lab.node_ip(1))):
        ping = lab.exec(src, ["busybox", "ping", "-c", "1", "-W", "2", dst], capture_output=True)
        assert ping.returncode == 0, f"{src} → {dst}: {ping.stdout}{ping.stderr}"

    assert [(m.name, m.agent, m.netns_present) for m in lab.status().members] == [
        ("node1", "healthy", True),
        ("node2", "healthy", True),
        ("client", "-", True),
    ]
    assert lab.exec("node2", ["sh", "-c", "exit 7"]).returncode == 7
    assert "stand-in agent of node1 on sqlite://" in record.nodes[0].log.read_text()

    report = lab.down()

    assert set(report.namespaces) >= {f"{name}-node1-pod-node1", f"{name}-node2-pod-node2"}
    assert lab_namespaces(name) == []
    assert [pid for pid in agent_pids + pod_pids if running(pid)] == []
    assert not dirs.state_base.exists()  # the lab was the only one: its base dirs go too
    assert not dirs.run_base.exists()


def test_an_agent_that_fails_leaves_nothing_behind(dirs: LabDirs, name: str) -> None:
    failing = [sys.executable, "-c", "import sys; print('cannot open the store'); sys.exit(3)"]
    with pytest.raises(AgentUnavailable) as caught:
        Lab.up(name, 2, agent_command=failing, dirs=dirs, health_timeout=30)
    assert "cannot open the store" in str(caught.value)
    assert lab_namespaces(name) == []
    assert not dirs.state_dir(name).exists()
    assert not dirs.run_dir(name).exists()


def test_the_command_line(dirs: LabDirs, agent: list[str], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cli.add_command(lab_group)
    monkeypatch.setenv("MEMBRANE_LAB_STATE_DIR", str(dirs.state_base))
    monkeypatch.setenv("MEMBRANE_LAB_RUN_DIR", str(dirs.run_base))
    monkeypatch.setenv(AGENT_COMMAND_ENV, " ".join(agent))
    monkeypatch.delenv("MEMBRANE_LAB", raising=False)
    runner = CliRunner()

    up = runner.invoke(cli, ["lab", "up", "--name", name, "--nodes", "1"])
    assert up.exit_code == 0, up.output
    assert f"lab {name} is up: 1 node, vxlan routing, sqlite store" in up.stdout
    assert "[1/7] state and run dirs\n" in up.stderr  # not a terminal: one line per step
    assert "relay listening on 127.0.0.1:" in up.stderr

    status = runner.invoke(cli, ["lab", "status", "--name", name])
    assert status.exit_code == 0
    assert status.stdout.startswith(f"lab {name}: ready, 1 node, vxlan routing")
    assert f"node1    {name}-node1" in status.stdout and "healthy" in status.stdout

    exec_ = runner.invoke(cli, ["--lab", name, "lab", "exec", "node1", "--", "sh", "-c", "exit 5"])
    assert exec_.exit_code == 5
    killed = runner.invoke(cli, ["lab", "exec", "node1", "--", "sh", "-c", "kill -TERM $$"])
    assert killed.exit_code == 128 + signal.SIGTERM

    down = runner.invoke(cli, ["lab", "down", "--name", name])
    assert down.exit_code == 0
    assert down.stdout.startswith(f"lab {name} removed: 3 network namespaces")
    assert lab_namespaces(name) == []
    again = runner.invoke(cli, ["lab", "down", "--name", name])
    assert (again.exit_code, again.stdout) == (0, f"no lab named {name}: nothing to remove\n")
