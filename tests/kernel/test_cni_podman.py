"""podman attaches a container through membrane-cni to a real agent, and detaches it again.

podman runs its CNI plugins in its own network namespace, and the agent creates the host side of
the veth in the namespace it runs in; so podman itself runs inside the node's namespace, as it
would on a host whose agent runs in the host's namespace. podman keeps everything below a
temporary directory (see :mod:`membrane.testing.podman`); only the container's
``/run/netns/netns-<uuid>`` and libcni's ``/var/lib/cni/results`` entry live outside it, and both
are checked gone once the container is removed.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from membrane.cni.client import AgentClient
from membrane.datapath.netlink.model import endpoint_ifname
from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import missing_binaries, wait_until
from membrane.testing.podman import (
    Podman,
    build_busybox_rootfs,
    membrane_conflist,
    podman_missing,
    podman_session,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(90)]

VENV_BIN = Path(sys.executable).parent
NETWORK = "membrane"
PAGE = "hello from a podman container\n"
LIBCNI_RESULTS = Path("/var/lib/cni/results")
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')"


def _skip_reason() -> str | None:
    if not (VENV_BIN / "membrane-cni").is_file():
        return f"{VENV_BIN / 'membrane-cni'} is not installed"
    if missing_binaries("nft"):
        return "the agent needs nft"
    return podman_missing()


@pytest.fixture(autouse=True)
def _podman_available() -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def node() -> Iterator[AgentNode]:
    with AgentNode("mbci-") as agent_node:
        agent_node.start()
        yield agent_node


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mbci-podman-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def podman(node: AgentNode, workdir: Path) -> AsyncIterator[Podman]:
    """A private podman running inside the node's namespace; its containers go before the node does."""
    conf = membrane_conflist(NETWORK, agent_socket=node.socket, del_queue_dir=node.run_dir / "cni-del-queue")
    async with podman_session(
        workdir / "podman", [conf], plugin_dirs=[VENV_BIN], launcher=("nsenter", f"--net={node.node.path}")
    ) as session:
        yield session


def node_links(node: AgentNode) -> list[str]:
    return [link["ifname"] for link in json.loads(node.node.run("ip", "-j", "link", "show").stdout)]


def root_links() -> list[str]:
    return [
        link["ifname"]
        for link in json.loads(
            subprocess.run(["ip", "-j", "link", "show"], check=True, capture_output=True, text=True).stdout
        )
    ]


def endpoint_line(node: AgentNode, ip: str) -> str | None:
    lines = node.membrane("endpoint", "list").stdout.splitlines()
    return next((line for line in lines if f" {ip} " in line), None)


def libcni_results(container_id: str) -> list[Path]:
    if not LIBCNI_RESULTS.is_dir():
        return []
    return [p for p in LIBCNI_RESULTS.iterdir() if container_id in p.name]


async def test_podman_container_on_the_membrane_network_serves_a_pod_until_removed(
    node: AgentNode, podman: Podman, workdir: Path
) -> None:
    rootfs = build_busybox_rootfs(workdir / "rootfs", {"www/index.html": PAGE})
    name = f"pmweb{workdir.name[-8:]}"
    cid = await podman.run_detached(NETWORK, rootfs, "/bin/httpd", "-f", "-p", "80", "-h", "/www", name=name)

    info = await podman.inspect(cid)
    settings = info["NetworkSettings"]
    ip = settings["Networks"][NETWORK]["IPAddress"]
    cidr = ipaddress.IPv4Network(AgentClient(str(node.socket)).status()["podCIDR"])
    assert ipaddress.IPv4Address(ip) in cidr
    assert settings["Networks"][NETWORK]["Gateway"] == str(cidr.network_address + 1)
    netns = Path(settings["SandboxKey"])
    assert netns.exists()

    # The agent registered the endpoint under the name podman passed in CNI_ARGS (K8S_POD_NAME),
    # and its host veth is in the node's namespace.
    line = endpoint_line(node, ip)
    assert line is not None and "ready" in line and f"default/{name}" in line, line
    veth = endpoint_ifname(cid)
    assert veth in node_links(node)
    assert veth not in root_links()
    assert libcni_results(cid), "libcni cached no result for the container"

    # A pod of the built-in runner fetches the container's page over HTTP.
    node.membrane("pod", "run", "client", "-n", "default", "--", "sleep", "3600")

    def fetch() -> str:
        # Python, not busybox wget: the host's static busybox wget crashes on this platform.
        result = node.membrane(
            "pod", "exec", "default/client", "--", sys.executable, "-c", FETCH, f"http://{ip}/", check=False
        )
        return result.stdout if result.returncode == 0 else ""

    assert wait_until(fetch, timeout=15, interval=0.2, what="the container's httpd to answer") == PAGE

    # podman rm runs the DEL: endpoint, veth, podman's namespace and libcni's cache entry go.
    await podman.rm(cid)
    assert endpoint_line(node, ip) is None
    assert f"{ip}/32" not in node.membrane("ip", "list").stdout
    assert veth not in node_links(node)
    assert not netns.exists()
    assert libcni_results(cid) == []
    assert "cni DEL container=" + cid in node.log.read_text()


async def test_podman_rm_while_the_agent_is_down_succeeds_and_the_agent_cleans_up_at_start(
    node: AgentNode, podman: Podman, workdir: Path
) -> None:
    rootfs = build_busybox_rootfs(workdir / "rootfs")
    cid = await podman.run_detached(NETWORK, rootfs, "/bin/sleep", "3600", name=f"pmsleep{workdir.name[-8:]}")
    ip = (await podman.inspect(cid))["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
    assert endpoint_line(node, ip) is not None

    node.kill()
    await podman.rm(cid)  # raises when podman reports the DEL as failed
    queued = node.run_dir / "cni-del-queue" / f"{cid}@eth0.json"
    assert queued.is_file()
    assert libcni_results(cid) == []

    node.start()
    wait_until(lambda: not queued.exists(), timeout=15, what="the queued DEL to be replayed")
    assert endpoint_line(node, ip) is None
    assert f"{ip}/32" not in node.membrane("ip", "list").stdout
    assert endpoint_ifname(cid) not in node_links(node)
