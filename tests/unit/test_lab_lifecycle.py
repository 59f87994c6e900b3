"""lab up / status / down against the in-memory machine: order, failures, what is left behind."""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from membrane.core.errors import AgentUnavailable, AlreadyExists, DatapathError, InvalidInput, NotFound
from membrane.lab import lab as lab_module
from membrane.lab.fake import FakeMachine
from membrane.lab.lab import Lab, Progress, Supervision, initial_record
from membrane.lab.plan import LabPlan
from membrane.lab.state import LabDirs, read_record, write_record
from membrane.lab.supervisor import ServiceStatus, status_path, write_status

AGENT = ("/opt/agent", "agent")


@pytest.fixture
def dirs(tmp_path: Path) -> LabDirs:
    return LabDirs(state_base=tmp_path / "state", run_base=tmp_path / "run")


@pytest.fixture
def machine() -> FakeMachine:
    return FakeMachine()


def up(dirs: LabDirs, machine: FakeMachine, name: str = "t", nodes: int = 2, **kwargs: object) -> Lab:
    return Lab.up(name, nodes, agent_command=AGENT, dirs=dirs, host=machine.host(), **kwargs)  # type: ignore[arg-type]


def nothing_left(dirs: LabDirs, machine: FakeMachine, name: str = "t") -> None:
    assert machine.namespaces == set()
    assert machine.processes == {}
    assert not dirs.state_dir(name).exists()
    assert not dirs.run_dir(name).exists()


def test_up_builds_every_namespace_and_starts_one_agent_per_node(dirs: LabDirs, machine: FakeMachine) -> None:
    seen: list[Progress] = []
    lab = up(dirs, machine, client=True, progress=seen.append)

    assert machine.namespaces == {"t-underlay", "t-node1", "t-node2", "t-client"}
    record = read_record(dirs.record_path("t"))
    assert record.phase == "ready"
    assert record.store_url == f"sqlite://{dirs.state_base}/t/store.db"
    assert [n.ip for n in record.nodes] == ["172.31.0.11", "172.31.0.12"]
    agents = sorted((p for p in machine.processes.values() if p.argv[0] == "nsenter"), key=lambda p: p.ref.pid)
    assert [p.netns for p in agents] == ["t-node1", "t-node2"]
    assert list(agents[0].argv) == [
        "nsenter",
        "--net=/run/netns/t-node1",
        *AGENT,
        "--node",
        "node1",
        "--store",
        record.store_url,
        "--config",
        str(dirs.state_base / "t" / "agent.yaml"),
        "--state-dir",
        str(dirs.state_base / "t" / "node1"),
        "--run-dir",
        str(dirs.run_base / "t" / "node1"),
        "--netns-prefix",
        "t-node1-",
    ]
    assert agents[1].argv[-1] == "t-node2-"
    assert [n.agent.pid if n.agent else None for n in record.nodes] == [p.ref.pid for p in agents]
    assert [p.step for p in seen] == list(range(1, seen[0].total + 1))
    assert seen[-1].label == "3 supervisors started (agents and relay restart when they exit)"
    assert record.relay is not None and seen[-2].label == f"relay listening on {record.relay.address}"
    relay = [p for p in machine.processes.values() if p.argv[1:4] == ("-m", "membrane", "relay")]
    assert [p.argv[4:] for p in relay] == [("--store", record.store_url, "--listen", record.relay.address)]
    assert relay[0].ref == record.relay.process and relay[0].netns is None
    # Each supervisor adopts the process running now and knows how to start it again.
    supervisors = {p.argv[p.argv.index("--name") + 1]: p for p in machine.processes.values()
                   if "membrane.lab.supervisor" in p.argv}
    assert sorted(supervisors) == ["node1", "node2", "relay"]
    node1 = supervisors["node1"]
    assert node1.ref == record.nodes[0].supervisor and node1.netns is None
    assert node1.argv[node1.argv.index("--adopt") + 1] == f"{agents[0].ref.pid}:{agents[0].ref.start_ticks}"
    assert node1.argv[node1.argv.index("--") + 1:] == agents[0].argv
    assert lab.node_netns(2) == "t-node2"
    assert lab.netns("client") == "t-client"
    assert lab.netns("underlay") == "t-underlay"


def test_two_labs_get_different_underlay_subnets(dirs: LabDirs, machine: FakeMachine) -> None:
    first = up(dirs, machine, "a", 1)
    second = up(dirs, machine, "b", 1)
    assert first.record.subnet == "172.31.0.0/24"
    assert second.record.subnet == "172.31.1.0/24"
    first.down()
    third = up(dirs, machine, "c", 1)
    assert third.record.subnet == "172.31.0.0/24"  # freed by the removed lab


def test_a_name_in_use_is_refused(dirs: LabDirs, machine: FakeMachine) -> None:
    up(dirs, machine, "t", 1)
    with pytest.raises(AlreadyExists, match="lab t exists already"):
        up(dirs, machine, "t", 1)


