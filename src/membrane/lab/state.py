"""Where labs keep their files, and the lab record (``lab.json``) that says what a lab owns.

A lab ``L`` has a state dir ``<state base>/L`` (``lab.json``, the SQLite store, the agents'
state dirs and logs, the relay's log, the supervisors' status files and logs) and a run dir
``<run base>/L`` (the agents' sockets). The bases default to ``/var/lib/membrane/labs`` and
``/run/membrane/labs`` and are overridden by
``MEMBRANE_LAB_STATE_DIR`` / ``MEMBRANE_LAB_RUN_DIR``.

The record is written before anything is built and rewritten after every step, atomically, so
``lab down`` always knows what a lab owns, even after a crash half-way through ``lab up``.

Primitives: :class:`LabDirs`, :class:`LabRecord` (with :class:`LabNode`, :class:`LabMember`,
:class:`ProcessRef`, :class:`LabRelay`, and for ``--store etcd`` :class:`LabEtcd` and :class:`LabEtcdMember`),
:func:`read_record`, :func:`write_record`, :func:`read_all_records`, :func:`labs_lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from membrane.core.config import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR
from membrane.core.errors import InvalidInput, NotFound
from membrane.lab.plan import Routing, StoreKind

STATE_DIR_ENV = "MEMBRANE_LAB_STATE_DIR"
RUN_DIR_ENV = "MEMBRANE_LAB_RUN_DIR"
RECORD_FILE = "lab.json"

Phase = Literal["building", "ready"]


@dataclass(frozen=True)
class LabDirs:
    state_base: Path
    run_base: Path

    @classmethod
    def from_env(cls) -> LabDirs:
        return cls(
            state_base=Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR / "labs"),
            run_base=Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR / "labs"),
        )

    def state_dir(self, name: str) -> Path:
        return self.state_base / name

    def run_dir(self, name: str) -> Path:
        return self.run_base / name

    def record_path(self, name: str) -> Path:
        return self.state_dir(name) / RECORD_FILE


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProcessRef(_Frozen):
    """A process the lab started: ``start_ticks`` (from /proc/PID/stat) tells a reused PID apart."""

    pid: int
    start_ticks: int


class LabMember(_Frozen):
    """A namespace on the underlay: a node or the client."""

    name: str
    netns: str
    ip: str


class LabNode(LabMember):
    state_dir: Path
    run_dir: Path
    log: Path
    # The agent 'lab up' started; its supervisor's status file names the one running now.
    agent: ProcessRef | None = None
    supervisor: ProcessRef | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / "agent.sock"


class LabEtcdMember(_Frozen):
    """One etcd member, running in the underlay namespace."""

    name: str
    ip: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    process: ProcessRef | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.client_port}"


class LabEtcd(_Frozen):
    """The lab's etcd cluster and the forwarder that lets the CLI reach it from the root namespace."""

    members: tuple[LabEtcdMember, ...]
    forwarder_port: int
    forwarder_log: Path
    forwarder: ProcessRef | None = None

    @property
    def agent_store_url(self) -> str:
        """What the agents use: the members' own addresses, reached over the underlay."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    @property
    def processes(self) -> tuple[ProcessRef, ...]:
        refs = [m.process for m in self.members] + [self.forwarder]
        return tuple(r for r in refs if r is not None)

    def with_member_process(self, name: str, process: ProcessRef) -> LabEtcd:
        members = tuple(m.model_copy(update={"process": process}) if m.name == name else m for m in self.members)
        return self.model_copy(update={"members": members})


class LabRelay(_Frozen):
    """The lab's relay: the whole cluster's Observer API, in the root namespace on 127.0.0.1."""

    address: str
    log: Path
    process: ProcessRef | None = None  # the relay 'lab up' started, as for agents
    supervisor: ProcessRef | None = None


class LabRecord(_Frozen):
    version: Literal[1] = 1
    name: str
    phase: Phase
    created: str
    routing: Routing
    store_kind: StoreKind
    store_url: str
    subnet: str
    gateway: str
    subnet_index: int
    underlay_netns: str
    nodes: tuple[LabNode, ...]
    client: LabMember | None = None
    state_dir: Path
    run_dir: Path
    etcd: LabEtcd | None = None
    relay: LabRelay | None = None
    #: Cluster settings given at creation (``lab up --set KEY=VALUE``), written by the first agent.
    settings: dict[str, Any] = {}

    @property
    def prefix(self) -> str:
        return f"{self.name}-"

    @property
    def agent_store_url(self) -> str:
        """The store URL the agents get; ``store_url`` is the one for commands in the root namespace."""
        return self.etcd.agent_store_url if self.etcd is not None else self.store_url

    @property
    def namespaces(self) -> tuple[str, ...]:
        names = [self.underlay_netns, *(n.netns for n in self.nodes)]
        if self.client is not None:
            names.append(self.client.netns)
        return tuple(names)

    @property
    def members(self) -> tuple[LabMember, ...]:
        return (*self.nodes, *((self.client,) if self.client else ()))

    def member(self, name: str) -> LabMember:
        for member in self.members:
            if member.name == name:
                return member
        if name == "underlay":
            return LabMember(name="underlay", netns=self.underlay_netns, ip=self.gateway)
        known = ", ".join([m.name for m in self.members] + ["underlay"])
        raise NotFound(f"lab {self.name} has no {name!r} (it has: {known})")

    def node(self, k: int) -> LabNode:
        if not 1 <= k <= len(self.nodes):
            raise NotFound(f"lab {self.name} has no node{k} (it has {len(self.nodes)} nodes)")
        return self.nodes[k - 1]

    def with_agent(self, node_name: str, agent: ProcessRef) -> LabRecord:
        nodes = tuple(n.model_copy(update={"agent": agent}) if n.name == node_name else n for n in self.nodes)
        return self.model_copy(update={"nodes": nodes})

    def with_supervisor(self, name: str, supervisor: ProcessRef) -> LabRecord:
        """Record the supervisor of node ``name``, or of the relay (``relay``)."""
        if name == "relay":
            assert self.relay is not None
            return self.model_copy(update={"relay": self.relay.model_copy(update={"supervisor": supervisor})})
        nodes = tuple(n.model_copy(update={"supervisor": supervisor}) if n.name == name else n for n in self.nodes)
        return self.model_copy(update={"nodes": nodes})


def read_record(path: Path) -> LabRecord:
    try:
        return LabRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise NotFound(f"no lab record at {path}") from None
    except (OSError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise InvalidInput([f"{path}: unreadable lab record: {first}"]) from None


def write_record(dirs: LabDirs, record: LabRecord) -> None:
    """Replace ``lab.json`` atomically: readers see the old record or the new one, never half."""
    path = dirs.record_path(record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lab.", suffix=".json")
    try:
        os.fchmod(fd, 0o644)  # nothing secret in it; read-only commands of other users can resolve labs
        with os.fdopen(fd, "w") as out:
            out.write(record.model_dump_json(indent=2))
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_all_records(dirs: LabDirs) -> tuple[list[LabRecord], list[str]]:
    """Every lab record under the state base, sorted by name, and one problem line per unreadable one."""
    records: list[LabRecord] = []
    problems: list[str] = []
    try:
        entries = sorted(dirs.state_base.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return records, problems
    for entry in entries:
        path = entry / RECORD_FILE
        if not path.is_file():
            continue
        try:
            records.append(read_record(path))
        except NotFound:
            continue  # removed by a 'lab down' since the directory was listed
        except InvalidInput as exc:
            problems.extend(exc.problems)
    return records, problems


@contextlib.contextmanager
def labs_lock(dirs: LabDirs) -> Iterator[None]:
    """Serialise ``lab up`` runs on one machine while they pick names and subnets.

    The lock is taken on the state base directory itself, so it leaves no file behind.
    """
    while True:
        dirs.state_base.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(dirs.state_base, os.O_RDONLY | os.O_DIRECTORY)
            break
        except FileNotFoundError:
            continue  # the last lab's 'down' removed the empty base in between: make it again
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
