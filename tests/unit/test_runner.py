"""The pod runner on fakes: namespaces and processes through FakeNetnsHost, wiring through FakeNetlink."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
from pathlib import Path
from typing import Any

from membrane.agent.datapath import NodeDatapath
from membrane.agent.endpoints import EndpointManager, NodeContext
from membrane.agent.intent import Intent
from membrane.agent.runner import PodRunner
from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.nft.fake import FakeNftRunner
from membrane.datapath.process_fake import FakeNetnsHost, Scripted
from membrane.store import keys
from membrane.store.identities import IdentityAllocator
from membrane.store.memory import MemoryStore

NODE = NodeContext(
    name="node1",
    node_ip=ipaddress.IPv4Address("172.31.0.11"),
    pod_cidr=ipaddress.IPv4Network("10.244.0.0/29"),
    router_ip=ipaddress.IPv4Address("10.244.0.1"),
    mtu=1450,
)
PREFIX = "mbpod-"


class Node:
    def __init__(self, state_dir: Path) -> None:
        self.store = MemoryStore()
        self.netlink = FakeNetlink()
        self.host = FakeNetnsHost(netlink=self.netlink)
        self.intent = Intent()
        datapath = NodeDatapath(NODE, self.netlink, FakeNftRunner())
        self.endpoints = EndpointManager(
            self.store, NODE, datapath.wiring, IdentityAllocator(self.store), self.intent,
            lambda: datapath.sync(self.endpoints.ready_records()), netns_present=self.host.exists,
        )
        self.state_dir = state_dir
        self.runner = self.new_runner()

    def new_runner(self) -> PodRunner:
        return PodRunner(self.store, NODE.name, str(NODE.node_ip), self.intent, self.endpoints, self.state_dir,
                         PREFIX, host=self.host)

    async def bind(self, name: str, uid: str, command: list[str], restart: str = "Always") -> None:
        pod: dict[str, Any] = {
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {"nodeName": NODE.name, "restartPolicy": restart,
                     "containers": [{"name": "main", "image": "busybox", "command": command}]},
        }
        self.intent.pods[("default", name)] = pod
        await self.store.put(keys.object_key("pods", "default", name), json.dumps(pod).encode())

    async def status(self, name: str) -> dict[str, Any]:
        kv = await self.store.get(keys.object_key("pods", "default", name))
        assert kv is not None
        status: dict[str, Any] = json.loads(kv.value)["status"]
        return status


async def test_a_pod_gets_a_namespace_an_endpoint_and_a_process_and_loses_them_when_deleted(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.runner.load()
    await node.bind("web", "uid-1", ["sleep", "3600"])
    await node.runner.reconcile()

    [name] = node.host.names(PREFIX)
    netns = node.host.path(name)
    [proc] = node.host.running()
    assert (proc.netns, proc.argv, proc.cwd) == (netns, ("sleep", "3600"), tmp_path / "pods" / "uid-1")
    assert proc.env["POD_NAME"] == "web"
    saved = json.loads((tmp_path / "pods" / "uid-1.json").read_text())
    assert saved["containers"]["main"]["pid"] == proc.pid  # recorded, so a restarted agent re-adopts it
    record = node.endpoints.get("uid-1")
    assert record is not None and record.state == "ready"
    assert "eth0" in node.netlink.namespaces[netns].links
    status = await node.status("web")
    assert status["phase"] == "Running" and status["podIP"] == str(record.ipv4)
    assert status["sandbox"]["netns"] == netns

    del node.intent.pods[("default", "web")]
    await node.runner.reconcile()
    assert not proc.running and proc.signals[0] == signal.SIGTERM
    assert node.host.names(PREFIX) == []
    assert netns not in node.netlink.namespaces  # the veth went with the namespace
    assert node.endpoints.get("uid-1") is None
    assert not (tmp_path / "pods" / "uid-1.json").exists()


async def test_a_process_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.runner.load()
    await node.bind("stubborn", "uid-2", ["sleep", "3600"])
    await node.runner.reconcile()
    [proc] = node.host.running()
    proc.ignores.add(signal.SIGTERM)
    del node.intent.pods[("default", "stubborn")]
    await node.runner.reconcile()  # waits out the grace period
    assert proc.signals == [signal.SIGTERM, signal.SIGKILL] and not proc.running
    assert node.host.names(PREFIX) == []


async def test_an_exited_process_is_reported_and_waits_out_its_backoff(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.runner.load()
    node.host.script(["false"], Scripted(returncode=1, runs_on=False))
    await node.bind("crash", "uid-3", ["false"], restart="OnFailure")
    await node.runner.reconcile()
    await node.runner.reconcile()  # sees the exit
    status = await node.status("crash")
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1
    assert status["phase"] == "Running"  # waiting to restart
    delay = node.runner.next_wakeup()
    assert delay is not None and 0 < delay <= 1.0
    assert len(node.host.processes) == 1


async def test_a_restarted_agent_adopts_running_processes_and_removes_stray_namespaces(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.runner.load()
    await node.bind("web", "uid-4", ["sleep", "3600"])
    await node.runner.reconcile()
    [proc] = node.host.running()
    await node.host.create(PREFIX + "default-gone-0123abcd")  # left by a crash: no sandbox owns it
    await node.host.create(PREFIX + "lab-node")  # the prefix, but not a pod's name

    node.runner = node.new_runner()
    node.runner.load()
    await node.runner.reconcile()
    assert node.host.running() == [proc]  # not started twice
    assert await node.runner.prune_foreign_netns() == [PREFIX + "default-gone-0123abcd"]
    assert PREFIX + "lab-node" in node.host.names(PREFIX)

    node.runner.wake.clear()
    node.host.exit(proc.pid, 0)  # exits while watched (re-adopted): the runner is woken
    await asyncio.sleep(0)
    assert node.runner.wake.is_set()
    await node.runner.close()
