"""membrane-cni end to end: the real plugin, the real agent, the distribution's chained plugins.

The "host" is an :class:`AgentNode` (a node namespace running ``membrane agent``); containers
are namespaces of their own. The whole chain runs inside the node namespace, as a runtime on
that host would run it: ``portmap`` writes its rules into the namespace it runs in, ``tuning``
enters the container's.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.cni.client import AgentClient
from membrane.store import open_store
from membrane.store.keys import pod_ip_key
from membrane.testing.agentnode import AgentNode
from membrane.testing.cnitool import ChainResult, CniTool
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries, wait_until
from membrane.testing.podman import membrane_conflist

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.timeout(120),
    pytest.mark.skipif(bool(missing_binaries("nft")), reason="the agent needs nft"),
]

CNI_BIN = Path(sys.executable).parent / "membrane-cni"
PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
PREFIX = "mbci-"
SOMAXCONN = "1234"  # tuning sets it in the container; the kernel default is 4096
HOST_PORT = 18080
UPLINK_IP = "172.31.254.1"


def reference_plugin(name: str) -> str | None:
    return next((str(Path(d) / name) for d in PLUGIN_DIRS if (Path(d) / name).is_file()), None)


def _skip_reason() -> str | None:
    if not CNI_BIN.is_file():
        return f"{CNI_BIN} is not installed"
    if reference_plugin("tuning") is None:
        return "the reference CNI plugins are not installed (containernetworking-plugins)"
    return None


# portmap 1.1 programs iptables (iptables-nft writes nft tables through the xtables compat layer).
PORTMAP_SKIP = (
    "portmap needs the reference plugin and iptables"
    if reference_plugin("portmap") is None or shutil.which("iptables") is None
    else None
)

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(16)
    def serve(conn):
        with conn:
            while data := conn.recv(4096):
                conn.sendall(sys.argv[2].encode() + b":" + data)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
""")

ECHO_CLIENT = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as sock:
        sock.sendall(b"ping"); print(sock.recv(64).decode())