def test_namespaces_that_look_like_the_lab_but_are_not_recorded_are_left_alone(
    dirs: LabDirs, machine: FakeMachine
) -> None:
    machine.namespaces.add("t-node1")
    with pytest.raises(AlreadyExists, match="network namespaces named t-… exist"):
        up(dirs, machine, "t", 1)
    assert machine.namespaces == {"t-node1"}
    assert not dirs.state_dir("t").exists()


def test_an_agent_that_exits_fails_up_with_its_log_and_leaves_nothing(dirs: LabDirs, machine: FakeMachine) -> None:
    machine.agent_exit_message = "agent: cannot open store"
    with pytest.raises(AgentUnavailable) as caught:
        up(dirs, machine)
    assert "the agent of node1 exited while starting" in str(caught.value)
    assert "  agent: cannot open store" in str(caught.value)
    nothing_left(dirs, machine)


def test_agents_that_never_answer_time_out_and_leave_nothing(dirs: LabDirs, machine: FakeMachine) -> None:
    machine.agents_answer = False
    with pytest.raises(AgentUnavailable, match=r"did not answer on .*agent\.sock within 0\.2 s"):
        up(dirs, machine, health_timeout=0.2)
    nothing_left(dirs, machine)


def test_a_failing_build_step_starts_no_agent_and_leaves_nothing(dirs: LabDirs, machine: FakeMachine) -> None:
    machine.fail_on = "addr add 172.31.0.12/24"
    with pytest.raises(DatapathError, match="injected failure"):
        up(dirs, machine)
    assert not any(p.argv[0] == "nsenter" for p in machine.processes.values())
    nothing_left(dirs, machine)


def test_down_stops_agents_and_pods_and_removes_only_the_labs_namespaces(dirs: LabDirs, machine: FakeMachine) -> None:
    lab = up(dirs, machine)
    agents = [n.agent for n in lab.record.nodes]
    # What the agents would have made: a pod namespace with a process in it.
    machine.namespaces.add("t-pod-web")
    pod = machine.add_process(["httpd"], "t-pod-web")
    node_process = machine.add_process(["sleep"], "t-node2")
    # Another lab, and something unrelated, whose names share the beginning.
    other = up(dirs, machine, "tt", 1)
    machine.namespaces.add("t")
    unrelated = machine.add_process(["sshd"], None)

    report = lab.down()

    assert report.found
    assert set(report.namespaces) == {"t-underlay", "t-node1", "t-node2", "t-pod-web"}
    assert report.processes == 4 + 4  # the agents, the pod, the node's process; 3 supervisors and the relay
    assert machine.namespaces == {"t", "tt-underlay", "tt-node1"}
    for ref in (*agents, pod, node_process):
        assert ref is not None and not machine.is_alive(ref)
    assert machine.is_alive(unrelated)
    assert other.record.nodes[0].agent is not None and machine.is_alive(other.record.nodes[0].agent)
    assert not dirs.state_dir("t").exists() and not dirs.run_dir("t").exists()
    assert dirs.state_dir("tt").exists() and dirs.run_dir("tt").exists()


def test_an_agent_that_ignores_sigterm_is_killed(
    dirs: LabDirs, machine: FakeMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lab_module, "AGENT_GRACE", 0.1)
    machine.agents_ignore_sigterm = True
    lab = up(dirs, machine, nodes=1)
    agent = lab.record.nodes[0].agent
    assert agent is not None
    lab.down()
    assert not machine.is_alive(agent)
    nothing_left(dirs, machine)


def test_down_is_idempotent_and_finds_the_only_lab(dirs: LabDirs, machine: FakeMachine) -> None:
    up(dirs, machine)
    report = Lab.remove(dirs=dirs, host=machine.host())
    assert report.name == "t" and report.found
    nothing_left(dirs, machine)
    assert not Lab.remove("t", dirs=dirs, host=machine.host()).found
    assert not Lab.remove(dirs=dirs, host=machine.host()).found


def test_down_cleans_up_after_a_crash_half_way_through_up(dirs: LabDirs, machine: FakeMachine) -> None:
    # What a killed 'lab up' leaves: a record still 'building', the underlay and node1 built.
    plan = LabPlan("t", 2, subnet_index=0)
    record = initial_record(plan, dirs, "sqlite", datetime.now(UTC))
    write_record(dirs, record)
    for step in plan.build_steps()[:2]:
        for batch in step.batches:
            machine.apply(batch)
    agent = machine.spawn(["nsenter", "--net=/run/netns/t-node1", *AGENT], record.nodes[0].log)
    write_record(dirs, record.with_agent("node1", agent))

    report = Lab.remove("t", dirs=dirs, host=machine.host())

    assert report.found and report.processes == 1
    nothing_left(dirs, machine)


def test_status_tells_healthy_stopped_and_missing_apart(dirs: LabDirs, machine: FakeMachine) -> None:
    lab = up(dirs, machine, client=True)
    agent2 = lab.record.nodes[1].agent
    assert agent2 is not None
    machine.signal(agent2, signal.SIGKILL)
    machine.namespaces.discard("t-client")

    rows = {m.name: m for m in Lab.open("t", dirs=dirs, host=machine.host()).status().members}

    assert rows["node1"].agent == "healthy" and rows["node1"].netns_present
    assert rows["node2"].agent == "stopped" and rows["node2"].agent_pid == agent2.pid
    assert rows["client"].agent == "-" and not rows["client"].netns_present


