"""A lab: a cluster of network namespaces on one machine, each node running the real agent.

``Lab.up`` builds it in this order, recording each step in ``lab.json`` before moving on::

    record (phase building) → dirs + agent.yaml (cluster settings: routing mode)
    → underlay netns + br0 → node netns k (veth eth0 ↔ port on br0)
    → client netns → [--store etcd: etcd members in the underlay, store forwarder, both healthy]
    → agent k started (nsenter --net=…, own session, log file)
    → every agent answers GET /v1/healthz
    → the relay started (``membrane relay`` on 127.0.0.1:PORT, root namespace) and listening
    → one supervisor per node and one for the relay, each adopting its process → record (phase ready)

A failure or an interrupt at any point tears down what was built. ``Lab.remove`` (``lab down``)
stops the supervisors first (each stops its process), then whatever agent or relay is still
running (SIGTERM, then SIGKILL after a grace period; by recorded PID and start time), then every process still
inside one of the lab's namespaces (pods the agents started) and the lab's etcd members and
forwarder (see :mod:`membrane.lab.etcd`), deletes the recorded namespaces
and every other namespace named ``<lab>-…`` (pod namespaces), then the lab's run and state dirs.
It is idempotent and works on a half-built lab.

The agent is started with ``nsenter --net``, not ``ip netns exec``: the latter gives the command
a private mount namespace, so the bind mounts the agent makes for pod namespaces under
/run/netns would not be visible outside it.

Primitives: :class:`Lab`, :class:`Progress`, :class:`LabStatus`, :class:`MemberStatus`,
:class:`DownReport`, :class:`RelayStatus`, :func:`agent_argv`, :func:`relay_argv`, :func:`agent_config_text`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml

from membrane.core.config import ClusterConfig, with_settings
from membrane.core.errors import AgentUnavailable, AlreadyExists, InvalidInput, MembraneError, NotFound
from membrane.lab.etcd import (
    ETCD_GRACE,
    EtcdProbe,
    NetnsEtcdProbe,
    StoreProcessStatus,
    etcd_status,
    free_port,
    lab_etcd,
    start_etcd,
    wait_etcd_healthy,
)
from membrane.lab.host import LabHost, ProcessControl, netns_path, real_host
from membrane.lab.plan import (
    DEFAULT_LAB_NAME,
    LabPlan,
    Routing,
    StoreKind,
    choose_subnet_index,
    validate_lab_name,
)
from membrane.lab.registry import find_lab
from membrane.lab.state import (
    LabDirs,
    LabMember,
    LabNode,
    LabRecord,
    LabRelay,
    ProcessRef,
    labs_lock,
    read_all_records,
    write_record,
)
from membrane.lab.supervisor import ServiceStatus, read_status, status_path, supervisor_argv

AGENT_COMMAND_ENV = "MEMBRANE_LAB_AGENT_COMMAND"
AGENT_CONFIG_FILE = "agent.yaml"
DEFAULT_HEALTH_TIMEOUT = 60.0
AGENT_GRACE = 5.0  # an agent gets this long after SIGTERM to clean up before SIGKILL
POD_GRACE = 2.0
KILL_WAIT = 5.0
SUPERVISOR_GRACE = AGENT_GRACE + KILL_WAIT + 2.0  # a supervisor stops its process before it exits
RESTART_TIMEOUT = 60.0
RELAY_HOST = "127.0.0.1"
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    label: str


ProgressCallback = Callable[[Progress], None]
AgentState = Literal["healthy", "not answering", "restarting", "stopped", "not started", "-"]


@dataclass(frozen=True)
class Supervision:
    """What a process's supervisor says: ``supervised`` False when no supervisor runs."""

    supervised: bool = False
    restarts: int = 0
    manual_restarts: int = 0
    last_exit: str | None = None
    next_start_in: float | None = None


@dataclass(frozen=True)
class MemberStatus:
    name: str
    netns: str
    ip: str
    netns_present: bool
    agent_pid: int | None
    agent: AgentState
    supervision: Supervision | None = None  # None: not a node (the client)


@dataclass(frozen=True)
class RelayStatus:
    address: str
    pid: int | None
    state: Literal["listening", "not listening", "restarting", "stopped"]
    supervision: Supervision


@dataclass(frozen=True)
class LabStatus:
    record: LabRecord
    members: tuple[MemberStatus, ...]
    store: tuple[StoreProcessStatus, ...] = ()  # etcd members and forwarder (--store etcd)
    relay: RelayStatus | None = None


