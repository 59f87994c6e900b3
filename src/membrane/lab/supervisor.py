"""Keep one lab process running, as systemd's ``Restart=always`` keeps an agent running on a host.

``lab up`` starts one supervisor per node (and one for the lab's relay), detached, after the
process it watches is healthy; the supervisor adopts that process and from then on::

    running ──exit (crash, SIGKILL, …)──► backoff: wait 0.5 s, 1 s, 2 s … 10 s ──► running (restarts+1)
       │   (a run of 30 s or more resets the wait to 0.5 s)
       ├──SIGUSR1 (lab restart) ──► SIGTERM, wait, SIGKILL ──► running (manual_restarts+1, wait reset)
       └──SIGTERM (lab down) ─────► SIGTERM, wait, SIGKILL ──► stopped, the supervisor exits

Every change is written atomically to a status file (``supervise-NAME.json`` in the lab's state
dir) that ``lab status`` reads: the current process, its state, the restart counts, the last
exit. A supervisor that is itself killed leaves its process running; ``lab down`` stops both.

The decisions are in :class:`Supervisor` (a clock and :class:`Children` are passed in, so its
back-off and bookkeeping are tested without processes); :func:`main` is the process
(``python -m membrane.lab.supervisor``), woken by a pidfd when the process exits and by a
signal wake-up pipe.

Primitives: :class:`Backoff`, :class:`ServiceStatus`, :func:`read_status`, :class:`Supervisor`,
:class:`Children`, :class:`HostChildren`, :func:`supervisor_argv`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from membrane.lab.host import HostProcesses, start_ticks
from membrane.lab.state import ProcessRef

POLL_INTERVAL = 1.0  # a safety net: exits are normally seen at once through the pidfd
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this long (the agent's clean-up time)
KILL_WAIT = 5.0
STATUS_PREFIX = "supervise-"

ServiceState = Literal["running", "backoff", "stopping", "stopped"]


@dataclass(frozen=True)
class Backoff:
    """systemd's ``RestartSec`` with ``RestartSteps``: doubling from ``initial`` to ``maximum``."""

    initial: float = 0.5
    maximum: float = 10.0
    reset_after: float = 30.0  # a run at least this long was not a crash loop

    def delay(self, failures: int) -> float:
        """The wait before restart number ``failures`` of a run of quick failures (1, 2, …)."""
        return min(self.maximum, self.initial * float(2 ** max(0, failures - 1)))


class ServiceStatus(BaseModel):
    """What ``supervise-NAME.json`` holds."""

    model_config = ConfigDict(extra="forbid")

    name: str
    supervisor_pid: int
    state: ServiceState
    process: ProcessRef | None = None
    started: str | None = None  # ISO time the current process started (or was adopted)
    restarts: int = 0  # after an exit nobody asked for
    manual_restarts: int = 0  # lab restart
    failures: int = 0  # quick exits in a row: sets the back-off
    last_exit: str | None = None  # "exit status 1", "killed by SIGKILL", "exited"
    last_exit_time: str | None = None
    next_start_in: float | None = None  # seconds, in state backoff


def status_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{STATUS_PREFIX}{name}.json"


