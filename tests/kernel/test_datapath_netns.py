"""The namespace kit every kernel test relies on: unique names, cleanup of namespaces and of the
processes left inside them, commands and Python inside a namespace, polling with a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from membrane.testing.netns import (
    NetnsCommandError,
    NetnsFactory,
    async_wait_until,
    missing_binaries,
    unique_name,
    wait_until,
)

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(bool(missing_binaries("busybox")), reason="needs busybox")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_unique_names_carry_the_prefix() -> None:
    names = {unique_name("mbdp-x-") for _ in range(100)}
    assert len(names) == 100 and all(n.startswith("mbdp-x-") and len(n) == 15 for n in names)


def test_factory_removes_namespaces_and_every_process_left_inside() -> None:
    with NetnsFactory() as factory:
        ns = factory("mbdp-kit-", lo_up=True)
        tracked = ns.spawn("busybox", "sleep", "300")
        # Started outside the kit (as a daemon would be): found by its namespace, killed by PID.
        stray = subprocess.Popen(ns.argv("busybox", "sleep", "300"))
        wait_until(lambda: {tracked.pid, stray.pid} <= set(ns.pids()), what="processes inside the namespace")
        assert os.getpid() not in ns.pids()
        assert "UP" in ns.run("ip", "-o", "link", "show", "lo").stdout
    assert not Path(ns.path).exists()
    stray.wait(timeout=5)
    assert tracked.poll() is not None and not _alive(stray.pid)


def test_commands_and_python_run_inside_the_namespace(netns_factory: NetnsFactory) -> None:
    ns = netns_factory("mbdp-kit-", lo_up=True)
    ns.run("ip", "addr", "add", "10.250.0.1/32", "dev", "lo")
    with pytest.raises(NetnsCommandError, match="nosuchdev0\" does not exist"):
        ns.run("ip", "link", "show", "nosuchdev0")
    # A socket made inside the namespace reaches an address that exists only there.
    server = ns.socket()
    try:
        server.bind(("10.250.0.1", 0))
        server.listen(1)
        client = ns.socket()
        with client:
            client.connect(server.getsockname())
        assert ns.call(lambda: socket.if_nametoindex("lo")) == 1
    finally:
        server.close()


async def test_waiting_gives_up_with_a_message() -> None:
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_until(lambda: False, timeout=0.05, what="the impossible")
    calls = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert await async_wait_until(third_time, timeout=2)