""")


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _plugins_installed() -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def node() -> Iterator[AgentNode]:
    with AgentNode(PREFIX) as agent_node:
        agent_node.start()
        yield agent_node


@pytest.fixture
def container(netns_factory: NetnsFactory) -> Callable[[], Netns]:
    """Makes a container network namespace; all of them are removed after the test."""
    return lambda: netns_factory(f"{PREFIX}c-", lo_up=True)


def cnitool(node: AgentNode) -> CniTool:
    """Runs plugins inside the node namespace, where a runtime on that host would run them."""
    return CniTool(launcher=("nsenter", f"--net={node.node.path}"))


def conflist(node: AgentNode, *chained: dict[str, Any], cni_version: str = "1.0.0") -> dict[str, Any]:
    return membrane_conflist(
        "membrane",
        agent_socket=node.socket,
        del_queue_dir=node.run_dir / "cni-del-queue",
        cni_version=cni_version,
        chained=chained,
    )


def tuning() -> dict[str, Any]:
    return {"type": "tuning", "sysctl": {"net.core.somaxconn": SOMAXCONN}}


def portmap() -> dict[str, Any]:
    return {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}


PORT_MAPPINGS = {"portMappings": [{"hostPort": HOST_PORT, "containerPort": 7000, "protocol": "tcp"}]}


def pod_args(name: str) -> dict[str, str]:
    # IgnoreUnknown: the reference plugins reject CNI_ARGS they do not know otherwise (as runtimes send).
    return {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": name}


def container_id(ns: Netns) -> str:
    return f"ctr{ns.name.replace('-', '')}"


def pod_ip(result: dict[str, Any]) -> str:
    [ip] = result["ips"]
    return str(ipaddress.IPv4Interface(ip["address"]).ip)


def pod_cidr(node: AgentNode) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(AgentClient(str(node.socket)).status()["podCIDR"])


def endpoint_rows(node: AgentNode) -> dict[str, str]:
    """``membrane endpoint list``: the first line of each endpoint, by IPv4 address."""
    rows = {}
    for line in node.membrane("endpoint", "list").stdout.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0].isdigit():
            ip = next((c for c in cells if c.count(".") == 3 and "/" not in c), None)
            if ip:
                rows[ip] = line
    return rows


def ipcache(node: AgentNode) -> str:
    return node.membrane("ip", "list").stdout


async def ip_key_owner(node: AgentNode, ip: str) -> str | None:
    """Who holds the address in the store (the endpoint record's key), None when it is free."""
    store = await open_store(node.store_url)
    try:
        kv = await store.get(pod_ip_key(ipaddress.IPv4Address(ip)))
        return kv.value.decode() if kv is not None else None
    finally:
        await store.close()


def host_links(node: AgentNode) -> list[str]:
    return [link["ifname"] for link in json.loads(node.node.run("ip", "-j", "link", "show").stdout)]


def host_ifname(result: dict[str, Any]) -> str:
    return next(str(i["name"]) for i in result["interfaces"] if "sandbox" not in i)


def echo(ns: Netns, ip: str, port: int = 7000) -> str:
    result = ns.run(sys.executable, "-c", ECHO_CLIENT, ip, str(port), check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def ok(result: ChainResult) -> ChainResult:
    """The chain succeeded (with every plugin's output in the failure message otherwise)."""
    details = [(r.plugin, r.returncode, r.output, r.stderr.strip()[-500:]) for r in result.runs]
    assert result.ok, f"{result.command} failed: {details}"
    return result


async def add(node: AgentNode, conf: dict[str, Any], ns: Netns, name: str, **kwargs: Any) -> dict[str, Any]:
    result = ok(await cnitool(node).add(conf, container_id(ns), ns.path, args=pod_args(name), **kwargs)).result
    assert result is not None
    return result


# -- ADD through a chain -----------------------------------------------------------------------


async def test_add_hands_the_result_down_a_chain_with_tuning(node: AgentNode, container: Callable[[], Netns]) -> None:
    ns = container()
    chain = await cnitool(node).add(conflist(node, tuning()), container_id(ns), ns.path, args=pod_args("web"))
    ok(chain)
    assert chain.order == ["membrane-cni", "tuning"]
    membrane_run, tuning_run = chain.runs
    assert membrane_run.output is not None and chain.result is not None
    assert tuning_run.config["prevResult"] == membrane_run.output

    result = chain.result
    assert result["cniVersion"] == "1.0.0"
    ip = pod_ip(result)
    cidr = pod_cidr(node)
    assert ipaddress.IPv4Address(ip) in cidr
    assert result["ips"][0]["gateway"] == str(cidr.network_address + 1)
    [sandbox] = [i for i in result["interfaces"] if i.get("sandbox")]
    assert sandbox == {"name": "eth0", "mac": sandbox["mac"], "sandbox": ns.path}

    # What the result says is what the container has.
    addresses = ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f"{ip}/32" in addresses
    assert sandbox["mac"] in ns.run("ip", "-o", "link", "show", "dev", "eth0").stdout
    assert host_ifname(result) in host_links(node)
    # tuning ran in the container's namespace, not the node's.
    assert ns.run("sysctl", "-n", "net.core.somaxconn").stdout.strip() == SOMAXCONN
    assert node.node.run("sysctl", "-n", "net.core.somaxconn").stdout.strip() != SOMAXCONN
    assert "default/web" in endpoint_rows(node)[ip]


@pytest.mark.skipif(PORTMAP_SKIP is not None, reason=PORTMAP_SKIP or "")
async def test_portmap_after_membrane_forwards_a_node_port_to_the_container(
    node: AgentNode, container: Callable[[], Netns]
) -> None:
    ns = container()
    conf = conflist(node, tuning(), portmap())
    tool = cnitool(node)
    chain = ok(await tool.add(conf, container_id(ns), ns.path, args=pod_args("web"), capability_args=PORT_MAPPINGS))
    assert chain.order == ["membrane-cni", "tuning", "portmap"]
    assert chain.runs[2].config["prevResult"] == chain.runs[1].output
    assert chain.runs[2].config["runtimeConfig"] == PORT_MAPPINGS
    assert chain.result is not None
    ip = pod_ip(chain.result)
    assert chain.result["ips"] == chain.runs[0].output["ips"]  # type: ignore[index]

    # portmap's rules are in the node's namespace (the one it ran in).
    rules = node.node.run("iptables", "-t", "nat", "-S").stdout
    assert f"--dport {HOST_PORT} -j DNAT --to-destination {ip}:7000" in rules, rules

    # ... and they work: a peer on the node's link reaches the container through the node's port.
    node.uplink.run("ip", "addr", "add", f"{UPLINK_IP}/24", "dev", "eth0")
    ns.spawn(sys.executable, "-c", ECHO_SERVER, "7000", "web")
    node_ip = node.node_ip.split("/")[0]
    assert (
        wait_until(lambda: echo(node.uplink, node_ip, HOST_PORT), timeout=10, what="the mapped port to answer")
        == "web:ping"
    )

    ok(
        await tool.delete(
            conf,
            container_id(ns),
            ns.path,
            prev_result=chain.result,
            args=pod_args("web"),
            capability_args=PORT_MAPPINGS,
        )
    )
    assert f"--to-destination {ip}:7000" not in node.node.run("iptables", "-t", "nat", "-S").stdout
    assert ip not in endpoint_rows(node)


# -- traffic between containers ------------------------------------------------------------


async def test_two_containers_attached_by_cni_talk_to_each_other(
    node: AgentNode, container: Callable[[], Netns]
) -> None:
    client, server = container(), container()
    conf = conflist(node, tuning())
    client_ip = pod_ip(await add(node, conf, client, "client"))
    server_ip = pod_ip(await add(node, conf, server, "server"))
    assert client_ip != server_ip

    server.spawn(sys.executable, "-c", ECHO_SERVER, "7000", "server")
    assert wait_until(lambda: echo(client, server_ip), timeout=10, what="the server to answer") == "server:ping"

    rows = endpoint_rows(node)
    assert "default/client" in rows[client_ip] and "ready" in rows[client_ip]
    assert "default/server" in rows[server_ip] and "ready" in rows[server_ip]
    listed = ipcache(node)
    assert f"{client_ip}/32" in listed and f"{server_ip}/32" in listed


# -- CHECK ---------------------------------------------------------------------------------


async def test_check_passes_after_add_and_fails_once_the_container_interface_is_gone(
    node: AgentNode, container: Callable[[], Netns]
) -> None:
    ns = container()
    # No portmap here: its 1.1 CHECK fails on a node that has no IPv6 nat chain for the container.
    conf = conflist(node, tuning())
    tool = cnitool(node)
    result = await add(node, conf, ns, "web")
    check = ok(await tool.check(conf, container_id(ns), ns.path, prev_result=result, args=pod_args("web")))
    assert check.order == ["membrane-cni", "tuning"]

    ns.run("ip", "link", "del", "eth0")  # takes the host side of the veth pair with it
    broken = await tool.check(conf, container_id(ns), ns.path, prev_result=result, args=pod_args("web"))
    assert not broken.ok
    failed = broken.failed_run
    assert failed is not None and failed.plugin == "membrane-cni" and failed.returncode == 1
    error = broken.error
    assert error is not None
    assert error["code"] == 102, error
    assert error["cniVersion"] == "1.0.0"
    assert "does not match" in error["msg"]
    assert "missing" in error["details"], error


# -- DEL -----------------------------------------------------------------------------------


async def test_del_twice_succeeds_and_releases_the_address(node: AgentNode, container: Callable[[], Netns]) -> None:
    ns = container()
    conf = conflist(node, tuning())
    tool = cnitool(node)
    result = await add(node, conf, ns, "web")
    ip = pod_ip(result)
    assert await ip_key_owner(node, ip) is not None
    assert f"{ip}/32" in ipcache(node)

    chain = ok(await tool.delete(conf, container_id(ns), ns.path, prev_result=result, args=pod_args("web")))
    assert chain.order == ["tuning", "membrane-cni"]
    assert "eth0" not in ns.run("ip", "-o", "link").stdout
    # Again, as a runtime does after the container's namespace is gone (CNI_NETNS empty).
    ns.delete()
    ok(await tool.delete(conf, container_id(ns), "", prev_result=result, args=pod_args("web")))

    assert ip not in endpoint_rows(node)
    assert f"{ip}/32" not in ipcache(node)
    assert await ip_key_owner(node, ip) is None
    assert host_ifname(result) not in host_links(node)

    # A restarted agent hands out addresses from the start of the range again: the freed one.
    node.stop()
    node.start()
    again = container()
    assert pod_ip(await add(node, conf, again, "again")) == ip


async def test_del_while_the_agent_is_down_is_queued_and_replayed_at_start(
    node: AgentNode, container: Callable[[], Netns]
) -> None:
    ns = container()
    conf = conflist(node, tuning())
    tool = cnitool(node)
    result = await add(node, conf, ns, "web")
    ip, veth = pod_ip(result), host_ifname(result)

    node.kill()
    chain = ok(await tool.delete(conf, container_id(ns), ns.path, prev_result=result, args=pod_args("web")))
    membrane_run = chain.runs[-1]
    assert membrane_run.plugin == "membrane-cni" and membrane_run.output is None
    assert "DEL queued" in membrane_run.stderr
    queued = node.run_dir / "cni-del-queue" / f"{container_id(ns)}@eth0.json"
    assert queued.is_file()
    assert json.loads(queued.read_text())["command"] == "DEL"
    assert veth in host_links(node)  # nobody has acted on it yet

    # The container's namespace stays: the agent must drop the endpoint because of the DEL,
    # not because it finds the namespace gone.
    node.start()
    wait_until(lambda: not queued.exists(), timeout=15, what="the queued DEL to be replayed")
    wait_until(lambda: veth not in host_links(node), timeout=10, what="the host veth to go")
    assert ip not in endpoint_rows(node)
    assert await ip_key_owner(node, ip) is None
    assert "drained queued CNI DELs" in node.log.read_text()


# -- ADD with the agent down -----------------------------------------------------------------


async def test_add_while_the_agent_is_down_fails_with_try_again_later(
    node: AgentNode, container: Callable[[], Netns]
) -> None:
    ns = container()
    node.kill()
    chain = await cnitool(node).add(conflist(node, tuning()), container_id(ns), ns.path, args=pod_args("web"))
    assert not chain.ok
    assert chain.order == ["membrane-cni"]  # the chain stops at the first failure
    error = chain.error
    assert error is not None
    assert error["code"] == 11
    assert error["msg"] == "the membrane agent is not running; try again later"
    assert str(node.socket) in error["details"]
    assert "eth0" not in ns.run("ip", "-o", "link").stdout


# -- versions ------------------------------------------------------------------------------


async def test_version_and_a_0_4_0_configuration_get_0_4_0_results(
    node: AgentNode, container: Callable[[], Netns]
) -> None:
    tool = cnitool(node)
    for probe in ("1.0.0", "0.4.0"):
        version = await tool.version("membrane-cni", probe)
        assert version.ok and version.output is not None
        assert version.output["cniVersion"] == probe
        assert {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(version.output["supportedVersions"])

    ns = container()
    conf = conflist(node, tuning(), cni_version="0.4.0")
    chain = ok(await tool.add(conf, container_id(ns), ns.path, args=pod_args("old")))
    membrane_out = chain.runs[0].output
    assert membrane_out is not None and chain.result is not None
    assert membrane_out["cniVersion"] == "0.4.0"
    [ip] = membrane_out["ips"]
    assert ip["version"] == "4"
    assert ipaddress.IPv4Interface(ip["address"]).ip in pod_cidr(node)
    assert chain.result["cniVersion"] == "0.4.0"  # tuning parsed it as 0.4.0 and passed it on
    assert chain.runs[1].config["prevResult"] == membrane_out
    ok(await tool.check(conf, container_id(ns), ns.path, prev_result=chain.result, args=pod_args("old")))
    ok(await tool.delete(conf, container_id(ns), ns.path, prev_result=chain.result, args=pod_args("old")))
    assert pod_ip(membrane_out) not in endpoint_rows(node)