def read_status(path: Path) -> ServiceStatus | None:
    """The status a supervisor wrote; None when there is none (yet) or it cannot be read."""
    try:
        return ServiceStatus.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def write_status(path: Path, status: ServiceStatus) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".supervise.", suffix=".json")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(status.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Children(Protocol):
    def spawn(self, argv: Sequence[str], log: Path) -> ProcessRef: ...

    def is_alive(self, proc: ProcessRef) -> bool: ...

    def signal(self, proc: ProcessRef, signum: int) -> None: ...

    def exit_status(self, proc: ProcessRef) -> str:
        """How a process that is no longer alive ended ("exited" when that is unknown)."""
        ...


class HostChildren(HostProcesses):
    """Host processes whose exit status is kept when they are our children."""

    def __init__(self) -> None:
        self._statuses: dict[int, str] = {}

    def is_alive(self, proc: ProcessRef) -> bool:
        # Reap our own child here, before HostProcesses would (it discards the status).
        ticks = start_ticks(proc.pid)
        if ticks == proc.start_ticks and proc.pid not in self._statuses:
            with contextlib.suppress(ChildProcessError):
                pid, raw = os.waitpid(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    self._statuses[pid] = describe_wait_status(raw)
                    return False
        return super().is_alive(proc)

    def exit_status(self, proc: ProcessRef) -> str:
        return self._statuses.pop(proc.pid, "exited")


def describe_wait_status(raw: int) -> str:
    if os.WIFSIGNALED(raw):
        signum = os.WTERMSIG(raw)
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(signum).name}"
        return f"killed by signal {signum}"
    return f"exit status {os.waitstatus_to_exitcode(raw)}"


class Supervisor:
    """One supervised process: its restarts, their back-off, the status file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        status_file: Path,
        children: Children,
        *,
        adopt: ProcessRef | None = None,
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self._argv = list(argv)
        self._log = log
        self._file = status_file
        self._children = children
        self._backoff = backoff
        self._clock = clock
        self._sleep = sleep
        self._stop_grace = stop_grace
        self._started_at = clock()
        self._next_start = 0.0
        self.status = ServiceStatus(name=name, supervisor_pid=os.getpid(), state="backoff")
        if adopt is not None and children.is_alive(adopt):
            self._set(state="running", process=adopt, started=_now_iso())
        else:
            self._start()

    @property
    def process(self) -> ProcessRef | None:
        return self.status.process if self.status.state == "running" else None

    def _set(self, **changes: object) -> None:
        self.status = self.status.model_copy(update=changes)
        write_status(self._file, self.status)

    def _start(self, **counts: int) -> None:
        ref = self._children.spawn(self._argv, self._log)
        self._started_at = self._clock()
        self._set(state="running", process=ref, started=_now_iso(), next_start_in=None, **counts)

    def tick(self) -> float:
        """Notice an exit or start what is due; the seconds until the next tick is needed."""
        now = self._clock()
        if self.status.state == "running":
            ref = self.status.process
            assert ref is not None
            if self._children.is_alive(ref):
                return POLL_INTERVAL
            ran = now - self._started_at
            failures = 1 if ran >= self._backoff.reset_after else self.status.failures + 1
            delay = self._backoff.delay(failures)
            self._next_start = now + delay
            self._set(state="backoff", failures=failures, last_exit=self._children.exit_status(ref),
                      last_exit_time=_now_iso(), next_start_in=delay)
            return delay
        if self.status.state == "backoff":
            if now >= self._next_start:
                self._start(restarts=self.status.restarts + 1)
                return POLL_INTERVAL
            return self._next_start - now
        return POLL_INTERVAL

    def restart(self) -> None:
        """On purpose (``lab restart``): stop the process, start it again at once."""
        if self.status.state == "running":
            self._stop_process()
        self._start(manual_restarts=self.status.manual_restarts + 1, failures=0)

    def stop(self) -> None:
        """The supervisor is going away (``lab down``): stop the process and say so."""
        if self.status.state == "running":
            self._set(state="stopping")
            self._stop_process()
        self._set(state="stopped", process=None, next_start_in=None)

    def _stop_process(self) -> None:
        ref = self.status.process
        assert ref is not None
        for signum, wait in ((signal.SIGTERM, self._stop_grace), (signal.SIGKILL, KILL_WAIT)):
            self._children.signal(ref, signum)
            deadline = self._clock() + wait
            while self._children.is_alive(ref) and self._clock() < deadline:
                self._sleep(0.05)
            if not self._children.is_alive(ref):
                break
        self._children.exit_status(ref)  # forget it: it is not an exit to report


def supervisor_argv(python: str, name: str, status_file: Path, log: Path, adopt: ProcessRef | None,
                    argv: Sequence[str]) -> list[str]:
    adopted = ["--adopt", f"{adopt.pid}:{adopt.start_ticks}"] if adopt is not None else []
    return [python, "-m", "membrane.lab.supervisor", "--name", name, "--status", str(status_file),
            "--log", str(log), *adopted, "--", *argv]


# -- the process ----------------------------------------------------------------------------------
def _pidfd(ref: ProcessRef | None) -> int | None:
    if ref is None:
        return None
    try:
        return os.pidfd_open(ref.pid)
    except OSError:  # gone already (the next tick sees it), or a kernel without pidfds
        return None


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m membrane.lab.supervisor")
    parser.add_argument("--name", required=True)
    parser.add_argument("--status", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--adopt", metavar="PID:TICKS")
    parser.add_argument("argv", nargs="+")
    opts = parser.parse_args(args)
    adopt = None
    if opts.adopt:
        pid, ticks = opts.adopt.split(":")
        adopt = ProcessRef(pid=int(pid), start_ticks=int(ticks))

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    received: list[int] = []
    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(handled, lambda s, _f: received.append(s))

    supervisor = Supervisor(opts.name, opts.argv, opts.log, opts.status, HostChildren(), adopt=adopt)
    watched: ProcessRef | None = None
    pidfd: int | None = None
    while True:
        timeout = supervisor.tick()
        if supervisor.process != watched:
            if pidfd is not None:
                os.close(pidfd)
            watched = supervisor.process
            pidfd = _pidfd(watched)
        if not received:
            select.select([wake_r, *([pidfd] if pidfd is not None else [])], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 64)
        while received:
            signum = received.pop(0)
            if signum == signal.SIGUSR1:
                supervisor.restart()
            else:
                supervisor.stop()
                return 0


if __name__ == "__main__":
    sys.exit(main())
