"""What `membrane lab` prints, and how it refuses what it cannot do (no kernel needed)."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from membrane.cli.lab_cmd import ProgressPrinter, lab, render_progress, render_status, render_summary
from membrane.cli.main import cli
from membrane.lab.lab import LabStatus, MemberStatus, Progress, RelayStatus, Supervision, initial_record
from membrane.lab.plan import LabPlan
from membrane.lab.state import LabDirs, LabRecord, LabRelay, ProcessRef, write_record

DIRS = LabDirs(Path("/var/lib/membrane/labs"), Path("/run/membrane/labs"))


def demo_record() -> LabRecord:
    record = initial_record(LabPlan("demo", 2, 0, client=True), DIRS, "sqlite", datetime(2024, 1, 1, tzinfo=UTC))
    record = record.with_agent("node1", ProcessRef(pid=4242, start_ticks=1))
    record = record.with_agent("node2", ProcessRef(pid=4243, start_ticks=1)).model_copy(update={"phase": "ready"})
    return record.model_copy(update={"relay": LabRelay(address="127.0.0.1:4245", log=DIRS.state_base / "relay.log")})


def test_summary_tells_how_to_reach_each_part() -> None:
    assert render_summary(demo_record()) == (
        "lab demo is up: 2 nodes, vxlan routing, sqlite store\n"
        "\n"
        "  node1      netns demo-node1      172.31.0.11      agent pid 4242\n"
        "  node2      netns demo-node2      172.31.0.12      agent pid 4243\n"
        "  client     netns demo-client     172.31.0.100     outside the cluster\n"
        "  underlay   netns demo-underlay   172.31.0.1/24    bridge br0, gateway\n"
        "  relay      root netns            127.0.0.1:4245   Observer API of the whole cluster\n"
        "\n"
        "  store        sqlite:///var/lib/membrane/labs/demo/store.db\n"
        "  agent logs   /var/lib/membrane/labs/demo/agent-node*.log\n"
        "  relay        127.0.0.1:4245 (membrane observe uses it; hubble observe --server 127.0.0.1:4245)\n"
        "\n"
        "Use it:\n"
        "  membrane --lab demo status\n"
        "  membrane --lab demo observe --last 20\n"
        "  membrane --lab demo pod run web -n default -- busybox httpd -f -p 80\n"
        "  membrane lab exec --name demo node1 -- ip addr\n"
        "  membrane lab down --name demo"
    )


def test_status_table() -> None:
    status = LabStatus(
        demo_record(),
        (
            MemberStatus("node1", "demo-node1", "172.31.0.11", True, 4250, "healthy",
                         Supervision(True, 2, 1, "killed by SIGKILL")),
            MemberStatus("node2", "demo-node2", "172.31.0.12", False, 4243, "stopped", Supervision(False)),
            MemberStatus("node3", "demo-node3", "172.31.0.13", True, None, "restarting",
                         Supervision(True, 4, 0, "exit status 1", 8.0)),
            MemberStatus("client", "demo-client", "172.31.0.100", True, None, "-"),
        ),
        relay=RelayStatus("127.0.0.1:4245", 4244, "listening", Supervision(True)),
    )
    assert render_status(status) == (
        "lab demo: ready, 2 nodes, vxlan routing, underlay 172.31.0.0/24 (netns demo-underlay), "
        "store sqlite:///var/lib/membrane/labs/demo/store.db\n"
        "MEMBER   NETNS                  IP             AGENT PID   AGENT                   RESTARTS"
        "                LAST EXIT\n"
        "node1    demo-node1             172.31.0.11    4250        healthy                 2 (+1 by lab restart)"
        "   killed by SIGKILL\n"
        "node2    demo-node2 (missing)   172.31.0.12    4243        stopped, unsupervised   0"
        "                       -\n"
        "node3    demo-node3             172.31.0.13    -           restarting in 8 s       4"
        "                       exit status 1\n"
        "client   demo-client            172.31.0.100   -           -                       -"
        "                       -\n"
        "RELAY            PID    STATE       RESTARTS   LAST EXIT\n"
        "127.0.0.1:4245   4244   listening   0          -"
    )


def test_progress_bar() -> None:
    assert render_progress(Progress(0, 4, "start"), width=8) == "[--------] 0/4 start"
    assert render_progress(Progress(3, 4, "node1 agent started"), width=8) == "[######--] 3/4 node1 agent started"
    assert render_progress(Progress(4, 4, "done"), width=8) == "[########] 4/4 done"


def test_progress_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=True)
    printer(Progress(1, 2, "underlay namespace"))
    printer(Progress(2, 2, "node1 namespace"))
    printer.finish()
    assert out.getvalue().count("\n") == 1
    assert out.getvalue().endswith(render_progress(Progress(2, 2, "node1 namespace")) + "\n")


def test_progress_in_a_log_is_one_line_per_step() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=False)
    printer(Progress(1, 2, "underlay namespace"))
    printer(Progress(2, 2, "node1 namespace"))
    printer.finish()
    assert out.getvalue() == "[1/2] underlay namespace\n[2/2] node1 namespace\n"


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    cli.add_command(lab)
    monkeypatch.setenv("MEMBRANE_LAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEMBRANE_LAB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("MEMBRANE_LAB", raising=False)
    return CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tor"], "Error: --tor is not available in the lab yet\n"),
        (["--name", "my-lab"], "Error: invalid lab name 'my-lab': use 1-24 lowercase letters and digits"),
    ],
)
def test_up_refuses_with_one_line(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(cli, ["lab", "up", *args])
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1


def test_up_help_offers_only_what_up_does(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["lab", "up", "--help"])
    assert result.exit_code == 0
    assert "--client" in result.stdout
    assert "--tor" not in result.stdout  # refused until the lab has a router


def test_up_with_too_many_nodes_is_a_usage_error(runner: CliRunner) -> None:
    assert runner.invoke(cli, ["lab", "up", "--nodes", "9"]).exit_code == 2


def test_with_no_lab_down_and_status_have_nothing_to_do(runner: CliRunner) -> None:
    down = runner.invoke(cli, ["lab", "down"])
    assert (down.exit_code, down.stdout) == (0, "no lab is running: nothing to remove\n")
    status = runner.invoke(cli, ["lab", "status"])
    assert (status.exit_code, status.stdout) == (0, "no lab is running (membrane lab up builds one)\n")


def test_exec_in_an_unknown_lab_fails_with_one_line(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--lab", "nosuch", "lab", "exec", "node1", "--", "true"])
    assert result.exit_code == 1
    assert result.stderr == "Error: no lab named nosuch (membrane lab status lists the labs)\n"


def test_several_labs_need_a_name(runner: CliRunner, tmp_path: Path) -> None:
    dirs = LabDirs.from_env()
    for index, name in enumerate(["alpha", "beta"]):
        write_record(dirs, initial_record(LabPlan(name, 1, index), dirs, "sqlite", datetime.now(UTC)))
    result = runner.invoke(cli, ["lab", "exec", "node1", "--", "true"])
    assert result.exit_code == 1
    assert result.stderr == "Error: several labs are running (alpha, beta): pass --name NAME\n"
