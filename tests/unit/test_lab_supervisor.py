"""The lab's supervisor: back-off, restart bookkeeping and the status file, on a fake clock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from membrane.lab.host import HostProcesses
from membrane.lab.state import ProcessRef
from membrane.lab.supervisor import Backoff, ServiceStatus, Supervisor, read_status, supervisor_argv
from membrane.testing.netns import wait_until


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Children:
    """Processes that run until killed; one that ignores SIGTERM needs SIGKILL."""

    alive: set[int] = field(default_factory=set)
    spawned: list[tuple[str, ...]] = field(default_factory=list)
    signals: list[tuple[int, int]] = field(default_factory=list)
    ignore_sigterm: bool = False
    how: dict[int, str] = field(default_factory=dict)
    next_pid: int = 100

    def spawn(self, argv: Sequence[str], log: Path) -> ProcessRef:
        self.next_pid += 1
        self.spawned.append(tuple(argv))
        self.alive.add(self.next_pid)
        return ProcessRef(pid=self.next_pid, start_ticks=self.next_pid)

    def is_alive(self, proc: ProcessRef) -> bool:
        return proc.pid in self.alive

    def signal(self, proc: ProcessRef, signum: int) -> None:
        self.signals.append((proc.pid, signum))
        if signum == signal.SIGKILL or not self.ignore_sigterm:
            self.crash(proc.pid, f"killed by {signal.Signals(signum).name}")

    def crash(self, pid: int, how: str = "killed by SIGKILL") -> None:
        self.alive.discard(pid)
        self.how[pid] = how

    def exit_status(self, proc: ProcessRef) -> str:
        return self.how.pop(proc.pid, "exited")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def children() -> Children:
    return Children()


def supervise(tmp_path: Path, children: Children, clock: Clock, adopt: ProcessRef | None = None) -> Supervisor:
    return Supervisor("node1", ["agent", "--node", "node1"], tmp_path / "agent.log", tmp_path / "s.json",
                      children, adopt=adopt, clock=clock, sleep=clock.sleep, stop_grace=1.0)


def current(sup: Supervisor) -> int:
    assert sup.process is not None
    return sup.process.pid


def test_backoff_doubles_from_half_a_second_to_ten() -> None:
    assert [Backoff().delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_an_adopted_process_is_watched_not_started_again(tmp_path: Path, children: Children, clock: Clock) -> None:
    running = children.spawn(["agent"], tmp_path / "log")
    sup = supervise(tmp_path, children, clock, adopt=running)
    assert sup.process == running and len(children.spawned) == 1
    status = read_status(tmp_path / "s.json")
    assert status is not None and status.state == "running" and status.process == running and status.restarts == 0


def test_a_dead_adoptee_is_started_at_once(tmp_path: Path, children: Children, clock: Clock) -> None:
    sup = supervise(tmp_path, children, clock, adopt=ProcessRef(pid=7, start_ticks=7))
    assert children.spawned == [("agent", "--node", "node1")] and sup.process is not None


def test_a_crash_loop_backs_off_doubling_and_counts_every_restart(
    tmp_path: Path, children: Children, clock: Clock
) -> None:
    sup = supervise(tmp_path, children, clock)
    waits = []
    for _ in range(7):
        clock.now += 0.1  # a quick crash
        children.crash(current(sup))
        wait = sup.tick()
        waits.append(wait)
        assert sup.process is None and sup.status.state == "backoff"
        clock.now += wait - 0.01
        sup.tick()
        assert sup.process is None  # not before its time
        clock.now += 0.01
        sup.tick()
        assert sup.process is not None
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    status = read_status(tmp_path / "s.json")
    assert status is not None
    assert (status.state, status.restarts, status.manual_restarts) == ("running", 7, 0)
    assert status.last_exit == "killed by SIGKILL" and status.last_exit_time is not None
    assert len(children.spawned) == 8


def test_thirty_seconds_of_running_resets_the_backoff(tmp_path: Path, children: Children, clock: Clock) -> None:
    sup = supervise(tmp_path, children, clock)
    for _ in range(3):
        children.crash(current(sup))
        clock.now += sup.tick()
        sup.tick()
    clock.now += 30
    children.crash(current(sup), "exit status 1")
    assert sup.tick() == 0.5
    assert sup.status.last_exit == "exit status 1" and sup.status.restarts == 3


def test_a_restart_on_purpose_stops_and_starts_and_is_counted_apart(
    tmp_path: Path, children: Children, clock: Clock
) -> None:
    children.ignore_sigterm = True
    sup = supervise(tmp_path, children, clock)
    first = current(sup)
    sup.restart()
    assert children.signals == [(first, signal.SIGTERM), (first, signal.SIGKILL)]
    assert current(sup) != first
    status = read_status(tmp_path / "s.json")
    assert status is not None and (status.restarts, status.manual_restarts) == (0, 1)
    assert status.last_exit is None  # not a crash
    # Its own stop is not taken for a crash on the next tick.
    assert sup.tick() > 0 and sup.status.restarts == 0


def test_stop_ends_the_process_and_restarts_nothing(tmp_path: Path, children: Children, clock: Clock) -> None:
    sup = supervise(tmp_path, children, clock)
    pid = current(sup)
    sup.stop()
    assert children.signals == [(pid, signal.SIGTERM)] and not children.alive
    clock.now += 60
    sup.tick()
    assert not children.alive and len(children.spawned) == 1
    status = read_status(tmp_path / "s.json")
    assert status is not None and status.state == "stopped" and status.process is None


def test_the_command_line_carries_what_to_adopt(tmp_path: Path) -> None:
    argv = supervisor_argv("py", "node2", tmp_path / "s.json", tmp_path / "a.log", ProcessRef(pid=5, start_ticks=9),
                           ["nsenter", "--net=x", "agent"])
    assert argv == ["py", "-m", "membrane.lab.supervisor", "--name", "node2", "--status", str(tmp_path / "s.json"),
                    "--log", str(tmp_path / "a.log"), "--adopt", "5:9", "--", "nsenter", "--net=x", "agent"]


def test_the_supervisor_process_restarts_a_killed_child_restarts_on_request_and_stops(tmp_path: Path) -> None:
    status_file = tmp_path / "s.json"
    argv = supervisor_argv(sys.executable, "sleeper", status_file, tmp_path / "child.log", None,
                           ["sleep", "600"])
    supervisor = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def running(restarts: int = 0, manual: int = 0) -> ServiceStatus | None:
            status = read_status(status_file)
            ok = (status is not None and status.state == "running" and status.process is not None
                  and (status.restarts, status.manual_restarts) == (restarts, manual))
            return status if ok else None

        def wait_running(restarts: int = 0, manual: int = 0) -> ServiceStatus:
            found = wait_until(lambda: running(restarts, manual), timeout=10, what=f"run {restarts}/{manual}")
            assert found is not None
            return found

        first = wait_running()
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        second = wait_running(1)
        assert second.last_exit == "killed by SIGKILL" and second.process != first.process
        supervisor.send_signal(signal.SIGUSR1)  # lab restart
        third = wait_running(1, 1)
        assert third.process is not None and third.process != second.process
        supervisor.send_signal(signal.SIGTERM)  # lab down
        assert supervisor.wait(timeout=10) == 0
        stopped = read_status(status_file)
        assert stopped is not None and stopped.state == "stopped"
        assert third.process is not None and not HostProcesses().is_alive(third.process)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
