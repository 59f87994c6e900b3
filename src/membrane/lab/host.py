"""The lab's boundaries with the machine: namespaces, processes, agent health.

Each boundary is a protocol with a real implementation here and a fake in
:mod:`membrane.lab.fake`, so the order of ``lab up`` / ``lab down`` is tested without root.

- :class:`NetnsControl` / :class:`IpNetns`: apply ``ip -batch`` lines, list and delete named
  namespaces, find the processes living in them (by the inode of ``/proc/PID/ns/net``).
- :class:`ProcessControl` / :class:`HostProcesses`: start a detached process (own session,
  output to a log), tell whether it still runs (a recorded PID may have been reused: the start
  time from ``/proc/PID/stat`` must match), signal it.
- :class:`AgentProbe` / :class:`HttpAgentProbe`: ``GET /v1/healthz`` on the agent's unix socket,
  a TCP connect to the relay.
- :class:`LabHost` bundles the three.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from membrane.core.errors import DatapathError, MembraneError
from membrane.lab.plan import IpBatch
from membrane.lab.state import ProcessRef

NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts named namespaces
HEALTH_PATH = "/v1/healthz"


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


class NetnsControl(Protocol):
    def apply(self, batch: IpBatch) -> None:
        """Run the batch; DatapathError names the failing line."""
        ...

    def list_netns(self) -> list[str]: ...

    def delete_netns(self, names: Sequence[str]) -> None:
        """Delete these namespaces; names that do not exist are skipped."""
        ...

    def netns_processes(self, names: Sequence[str]) -> list[ProcessRef]:
        """The processes whose network namespace is one of these (the caller excluded)."""
        ...


class ProcessControl(Protocol):
    def spawn(self, argv: Sequence[str], log: Path) -> ProcessRef:
        """Start ``argv`` in a new session, stdin from /dev/null, stdout and stderr appended to ``log``."""
        ...

    def is_alive(self, proc: ProcessRef) -> bool: ...

    def signal(self, proc: ProcessRef, signum: int) -> None:
        """Signal the process if it is still the one recorded; otherwise do nothing."""
        ...


class AgentProbe(Protocol):
    def healthy(self, socket_path: Path) -> bool: ...

    def listening(self, address: str) -> bool:
        """Whether something accepts TCP connections at ``HOST:PORT`` (the relay)."""
        ...


@dataclass(frozen=True)
class LabHost:
    netns: NetnsControl
    processes: ProcessControl
    probe: AgentProbe


def real_host() -> LabHost:
    return LabHost(IpNetns(), HostProcesses(), HttpAgentProbe())


# -- namespaces ---------------------------------------------------------------------------
class IpNetns:
    def __init__(self, ip: str = "ip") -> None:
        self._ip = ip

    def apply(self, batch: IpBatch) -> None:
        argv = [self._ip, *(("-n", batch.netns) if batch.netns else ()), "-batch", "-"]
        result = self._run(argv, "\n".join(batch.lines) + "\n")
        if result.returncode != 0:
            where = f" in {batch.netns}" if batch.netns else ""
            detail = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
            raise DatapathError(f"ip{where}: {detail}")

    def list_netns(self) -> list[str]:
        try:
            return sorted(p.name for p in NETNS_DIR.iterdir())
        except FileNotFoundError:
            return []

    def delete_netns(self, names: Sequence[str]) -> None:
        present = set(self.list_netns())
        todo = [n for n in names if n in present]
        if not todo:
            return
        # -force: go on after a failed line, so one stuck namespace does not keep the others.
        self._run([self._ip, "-force", "-batch", "-"], "".join(f"netns delete {n}\n" for n in todo))
        left = sorted(set(todo) & set(self.list_netns()))
        if left:
            raise DatapathError(f"could not delete network namespaces: {', '.join(left)}")

    def netns_processes(self, names: Sequence[str]) -> list[ProcessRef]:
        wanted: set[tuple[int, int]] = set()
        for name in names:
            with contextlib.suppress(OSError):
                st = os.stat(netns_path(name))
                wanted.add((st.st_dev, st.st_ino))
        if not wanted:
            return []
        found: list[ProcessRef] = []
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:  # gone, or a zombie (its namespaces are released)
                continue
            if (st.st_dev, st.st_ino) in wanted and (ticks := start_ticks(int(entry))) is not None:
                found.append(ProcessRef(pid=int(entry), start_ticks=ticks))
        return found

    @staticmethod
    def _run(argv: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False, timeout=60)
        except FileNotFoundError:
            raise MembraneError(f"{argv[0]} not found: the lab needs iproute2") from None


# -- processes ----------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of proc(5): starttime


class HostProcesses:
    def spawn(self, argv: Sequence[str], log: Path) -> ProcessRef:
        exe = shutil.which(argv[0])
        if exe is None:
            raise MembraneError(f"{argv[0]} not found")
        log.parent.mkdir(parents=True, exist_ok=True)
        # posix_spawn rather than Popen: the process outlives this one (lab up returns while the
        # agents run), so there is no Popen object to keep; setsid detaches it from the terminal.
        pid = os.posix_spawn(
            exe,
            list(argv),
            {**os.environ, "PYTHONUNBUFFERED": "1"},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        ticks = start_ticks(pid)  # an exited child stays a zombie until reaped, so this is readable
        return ProcessRef(pid=pid, start_ticks=ticks if ticks is not None else -1)

    def is_alive(self, proc: ProcessRef) -> bool:
        fields = _stat_fields(proc.pid)
        if fields is None or int(fields[19]) != proc.start_ticks:
            return False
        if fields[0] in ("Z", "X"):
            _reap(proc.pid)
            return False
        return True

    def signal(self, proc: ProcessRef, signum: int) -> None:
        if self.is_alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)


def _reap(pid: int) -> None:
    """Collect the exit status of a child of this process (a no-op for anyone else's)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# -- agent health -------------------------------------------------------------------------
class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class HttpAgentProbe:
    timeout: float = 2.0

    def healthy(self, socket_path: Path) -> bool:
        conn = _UnixHTTPConnection(socket_path, self.timeout)
        try:
            conn.request("GET", HEALTH_PATH)
            response = conn.getresponse()
            response.read()
            return response.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def listening(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=self.timeout).close()
        except (OSError, ValueError):
            return False
        return True
