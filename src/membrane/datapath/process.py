"""Named network namespaces and the processes that run in them: the :class:`NetnsHost` boundary.

What the pod runner asks of the node: create a named namespace (a file bind-mounted under a run
directory, ``/run/netns`` in production, as ``ip netns add`` does), delete it, list those with a
prefix, spawn a long-running process inside one (its own session, output appended to files),
tell whether a pid is still the process that was started (pid + kernel start time), signal it,
learn its exit code, be told when it exits, find the processes working in a directory, and run a
command to completion inside a namespace.

Implementations: :class:`KernelNetnsHost` (the node, through pyroute2, ``nsenter``, /proc and
pidfds) and :class:`~membrane.datapath.process_fake.FakeNetnsHost` (in memory, for tests without
root). Primitives: :class:`SpawnedProcess`, :class:`CommandResult`, :func:`process_start_time`,
:func:`pids_working_in`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signals
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pyroute2 import netns as pyroute2_netns

from membrane.core.errors import DatapathError
from membrane.datapath.netns import NETNS_RUN_DIR


@dataclass(frozen=True)
class SpawnedProcess:
    """A started process: its pid and kernel start time (clock ticks), which tell a recycled pid apart."""

    pid: int
    start_time: int


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class NetnsHost(Protocol):
    """Namespaces under ``run_dir`` and processes inside them. Paths are ``run_dir / name``."""

    run_dir: Path

    def path(self, name: str) -> str:
        """The namespace file of ``name``."""
        ...

    async def create(self, name: str) -> str:
        """Create the namespace ``name`` (fine when it exists); its path."""
        ...

    async def delete(self, name: str) -> bool:
        """Remove the namespace ``name``; False when it did not exist. Processes inside keep running."""
        ...

    def names(self, prefix: str) -> list[str]:
        """Sorted names of the namespaces under ``run_dir`` starting with ``prefix``, never the one
        the calling process runs in."""
        ...

    def exists(self, path: str) -> bool:
        """Whether a namespace file (or any path, such as /proc/PID/ns/net) exists."""
        ...

    def spawn(self, netns: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], stdout: Path,
              stderr: Path | None = None) -> SpawnedProcess:
        """Start ``argv`` inside the namespace at path ``netns``, in its own session (its pid is its
        process group), working in ``cwd``; output is appended to ``stdout`` (and ``stderr``, or the
        same file). DatapathError when the namespace does not exist or the command cannot start."""
        ...

    def alive(self, pid: int, start_time: int) -> bool:
        """Whether ``pid`` still runs and is the process started at ``start_time`` (not a zombie)."""
        ...

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a process this host spawned and that has exited (128 + N after signal
        N), once; None when it runs, was not spawned here, or was asked for already."""
        ...

    def signal(self, pid: int, sig: int, *, group: bool = False) -> bool:
        """Send ``sig`` to ``pid`` (to its process group with ``group``); False when there is none."""
        ...

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> bool:
        """Call ``on_exit(pid)`` once, from the running event loop, when ``pid`` exits; False (and no
        call) when it cannot be watched because it is gone already."""
        ...

    def unwatch(self, pid: int) -> None:
        """Stop watching ``pid`` (fine when not watched)."""
        ...

    def pids_in(self, directory: Path) -> list[int]:
        """Processes working in ``directory`` (or in it before it was removed)."""
        ...

    async def run(self, netns: str, argv: Sequence[str], *, timeout: float = 10.0) -> CommandResult:
        """Run ``argv`` to completion inside the namespace at path ``netns``. DatapathError when the
        namespace does not exist or the command does not finish within ``timeout`` seconds."""
        ...


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a recycled pid apart.

    None when the process is gone or a zombie: an adopted process that exited is reaped by
    whoever inherited it, not by us, and may linger as a zombie meanwhile.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pids_working_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (or was, if it has been removed since)."""
    target = str(directory)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == target or cwd == f"{target} (deleted)":
            found.append(int(entry))
    return found


def _exit_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode  # Popen reports signal N as -N


class KernelNetnsHost:
    """The node's namespaces under ``run_dir`` (pyroute2 creates them as ``ip netns add`` does) and
    processes started through ``nsenter --net``, which execs the command: the pid is the command's."""

    def __init__(self, run_dir: Path = NETNS_RUN_DIR) -> None:
        self.run_dir = run_dir
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._watched: dict[int, int] = {}  # pid -> pidfd

    def path(self, name: str) -> str:
        return str(self.run_dir / name)

    async def create(self, name: str) -> str:
        path = self.path(name)
        if not os.path.exists(path):
            try:
                await asyncio.to_thread(pyroute2_netns.create, path)
            except OSError as exc:
                raise DatapathError(f"creating network namespace {path}: {exc}") from None
        return path

    async def delete(self, name: str) -> bool:
        path = self.path(name)
        if not os.path.exists(path):
            return False
        try:
            await asyncio.to_thread(pyroute2_netns.remove, path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise DatapathError(f"deleting network namespace {path}: {exc}") from None
        return True

    def names(self, prefix: str) -> list[str]:
        if not self.run_dir.is_dir():
            return []
        own = os.stat("/proc/self/ns/net")
        found = []
        for entry in self.run_dir.iterdir():
            if not entry.name.startswith(prefix):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino):  # a lab node shares the prefix
                found.append(entry.name)
        return sorted(found)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def spawn(self, netns: str, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], stdout: Path,
              stderr: Path | None = None) -> SpawnedProcess:
        if not os.path.exists(netns):
            raise DatapathError(f"network namespace {netns} does not exist")
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(stdout, "ab"))
            err = files.enter_context(open(stderr, "ab")) if stderr is not None else subprocess.STDOUT
            try:
                child = subprocess.Popen(
                    ["nsenter", f"--net={netns}", "--", *argv],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    env=dict(env), cwd=str(cwd), start_new_session=True,
                )
            except OSError as exc:
                raise DatapathError(f"starting {argv[0] if argv else '?'}: {exc.strerror}") from None
        self._children[child.pid] = child
        return SpawnedProcess(child.pid, process_start_time(child.pid) or 0)

    def alive(self, pid: int, start_time: int) -> bool:
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            return False  # exited (now reaped): its /proc entry may belong to a new process soon
        return process_start_time(pid) == start_time

    def exit_code(self, pid: int) -> int | None:
        child = self._children.get(pid)
        if child is None:
            return None
        code = child.poll()
        if code is None:
            return None
        del self._children[pid]
        return _exit_code(code)

    def signal(self, pid: int, sig: int, *, group: bool = False) -> bool:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> bool:
        if pid in self._watched:
            return True
        try:
            fd = os.pidfd_open(pid)  # works for processes that are not our children (re-adopted)
        except OSError:
            return False
        self._watched[pid] = fd

        def fire() -> None:
            self.unwatch(pid)
            on_exit(pid)

        asyncio.get_running_loop().add_reader(fd, fire)
        return True

    def unwatch(self, pid: int) -> None:
        fd = self._watched.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def pids_in(self, directory: Path) -> list[int]:
        return pids_working_in(directory)

    async def run(self, netns: str, argv: Sequence[str], *, timeout: float = 10.0) -> CommandResult:
        if not os.path.exists(netns):
            raise DatapathError(f"network namespace {netns} does not exist")
        proc = await asyncio.create_subprocess_exec(
            "nsenter", f"--net={netns}", "--", *argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signals.SIGKILL)
            await proc.wait()
            raise DatapathError(f"{' '.join(argv)} in {netns}: no answer within {timeout:g}s") from None
        assert proc.returncode is not None
        return CommandResult(_exit_code(proc.returncode), out.decode(errors="replace"), err.decode(errors="replace"))
