"""The pod runner on fakes: namespaces and processes through FakeNetnsHost, wiring through FakeNetlink."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from membrane.agent.runner import PodRunner
from membrane.api import k8s
from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.process_fake import FakeNetnsHost, Scripted
from membrane.store import keys
from membrane.store.memory import MemoryStore
from membrane.testing.agentkit import NODE, FakeNode

PREFIX = "mbpod-"


class Node:
    """The pod runner over the endpoint and datapath modules of a FakeNode."""

    def __init__(self, state_dir: Path) -> None:
        self.store = MemoryStore()
        self.netlink = FakeNetlink()
        self.host = FakeNetnsHost(netlink=self.netlink)
        self.fake = FakeNode(self.store, self.netlink, policy=False)
        self.endpoints = self.fake.manager
        self.state_dir = state_dir
        self.runner = self.new_runner()

    async def __aenter__(self) -> Node:
        await self.fake.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.fake.__aexit__(None, None, None)

    def new_runner(self) -> PodRunner:
        return PodRunner(self.store, NODE.name, str(NODE.node_ip), self.fake.intent.pods, self.endpoints,
                         self.state_dir, PREFIX, host=self.host)

    async def bind(self, name: str, uid: str, command: list[str], restart: str = "Always") -> None:
        data: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {"nodeName": NODE.name, "restartPolicy": restart,
                     "containers": [{"name": "main", "image": "busybox", "command": command}]},
        }
        self.fake.pods.upsert(k8s.Pod.model_validate(data))
        await self.store.put(keys.object_key("pods", "default", name), json.dumps(data).encode())

    def unbind(self, name: str) -> None:
        self.fake.pods.delete(("default", name))

    async def status(self, name: str) -> dict[str, Any]:
        kv = await self.store.get(keys.object_key("pods", "default", name))
        assert kv is not None
        status: dict[str, Any] = json.loads(kv.value)["status"]
        return status


async def test_a_pod_gets_a_namespace_an_endpoint_and_a_process_and_loses_them_when_deleted(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
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

        node.unbind("web")
        await node.runner.reconcile()
        assert not proc.running and proc.signals[0] == signal.SIGTERM
        assert node.host.names(PREFIX) == []
        assert netns not in node.netlink.namespaces  # the veth went with the namespace
        assert node.endpoints.get("uid-1") is None
        assert not (tmp_path / "pods" / "uid-1.json").exists()


async def test_a_process_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        node.runner.load()
        await node.bind("stubborn", "uid-2", ["sleep", "3600"])
        await node.runner.reconcile()
        [proc] = node.host.running()
        proc.ignores.add(signal.SIGTERM)
        node.unbind("stubborn")
        await node.runner.reconcile()  # waits out the grace period
        assert proc.signals == [signal.SIGTERM, signal.SIGKILL] and not proc.running
        assert node.host.names(PREFIX) == []


async def test_an_exited_process_is_reported_and_waits_out_its_backoff(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
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
    async with Node(tmp_path) as node:
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
