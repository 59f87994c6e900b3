"""The behaviour every :class:`~membrane.datapath.process.NetnsHost` must show, as a pytest suite.

A test module provides a ``netns_backend`` fixture yielding a :class:`NetnsHostBackend` and
subclasses :class:`NetnsHostContract`. :class:`FakeNetnsBackend` wraps
:class:`~membrane.datapath.process_fake.FakeNetnsHost`; :class:`KernelNetnsBackend` wraps
:class:`~membrane.datapath.process.KernelNetnsHost` with its run directory in a temporary
directory, so nothing outside it is touched, and removes every namespace and process it made.

Commands are real shell commands; the fake is told what they print and how they end
(:meth:`NetnsHostBackend.script`), the kernel runs them.

Primitives: :class:`NetnsHostBackend`, :class:`FakeNetnsBackend`, :class:`KernelNetnsBackend`,
:class:`NetnsHostContract`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from membrane.core.errors import DatapathError
from membrane.datapath.process import KernelNetnsHost, NetnsHost
from membrane.datapath.process_fake import FakeNetnsHost, Scripted
from membrane.testing.netns import async_wait_until, unique_name

WAIT = 10.0
SLEEPER = ("sleep", "30")


class NetnsHostBackend(abc.ABC):
    name: str
    host: NetnsHost
    prefix: str
    workdir: Path  # where processes work and write their output

    @abc.abstractmethod
    def script(self, argv: Sequence[str], result: Scripted) -> None:
        """Tell a fake what ``argv`` prints and how it ends (the kernel just runs it)."""

    def fresh_name(self) -> str:
        return unique_name(self.prefix)

    @abc.abstractmethod
    def close(self) -> None:
        """Kill what was spawned and remove what was created."""


class FakeNetnsBackend(NetnsHostBackend):
    name = "fake"

    def __init__(self, tmp: Path, prefix: str = "mbnlc-") -> None:
        self.fake = FakeNetnsHost(run_dir=tmp / "netns")
        self.host = self.fake
        self.prefix = prefix
        self.workdir = tmp / "work"
        self.workdir.mkdir()

    def script(self, argv: Sequence[str], result: Scripted) -> None:
        self.fake.script(argv, result)

    def close(self) -> None:
        pass


class KernelNetnsBackend(NetnsHostBackend):
    name = "kernel"

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.run_dir = tmp / "netns"
        self.kernel = KernelNetnsHost(run_dir=self.run_dir)
        self.host = self.kernel
        self.prefix = prefix
        self.workdir = tmp / "work"
        self.workdir.mkdir()

    def close(self) -> None:
        for pid in self.kernel.pids_in(self.workdir):
            self.kernel.signal(pid, signal.SIGKILL)
        for pid in list(self.kernel._children):
            self.kernel.signal(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.kernel._children[pid].wait(timeout=5)
        if self.run_dir.is_dir():
            for entry in self.run_dir.iterdir():
                if entry.name.startswith(self.prefix):
                    subprocess.run(["umount", "-l", str(entry)], capture_output=True)
                    entry.unlink(missing_ok=True)
            # Namespace creation made the run directory a shared mount of itself, as iproute2 does.
            subprocess.run(["umount", "-l", str(self.run_dir)], capture_output=True)

    def script(self, argv: Sequence[str], result: Scripted) -> None:
        pass  # the kernel runs the command itself


class NetnsHostContract:
    """The suite; a subclass runs it against the ``netns_backend`` fixture's implementation."""

    # -- namespaces ---------------------------------------------------------------------------

    async def test_create_list_and_delete(self, netns_backend: NetnsHostBackend) -> None:
        b, host = netns_backend, netns_backend.host
        first, second = b.fresh_name(), b.fresh_name()
        path = await host.create(first)
        assert path == str(host.run_dir / first) == host.path(first)
        assert host.exists(path)
        assert await host.create(first) == path  # fine when it exists
        await host.create(second)
        assert host.names(b.prefix) == sorted([first, second])
        assert host.names(first) == [first]
        assert host.names(b.prefix + "nothing-") == []

        assert await host.delete(first) is True
        assert not host.exists(path)
        assert host.names(b.prefix) == [second]
        assert await host.delete(first) is False
        assert await host.delete(second) is True
        assert host.names(b.prefix) == []

    # -- processes ----------------------------------------------------------------------------

    async def test_a_spawned_process_runs_until_signalled_and_tells_its_exit_once(
            self, netns_backend: NetnsHostBackend) -> None:
        b, host = netns_backend, netns_backend.host
        path = await host.create(b.fresh_name())
        argv = ("sh", "-c", "echo hello; echo oops >&2; exec sleep 30")
        b.script(argv, Scripted(stdout="hello\n", stderr="oops\n"))
        out, err = b.workdir / "out.log", b.workdir / "err.log"
        proc = host.spawn(path, argv, cwd=b.workdir, env={"PATH": "/usr/bin:/bin"}, stdout=out, stderr=err)
        assert proc.pid > 0 and proc.start_time > 0
        assert host.alive(proc.pid, proc.start_time)
        assert not host.alive(proc.pid, proc.start_time + 1)  # a recycled pid is not the process
        assert proc.pid in host.pids_in(b.workdir)
        assert host.exit_code(proc.pid) is None  # still running
        await async_wait_until(lambda: out.read_text() == "hello\n" and err.read_text() == "oops\n",
                               timeout=WAIT, what="the process's output")

        assert host.signal(proc.pid, 0)  # a harmless probe
        assert host.alive(proc.pid, proc.start_time)
        assert host.signal(proc.pid, signal.SIGTERM, group=True)
        await async_wait_until(lambda: not host.alive(proc.pid, proc.start_time), timeout=WAIT,
                               what="the process to exit")
        assert host.exit_code(proc.pid) == 128 + signal.SIGTERM
        assert host.exit_code(proc.pid) is None  # told once
        assert proc.pid not in host.pids_in(b.workdir)
        assert host.signal(proc.pid, signal.SIGKILL) is False

    async def test_a_process_that_ends_by_itself_gives_its_code_and_output_in_one_file(
            self, netns_backend: NetnsHostBackend) -> None:
        b, host = netns_backend, netns_backend.host
        path = await host.create(b.fresh_name())
        argv = ("sh", "-c", "echo done; echo bad >&2; exit 7")
        b.script(argv, Scripted(returncode=7, stdout="done\n", stderr="bad\n", runs_on=False))
        log = b.workdir / "both.log"
        log.write_text("before\n")
        proc = host.spawn(path, argv, cwd=b.workdir, env={"PATH": "/usr/bin:/bin"}, stdout=log)
        await async_wait_until(lambda: not host.alive(proc.pid, proc.start_time), timeout=WAIT,
                               what="the process to exit")
        assert host.exit_code(proc.pid) == 7
        assert log.read_text() == "before\ndone\nbad\n"  # appended, both streams
        assert host.watch(proc.pid, lambda pid: None) is False  # gone: nothing to watch

    async def test_a_watch_fires_once_when_the_process_exits(self, netns_backend: NetnsHostBackend) -> None:
        b, host = netns_backend, netns_backend.host
        path = await host.create(b.fresh_name())
        fired: list[int] = []
        proc = host.spawn(path, SLEEPER, cwd=b.workdir, env={"PATH": "/usr/bin:/bin"}, stdout=b.workdir / "s.log")
        other = host.spawn(path, SLEEPER, cwd=b.workdir, env={"PATH": "/usr/bin:/bin"}, stdout=b.workdir / "s.log")
        assert host.watch(proc.pid, fired.append)
        assert host.watch(other.pid, fired.append)
        host.unwatch(other.pid)
        await asyncio.sleep(0)
        assert fired == []
        assert host.signal(proc.pid, signal.SIGKILL)
        assert host.signal(other.pid, signal.SIGKILL)
        await async_wait_until(lambda: fired, timeout=WAIT, what="the watch to fire")
        await async_wait_until(lambda: not host.alive(other.pid, other.start_time), timeout=WAIT)
        await asyncio.sleep(0.05)
        assert fired == [proc.pid]
        assert host.exit_code(proc.pid) == 128 + signal.SIGKILL

    async def test_spawning_or_running_in_a_missing_namespace_fails(self, netns_backend: NetnsHostBackend) -> None:
        b, host = netns_backend, netns_backend.host
        missing = host.path(b.fresh_name())
        with pytest.raises(DatapathError, match="does not exist"):
            host.spawn(missing, SLEEPER, cwd=b.workdir, env={}, stdout=b.workdir / "x.log")
        with pytest.raises(DatapathError, match="does not exist"):
            await host.run(missing, ("true",))
        assert host.pids_in(b.workdir) == []

    async def test_unknown_pids(self, netns_backend: NetnsHostBackend) -> None:
        host = netns_backend.host
        never = 4_194_304 + 12345  # above the largest pid the kernel hands out
        assert host.exit_code(never) is None
        assert not host.alive(never, 1)
        assert host.signal(never, signal.SIGTERM) is False
        assert host.watch(never, lambda pid: None) is False

    # -- commands -----------------------------------------------------------------------------

    async def test_run_returns_exit_code_and_output(self, netns_backend: NetnsHostBackend) -> None:
        b, host = netns_backend, netns_backend.host
        path = await host.create(b.fresh_name())
        argv = ("sh", "-c", "echo out; echo err >&2; exit 3")
        b.script(argv, Scripted(returncode=3, stdout="out\n", stderr="err\n"))
        result = await host.run(path, argv)
        assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
        ok = ("sh", "-c", "echo fine")
        b.script(ok, Scripted(stdout="fine\n"))
        assert (await host.run(path, ok)).returncode == 0
