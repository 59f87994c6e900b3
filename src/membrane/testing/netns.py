"""Network namespaces for kernel tests: unique names, guaranteed cleanup, running things inside.

Primitives: :func:`unique_name`, :class:`Netns` (one namespace: run commands, spawn processes, call
Python or open sockets inside it), :class:`NetnsFactory` (creates namespaces and deletes all of them,
and every process left inside, on exit), :func:`wait_until` / :func:`async_wait_until` (poll a
condition with a timeout), :func:`missing_binaries` and :func:`kernel_test_skip_reason`.

Typical use, through the ``netns_factory`` fixture of ``tests/kernel/conftest.py``::

    def test_ping(netns_factory):
        node = netns_factory("mbdp-node", lo_up=True)
        node.run("ip", "link", "add", "a", "type", "veth", "peer", "name", "b")
        server = node.spawn("busybox", "nc", "-l", "-p", "8080")      # killed on teardown
        wait_until(lambda: "8080" in node.run("busybox", "netstat", "-ltn").stdout)

Commands run through ``nsenter --net=/run/netns/NAME``, which execs the command itself: the PID
a test gets is the command's, never a wrapper's. Note that nsenter does not remount /sys, so read
interface state with ``ip``, not from /sys/class/net.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from membrane.datapath.netns import NETNS_RUN_DIR, run_in_netns

T = TypeVar("T")

KERNEL_BINARIES = ("ip", "nsenter")


def unique_name(prefix: str, length: int = 8) -> str:
    """``prefix`` + ``length`` random hex digits, e.g. ``mbdp-node-3f9a0c1e``."""
    return prefix + secrets.token_hex((length + 1) // 2)[:length]


def missing_binaries(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def kernel_test_skip_reason(*binaries: str) -> str | None:
    """Why kernel tests cannot run here (not root, a binary missing), or None."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    missing = missing_binaries(*KERNEL_BINARIES, *binaries)
    if missing:
        return f"kernel tests need {', '.join(missing)}"
    return None


class NetnsCommandError(RuntimeError):
    def __init__(self, argv: list[str], result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout.strip()}\n"
            f"stderr: {result.stderr.strip()}"
        )


class Netns:
    """One named network namespace (``/run/netns/NAME``). Create with :meth:`create` or through
    :class:`NetnsFactory`; :meth:`delete` kills what runs inside and removes it."""

    def __init__(self, name: str, *, lo_up: bool = False) -> None:
        self.name = name
        self.path = str(NETNS_RUN_DIR / name)
        self._lo_up = lo_up
        self._processes: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    # -- lifecycle --------------------------------------------------------------------------

    def create(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, text=True)
        if self._lo_up:
            self.run("ip", "link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        """Stop the processes this namespace holds (by PID), then remove it. Safe to call twice."""
        for proc in self._processes:
            _stop(proc)
        self._processes.clear()
        for pid in self.pids():
            _kill_pid(pid)
        if Path(self.path).exists():
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, text=True)

    def __enter__(self) -> Netns:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()

    # -- running things inside ----------------------------------------------------------------

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", *cmd]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 10.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the namespace; NetnsCommandError when it fails."""
        argv = self.argv(*cmd)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise NetnsCommandError(argv, result)
        return result

    def spawn(self, *cmd: str, **popen: Any) -> subprocess.Popen[Any]:
        """Start a long-running command inside; it is stopped when the namespace is deleted."""
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(*cmd), **popen)
        self._processes.append(proc)
        return proc

    def call(self, fn: Callable[[], T]) -> T:
        """Call Python inside the namespace (on a short-lived thread)."""
        return run_in_netns(self.path, fn)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket living in this namespace, usable from any thread; the caller closes it."""
        return self.call(lambda: socket.socket(family, type, proto))

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one (never the calling process)."""
        try:
            target = os.stat(self.path)
        except FileNotFoundError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                found.append(int(entry))
        return found


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # Reap it if it is our child; otherwise its parent will.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class NetnsFactory:
    """Creates namespaces on demand; on exit deletes every one of them, even after a failure."""

    def __init__(self) -> None:
        self.created: list[Netns] = []

    def __call__(self, prefix: str, *, lo_up: bool = False) -> Netns:
        ns = Netns(unique_name(prefix), lo_up=lo_up)
        self.created.append(ns)
        return ns.create()

    def close(self) -> None:
        errors: list[BaseException] = []
        for ns in reversed(self.created):
            try:
                ns.delete()
            except BaseException as exc:  # keep deleting the others
                errors.append(exc)
        self.created.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> NetnsFactory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]], timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> T:
    """:func:`wait_until` for coroutines; ``predicate`` may be sync or async."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        await asyncio.sleep(interval)