@dataclass(frozen=True)
class DownReport:
    name: str
    found: bool  # False: there was nothing of this lab to remove
    namespaces: tuple[str, ...] = ()
    processes: int = 0


def default_agent_command() -> tuple[str, ...]:
    """The agent each node runs; ``MEMBRANE_LAB_AGENT_COMMAND`` replaces it (a development build)."""
    if override := os.environ.get(AGENT_COMMAND_ENV):
        return tuple(shlex.split(override))
    return (sys.executable, "-m", "membrane", "agent")


def agent_config_path(record: LabRecord) -> Path:
    """The agent config every node's agent reads (``--config``): the lab's cluster settings."""
    return record.state_dir / AGENT_CONFIG_FILE


def agent_config_text(record: LabRecord) -> str:
    """The first agent writes these cluster settings to the store; the others read them back."""
    return yaml.safe_dump({"cluster": {**record.settings, "routingMode": record.routing}}, sort_keys=True)


def agent_argv(base: Sequence[str], record: LabRecord, node: LabNode) -> list[str]:
    return [
        "nsenter",
        f"--net={netns_path(node.netns)}",
        *base,
        "--node",
        node.name,
        "--store",
        record.agent_store_url,
        "--config",
        str(agent_config_path(record)),
        "--state-dir",
        str(node.state_dir),
        "--run-dir",
        str(node.run_dir),
        "--netns-prefix",
        node_netns_prefix(record, node),
    ]


def relay_argv(record: LabRecord, address: str) -> list[str]:
    """The relay runs in the root namespace, where every agent's observer socket is a path it can open."""
    return [sys.executable, "-m", "membrane", "relay", "--store", record.store_url, "--listen", address]


def node_netns_prefix(record: LabRecord, node: LabNode) -> str:
    """``<lab>-<node>-``: inside the lab's prefix (so ``lab down`` finds the pods' namespaces) and
    distinct per node, so no agent takes another node's pod namespaces for its own leftovers."""
    return f"{record.prefix}{node.name}-"


def initial_record(
    plan: LabPlan, dirs: LabDirs, store: StoreKind, now: datetime, *, etcd_forwarder_port: int = 0
) -> LabRecord:
    """The record before anything is built; with etcd, the CLI's store URL is the forwarder's port."""
    state_dir, run_dir = dirs.state_dir(plan.name), dirs.run_dir(plan.name)
    nodes = tuple(
        LabNode(
            name=plan.node_name(k),
            netns=plan.node_netns(k),
            ip=str(plan.node_ip(k)),
            state_dir=state_dir / plan.node_name(k),
            run_dir=run_dir / plan.node_name(k),
            log=state_dir / f"agent-{plan.node_name(k)}.log",
        )
        for k in plan.node_numbers
    )
    client = LabMember(name="client", netns=plan.client_netns, ip=str(plan.client_ip)) if plan.client else None
    return LabRecord(
        name=plan.name,
        phase="building",
        created=now.isoformat(timespec="seconds"),
        routing=plan.routing,
        store_kind=store,
        store_url=(
            f"etcd://127.0.0.1:{etcd_forwarder_port}" if store == "etcd" else f"sqlite://{state_dir / 'store.db'}"
        ),
        subnet=str(plan.subnet),
        gateway=str(plan.gateway),
        subnet_index=plan.subnet_index,
        underlay_netns=plan.underlay_netns,
        nodes=nodes,
        client=client,
        state_dir=state_dir,
        run_dir=run_dir,
        etcd=lab_etcd(plan, state_dir, etcd_forwarder_port) if store == "etcd" else None,
    )


