"""An in-memory :class:`~membrane.datapath.process.NetnsHost` for tests without root.

Primitives: :class:`FakeNetnsHost` with :class:`FakeProcess` and :class:`Scripted`. Namespaces are
names in a set; processes are records with pids that never collide with real ones (above the
kernel's largest pid), that run until a fatal signal or :meth:`FakeNetnsHost.exit`. What a command
prints, and how it exits, is scripted per argv with :meth:`FakeNetnsHost.script`: ``run`` returns
it, ``spawn`` appends the output to the files and, for a command that does not run on, exits with
its code. It keeps the kernel implementation's promises (checked by the contract suite in
``membrane.testing.netns_contract``): one exit code per process, told once; a watch fires once;
spawning or running in a namespace that does not exist fails.

Given a :class:`~membrane.datapath.netlink.fake.FakeNetlink`, namespaces created and deleted here
appear and vanish there too, as on a node.
"""

from __future__ import annotations

import asyncio
import signal as signals
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from membrane.core.errors import DatapathError
from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.netns import NETNS_RUN_DIR
from membrane.datapath.process import CommandResult, SpawnedProcess

FIRST_PID = 5_000_000  # above PID_MAX_LIMIT (4,194,304): never a real process
_HARMLESS = {0, signals.SIGCHLD, signals.SIGWINCH, signals.SIGURG, signals.SIGCONT}


@dataclass(frozen=True)
class Scripted:
    """How a command behaves: its output and exit code; ``runs_on``: a spawned one keeps running."""

    returncode: int = 0
    stdout: str = ""
    stderr: str = ""
    runs_on: bool = True


@dataclass
class FakeProcess:
    pid: int
    start_time: int
    netns: str
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str]
    running: bool = True
    exit_code: int | None = None
    signals: list[int] = field(default_factory=list)
    ignores: set[int] = field(default_factory=set)  # signals it survives (e.g. SIGTERM)


class FakeNetnsHost:
    """Namespaces and processes in memory; ``calls`` records every operation by name."""

    def __init__(self, run_dir: Path = NETNS_RUN_DIR, netlink: FakeNetlink | None = None) -> None:
        self.run_dir = run_dir
        self.netlink = netlink
        self.namespaces: set[str] = set()
        self.processes: dict[int, FakeProcess] = {}
        self.runs: list[tuple[str, tuple[str, ...]]] = []
        self.own_namespace: str | None = None  # a name under run_dir that is the caller's own namespace
        self._scripts: dict[tuple[str, ...], Scripted] = {}
        self._next_pid = FIRST_PID
        self._clock = 1000
        self._unreported: set[int] = set()
        self._watches: dict[int, Callable[[int], None]] = {}

    # -- test controls ------------------------------------------------------------------------

    def script(self, argv: Sequence[str], result: Scripted) -> None:
        self._scripts[tuple(argv)] = result

    def exit(self, pid: int, code: int) -> None:
        """The process ends by itself with ``code``."""
        self._end(self.processes[pid], code)

    def running(self, netns: str | None = None) -> list[FakeProcess]:
        return [p for p in self.processes.values() if p.running and (netns is None or p.netns == netns)]

    def _end(self, proc: FakeProcess, code: int) -> None:
        if not proc.running:
            return
        proc.running, proc.exit_code = False, code
        self._unreported.add(proc.pid)
        on_exit = self._watches.pop(proc.pid, None)
        if on_exit is not None:
            # As a pidfd reader would: later, from the event loop, never inside the caller's call.
            try:
                asyncio.get_running_loop().call_soon(on_exit, proc.pid)
            except RuntimeError:
                on_exit(proc.pid)
        self._release(proc.netns)

    def _release(self, path: str) -> None:
        """A deleted namespace dies with the last process inside (and its veth ends with it)."""
        if (self.netlink is not None and Path(path).name not in self.namespaces
                and path in self.netlink.namespaces and not self.running(path)):
            self.netlink.delete_netns(path)

    # -- NetnsHost ----------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return str(self.run_dir / name)

    async def create(self, name: str) -> str:
        path = self.path(name)
        if name not in self.namespaces:
            self.namespaces.add(name)
            if self.netlink is not None:
                self.netlink.add_netns(path)
        return path

    async def delete(self, name: str) -> bool:
        if name not in self.namespaces:
            return False
        self.namespaces.discard(name)
        self._release(self.path(name))  # as in the kernel, it lives on while a process holds it
        return True

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.namespaces if n.startswith(prefix) and n != self.own_namespace)

    def exists(self, path: str) -> bool:
        return Path(path).parent == self.run_dir and Path(path).name in self.namespaces

    def spawn(self, netns: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], stdout: Path,
              stderr: Path | None = None) -> SpawnedProcess:
        if not self.exists(netns):
            raise DatapathError(f"network namespace {netns} does not exist")
        scripted = self._scripts.get(tuple(argv), Scripted())
        with open(stdout, "a") as out:
            out.write(scripted.stdout)
            if stderr is None:
                out.write(scripted.stderr)
        if stderr is not None:
            with open(stderr, "a") as err:
                err.write(scripted.stderr)
        self._next_pid += 1
        self._clock += 1
        proc = FakeProcess(self._next_pid, self._clock, netns, tuple(argv), cwd, dict(env))
        self.processes[proc.pid] = proc
        if not scripted.runs_on:
            self._end(proc, scripted.returncode)
        return SpawnedProcess(proc.pid, proc.start_time)

    def alive(self, pid: int, start_time: int) -> bool:
        proc = self.processes.get(pid)
        return proc is not None and proc.running and proc.start_time == start_time

    def exit_code(self, pid: int) -> int | None:
        if pid not in self._unreported:
            return None
        self._unreported.discard(pid)
        return self.processes[pid].exit_code

    def signal(self, pid: int, sig: int, *, group: bool = False) -> bool:
        proc = self.processes.get(pid)
        if proc is None or not proc.running:
            return False
        proc.signals.append(sig)
        if sig not in _HARMLESS and (sig not in proc.ignores or sig == signals.SIGKILL):
            self._end(proc, 128 + sig)
        return True

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> bool:
        proc = self.processes.get(pid)
        if proc is None or not proc.running:
            return False
        self._watches[pid] = on_exit
        return True

    def unwatch(self, pid: int) -> None:
        self._watches.pop(pid, None)

    def pids_in(self, directory: Path) -> list[int]:
        return sorted(p.pid for p in self.processes.values() if p.running and p.cwd == directory)

    async def run(self, netns: str, argv: Sequence[str], *, timeout: float = 10.0) -> CommandResult:
        if not self.exists(netns):
            raise DatapathError(f"network namespace {netns} does not exist")
        self.runs.append((netns, tuple(argv)))
        scripted = self._scripts.get(tuple(argv), Scripted())
        return CommandResult(scripted.returncode, scripted.stdout, scripted.stderr)
