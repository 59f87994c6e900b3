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
from membrane.store.objects import ObjectClient, decode
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

    async def delete(self, name: str, grace: int | None = None) -> None:
        """``membrane pod delete``, and its pod object as the reflector brings it to the intent."""
        await ObjectClient(self.store).delete("Pod", "default", name, grace_period=grace)
        await self.sync(name)

    async def sync(self, name: str) -> None:
        kv = await self.store.get(keys.object_key("pods", "default", name))
        if kv is None:
            self.fake.pods.delete(("default", name))
        else:
            pod = decode(kv)
            assert isinstance(pod, k8s.Pod)
            self.fake.pods.upsert(pod)

    async def exists(self, name: str) -> bool:
        return await self.store.get(keys.object_key("pods", "default", name)) is not None

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


async def test_a_deleted_pod_that_exits_on_sigterm_is_gone_at_once_with_its_object(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        node.runner.load()
        await node.bind("web", "uid-5", ["sleep", "3600"])
        await node.runner.reconcile()
        [proc] = node.host.running()

        await node.delete("web")  # the default grace period: 30 s
        pod = node.fake.intent.pods.snapshot().get(("default", "web"))
        assert pod is not None and pod.model is not None and pod.model.metadata.deletionGracePeriodSeconds == 30
        await node.runner.reconcile()
        assert proc.signals == [signal.SIGTERM] and not proc.running  # no SIGKILL: it finished by itself
        assert node.endpoints.get("uid-5") is None and node.host.names(PREFIX) == []
        assert not await node.exists("web")  # the node removes the object once the pod is stopped


async def test_a_process_ignoring_sigterm_keeps_its_endpoint_until_the_grace_period_ends(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        node.runner.load()
        await node.bind("stubborn", "uid-6", ["sleep", "3600"])
        await node.runner.reconcile()
        [proc] = node.host.running()
        proc.ignores.add(signal.SIGTERM)

        await node.delete("stubborn")
        await node.runner.reconcile()  # returns at once: the runner never sits out a grace period
        assert proc.signals == [signal.SIGTERM] and proc.running
        record = node.endpoints.get("uid-6")
        assert record is not None and record.state == "ready"  # still serving its connections
        assert await node.exists("stubborn")
        delay = node.runner.next_wakeup()
        assert delay is not None and 28 < delay <= 30

        await node.delete("stubborn", grace=1)  # deleting again may shorten the period
        await node.runner.reconcile()
        delay = node.runner.next_wakeup()
        assert delay is not None and delay <= 1
        while node.host.running():
            await asyncio.sleep(max(delay, 0))  # the deadline itself is the condition
            await node.runner.reconcile()
            delay = node.runner.next_wakeup() or 0
        assert proc.signals == [signal.SIGTERM, signal.SIGKILL]
        assert node.endpoints.get("uid-6") is None and not await node.exists("stubborn")


async def test_a_restarted_agent_keeps_counting_the_grace_period(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        node.runner.load()
        await node.bind("web", "uid-7", ["sleep", "3600"])
        await node.runner.reconcile()
        [proc] = node.host.running()
        proc.ignores.add(signal.SIGTERM)
        await node.delete("web")
        await node.runner.reconcile()

        node.runner = node.new_runner()
        node.runner.load()
        await node.runner.reconcile()
        assert proc.signals == [signal.SIGTERM] and proc.running  # not signalled again, not restarted
        delay = node.runner.next_wakeup()
        assert delay is not None and 28 < delay <= 30
        await node.runner.close()


async def test_a_terminating_pod_the_runner_never_ran_is_removed_at_once(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        node.runner.load()
        await node.bind("cni-pod", "uid-8", ["sleep", "3600"])  # bound, but its containers run elsewhere
        await node.delete("cni-pod")
        assert await node.exists("cni-pod")
        await node.runner.reconcile()
        assert not await node.exists("cni-pod") and node.host.running() == []


async def test_grace_period_zero_removes_the_object_and_stops_the_pod(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        node.runner.load()
        await node.bind("web", "uid-9", ["sleep", "3600"])
        await node.runner.reconcile()
        [proc] = node.host.running()
        await node.delete("web", grace=0)
        assert not await node.exists("web")
        await node.runner.reconcile()
        assert not proc.running and node.endpoints.get("uid-9") is None