class Lab:
    """A built lab. ``with Lab.up(...) as lab:`` removes it on exit."""

    def __init__(
        self, record: LabRecord, *, dirs: LabDirs, host: LabHost, etcd_probe: EtcdProbe | None = None
    ) -> None:
        self._record = record
        self._dirs = dirs
        self._host = host
        self._etcd_probe: EtcdProbe = etcd_probe or NetnsEtcdProbe()

    # -- life cycle ------------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        name: str = DEFAULT_LAB_NAME,
        nodes: int = 1,
        *,
        routing: Routing = "vxlan",
        store: StoreKind = "sqlite",
        etcd_members: int = 1,
        tor: bool = False,
        client: bool = False,
        agent_command: Sequence[str] | None = None,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        progress: ProgressCallback | None = None,
        dirs: LabDirs | None = None,
        host: LabHost | None = None,
        etcd_probe: EtcdProbe | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Lab:
        if tor:
            raise InvalidInput(["--tor is not available in the lab yet"])
        if settings and "routingMode" in settings:
            raise InvalidInput(["--set routingMode: use --routing"])
        with_settings(ClusterConfig(), dict(settings or {}))  # refused now, with the key, not by the agents
        validate_lab_name(name)
        dirs = dirs or LabDirs.from_env()
        host = host or real_host()
        base = tuple(agent_command) if agent_command else default_agent_command()
        with labs_lock(dirs):
            records, _ = read_all_records(dirs)
            _refuse_existing(name, dirs, host)
            plan = LabPlan(
                name,
                nodes,
                choose_subnet_index(r.subnet_index for r in records),
                client=client,
                routing=routing,
                store=store,
                etcd_members=etcd_members,
            )
            port = free_port() if store == "etcd" else 0
            record = initial_record(plan, dirs, store, datetime.now(UTC), etcd_forwarder_port=port)
            if settings:
                record = record.model_copy(update={"settings": dict(settings)})
            write_record(dirs, record)
        lab = cls(record, dirs=dirs, host=host, etcd_probe=etcd_probe)
        try:
            lab._build(plan, base, health_timeout, progress or (lambda _p: None))
        except BaseException:
            # Ctrl-C included: nothing half-built is left behind. A failing teardown must not
            # hide the error that caused it; 'lab down' can finish the job.
            with contextlib.suppress(Exception):
                lab.down()
            raise
        return lab

    @classmethod
    def open(
        cls,
        name: str | None = None,
        *,
        dirs: LabDirs | None = None,
        host: LabHost | None = None,
        etcd_probe: EtcdProbe | None = None,
    ) -> Lab:
        """The lab called ``name``, or the only lab there is."""
        dirs = dirs or LabDirs.from_env()
        record = find_lab(name, dirs=dirs, flag="--name")
        if record is None:
            raise NotFound("no lab is running (membrane lab up builds one)")
        return cls(record, dirs=dirs, host=host or real_host(), etcd_probe=etcd_probe)

    @classmethod
    def remove(cls, name: str | None = None, *, dirs: LabDirs | None = None, host: LabHost | None = None) -> DownReport:
        """Remove the lab called ``name`` (or the only lab); removing a lab that is gone does nothing."""
        dirs = dirs or LabDirs.from_env()
        host = host or real_host()
        if name is None:
            record = find_lab(None, dirs=dirs, flag="--name")
            if record is None:
                return DownReport(name="", found=False)
            return _remove(record.name, record, dirs, host)
        validate_lab_name(name)
        try:
            record = find_lab(name, dirs=dirs, flag="--name")
        except (NotFound, InvalidInput):
            # Gone, or unreadable: an unreadable record proves nothing about which namespaces are
            # ours, so only the lab's dirs are removed.
            record = None
        return _remove(name, record, dirs, host)

    def down(self) -> DownReport:
        return _remove(self.name, self._record, self._dirs, self._host)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # -- what it is ------------------------------------------------------------------------
    @property
    def record(self) -> LabRecord:
        return self._record

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def store_url(self) -> str:
        return self._record.store_url

    def node_netns(self, k: int) -> str:
        return self._record.node(k).netns

    def node_ip(self, k: int) -> str:
        return self._record.node(k).ip

    def netns(self, member: str) -> str:
        """The namespace of ``node1`` … ``nodeN``, ``client`` or ``underlay``."""
        return self._record.member(member).netns

    def exec_argv(self, member: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``member``'s namespace (for Popen)."""
        path = netns_path(self.netns(member))
        if not path.exists():
            raise NotFound(f"namespace {path.name} does not exist: lab {self.name} is broken (membrane lab down)")
        return ["nsenter", f"--net={path}", *argv]

    def exec(
        self,
        member: str,
        argv: Sequence[str],
        *,
        capture_output: bool = False,
        input: str | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``member``'s namespace and wait for it."""
        return subprocess.run(
            self.exec_argv(member, argv),
            capture_output=capture_output,
            input=input,
            text=True,
            timeout=timeout,
            check=check,
        )

    def status(self) -> LabStatus:
        present = set(self._host.netns.list_netns())
        rows = [self._node_status(node, node.netns in present) for node in self._record.nodes]
        if (c := self._record.client) is not None:
            rows.append(MemberStatus(c.name, c.netns, c.ip, c.netns in present, None, "-"))
        store = etcd_status(self._record, self._host.processes, self._etcd_probe)
        return LabStatus(self._record, tuple(rows), store, self._relay_status())

    def _service(self, name: str, recorded: ProcessRef | None,
                 supervisor: ProcessRef | None) -> tuple[ProcessRef | None, ServiceStatus | None, Supervision]:
        """The current process of node ``name`` (or the relay): the supervisor's, else the recorded one."""
        status = read_status(status_path(self._record.state_dir, name))
        supervised = supervisor is not None and self._host.processes.is_alive(supervisor)
        current = status.process if status is not None and status.state == "running" else None
        if status is None:
            current = recorded
        info = Supervision(supervised=supervised)
        if status is not None:
            info = Supervision(supervised, status.restarts, status.manual_restarts, status.last_exit,
                               status.next_start_in if status.state == "backoff" else None)
        return current, status, info

    def agent(self, node_name: str) -> ProcessRef | None:
        """The agent running on ``node_name`` now (a supervisor may have restarted it)."""
        node = self._record.member(node_name)
        if not isinstance(node, LabNode):
            raise NotFound(f"{node_name} is not a node of lab {self.name}")
        return self._service(node.name, node.agent, node.supervisor)[0]

    def supervisor(self, name: str) -> ProcessRef | None:
        """The supervisor of node ``name`` or of the relay (``relay``)."""
        if name == "relay":
            return self._record.relay.supervisor if self._record.relay else None
        node = self._record.member(name)
        if not isinstance(node, LabNode):
            raise NotFound(f"{name} is not a node of lab {self.name}")
        return node.supervisor

    def _node_status(self, node: LabNode, netns_present: bool) -> MemberStatus:
        current, status, info = self._service(node.name, node.agent, node.supervisor)
        agent: AgentState
        if current is None and status is not None and status.state == "backoff" and info.supervised:
            agent = "restarting"
        elif current is None and node.agent is None:
            agent = "not started"
        elif current is None or not self._host.processes.is_alive(current):
            agent = "stopped"
        elif self._host.probe.healthy(node.socket):
            agent = "healthy"
        else:
            agent = "not answering"
        pid = current.pid if current else (node.agent.pid if node.agent else None)
        return MemberStatus(node.name, node.netns, node.ip, netns_present, pid, agent, info)

    def _relay_status(self) -> RelayStatus | None:
        relay = self._record.relay
        if relay is None:
            return None
        current, status, info = self._service("relay", relay.process, relay.supervisor)
        state: Literal["listening", "not listening", "restarting", "stopped"]
        if current is None and status is not None and status.state == "backoff" and info.supervised:
            state = "restarting"
        elif current is None or not self._host.processes.is_alive(current):
            state = "stopped"
        else:
            state = "listening" if self._host.probe.listening(relay.address) else "not listening"
        return RelayStatus(relay.address, current.pid if current else None, state, info)

    @property
    def relay_address(self) -> str | None:
        """Where the lab's relay serves the Observer API for the whole cluster."""
        return self._record.relay.address if self._record.relay else None

    def restart(self, node_name: str, timeout: float = RESTART_TIMEOUT) -> ProcessRef:
        """Restart a node's agent on purpose (its supervisor stops it and starts it again); the new one,
        once it answers."""
        node = self._record.member(node_name)
        if not isinstance(node, LabNode):
            raise NotFound(f"{node_name} is not a node of lab {self.name}")
        supervisor = node.supervisor
        if supervisor is None or not self._host.processes.is_alive(supervisor):
            raise AgentUnavailable(f"the supervisor of {node.name} is not running: 'membrane lab down' and "
                                   "'lab up' rebuild the lab")
        path = status_path(self._record.state_dir, node.name)
        before = read_status(path)
        count = before.manual_restarts if before else 0
        self._host.processes.signal(supervisor, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = read_status(path)
            if (now is not None and now.manual_restarts > count and now.state == "running" and now.process
                    and self._host.probe.healthy(node.socket)):
                return now.process
            if not self._host.processes.is_alive(supervisor):
                raise AgentUnavailable(f"the supervisor of {node.name} exited{_log_tail(_supervisor_log(node.log))}")
            time.sleep(POLL_INTERVAL)
        raise AgentUnavailable(f"the agent of {node.name} did not answer within {timeout:g} s after its restart"
                               f"{_log_tail(node.log)}")

    # -- building --------------------------------------------------------------------------
    def _save(self, record: LabRecord) -> None:
        write_record(self._dirs, record)
        self._record = record

    def _build(self, plan: LabPlan, base: Sequence[str], health_timeout: float, report: ProgressCallback) -> None:
        steps = plan.build_steps()
        etcd_steps = len(self._record.etcd.members) + 2 if self._record.etcd is not None else 0
        total = 1 + len(steps) + etcd_steps + 2 * plan.nodes + 2
        done = 0

        def advance(label: str) -> None:
            nonlocal done
            done += 1
            report(Progress(done, total, label))

        record = self._record
        for node in record.nodes:
            node.state_dir.mkdir(parents=True, exist_ok=True)
            node.run_dir.mkdir(parents=True, exist_ok=True)
        agent_config_path(record).write_text(agent_config_text(record))
        advance("state and run dirs")
        for step in steps:
            for batch in step.batches:
                self._host.netns.apply(batch)
            advance(f"{step.label} namespace")
        if self._record.etcd is not None:
            # Before the agents: an agent's first act is to open the store.
            start_etcd(self._record, self._host.processes, self._save, advance)
            wait_etcd_healthy(self._record, self._host.processes, self._etcd_probe, health_timeout)
            advance(f"etcd healthy, reachable from here at {self._record.store_url}")
        for node in record.nodes:
            ref = self._host.processes.spawn(agent_argv(base, self._record, node), node.log)
            self._save(self._record.with_agent(node.name, ref))
            advance(f"{node.name} agent started (pid {ref.pid})")
        for node_name in self._wait_healthy(health_timeout):
            advance(f"{node_name} agent healthy")
        self._start_relay(health_timeout)
        advance(f"relay listening on {self.relay_address}")
        self._start_supervisors(base)
        advance(f"{plan.nodes + 1} supervisors started (agents and relay restart when they exit)")
        self._save(self._record.model_copy(update={"phase": "ready"}))

    def _start_relay(self, timeout: float) -> None:
        address = f"{RELAY_HOST}:{free_port(RELAY_HOST)}"
        relay = LabRelay(address=address, log=self._record.state_dir / "relay.log")
        self._save(self._record.model_copy(update={"relay": relay}))
        ref = self._host.processes.spawn(relay_argv(self._record, address), relay.log)
        self._save(self._record.model_copy(update={"relay": relay.model_copy(update={"process": ref})}))
        deadline = time.monotonic() + timeout
        while not self._host.probe.listening(address):
            if not self._host.processes.is_alive(ref):
                raise AgentUnavailable(f"the relay exited while starting{_log_tail(relay.log)}")
            if time.monotonic() > deadline:
                raise AgentUnavailable(f"the relay did not listen on {address} within {timeout:g} s"
                                       f"{_log_tail(relay.log)}")
            time.sleep(POLL_INTERVAL)

    def _start_supervisors(self, base: Sequence[str]) -> None:
        """One per node and one for the relay, each adopting the process running now."""
        record = self._record
        assert record.relay is not None
        services: list[tuple[str, ProcessRef | None, Path, list[str]]] = [
            (n.name, n.agent, n.log, agent_argv(base, record, n)) for n in record.nodes
        ]
        services.append(("relay", record.relay.process, record.relay.log, relay_argv(record, record.relay.address)))
        for name, ref, log, argv in services:
            supervisor = self._host.processes.spawn(
                supervisor_argv(sys.executable, name, status_path(record.state_dir, name), log, ref, argv),
                _supervisor_log(log),
            )
            self._save(self._record.with_supervisor(name, supervisor))

    def _wait_healthy(self, timeout: float) -> Iterable[str]:
        """Yield each node's name as its agent answers; fail fast when an agent exits."""
        pending = list(self._record.nodes)
        deadline = time.monotonic() + timeout
        while pending:
            for node in list(pending):
                assert node.agent is not None
                if not self._host.processes.is_alive(node.agent):
                    raise AgentUnavailable(f"the agent of {node.name} exited while starting{_log_tail(node.log)}")
                if self._host.probe.healthy(node.socket):
                    pending.remove(node)
                    yield node.name
            if pending and time.monotonic() > deadline:
                node = pending[0]
                raise AgentUnavailable(
                    f"the agent of {node.name} did not answer on {node.socket} within {timeout:g} s"
                    f"{_log_tail(node.log)}"
                )
            if pending:
                time.sleep(POLL_INTERVAL)


def _refuse_existing(name: str, dirs: LabDirs, host: LabHost) -> None:
    if dirs.record_path(name).exists():
        raise AlreadyExists(f"lab {name} exists already (membrane lab down --name {name} removes it)")
    leftovers = [p for p in (dirs.state_dir(name), dirs.run_dir(name)) if p.exists()]
    if leftovers:
        raise AlreadyExists(
            f"{leftovers[0]} exists already, left by an earlier lab {name} (membrane lab down --name {name})"
        )
    taken = [n for n in host.netns.list_netns() if n.startswith(f"{name}-")]
    if taken:
        # Without a record they cannot be proven ours, so they are not removed either.
        raise AlreadyExists(
            f"network namespaces named {name}-… exist but no lab {name} does ({', '.join(taken[:3])}): "
            "pick another --name"
        )


def _remove(name: str, record: LabRecord | None, dirs: LabDirs, host: LabHost) -> DownReport:
    state_dir, run_dir = dirs.state_dir(name), dirs.run_dir(name)
    if record is None and not state_dir.exists() and not run_dir.exists():
        return DownReport(name=name, found=False)
    namespaces: list[str] = []
    stopped = 0
    if record is not None:
        # The agents and the relay: the ones running now (their supervisors' status files) and the
        # ones 'lab up' started.
        names = [n.name for n in record.nodes] + (["relay"] if record.relay else [])
        current = [st.process for name in names if (st := read_status(status_path(state_dir, name))) and st.process]
        started = [n.agent for n in record.nodes] + [record.relay.process if record.relay else None]
        services = list({r.pid: r for r in [*current, *(r for r in started if r)]}.values())
        running = sum(1 for r in services if host.processes.is_alive(r))
        # Supervisors first, so that nothing is restarted behind our back; each stops its process.
        supervisors = [n.supervisor for n in record.nodes] + [record.relay.supervisor if record.relay else None]
        stopped += _terminate(host.processes, [s for s in supervisors if s], SUPERVISOR_GRACE)
        # Then what a supervisor killed with SIGKILL left behind.
        _terminate(host.processes, services, AGENT_GRACE)
        stopped += running
        if record.etcd is not None:  # after the agents, which may still write on their way out
            stopped += _terminate(host.processes, record.etcd.processes, ETCD_GRACE)
        namespaces = sorted(
            set(record.namespaces) | {n for n in host.netns.list_netns() if n.startswith(record.prefix)}
        )
        stopped += _terminate(host.processes, host.netns.netns_processes(namespaces), POD_GRACE)
        host.netns.delete_netns(namespaces)
    for path in (run_dir, state_dir):
        shutil.rmtree(path, ignore_errors=True)
    if state_dir.exists() or run_dir.exists():
        raise MembraneError(f"could not remove {state_dir if state_dir.exists() else run_dir}")
    for base in (dirs.run_base, dirs.state_base):
        with contextlib.suppress(OSError):  # still holds other labs: keep it
            base.rmdir()
    return DownReport(name=name, found=True, namespaces=tuple(namespaces), processes=stopped)


def _terminate(processes: ProcessControl, refs: Sequence[ProcessRef], grace: float) -> int:
    """SIGTERM, wait up to ``grace`` seconds, SIGKILL what is left; the number that were running."""
    running = [r for r in refs if processes.is_alive(r)]
    for ref in running:
        processes.signal(ref, signal.SIGTERM)
    left = _wait_gone(processes, running, grace)
    for ref in left:
        processes.signal(ref, signal.SIGKILL)
    if left := _wait_gone(processes, left, KILL_WAIT):
        raise MembraneError(f"processes survived SIGKILL: {', '.join(str(r.pid) for r in left)}")
    return len(running)


def _wait_gone(processes: ProcessControl, refs: Sequence[ProcessRef], timeout: float) -> list[ProcessRef]:
    deadline = time.monotonic() + timeout
    left = [r for r in refs if processes.is_alive(r)]
    while left and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        left = [r for r in left if processes.is_alive(r)]
    return left


def _supervisor_log(log: Path) -> Path:
    """``agent-node1.log`` → ``agent-node1.supervisor.log``."""
    return log.with_suffix(".supervisor.log")


def _log_tail(log: Path) -> str:
    try:
        with log.open(errors="replace") as f:
            lines = [line.rstrip() for line in deque(f, maxlen=LOG_TAIL_LINES)]
    except OSError:
        return " (it left no log)"
    lines = [line for line in lines if line]
    if not lines:
        return " (its log is empty)"
    # The log goes with the lab when a failed 'lab up' tears it down: quote it rather than name it.
    return "; the last lines of its log:\n" + "\n".join(f"  {line}" for line in lines)
