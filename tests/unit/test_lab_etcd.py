"""lab up/status/down with --store etcd against the in-memory machine, and its rendered text."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from membrane.cli.lab_cmd import lab as lab_group
from membrane.cli.lab_cmd import render_status, render_summary
from membrane.cli.main import cli
from membrane.core.errors import InvalidInput, StoreError
from membrane.lab.etcd import FakeEtcdProbe, StoreProcessStatus, forwarder_argv, member_argv
from membrane.lab.fake import FakeMachine
from membrane.lab.lab import Lab, LabStatus, MemberStatus, initial_record
from membrane.lab.plan import LabPlan
from membrane.lab.state import LabDirs, LabRecord, ProcessRef, read_record

AGENT = ("/opt/agent", "agent")


@dataclass
class OrderedMachine(FakeMachine):
    """Also remembers the order in which processes were signalled."""

    signalled: list[int] = field(default_factory=list)

    def signal(self, proc: ProcessRef, signum: int) -> None:
        if self.is_alive(proc):
            self.signalled.append(proc.pid)
        super().signal(proc, signum)


@pytest.fixture
def dirs(tmp_path: Path) -> LabDirs:
    return LabDirs(state_base=tmp_path / "state", run_base=tmp_path / "run")


@pytest.fixture
def machine() -> OrderedMachine:
    return OrderedMachine()


def up(dirs: LabDirs, machine: FakeMachine, probe: FakeEtcdProbe | None = None, **kwargs: object) -> Lab:
    return Lab.up(
        "t",
        1,
        store="etcd",
        agent_command=AGENT,
        dirs=dirs,
        host=machine.host(),
        etcd_probe=probe or FakeEtcdProbe(),
        **kwargs,  # type: ignore[arg-type]
    )


def nothing_left(dirs: LabDirs, machine: FakeMachine) -> None:
    assert machine.namespaces == set()
    assert machine.processes == {}
    assert not dirs.state_dir("t").exists()
    assert not dirs.run_dir("t").exists()


def option(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_etcd_runs_in_the_underlay_and_the_cli_reaches_it_through_the_forwarder(
    dirs: LabDirs, machine: OrderedMachine
) -> None:
    probe = FakeEtcdProbe()
    lab = up(dirs, machine, probe)
    record = read_record(dirs.record_path("t"))
    assert record.etcd is not None
    port = record.etcd.forwarder_port

    assert record.store_url == f"etcd://127.0.0.1:{port}"
    assert record.agent_store_url == "etcd://172.31.0.1:2379"
    etcd, forwarder, agent, relay, *supervisors = sorted(machine.processes.values(), key=lambda p: p.ref.pid)
    assert option(relay.argv, "--store") == record.store_url, "the relay reaches the store as the CLI does"
    assert len(supervisors) == 2
    assert etcd.netns == "t-underlay"
    assert etcd.argv[:3] == ("nsenter", "--net=/run/netns/t-underlay", "etcd")
    assert option(etcd.argv, "--listen-client-urls") == "http://172.31.0.1:2379"
    assert option(etcd.argv, "--listen-peer-urls") == "http://172.31.0.1:2380"
    assert option(etcd.argv, "--data-dir") == str(dirs.state_dir("t") / "etcd" / "etcd1")
    assert forwarder.netns is None, "the forwarder listens in the root namespace"
    assert forwarder.argv[1:] == (
        "-m",
        "membrane",
        "lab",
        "forward",
        "--listen",
        f"127.0.0.1:{port}",
        "--netns",
        "/run/netns/t-underlay",
        "--upstream",
        "172.31.0.1:2379",
    )
    assert agent.netns == "t-node1"
    assert option(agent.argv, "--store") == "etcd://172.31.0.1:2379"
    # Healthy from inside the underlay, and through the forwarder from here, before any agent ran.
    assert probe.asked == [("t-underlay", "172.31.0.1", 2379), (None, "127.0.0.1", port)]
    assert lab.record.phase == "ready"


def test_three_members_listen_on_the_gateway_with_their_own_ports(dirs: LabDirs, machine: OrderedMachine) -> None:
    lab = up(dirs, machine, etcd_members=3)
    record = lab.record
    assert record.etcd is not None
    assert [m.endpoint for m in record.etcd.members] == ["172.31.0.1:2379", "172.31.0.1:2381", "172.31.0.1:2383"]
    assert record.agent_store_url == "etcd://172.31.0.1:2379,172.31.0.1:2381,172.31.0.1:2383"
    argv = tuple(member_argv(record, record.etcd.members[1]))
    assert option(argv, "--name") == "etcd2"
    assert option(argv, "--initial-cluster") == (
        "etcd1=http://172.31.0.1:2380,etcd2=http://172.31.0.1:2382,etcd3=http://172.31.0.1:2384"
    )
    assert option(argv, "--initial-cluster-token") == "membrane-lab-t"
    assert forwarder_argv(record, "python")[-6:] == [
        "--upstream",
        "172.31.0.1:2379",
        "--upstream",
        "172.31.0.1:2381",
        "--upstream",
        "172.31.0.1:2383",
    ]
    assert sum(1 for p in machine.processes.values() if p.netns == "t-underlay") == 3


def test_down_stops_the_agents_first_then_etcd_and_the_forwarder(dirs: LabDirs, machine: OrderedMachine) -> None:
    lab = up(dirs, machine, etcd_members=3)
    record = lab.record
    assert record.etcd is not None
    agent = record.nodes[0].agent
    assert agent is not None

    report = lab.down()

    assert report.processes == 8  # 2 supervisors, the agent, the relay, 3 members, the forwarder
    assert agent.pid in machine.signalled[:4], "agents may still write to the store on their way out"
    assert sorted(machine.signalled[4:]) == sorted(r.pid for r in record.etcd.processes)
    nothing_left(dirs, machine)


def test_a_member_that_exits_fails_up_with_its_log_and_leaves_nothing(dirs: LabDirs, machine: FakeMachine) -> None:
    machine.agent_exit_message = "etcd: listen tcp 172.31.0.1:2379: bind: address already in use"
    with pytest.raises(StoreError) as caught:
        up(dirs, machine)
    assert "the lab's etcd1 exited while starting" in str(caught.value)
    assert "  etcd: listen tcp 172.31.0.1:2379: bind: address already in use" in str(caught.value)
    nothing_left(dirs, machine)


def test_etcd_that_never_becomes_healthy_times_out_before_any_agent_starts(dirs: LabDirs, machine: FakeMachine) -> None:
    with pytest.raises(StoreError, match=r"the lab's etcd1 \(172\.31\.0\.1:2379\) was not healthy within 0\.2 s"):
        up(dirs, machine, FakeEtcdProbe(answers=False), health_timeout=0.2)
    assert not any(AGENT[0] in p.argv for p in machine.processes.values())
    nothing_left(dirs, machine)


def test_status_shows_each_member_and_the_forwarder(dirs: LabDirs, machine: OrderedMachine) -> None:
    lab = up(dirs, machine, etcd_members=3)
    record = lab.record
    assert record.etcd is not None
    killed = record.etcd.members[0].process
    assert killed is not None
    machine.signal(killed, signal.SIGKILL)

    store = Lab.open("t", dirs=dirs, host=machine.host(), etcd_probe=FakeEtcdProbe()).status().store

    assert [(s.name, s.state) for s in store] == [
        ("etcd1", "stopped"),
        ("etcd2", "healthy"),
        ("etcd3", "healthy"),
        ("forwarder", "healthy"),
    ]
    assert store[-1].endpoint == f"127.0.0.1:{record.etcd.forwarder_port}"
    unanswered = Lab.open("t", dirs=dirs, host=machine.host(), etcd_probe=FakeEtcdProbe(answers=False)).status()
    assert {s.state for s in unanswered.store} == {"stopped", "not answering"}


def test_a_sqlite_lab_has_no_store_processes(dirs: LabDirs, machine: FakeMachine) -> None:
    lab = Lab.up("t", 1, agent_command=AGENT, dirs=dirs, host=machine.host(), etcd_probe=FakeEtcdProbe())
    assert lab.record.etcd is None and lab.record.agent_store_url == lab.record.store_url
    assert lab.status().store == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"store": "sqlite", "etcd_members": 3}, "--etcd-members needs --store etcd"),
        ({"store": "etcd", "etcd_members": 2}, "--etcd-members must be 1 or 3, not 2"),
    ],
)
def test_member_counts_are_checked_before_anything_is_made(
    dirs: LabDirs, machine: FakeMachine, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        Lab.up("t", 1, agent_command=AGENT, dirs=dirs, host=machine.host(), **kwargs)  # type: ignore[arg-type]
    assert caught.value.problems == [message]
    assert machine.batches == []


# -- rendered text -------------------------------------------------------------------------------

DIRS = LabDirs(state_base=Path("/var/lib/membrane/labs"), run_base=Path("/run/membrane/labs"))


def etcd_record() -> LabRecord:
    plan = LabPlan("demo", 1, 0, store="etcd", etcd_members=3)
    record = initial_record(plan, DIRS, "etcd", datetime(2024, 1, 1, tzinfo=UTC), etcd_forwarder_port=40123)
    assert record.etcd is not None
    etcd = record.etcd
    for pid, member in enumerate(etcd.members, start=4300):
        etcd = etcd.with_member_process(member.name, ProcessRef(pid=pid, start_ticks=1))
    etcd = etcd.model_copy(update={"forwarder": ProcessRef(pid=4310, start_ticks=1)})
    record = record.model_copy(update={"etcd": etcd, "phase": "ready"})
    return record.with_agent("node1", ProcessRef(pid=4242, start_ticks=1))


def test_summary_of_an_etcd_lab_names_both_store_urls() -> None:
    text = render_summary(etcd_record())
    assert text.splitlines()[:12] == [
        "lab demo is up: 1 node, vxlan routing, etcd store",
        "",
        "  node1      netns demo-node1      172.31.0.11       agent pid 4242",
        "  underlay   netns demo-underlay   172.31.0.1/24     bridge br0, gateway",
        "  etcd1      netns demo-underlay   172.31.0.1:2379   etcd member, pid 4300",
        "  etcd2      netns demo-underlay   172.31.0.1:2381   etcd member, pid 4301",
        "  etcd3      netns demo-underlay   172.31.0.1:2383   etcd member, pid 4302",
        "",
        "  store        etcd://127.0.0.1:40123 (forwarded to the underlay; agents use "
        "etcd://172.31.0.1:2379,172.31.0.1:2381,172.31.0.1:2383)",
        "  etcd logs    /var/lib/membrane/labs/demo/etcd-*.log",
        "  agent logs   /var/lib/membrane/labs/demo/agent-node*.log",
        "",
    ]


def test_status_of_an_etcd_lab_has_a_store_table() -> None:
    status = LabStatus(
        etcd_record(),
        (MemberStatus("node1", "demo-node1", "172.31.0.11", True, 4242, "healthy"),),
        (
            StoreProcessStatus("etcd1", "172.31.0.1:2379", 4300, "stopped"),
            StoreProcessStatus("etcd2", "172.31.0.1:2381", 4301, "healthy"),
            StoreProcessStatus("etcd3", "172.31.0.1:2383", 4302, "not answering"),
            StoreProcessStatus("forwarder", "127.0.0.1:40123", 4310, "healthy"),
        ),
    )
    assert render_status(status) == (
        "lab demo: ready, 1 node, vxlan routing, underlay 172.31.0.0/24 (netns demo-underlay), "
        "store etcd://127.0.0.1:40123\n"
        "MEMBER   NETNS        IP            AGENT PID   AGENT     RESTARTS   LAST EXIT\n"
        "node1    demo-node1   172.31.0.11   4242        healthy   -          -\n"
        "STORE       ENDPOINT          PID    STATE\n"
        "etcd1       172.31.0.1:2379   4300   stopped\n"
        "etcd2       172.31.0.1:2381   4301   healthy\n"
        "etcd3       172.31.0.1:2383   4302   not answering\n"
        "forwarder   127.0.0.1:40123   4310   healthy"
    )


def test_cli_refuses_etcd_members_without_etcd_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli.add_command(lab_group)
    monkeypatch.setenv("MEMBRANE_LAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEMBRANE_LAB_RUN_DIR", str(tmp_path / "run"))
    result = CliRunner().invoke(cli, ["lab", "up", "--etcd-members", "3"])
    assert result.exit_code == 1
    assert result.stderr == "Error: --etcd-members needs --store etcd\n"
    assert CliRunner().invoke(cli, ["lab", "up", "--store", "etcd", "--etcd-members", "2"]).exit_code == 2
