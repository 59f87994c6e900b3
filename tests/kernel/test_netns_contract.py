"""KernelNetnsHost against the namespaces-and-processes contract, with its run directory in a
temporary directory (namespaces ``mbnlc-…``), plus what only the kernel can show."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.datapath.process import KernelNetnsHost
from membrane.testing.netns import missing_binaries
from membrane.testing.netns_contract import KernelNetnsBackend, NetnsHostBackend, NetnsHostContract

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(bool(missing_binaries("sh", "sleep", "readlink")),
                                                     reason="needs sh, sleep and readlink")]


@pytest.fixture
def netns_backend(tmp_path: Path) -> Iterator[NetnsHostBackend]:
    backend = KernelNetnsBackend(tmp_path, "mbnlc-")
    try:
        yield backend
    finally:
        backend.close()


class TestKernelNetnsHostContract(NetnsHostContract):
    pass


async def test_commands_run_inside_the_namespace_and_never_list_the_callers_own(
        netns_backend: NetnsHostBackend) -> None:
    host = netns_backend.host
    assert isinstance(host, KernelNetnsHost)
    name = netns_backend.fresh_name()
    path = await host.create(name)
    result = await host.run(path, ("readlink", "/proc/self/ns/net"))
    assert result.stdout.strip() == f"net:[{os.stat(path).st_ino}]"
    links = await host.run(path, ("ip", "-o", "link", "show"))
    assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]

    # A name under the run directory that is the caller's own namespace (a lab node) is not listed.
    own = host.run_dir / (netns_backend.prefix + "self")
    own.touch()
    try:
        subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(own)], check=True)
        assert host.names(netns_backend.prefix) == [name]
    finally:
        subprocess.run(["umount", str(own)], check=True)
        own.unlink()