def test_the_context_manager_removes_the_lab(dirs: LabDirs, machine: FakeMachine) -> None:
    with up(dirs, machine) as lab:
        assert lab.store_url.startswith("sqlite://")
    nothing_left(dirs, machine)


def test_an_unknown_member_names_the_known_ones(dirs: LabDirs, machine: FakeMachine) -> None:
    lab = up(dirs, machine)
    with pytest.raises(NotFound, match=r"lab t has no 'node3' \(it has: node1, node2, underlay\)"):
        lab.netns("node3")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tor": True}, "--tor is not available in the lab yet"),
    ],
)
def test_parts_not_built_yet_are_refused_before_anything_is_made(
    dirs: LabDirs, machine: FakeMachine, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        up(dirs, machine, **kwargs)
    assert caught.value.problems == [message]
    assert machine.batches == []
    assert not dirs.state_base.exists() or not any(dirs.state_base.iterdir())


def test_settings_given_at_creation_reach_the_first_agents_config(dirs: LabDirs, machine: FakeMachine) -> None:
    up(dirs, machine, settings={"policyAuditMode": True, "tunnelPort": 8473}, routing="native")
    config = yaml.safe_load((dirs.state_base / "t" / "agent.yaml").read_text())
    assert config["cluster"] == {"policyAuditMode": True, "tunnelPort": 8473, "routingMode": "native"}
    assert read_record(dirs.record_path("t")).settings == {"policyAuditMode": True, "tunnelPort": 8473}


def test_a_bad_setting_at_creation_is_refused_before_anything_is_made(dirs: LabDirs, machine: FakeMachine) -> None:
    with pytest.raises(InvalidInput, match="policyEnforcementMode"):
        up(dirs, machine, settings={"policyEnforcementMode": "sometimes"})
    with pytest.raises(InvalidInput, match="use --routing"):
        up(dirs, machine, settings={"routingMode": "native"})
    assert machine.namespaces == set() and not dirs.record_path("t").exists()


def test_status_shows_what_the_supervisors_report(dirs: LabDirs, machine: FakeMachine) -> None:
    lab = up(dirs, machine)
    node1, node2 = lab.record.nodes
    assert node1.agent is not None and node2.agent is not None
    # node1's agent was killed and restarted twice, once on purpose; node2's waits for its back-off.
    machine.signal(node1.agent, signal.SIGKILL)
    again = machine.spawn(["nsenter", "--net=/run/netns/t-node1", *AGENT, "--run-dir", str(node1.run_dir)], node1.log)
    write_status(status_path(lab.record.state_dir, "node1"), ServiceStatus(
        name="node1", supervisor_pid=1, state="running", process=again, restarts=2, manual_restarts=1,
        last_exit="killed by SIGKILL"))
    machine.signal(node2.agent, signal.SIGKILL)
    write_status(status_path(lab.record.state_dir, "node2"), ServiceStatus(
        name="node2", supervisor_pid=1, state="backoff", restarts=3, failures=3, next_start_in=2.0))

    status = Lab.open("t", dirs=dirs, host=machine.host()).status()
    rows = {m.name: m for m in status.members}

    assert (rows["node1"].agent, rows["node1"].agent_pid) == ("healthy", again.pid)
    assert rows["node1"].supervision == Supervision(True, 2, 1, "killed by SIGKILL", None)
    assert rows["node2"].agent == "restarting" and rows["node2"].supervision is not None
    assert rows["node2"].supervision.next_start_in == 2.0
    assert lab.agent("node1") == again
    assert status.relay is not None and status.relay.state == "listening"
    assert status.relay.supervision.supervised and status.relay.pid == lab.record.relay.process.pid  # type: ignore[union-attr]
    # Without its supervisor, a node is no longer looked after, and lab restart says so.
    supervisor = lab.supervisor("node1")
    assert supervisor is not None
    machine.signal(supervisor, signal.SIGKILL)
    assert Lab.open("t", dirs=dirs, host=machine.host()).status().members[0].supervision == Supervision(
        False, 2, 1, "killed by SIGKILL", None)
    with pytest.raises(AgentUnavailable, match="the supervisor of node1 is not running"):
        lab.restart("node1")


def test_down_stops_the_processes_a_killed_supervisor_left(dirs: LabDirs, machine: FakeMachine) -> None:
    lab = up(dirs, machine, nodes=1)
    relay = lab.record.relay
    assert relay is not None and relay.supervisor is not None and relay.process is not None
    # The relay's supervisor restarted it (in the root namespace: no namespace sweep finds it), then was killed.
    machine.signal(relay.process, signal.SIGKILL)
    again = machine.spawn(["python", "-m", "membrane", "relay"], relay.log)
    write_status(status_path(lab.record.state_dir, "relay"),
                 ServiceStatus(name="relay", supervisor_pid=1, state="running", process=again, restarts=1))
    machine.signal(relay.supervisor, signal.SIGKILL)
    lab.down()
    nothing_left(dirs, machine)
