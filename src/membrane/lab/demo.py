"""Example applications for a lab: deploy, wait until they run, show them talking, apply a policy.

Each scenario is a manifest in ``lab/demos/`` applied exactly as a user would apply it. The Star
Wars scenario follows Cilium's getting-started guide across two nodes (the Death Star on node1,
the ships on node2 when the lab has two)::

    apply starwars.yaml → both ships land → apply starwars-policy.yaml (rule1: only org=empire may
    reach the Death Star on TCP 80) → wait until node1 enforces it → the TIE fighter lands, the
    X-wing times out → ``membrane observe --verdict DROPPED --to-label org=empire`` through the
    lab's relay shows the drop

and ends with the commands to look further.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from membrane.api import k8s
from membrane.api.manifest import parse_manifest_text
from membrane.cli.pods import wait_for_pod
from membrane.core.errors import MembraneError
from membrane.lab.lab import Lab
from membrane.store import keys, open_store
from membrane.store.base import Store
from membrane.store.objects import ObjectClient

# (client pod, method, path, what the request means)
LANDINGS = (
    ("tiefighter", "POST", "/v1/request-landing", "an Empire ship asks to land"),
    ("xwing", "POST", "/v1/request-landing", "an Alliance ship asks to land"),
)
EXHAUST_PORT = ("tiefighter", "PUT", "/v1/exhaust-port", "an Empire ship hits the exhaust port")
POLICY_NAME = "rule1"
POLICY_TIMEOUT = 30.0
OBSERVE_TIMEOUT = 15.0
OBSERVE_FILTERS = ("--verdict", "DROPPED", "--to-label", "org=empire")


def scenario_manifest(scenario: str, nodes: int = 1) -> str:
    """The manifest with the interpreter and the nodes filled in (one node: everything on node1)."""
    text = (resources.files("membrane.lab") / "demos" / f"{scenario}.yaml").read_text()
    client_node = "node2" if nodes >= 2 else "node1"
    return (text.replace("{python}", sys.executable).replace("{server_node}", "node1")
            .replace("{client_node}", client_node))


async def run_demo(lab: Lab, scenario: str, say: Callable[[str], None]) -> None:
    objects = parse_manifest_text(scenario_manifest(scenario, len(lab.record.nodes)), source=f"{scenario}.yaml")
    store = await open_store(lab.store_url)
    try:
        client = ObjectClient(store)
        cluster_ip = ""
        for result in await client.apply(objects):
            say(f"{result.ref} {result.action}")
            if isinstance(result.object, k8s.Service):
                cluster_ip = result.object.spec.clusterIP or ""
        pods = {obj.name: obj for obj in objects if obj.kind == "Pod"}
        statuses = {}
        for pod_name in pods:
            statuses[pod_name] = (await wait_for_pod(store, "default", pod_name, timeout=60)).get("status") or {}
        say("")
        for pod_name, status in statuses.items():
            say(f"  {pod_name:<12} {status.get('phase'):<8} {status.get('podIP', '-'):<15} "
                f"on {(status.get('sandbox') or {}).get('node', '?')}")
        # The ships call the Death Star through its Service, as in Cilium's guide (by its cluster IP:
        # membrane has no DNS yet); every node load-balances it.
        server_ip = cluster_ip or statuses["deathstar"]["podIP"]
        server_node = (statuses["deathstar"].get("sandbox") or {}).get("node", "node1")
        say(f"  service deathstar: ClusterIP {server_ip} -> deathstar")
        await _wait_for_listener(statuses["tiefighter"]["sandbox"]["netns"], server_ip)

        async def ask(client_pod: str, method: str, path: str, meaning: str) -> None:
            reply = await _request(statuses[client_pod]["sandbox"]["netns"], method, f"http://{server_ip}{path}")
            say(f"  {client_pod} {method} {path}  ({meaning}): {reply}")

        say("")
        say("No policy yet: every ship may land.")
        for request in LANDINGS:
            await ask(*request)

        say("")
        policy = parse_manifest_text(scenario_manifest(f"{scenario}-policy"), source=f"{scenario}-policy.yaml")
        for result in await client.apply(policy):
            say(f"{result.ref} {result.action}: only org=empire may reach the deathstar, on TCP port 80")
        await _wait_enforcing(store, POLICY_NAME, server_node)
        say(f"  {server_node} enforces it.")
        for request in LANDINGS:
            await ask(*request)
        say("  (the X-wing's packets are dropped at the deathstar's node: no reply, the request times out)")
        await ask(*EXHAUST_PORT)
        say("  (an L3/L4 policy cannot tell a landing from an attack; Cilium's L7 rule can, but membrane has "
            "no L7 proxy yet)")

        prefix = f"membrane --lab {lab.record.name}"
        observe = f"{prefix} observe {' '.join(OBSERVE_FILTERS)}"
        say("")
        say(f"The drops, through the lab's relay ({lab.relay_address}), which sees every node:")
        say(f"$ {observe}")
        say(await _observe_drops(lab))
        endpoints, _ = await store.list(keys.ENDPOINTS)
        say("")
        say(f"{len(endpoints)} endpoints on {len(lab.record.nodes)} node(s). Look around:")
        for hint in (
            observe,
            f"{prefix} observe --from-pod default/xwing --print-node-name",
            f"{prefix} flows nodes",
            f"{prefix} get pods -o wide",
            f"{prefix} get cnp rule1 -n default -o yaml",
            f"{prefix} policy trace --from default/xwing --to service:default/deathstar --port 80/TCP",
            f"{prefix} service list --node {lab.record.nodes[-1].name}",
            f"{prefix} observe --to-service default/deathstar",
            f"{prefix} endpoint list",
            f"{prefix} identity list",
            f"{prefix} lab exec {server_node} -- nft list table inet membrane",
            f"membrane lab down --name {lab.record.name}",
        ):
            say(f"  {hint}")
    finally:
        await store.close()


async def _wait_enforcing(store: Store, name: str, node: str, timeout: float = POLICY_TIMEOUT) -> None:
    """Until ``node`` reports the policy in its kernel (``status.nodes[node].enforcing``)."""
    key = keys.object_key("ciliumnetworkpolicies", "default", name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kv = await store.get(key)
        status: dict[str, Any] = (json.loads(kv.value).get("status") or {}) if kv else {}
        if ((status.get("nodes") or {}).get(node) or {}).get("enforcing"):
            return
        await asyncio.sleep(0.1)
    raise MembraneError(f"{node} did not enforce CiliumNetworkPolicy default/{name} within {timeout:g} s")


async def _observe_drops(lab: Lab, timeout: float = OBSERVE_TIMEOUT) -> str:
    """Run the printed ``membrane observe`` once the relay has the drop (flows reach it within moments)."""
    argv = [sys.executable, "-m", "membrane", "--lab", lab.record.name, "observe", *OBSERVE_FILTERS]
    env = {k: v for k, v in os.environ.items() if k != "MEMBRANE_STORE"}
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        raw, _ = await proc.communicate()
        out = raw.decode().rstrip()
        if "DROPPED" in out:
            return out
        await asyncio.sleep(0.2)
    return out or "(no drop seen yet)"


async def _request(netns: str, method: str, url: str) -> str:
    argv = ["nsenter", f"--net={netns}", sys.executable, "-m", "membrane.lab.demoapp", "request", method, url]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode().strip()


async def _wait_for_listener(netns: str, server_ip: str, timeout: float = 15.0) -> None:
    """The server pod is Running once its process started; wait until it also accepts connections."""
    probe = (f"import socket; socket.create_connection(({json.dumps(server_ip)}, 80), timeout=1).close()")
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        proc = await asyncio.create_subprocess_exec("nsenter", f"--net={netns}", sys.executable, "-c", probe,
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if await proc.wait() == 0:
            return
        await asyncio.sleep(0.1)
