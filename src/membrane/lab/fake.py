"""An in-memory machine for lab tests without root: namespaces, processes and agents.

:class:`FakeMachine` implements :class:`~membrane.lab.host.NetnsControl`,
:class:`~membrane.lab.host.ProcessControl` and :class:`~membrane.lab.host.AgentProbe` over one
consistent model: ``netns add``/``netns delete`` lines change the set of namespaces, a spawned
``nsenter --net=/run/netns/X …`` process lives in namespace X, and an agent is healthy once it
runs (unless told otherwise). Tests can place extra processes in namespaces (pods), make a step
fail, make agents exit, hang or ignore SIGTERM.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from membrane.core.errors import DatapathError
from membrane.lab.host import LabHost
from membrane.lab.plan import IpBatch
from membrane.lab.state import ProcessRef


@dataclass
class FakeProcess:
    ref: ProcessRef
    argv: tuple[str, ...]
    netns: str | None
    log: Path | None = None
    ignores_sigterm: bool = False
    signals: list[int] = field(default_factory=list)


@dataclass
class FakeMachine:
    namespaces: set[str] = field(default_factory=set)
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    batches: list[IpBatch] = field(default_factory=list)
    # An `ip` line containing this text fails (and the rest of its batch is not applied).
    fail_on: str | None = None
    # Spawned agents: exit at once (after writing this to their log), never answer, ignore SIGTERM.
    agent_exit_message: str | None = None
    agents_answer: bool = True
    agents_ignore_sigterm: bool = False
    _next_pid: int = 1000

    def host(self) -> LabHost:
        return LabHost(netns=self, processes=self, probe=self)

    # -- NetnsControl ------------------------------------------------------------------------
    def apply(self, batch: IpBatch) -> None:
        self.batches.append(batch)
        if batch.netns is not None and batch.netns not in self.namespaces:
            raise DatapathError(f"ip in {batch.netns}: Cannot open network namespace")
        for line in batch.lines:
            if self.fail_on is not None and self.fail_on in line:
                raise DatapathError(f"ip: {line}: injected failure")
            words = line.split()
            if words[:2] == ["netns", "add"]:
                if words[2] in self.namespaces:
                    raise DatapathError(f'ip: Cannot create namespace file "/run/netns/{words[2]}": File exists')
                self.namespaces.add(words[2])

    def list_netns(self) -> list[str]:
        return sorted(self.namespaces)

    def delete_netns(self, names: Sequence[str]) -> None:
        self.namespaces.difference_update(names)

    def netns_processes(self, names: Sequence[str]) -> list[ProcessRef]:
        return [p.ref for p in self.processes.values() if p.netns in names]

    # -- ProcessControl ----------------------------------------------------------------------
    def add_process(self, argv: Sequence[str], netns: str | None, *, ignores_sigterm: bool = False) -> ProcessRef:
        self._next_pid += 1
        ref = ProcessRef(pid=self._next_pid, start_ticks=self._next_pid * 10)
        self.processes[ref.pid] = FakeProcess(ref, tuple(argv), netns, ignores_sigterm=ignores_sigterm)
        return ref

    def spawn(self, argv: Sequence[str], log: Path) -> ProcessRef:
        netns = None
        if argv and argv[0] == "nsenter" and argv[1].startswith("--net="):
            netns = Path(argv[1].removeprefix("--net=")).name
            if netns not in self.namespaces:
                raise DatapathError(f"nsenter: cannot open {argv[1]}")
        log.parent.mkdir(parents=True, exist_ok=True)
        ref = self.add_process(argv, netns, ignores_sigterm=self.agents_ignore_sigterm)
        self.processes[ref.pid].log = log
        if self.agent_exit_message is not None:
            with log.open("a") as out:
                out.write(self.agent_exit_message + "\n")
            del self.processes[ref.pid]
        return ref

    def is_alive(self, proc: ProcessRef) -> bool:
        running = self.processes.get(proc.pid)
        return running is not None and running.ref == proc

    def signal(self, proc: ProcessRef, signum: int) -> None:
        if not self.is_alive(proc):
            return
        running = self.processes[proc.pid]
        running.signals.append(signum)
        if signum == signal.SIGKILL or (signum in (signal.SIGTERM, signal.SIGINT) and not running.ignores_sigterm):
            del self.processes[proc.pid]

    # -- AgentProbe --------------------------------------------------------------------------
    def healthy(self, socket_path: Path) -> bool:
        if not self.agents_answer:
            return False
        run_dir = str(socket_path.parent)
        return any(run_dir in p.argv for p in self.processes.values())

    def listening(self, address: str) -> bool:
        """A relay listens once it runs: a process with ``--listen ADDRESS``."""
        return any(p.argv[-2:] == ("--listen", address) for p in self.processes.values())
