"""The agent unit ``membrane install`` writes starts a working agent: its ExecStart command line,
run for real inside a node namespace, answers on the API socket."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from membrane.cli.main import cli
from membrane.cni.client import AgentClient, AgentClientError
from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import wait_until

BIN = Path(sys.executable).parent


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mbht-"))  # short: the agent's unix sockets live below it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_units_exec_start_runs_an_agent_that_answers(root: Path) -> None:
    result = CliRunner().invoke(cli, ["install", "--root", str(root), "--bin-dir", str(BIN), "--node", "host1"])
    assert result.exit_code == 0, result.stderr
    unit = (root / "etc/systemd/system/membrane-agent.service").read_text()
    argv = shlex.split(next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")))

    # The same command line, with the config's host paths moved below the temporary root.
    config_at = argv.index("--config") + 1
    config_file = root / argv[config_at].lstrip("/")
    settings = yaml.safe_load(config_file.read_text())
    assert settings["store"] == "sqlite:///var/lib/membrane/store.db"
    settings["store"] = f"sqlite://{root}/var/lib/membrane/store.db"
    settings["stateDir"] = str(root / settings["stateDir"].lstrip("/"))
    settings["runDir"] = str(root / settings["runDir"].lstrip("/"))
    socket = Path(settings["runDir"]) / "agent.sock"
    log = root / "agent.log"
    with AgentNode("mbht") as node:
        settings["netnsPrefix"] = node.netns_prefix  # so the node's cleanup finds what the agent made
        config_file.write_text(yaml.safe_dump(settings))
        argv[config_at] = str(config_file)
        with open(log, "wb") as out:
            agent = subprocess.Popen(["nsenter", f"--net={node.node.path}", *argv], stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            def healthy() -> bool:
                assert agent.poll() is None, f"the agent exited:\n{log.read_text(errors='replace')}"
                try:
                    return AgentClient(str(socket), timeout=2).healthz().get("status") == "ok"
                except AgentClientError:
                    return False

            wait_until(healthy, timeout=30, interval=0.05, what="the installed agent to answer")
            status = AgentClient(str(socket), timeout=5).status()
            assert status["node"] == "host1"
            assert status["nodeIP"] == node.node_ip.split("/")[0]
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(timeout=5)
    assert agent.returncode is not None
