"""The built-in pod runner: pods as processes in their own network namespaces.

For every Pod bound to this node it keeps a *sandbox* — a network namespace attached through the
same endpoint path a CNI runtime uses — and runs each container's command inside it. Namespaces
and processes go through a :class:`~membrane.datapath.process.NetnsHost` (the node's by default;
tests pass :class:`~membrane.datapath.process_fake.FakeNetnsHost`). Processes are started in
their own session so that an agent restart leaves them running; the runner re-adopts them from
its state files (pid + kernel start time, so a recycled pid is never mistaken for the pod).

    desired pods (intent) ──► sandbox (netns) ──► endpoint (ADD) ──► processes ──► pod status
    terminating pods      ──► SIGTERM ──► (exit, or SIGKILL after the grace period)
                          ──► endpoint DEL ──► netns removed ──► pod object removed
    gone pods / stale uid ──► kill process group ──► endpoint DEL ──► netns removed

Deletion is Kubernetes' graceful deletion: ``delete`` marks the pod (``deletionTimestamp``,
``deletionGracePeriodSeconds``), this runner sends SIGTERM to each container's process group and
SIGKILL to what is left when the grace period ends, and once nothing runs removes the endpoint,
the namespace and finally the object. Meanwhile the endpoint stays ready and wired (the pod may
finish its connections); that it is terminating is read from the pod's ``deletionTimestamp``,
the one place it is recorded. The grace period is counted from when this runner sent SIGTERM
(kept in the sandbox's state file, so a restarted agent does not start it over). The runner
never waits for a grace period: exits wake it, and :meth:`PodRunner.next_wakeup` names the
deadline. A terminating pod the runner has no sandbox for (its containers were started by a CNI
runtime, which deletes its endpoint with its own CNI DEL) has nothing to stop here: its object
is removed at once. A pod object that disappears outright (``--grace-period 0``, or with its
namespace) is stopped as before, with :data:`DEFAULT_GRACE_SECONDS` between the signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from membrane.agent.contract import CniRequest
from membrane.agent.endpoints import EndpointManager
from membrane.api import k8s
from membrane.api.podrow import PodRow
from membrane.core.errors import MembraneError
from membrane.core.statedb import Table
from membrane.datapath.process import KernelNetnsHost, NetnsHost
from membrane.store import keys
from membrane.store.base import Store
from membrane.store.objects import DEFAULT_TERMINATION_GRACE_SECONDS, ObjectClient

log = logging.getLogger(__name__)

#: Between SIGTERM and SIGKILL for a pod whose object was removed outright (no grace period given).
DEFAULT_GRACE_SECONDS = 2.0
MAX_RESTART_BACKOFF = 30.0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class ContainerState:
    name: str
    pid: int = 0
    pid_start: int = 0
    started_at: float = 0.0
    restarts: int = 0
    exit_code: int | None = None
    finished_at: float = 0.0
    next_start: float = 0.0  # restart backoff


@dataclass
class Sandbox:
    uid: str
    namespace: str
    name: str
    netns: str  # name under the NetnsHost's run directory (/run/netns)
    containers: dict[str, ContainerState] = field(default_factory=dict)
    stopping_since: float = 0.0  # when SIGTERM was sent (the pod is terminating); 0 while it runs
    kill_at: float = 0.0  # when what is left gets SIGKILL

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Sandbox:
        data = json.loads(text)
        data["containers"] = {k: ContainerState(**v) for k, v in data.get("containers", {}).items()}
        return cls(**data)


class PodRunner:
    def __init__(
        self,
        store: Store,
        node_name: str,
        node_ip: str,
        pods: Table[PodRow],
        endpoints: EndpointManager,
        state_dir: Path,
        netns_prefix: str,
        host: NetnsHost | None = None,
    ) -> None:
        self._host: NetnsHost = host if host is not None else KernelNetnsHost()
        self._store = store
        self._objects = ObjectClient(store)
        self._node = node_name
        self._node_ip = node_ip
        self._pods = pods
        self._pod_dicts: dict[int, tuple[k8s.Pod, dict[str, Any]]] = {}
        self._endpoints = endpoints
        self._dir = state_dir / "pods"
        self._prefix = netns_prefix
        self._sandboxes: dict[str, Sandbox] = {}
        self._watched: set[int] = set()
        self._written_status: dict[str, dict[str, Any]] = {}
        self.wake = asyncio.Event()

    # -- state files -------------------------------------------------------------------------

    def load(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in self._dir.glob("*.json"):
            try:
                sandbox = Sandbox.from_json(path.read_text())
            except (ValueError, TypeError, KeyError):
                log.warning("ignoring unreadable sandbox state %s", path)
                continue
            self._sandboxes[sandbox.uid] = sandbox
            recorded = {c.pid for c in sandbox.containers.values() if c.pid}
            for pid in self._host.pids_in(self._dir / sandbox.uid):
                if pid not in recorded:
                    log.warning("killing pid %d of pod %s/%s: started but never recorded (agent crash)",
                                pid, sandbox.namespace, sandbox.name)
                    self._host.signal(pid, signal.SIGKILL)
            for container in sandbox.containers.values():
                if container.pid and self._host.alive(container.pid, container.pid_start):
                    self._watch(container.pid)
                elif container.pid:
                    container.pid = 0  # exited while the agent was away; the exit code is unknown
                    container.exit_code = container.exit_code if container.exit_code is not None else -1
                    container.finished_at = container.finished_at or time.time()

    def _save(self, sandbox: Sandbox) -> None:
        path = self._dir / f"{sandbox.uid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(sandbox.to_json())
        os.replace(tmp, path)

    def _netns_name(self, namespace: str, name: str, uid: str) -> str:
        digest = hashlib.sha256(f"{namespace}/{name}/{uid}".encode()).hexdigest()[:8]
        return f"{self._prefix}{namespace}-{name}-{digest}"[:200]

    # -- process supervision -----------------------------------------------------------------

    def _watch(self, pid: int) -> None:
        """Wake the runner when ``pid`` exits (also for processes adopted after a restart)."""
        if pid in self._watched:
            return
        if not self._host.watch(pid, self._on_exit):
            self.wake.set()  # gone already
            return
        self._watched.add(pid)

    def _on_exit(self, pid: int) -> None:
        self._watched.discard(pid)
        self.wake.set()

    def _reap(self, container: ContainerState) -> bool:
        """True once the container's process has exited (recording its exit code when known)."""
        if not container.pid:
            return True
        if self._host.alive(container.pid, container.pid_start):
            return False
        code = self._host.exit_code(container.pid)  # known for processes started by this agent
        if code is not None:
            container.exit_code = code
        else:
            container.exit_code = container.exit_code if container.exit_code is not None else -1
        container.pid = 0
        container.finished_at = time.time()
        return True

    def _spawn(self, sandbox: Sandbox, container_spec: dict[str, Any], state: ContainerState) -> None:
        argv = list(container_spec.get("command") or []) + [str(a) for a in container_spec.get("args") or []]
        pod_dir = self._dir / sandbox.uid
        pod_dir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOSTNAME": sandbox.name, "POD_NAME": sandbox.name, "POD_NAMESPACE": sandbox.namespace}
        for item in container_spec.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
        # Its own session: an agent restart leaves it running, and its process group is its pid.
        child = self._host.spawn(self._host.path(sandbox.netns), argv, cwd=pod_dir, env=env,
                                 stdout=pod_dir / f"{state.name}.log")
        state.pid = child.pid
        state.pid_start = child.start_time
        state.started_at = time.time()
        state.exit_code = None
        self._save(sandbox)  # record the pid at once: a crash now must not orphan the process
        self._watch(child.pid)
        log.info("pod %s/%s container %s started as pid %d", sandbox.namespace, sandbox.name, state.name, child.pid)

    async def _kill(self, sandbox: Sandbox, grace: float) -> None:
        pids = [c.pid for c in sandbox.containers.values() if c.pid]
        for pid in pids:
            self._host.signal(pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(not self._reap(c) for c in sandbox.containers.values()):
            await asyncio.sleep(0.05)
        for container in sandbox.containers.values():
            if container.pid and not self._reap(container):
                self._host.signal(container.pid, signal.SIGKILL, group=True)
                for _ in range(100):
                    if self._reap(container):
                        break
                    await asyncio.sleep(0.02)
        # Anything else still working in the pod's directory was started for it: forked children,
        # or a process a crash kept us from recording.
        for pid in self._host.pids_in(self._dir / sandbox.uid):
            self._host.signal(pid, signal.SIGKILL)

    # -- reconcile ---------------------------------------------------------------------------

    def _as_dict(self, pod: k8s.Pod) -> dict[str, Any]:
        """The pod as the runner's container code reads it, dumped once per row."""
        cached = self._pod_dicts.get(id(pod))
        if cached is None or cached[0] is not pod:
            cached = (pod, pod.to_dict())
        return cached[1]

    def local_pods(self) -> list[k8s.Pod]:
        """This node's pods as full objects (the intent keeps them for this node's pods)."""
        return [row.model for row in self._pods.snapshot().by("node", self._node) if row.model is not None]

    async def reconcile(self) -> None:
        local = self.local_pods()
        self._pod_dicts = {id(pod): (pod, self._as_dict(pod)) for pod in local}
        desired = {
            pod.metadata.uid or "": self._as_dict(pod) for pod in local if not pod.metadata.deletionTimestamp
        }
        terminating = {pod.metadata.uid: pod for pod in local if pod.metadata.deletionTimestamp and pod.metadata.uid}
        for uid, sandbox in list(self._sandboxes.items()):
            if uid in terminating:
                await self._terminate(sandbox, terminating[uid])
            elif uid not in desired:
                await self._teardown(sandbox)
        for uid, stopping in terminating.items():
            if uid not in self._sandboxes:
                # Nothing of it runs here (any more): stopped in this or an earlier pass, or never
                # started by this runner (a CNI runtime's container).
                await self._finish_deletion(stopping)
        for uid, pod in desired.items():
            if uid:
                try:
                    await self._ensure(uid, pod)
                except MembraneError as exc:
                    log.warning("pod %s/%s: %s", pod["metadata"].get("namespace"), pod["metadata"]["name"], exc)

    async def _terminate(self, sandbox: Sandbox, pod: k8s.Pod) -> None:
        """One step of a graceful stop: SIGTERM once, SIGKILL once the grace period is over, and
        when nothing runs any more the teardown and the object's removal. Never waits the period."""
        grace = pod.metadata.deletionGracePeriodSeconds
        grace = DEFAULT_TERMINATION_GRACE_SECONDS if grace is None else grace
        now = time.time()
        if not sandbox.stopping_since:
            log.info("stopping pod %s/%s (grace period %ds)", sandbox.namespace, sandbox.name, grace)
            sandbox.stopping_since, sandbox.kill_at = now, now + grace
            for container in sandbox.containers.values():
                container.next_start = 0  # a terminating pod's containers are not restarted
                if container.pid and not self._reap(container):
                    self._host.signal(container.pid, signal.SIGTERM, group=True)
            self._save(sandbox)
        elif sandbox.stopping_since + grace < sandbox.kill_at:
            sandbox.kill_at = sandbox.stopping_since + grace  # deleted again with a shorter period
            self._save(sandbox)
        running = [c for c in sandbox.containers.values() if not self._reap(c)]
        if running and now >= sandbox.kill_at:
            log.info("pod %s/%s: grace period over, killing %d container(s)", sandbox.namespace, sandbox.name,
                     len(running))
            for container in running:
                self._host.signal(container.pid, signal.SIGKILL, group=True)
            for _ in range(100):
                running = [c for c in running if not self._reap(c)]
                if not running:
                    break
                await asyncio.sleep(0.02)
        if running:
            self._save(sandbox)
            await self._write_status(sandbox.uid, self._as_dict(pod), sandbox)
            return
        await self._teardown(sandbox)
        await self._finish_deletion(pod)

    async def _finish_deletion(self, pod: k8s.Pod) -> None:
        try:
            await self._objects.finish_deletion("Pod", pod.namespace or "default", pod.name, pod.metadata.uid or "")
        except MembraneError as exc:
            log.warning("pod %s/%s: cannot remove the object: %s", pod.namespace, pod.name, exc)

    async def _ensure(self, uid: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        sandbox = self._sandboxes.get(uid)
        if sandbox is None:
            sandbox = Sandbox(uid, namespace, name, self._netns_name(namespace, name, uid))
            self._sandboxes[uid] = sandbox
            self._save(sandbox)
        netns_path = self._host.path(sandbox.netns)
        if not self._host.exists(netns_path):
            await self._host.create(sandbox.netns)
        record = self._endpoints.get(uid)
        if record is None or record.state != "ready":
            request = CniRequest("ADD", uid, netns_path, "eth0",
                                 {"K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": name})
            await self._endpoints.add(request, origin="runner")
        policy = (pod.get("spec") or {}).get("restartPolicy") or "Always"
        now = time.time()
        for spec in (pod.get("spec") or {}).get("containers") or []:
            if not (spec.get("command") or spec.get("args")):
                continue  # no command: the pod is its network sandbox alone (like a pause container)
            state = sandbox.containers.setdefault(spec["name"], ContainerState(spec["name"]))
            if not self._reap(state):
                continue
            first_run = state.started_at == 0
            exited_ok = state.exit_code == 0
            should_run = first_run or policy == "Always" or (policy == "OnFailure" and not exited_ok)
            if not should_run:
                continue
            if not first_run:
                if state.next_start == 0:
                    ran_for = state.finished_at - state.started_at
                    backoff = 1.0 if ran_for > 60 else min(2.0 ** min(state.restarts, 5), MAX_RESTART_BACKOFF)
                    state.next_start = state.finished_at + backoff
                if now < state.next_start:
                    continue
                state.restarts += 1
                state.next_start = 0
            self._spawn(sandbox, spec, state)
        self._save(sandbox)
        await self._write_status(uid, pod, sandbox)

    def next_wakeup(self) -> float | None:
        pending = [c.next_start for s in self._sandboxes.values() for c in s.containers.values() if c.next_start]
        pending += [s.kill_at for s in self._sandboxes.values() if s.kill_at]
        return min(pending) - time.time() if pending else None

    async def _teardown(self, sandbox: Sandbox) -> None:
        log.info("tearing down pod %s/%s", sandbox.namespace, sandbox.name)
        await self._kill(sandbox, DEFAULT_GRACE_SECONDS)
        await self._endpoints.cni_del(CniRequest("DEL", sandbox.uid, self._host.path(sandbox.netns), "eth0"))
        await self._host.delete(sandbox.netns)
        with contextlib.suppress(FileNotFoundError):
            (self._dir / f"{sandbox.uid}.json").unlink()
        with contextlib.suppress(OSError):
            for path in (self._dir / sandbox.uid).glob("*"):
                path.unlink()
            (self._dir / sandbox.uid).rmdir()
        self._sandboxes.pop(sandbox.uid, None)
        self._written_status.pop(sandbox.uid, None)

    async def prune_foreign_netns(self) -> list[str]:
        """Remove namespaces carrying this runner's prefix that no sandbox owns (left by a crash)."""
        owned = {s.netns for s in self._sandboxes.values()}
        removed: list[str] = []
        if not self._prefix:
            return removed
        # names() never lists the namespace the agent runs in (a lab node shares the prefix).
        for name in self._host.names(self._prefix):
            if name in owned or not self._looks_like_pod_netns(name):
                continue
            if await self._host.delete(name):
                removed.append(name)
        return removed

    def _looks_like_pod_netns(self, name: str) -> bool:
        tail = name.removeprefix(self._prefix)
        digest = tail.rsplit("-", 1)[-1]
        return len(digest) == 8 and all(c in "0123456789abcdef" for c in digest) and tail.count("-") >= 2

    # -- status --------------------------------------------------------------------------------

    def _status(self, pod: dict[str, Any], sandbox: Sandbox) -> dict[str, Any]:
        record = self._endpoints.get(sandbox.uid)
        statuses = []
        running = waiting = failed = 0
        specs = (pod.get("spec") or {}).get("containers") or []
        for spec in specs:
            state = sandbox.containers.get(spec["name"])
            entry: dict[str, Any] = {"name": spec["name"], "image": spec.get("image", ""),
                                     "containerID": f"membrane://{sandbox.uid}/{spec['name']}",
                                     "restartCount": state.restarts if state else 0}
            if state is None or not (spec.get("command") or spec.get("args")):
                # No process: the container is the sandbox itself, up since the endpoint was made.
                entry["state"] = {"running": {"startedAt": _iso(record.created if record else 0)}}
                entry["ready"] = True
                running += 1
            elif state.pid:
                entry["state"] = {"running": {"startedAt": _iso(state.started_at)}}
                entry["ready"] = True
                running += 1
            else:
                code = state.exit_code if state.exit_code is not None else -1
                entry["state"] = {"terminated": {"exitCode": code, "finishedAt": _iso(state.finished_at),
                                                 "reason": "Completed" if code == 0 else "Error"}}
                entry["ready"] = False
                failed += code != 0
                waiting += state.next_start != 0
            statuses.append(entry)
        if record is None or record.state != "ready":
            phase = "Pending"
        elif running or waiting:
            phase = "Running"
        else:
            phase = "Failed" if failed else "Succeeded"
        ready = phase == "Running" and all(s["ready"] for s in statuses)
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": self._node_ip,
            "hostIPs": [{"ip": self._node_ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": statuses,
            "sandbox": {"netns": self._host.path(sandbox.netns), "node": self._node},
        }
        if record is not None and record.state == "ready":
            status["podIP"] = str(record.ipv4)
            status["podIPs"] = [{"ip": str(record.ipv4)}]
            status["startTime"] = _iso(record.created)
        return status

    async def _write_status(self, uid: str, pod: dict[str, Any], sandbox: Sandbox) -> None:
        status = self._status(pod, sandbox)
        if self._written_status.get(uid) == status:
            return
        meta = pod["metadata"]
        key = keys.object_key("pods", meta.get("namespace", "default"), meta["name"])
        for _ in range(5):
            kv = await self._store.get(key)
            if kv is None:
                return
            obj = json.loads(kv.value)
            if (obj.get("metadata") or {}).get("uid") != uid:
                return
            obj["status"] = status
            try:
                await self._store.put(key, json.dumps(obj).encode(), expect_mod_revision=kv.mod_revision)
            except MembraneError:
                continue
            self._written_status[uid] = status
            return

    async def close(self) -> None:
        for pid in self._watched:
            self._host.unwatch(pid)
        self._watched.clear()
