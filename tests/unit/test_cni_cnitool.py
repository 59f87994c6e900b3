"""The Python cnitool: plugin order, prevResult hand-over, error handling, request configuration."""

from __future__ import annotations

import json
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
from membrane.testing.cnitool import CniTool, FakeEndpointService, derive_plugin_config, load_conflist

# A chained plugin that logs what it was given and passes prevResult through, as tuning does.
STUB = """#!{python}
import json, os, sys
conf = json.load(sys.stdin) if os.environ["CNI_COMMAND"] != "VERSION" else {{}}
with open({log!r}, "a") as log:
    log.write(json.dumps({{"command": os.environ["CNI_COMMAND"], "conf": conf,
                           "containerID": os.environ.get("CNI_CONTAINERID", "")}}) + "\\n")
if conf.get("failOn") == os.environ["CNI_COMMAND"]:
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 120, "msg": "stub says no"}}))
    sys.exit(1)
if os.environ["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


@dataclass
class Chain:
    tool: CniTool
    service: FakeEndpointService
    log: Path
    conflist: dict[str, Any]

    def stub_calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mbcni-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def chain(short_dir: Path) -> AsyncIterator[Chain]:
    plugins = short_dir / "plugins"
    plugins.mkdir()
    log = short_dir / "stub.log"
    stub = plugins / "stub-tuning"
    stub.write_text(STUB.format(python=sys.executable, log=str(log)))
    stub.chmod(0o755)
    service = FakeEndpointService()
    sock = short_dir / "agent.sock"
    conflist = {
        "cniVersion": "1.0.0",
        "name": "membrane",
        "plugins": [
            {"type": "membrane-cni", "agentSocket": str(sock), "delQueueDir": str(short_dir / "queue")},
            {"type": "stub-tuning", "capabilities": {"portMappings": True}},
        ],
    }
    tool = CniTool([plugins, Path(sys.executable).parent])
    async with AgentApiServer(sock, service, dict):
        yield Chain(tool, service, log, conflist)


async def test_add_runs_in_order_and_hands_each_plugin_the_previous_result(chain: Chain) -> None:
    ports = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    added = await chain.tool.add(
        chain.conflist,
        "c1",
        "/run/netns/c1",
        args={"K8S_POD_NAME": "web"},
        capability_args={"portMappings": ports},
    )
    assert added.ok, added.error
    assert added.order == ["membrane-cni", "stub-tuning"]
    membrane_result = added.runs[0].output
    [stub_call] = chain.stub_calls()
    assert stub_call["conf"]["prevResult"] == membrane_result
    assert stub_call["conf"]["runtimeConfig"] == {"portMappings": ports}
    assert added.result == membrane_result  # the stub passed it through
    assert "prevResult" not in chain.service.requests[0].netconf  # the first plugin gets none
    assert chain.service.requests[0].args == {"K8S_POD_NAME": "web"}


async def test_del_runs_in_reverse_order_with_the_cached_result(chain: Chain) -> None:
    added = (await chain.tool.add(chain.conflist, "c1", "/run/netns/c1")).raise_for_error()
    deleted = await chain.tool.delete(chain.conflist, "c1", "/run/netns/c1", prev_result=added.result)
    assert deleted.ok, deleted.error
    assert deleted.order == ["stub-tuning", "membrane-cni"]
    assert chain.stub_calls()[-1]["command"] == "DEL"
    assert chain.service.requests[-1].netconf["prevResult"] == added.result
    assert chain.service.attached == set()


async def test_check_runs_in_order(chain: Chain) -> None:
    added = (await chain.tool.add(chain.conflist, "c1", "/run/netns/c1")).raise_for_error()
    checked = await chain.tool.check(chain.conflist, "c1", "/run/netns/c1", prev_result=added.result or {})
    assert checked.ok and checked.order == ["membrane-cni", "stub-tuning"]
    skipped = await chain.tool.check(
        {**chain.conflist, "disableCheck": True}, "c1", "/run/netns/c1", prev_result=added.result or {}
    )
    assert skipped.ok and skipped.order == []


async def test_a_failing_plugin_stops_the_chain(chain: Chain) -> None:
    chain.service.failures["ADD"] = CniFailure(100, "no address left")
    added = await chain.tool.add(chain.conflist, "c1", "/run/netns/c1")
    assert not added.ok and added.order == ["membrane-cni"]
    assert added.error is not None and added.error["code"] == 100
    assert added.result is None
    assert chain.stub_calls() == []


async def test_gc_carries_on_after_an_error(chain: Chain) -> None:
    conflist = {
        **chain.conflist,
        "cniVersion": "1.1.0",
        "plugins": [{"type": "stub-tuning", "failOn": "GC"}, chain.conflist["plugins"][0]],
    }
    collected = await chain.tool.gc(conflist, [("c1", "eth0")])
    assert collected.order == ["stub-tuning", "membrane-cni"]
    assert collected.error is not None and collected.error["code"] == 120
    assert chain.service.gc_calls == [[("c1", "eth0")]]
    assert chain.stub_calls()[0]["conf"]["cni.dev/valid-attachments"] == [
        {"containerID": "c1", "ifname": "eth0"}
    ]


async def test_version_and_status_of_the_plugin(chain: Chain) -> None:
    version = await chain.tool.version("membrane-cni")
    assert version.ok and version.output is not None
    assert "1.0.0" in version.output["supportedVersions"]
    status = await chain.tool.status({**chain.conflist, "cniVersion": "1.1.0"})
    assert status.ok and status.order == ["membrane-cni", "stub-tuning"]


def test_missing_plugin_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-plugin"):
        CniTool(["/nonexistent"]).find_plugin("no-such-plugin")


def test_derived_configuration_follows_the_spec() -> None:
    conflist = {"cniVersion": "1.0.0", "name": "net", "plugins": []}
    plugin = {
        "type": "portmap",
        "cniVersion": "0.3.1",  # the list's version wins
        "name": "other",
        "capabilities": {"portMappings": True, "bandwidth": False},
    }
    config = derive_plugin_config(
        conflist,
        plugin,
        prev_result={"cniVersion": "1.0.0"},
        capability_args={"portMappings": [1], "bandwidth": {"rate": 1}, "ips": ["10.0.0.1"]},
    )
    assert config == {
        "type": "portmap",
        "cniVersion": "1.0.0",
        "name": "net",
        "runtimeConfig": {"portMappings": [1]},
        "prevResult": {"cniVersion": "1.0.0"},
    }


def test_load_conflist_wraps_a_single_conf(tmp_path: Path) -> None:
    path = tmp_path / "10-net.conf"
    path.write_text(json.dumps({"cniVersion": "0.4.0", "name": "n", "type": "membrane-cni"}))
    assert load_conflist(path) == {"cniVersion": "0.4.0", "name": "n", "plugins": [{"type": "membrane-cni"}]}
