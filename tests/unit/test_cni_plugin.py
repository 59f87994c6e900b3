"""membrane-cni end to end: the installed executable against an agent API with a fake endpoint service."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from membrane.agent.api import AgentApiServer
from membrane.agent.contract import CniFailure
from membrane.cni.queue import drain_del_queue
from membrane.testing.cnitool import FakeEndpointService

GOLDEN = Path(__file__).parent / "golden" / "cni"
NETNS = "/var/run/netns/mbcni-golden"
CONTAINER = "4f1c2d3e4b5a"


def plugin_argv() -> list[str]:
    script = Path(sys.executable).parent / "membrane-cni"
    return [str(script)] if script.exists() else [sys.executable, "-m", "membrane.cni.plugin"]


@dataclass
class PluginOutput:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


@dataclass
class Agent:
    service: FakeEndpointService
    socket: Path
    queue_dir: Path
    server: AgentApiServer


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mbcni-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def agent(short_dir: Path) -> AsyncIterator[Agent]:
    service = FakeEndpointService()
    server = AgentApiServer(short_dir / "run" / "agent.sock", service, lambda: {"node": "node1"})
    await server.start()
    try:
        yield Agent(service, server.socket_path, short_dir / "queue", server)
    finally:
        await server.close()


def netconf(agent_socket: Path, queue_dir: Path, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": "membrane",
        "type": "membrane-cni",
        "agentSocket": str(agent_socket),
        "delQueueDir": str(queue_dir),
        **extra,
    }


async def run_plugin(command: str | None, stdin: dict[str, Any] | bytes, **env: str) -> PluginOutput:
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_CONTAINERID": CONTAINER,
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }
    if command is not None:
        full_env["CNI_COMMAND"] = command
    full_env.update(env)
    full_env = {k: v for k, v in full_env.items() if v != ""}  # "" means: leave the variable out
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    proc = await asyncio.create_subprocess_exec(
        *plugin_argv(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    out, err = await proc.communicate(data)
    assert proc.returncode is not None
    return PluginOutput(proc.returncode, out.decode(), err.decode())


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), (
        f"{name} differs from the golden file (MEMBRANE_UPDATE_GOLDEN=1 rewrites)"
    )


def assert_cni_error(output: PluginOutput, code: int) -> dict[str, Any]:
    assert output.returncode != 0, output
    error = output.json
    assert error["code"] == code, error
    assert error["msg"], error
    return dict(error)


# -- VERSION --------------------------------------------------------------------------------


async def test_version_lists_supported_versions() -> None:
    out = await run_plugin("VERSION", b"", CNI_CONTAINERID="", CNI_NETNS="", CNI_IFNAME="")
    assert out.returncode == 0
    assert out.stdout == (
        '{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}\n'
    )


async def test_version_echoes_the_version_the_runtime_probes_with() -> None:
    out = await run_plugin("VERSION", {"cniVersion": "0.4.0"})
    assert out.json["cniVersion"] == "0.4.0"
    assert "1.1.0" in out.json["supportedVersions"]


# -- ADD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.1.0", "1.0.0", "0.4.0", "0.3.1"])
async def test_add_prints_the_result_in_the_requested_version(agent: Agent, version: str) -> None:
    out = await run_plugin("ADD", netconf(agent.socket, agent.queue_dir, version))
    assert out.returncode == 0, out
    assert_golden(f"add-result-{version}.json", out.stdout)
    assert agent.service.commands() == [("ADD", CONTAINER)]


async def test_add_forwards_env_args_and_netconf_to_the_agent(agent: Agent) -> None:
    conf = netconf(agent.socket, agent.queue_dir)
    out = await run_plugin(
        "ADD", conf, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0", CNI_IFNAME="net1"
    )
    assert out.returncode == 0, out
    [request] = agent.service.requests
    assert (request.command, request.container_id, request.netns, request.ifname) == (
        "ADD",
        CONTAINER,
        NETNS,
        "net1",
    )
    assert request.args == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-0"}
    assert (request.pod_namespace, request.pod_name) == ("shop", "web-0")
    assert request.netconf == conf


async def test_add_in_a_chain_passes_prev_result_along_but_answers_with_its_own(agent: Agent) -> None:
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "192.168.99.9/24"}]}
    out = await run_plugin("ADD", netconf(agent.socket, agent.queue_dir, prevResult=prev))
    assert out.returncode == 0, out
    assert agent.service.requests[0].netconf["prevResult"] == prev
    assert [ip["address"] for ip in out.json["ips"]] == ["10.244.1.23/32", "fd00:10:244:1::17/128"]


async def test_add_with_the_agent_down_asks_the_runtime_to_try_again(short_dir: Path) -> None:
    sock = short_dir / "absent.sock"
    out = await run_plugin("ADD", netconf(sock, short_dir / "queue"))
    error = assert_cni_error(out, 11)
    assert "not running" in error["msg"]
    assert str(sock) in error["details"]


async def test_add_with_a_stale_socket_file_is_agent_down(short_dir: Path) -> None:
    import socket

    sock_path = short_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # bound, never listening: connect() is refused
    try:
        out = await run_plugin("ADD", netconf(sock_path, short_dir / "queue"))
    finally:
        stale.close()
    assert_cni_error(out, 11)


async def test_add_failure_of_the_agent_keeps_its_cni_code(agent: Agent) -> None:
    agent.service.failures["ADD"] = CniFailure(100, "no address left in 10.244.1.0/24", "254 of 254 in use")
    out = await run_plugin("ADD", netconf(agent.socket, agent.queue_dir))
    error = assert_cni_error(out, 100)
    assert error == {
        "cniVersion": "1.0.0",
        "code": 100,
        "msg": "no address left in 10.244.1.0/24",
        "details": "254 of 254 in use",
    }


async def test_add_unexpected_agent_exception_is_an_internal_error(agent: Agent) -> None:
    agent.service.failures["ADD"] = RuntimeError("veth vanished")
    out = await run_plugin("ADD", netconf(agent.socket, agent.queue_dir))
    error = assert_cni_error(out, 999)
    assert "veth vanished" in error["msg"]


# -- errors from bad input ------------------------------------------------------------------

BAD_INPUT = [
    pytest.param(None, {}, {}, 4, id="no-CNI_COMMAND"),
    pytest.param("FROB", {}, {}, 4, id="unknown-command"),
    pytest.param("ADD", {"CNI_CONTAINERID": ""}, {}, 4, id="ADD-without-container-id"),
    pytest.param("ADD", {"CNI_NETNS": ""}, {}, 4, id="ADD-without-netns"),
    pytest.param("DEL", {"CNI_IFNAME": ""}, {}, 4, id="DEL-without-ifname"),
    pytest.param("ADD", {"CNI_CONTAINERID": "-bad/id"}, {}, 4, id="invalid-container-id"),
    pytest.param("ADD", {"CNI_IFNAME": "a-name-far-too-long"}, {}, 4, id="ifname-too-long"),
    pytest.param("ADD", {"CNI_IFNAME": "eth 0"}, {}, 4, id="ifname-with-space"),
    pytest.param("ADD", {"CNI_ARGS": "K8S_POD_NAME"}, {}, 4, id="CNI_ARGS-pair-without-value"),
    pytest.param("ADD", {}, {"name": ""}, 7, id="missing-network-name"),
    pytest.param("ADD", {}, {"name": "bad name"}, 7, id="invalid-network-name"),
    pytest.param("ADD", {}, {"cniVersion": "0.2.0"}, 1, id="unsupported-version"),
    pytest.param("ADD", {}, {"cniVersion": "2.0.0"}, 1, id="future-version"),
    pytest.param("ADD", {}, {"cniVersion": "one"}, 6, id="unparsable-version"),
    pytest.param("CHECK", {}, {"cniVersion": "0.3.1"}, 1, id="CHECK-before-0.4.0"),
    pytest.param("STATUS", {}, {"cniVersion": "1.0.0"}, 1, id="STATUS-before-1.1.0"),
    pytest.param("GC", {}, {"cniVersion": "1.0.0"}, 1, id="GC-before-1.1.0"),
    pytest.param("ADD", {}, {"agentSocket": 7}, 7, id="agentSocket-not-a-string"),
    pytest.param("ADD", {}, {"agentTimeout": -1}, 7, id="agentTimeout-negative"),
]


@pytest.mark.parametrize(("command", "env", "conf_override", "code"), BAD_INPUT)
async def test_bad_input_is_reported_with_the_spec_error_code(
    agent: Agent, command: str | None, env: dict[str, str], conf_override: dict[str, Any], code: int
) -> None:
    conf = {**netconf(agent.socket, agent.queue_dir), **conf_override}
    out = await run_plugin(command, conf, **env)
    assert_cni_error(out, code)
    assert agent.service.requests == []  # nothing reached the agent


async def test_config_that_is_not_json_is_a_decoding_error(agent: Agent) -> None:
    out = await run_plugin("ADD", b"{not json")
    assert_cni_error(out, 6)


async def test_config_without_cni_version_is_incompatible(agent: Agent) -> None:
    conf = netconf(agent.socket, agent.queue_dir)
    del conf["cniVersion"]  # the spec reads that as 0.1.0
    assert_cni_error(await run_plugin("ADD", conf), 1)


async def test_error_object_is_in_the_configured_version(agent: Agent) -> None:
    out = await run_plugin("ADD", netconf(agent.socket, agent.queue_dir, "0.4.0"), CNI_IFNAME="x" * 20)
    assert assert_cni_error(out, 4)["cniVersion"] == "0.4.0"


# -- DEL ------------------------------------------------------------------------------------


async def test_del_reaches_the_agent_and_queues_nothing(agent: Agent) -> None:
    out = await run_plugin("DEL", netconf(agent.socket, agent.queue_dir), CNI_NETNS="")
    assert (out.returncode, out.stdout) == (0, "")
    assert agent.service.commands() == [("DEL", CONTAINER)]
    assert agent.service.requests[0].netns == ""
    assert not agent.queue_dir.exists()


async def test_del_with_the_agent_down_is_queued_and_succeeds(short_dir: Path) -> None:
    queue = short_dir / "queue"
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.23/32"}]}
    conf = netconf(short_dir / "absent.sock", queue, prevResult=prev)
    first = await run_plugin("DEL", conf)
    second = await run_plugin("DEL", conf)  # DEL is idempotent: the same attachment, one file
    assert (first.returncode, first.stdout) == (0, "")
    assert (second.returncode, second.stdout) == (0, "")
    assert "DEL queued" in first.stderr
    files = sorted(p.name for p in queue.iterdir())
    assert files == [f"{CONTAINER}@eth0.json"]
    queued = json.loads((queue / files[0]).read_text())
    assert queued["command"] == "DEL"
    assert (queued["containerID"], queued["ifname"], queued["netns"]) == (CONTAINER, "eth0", NETNS)
    assert queued["netconf"]["prevResult"] == prev


async def test_queued_del_is_replayed_by_the_agent_at_start(short_dir: Path) -> None:
    queue = short_dir / "queue"
    sock = short_dir / "agent.sock"
    for container in ("c1", "c2"):
        out = await run_plugin("DEL", netconf(sock, queue), CNI_CONTAINERID=container)
        assert out.returncode == 0, out
    service = FakeEndpointService()
    async with AgentApiServer(sock, service, dict):
        report = await drain_del_queue(queue, service)
    assert sorted(service.commands()) == [("DEL", "c1"), ("DEL", "c2")]
    assert len(report.deleted) == 2 and not report.failed
    assert list(queue.iterdir()) == []


async def test_del_queue_unwritable_is_an_io_error(short_dir: Path) -> None:
    blocker = short_dir / "file"
    blocker.write_text("")
    out = await run_plugin("DEL", netconf(short_dir / "absent.sock", blocker / "queue"))
    assert_cni_error(out, 5)


async def test_del_failure_reported_by_a_running_agent_is_an_error(agent: Agent) -> None:
    agent.service.failures["DEL"] = CniFailure(102, "nft refused the transaction")
    out = await run_plugin("DEL", netconf(agent.socket, agent.queue_dir))
    assert_cni_error(out, 102)
    assert not agent.queue_dir.exists()


# -- CHECK, STATUS, GC ----------------------------------------------------------------------


async def test_check_after_add_succeeds_and_unknown_container_fails(agent: Agent) -> None:
    conf = netconf(agent.socket, agent.queue_dir)
    assert (await run_plugin("ADD", conf)).returncode == 0
    added = json.loads((await run_plugin("ADD", conf, CNI_CONTAINERID="other")).stdout)
    ok = await run_plugin("CHECK", {**conf, "prevResult": added})
    assert (ok.returncode, ok.stdout) == (0, "")
    missing = await run_plugin("CHECK", {**conf, "prevResult": added}, CNI_CONTAINERID="never-added")
    assert_cni_error(missing, 3)
    assert [c for c, _ in agent.service.commands()] == ["ADD", "ADD", "CHECK", "CHECK"]


async def test_check_with_the_agent_down_fails(short_dir: Path) -> None:
    out = await run_plugin("CHECK", netconf(short_dir / "absent.sock", short_dir / "q"))
    assert_cni_error(out, 11)


async def test_status_reports_whether_the_agent_can_serve(agent: Agent, short_dir: Path) -> None:
    up = await run_plugin("STATUS", netconf(agent.socket, agent.queue_dir, "1.1.0"))
    assert (up.returncode, up.stdout) == (0, "")
    down = await run_plugin("STATUS", netconf(short_dir / "absent.sock", agent.queue_dir, "1.1.0"))
    assert assert_cni_error(down, 50)["cniVersion"] == "1.1.0"


async def test_gc_hands_the_valid_attachments_to_the_agent(agent: Agent) -> None:
    conf = netconf(agent.socket, agent.queue_dir, "1.1.0")
    for container in ("keep", "stale"):
        assert (await run_plugin("ADD", conf, CNI_CONTAINERID=container)).returncode == 0
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    out = await run_plugin(
        "GC", {**conf, "cni.dev/valid-attachments": valid}, CNI_CONTAINERID="", CNI_IFNAME="", CNI_NETNS=""
    )
    assert (out.returncode, out.stdout) == (0, "")
    assert agent.service.gc_calls == [[("keep", "eth0")]]
    assert agent.service.attached == {("keep", "eth0")}


# -- start-up cost --------------------------------------------------------------------------


async def test_plugin_imports_only_the_standard_library_and_its_own_modules() -> None:
    probe = (
        "import sys, membrane.cni.plugin\n"
        "heavy = ('asyncio', 'dataclasses', 'typing', 'http.client', 'ssl', 'logging', 'pydantic')\n"
        "print(sorted(m for m in sys.modules if m.startswith('membrane') or m in heavy))\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out.decode().strip() == str(
        ["membrane", "membrane.cni", "membrane.cni.client", "membrane.cni.plugin", "membrane.cni.types"]
    )
