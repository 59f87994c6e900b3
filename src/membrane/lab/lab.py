"""A lab: a cluster of network namespaces on one machine, each node running the real agent.

``Lab.up`` builds it in this order, recording each step in ``lab.json`` before moving on::

    record (phase building) → dirs + agent.yaml (cluster settings: routing mode)
    → underlay netns + br0 → node netns k (veth eth0 ↔ port on br0)
    → client netns → [--store etcd: etcd members in the underlay, store forwarder, both healthy]
    → agent k started (nsenter --net=…, own session, log file)
    → every agent answers GET /v1/healthz → record (phase ready)

A failure or an interrupt at any point tears down what was built. ``Lab.remove`` (``lab down``)
stops the recorded agents (SIGTERM, then SIGKILL after a grace period), then every process still
inside one of the lab's namespaces (pods the agents started) and the lab's etcd members and
forwarder (see :mod:`membrane.lab.etcd`), deletes the recorded namespaces
and every other namespace named ``<lab>-…`` (pod namespaces), then the lab's run and state dirs.
It is idempotent and works on a half-built lab.

The agent is started with ``nsenter --net``, not ``ip netns exec``: the latter gives the command
a private mount namespace, so the bind mounts the agent makes for pod namespaces under
/run/netns would not be visible outside it.

Primitives: :class:`Lab`, :class:`Progress`, :class:`LabStatus`, :class:`MemberStatus`,
:class:`DownReport`, :func:`agent_argv`, :func:`agent_config_text`.
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
    ProcessRef,
    labs_lock,
    read_all_records,
    write_record,
)

AGENT_COMMAND_ENV = "MEMBRANE_LAB_AGENT_COMMAND"
AGENT_CONFIG_FILE = "agent.yaml"
DEFAULT_HEALTH_TIMEOUT = 60.0
AGENT_GRACE = 5.0  # an agent gets this long after SIGTERM to clean up before SIGKILL
POD_GRACE = 2.0
KILL_WAIT = 5.0
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    label: str


ProgressCallback = Callable[[Progress], None]
AgentState = Literal["healthy", "not answering", "stopped", "not started", "-"]


@dataclass(frozen=True)
class MemberStatus:
    name: str
    netns: str
    ip: str
    netns_present: bool
    agent_pid: int | None
    agent: AgentState


@dataclass(frozen=True)
class LabStatus:
    record: LabRecord
    members: tuple[MemberStatus, ...]
    store: tuple[StoreProcessStatus, ...] = ()  # etcd members and forwarder (--store etcd)


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
        return LabStatus(self._record, tuple(rows), store)

    def _node_status(self, node: LabNode, netns_present: bool) -> MemberStatus:
        agent: AgentState
        if node.agent is None:
            agent = "not started"
        elif not self._host.processes.is_alive(node.agent):
            agent = "stopped"
        elif self._host.probe.healthy(node.socket):
            agent = "healthy"
        else:
            agent = "not answering"
        pid = node.agent.pid if node.agent else None
        return MemberStatus(node.name, node.netns, node.ip, netns_present, pid, agent)

    # -- building --------------------------------------------------------------------------
    def _save(self, record: LabRecord) -> None:
        write_record(self._dirs, record)
        self._record = record

    def _build(self, plan: LabPlan, base: Sequence[str], health_timeout: float, report: ProgressCallback) -> None:
        steps = plan.build_steps()
        etcd_steps = len(self._record.etcd.members) + 2 if self._record.etcd is not None else 0
        total = 1 + len(steps) + etcd_steps + 2 * plan.nodes
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
        self._save(self._record.model_copy(update={"phase": "ready"}))

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
        stopped += _terminate(host.processes, [n.agent for n in record.nodes if n.agent], AGENT_GRACE)
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
