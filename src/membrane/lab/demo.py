"""Example applications for a lab: deploy, wait until they run, show them talking.

Each scenario is a manifest in ``lab/demos/`` applied exactly as a user would apply it, then a
few requests between its pods whose replies are printed, then what to try next.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from importlib import resources

from membrane.api.manifest import parse_manifest_text
from membrane.cli.pods import wait_for_pod
from membrane.lab.lab import Lab
from membrane.store import keys, open_store
from membrane.store.objects import ObjectClient

# (client pod, method, path, what the request means)
STARWARS_REQUESTS = (
    ("tiefighter", "POST", "/v1/request-landing", "an Empire ship asks to land"),
    ("xwing", "POST", "/v1/request-landing", "an Alliance ship asks to land"),
    ("tiefighter", "PUT", "/v1/exhaust-port", "a ship hits the exhaust port"),
)


def scenario_manifest(scenario: str) -> str:
    text = (resources.files("membrane.lab") / "demos" / f"{scenario}.yaml").read_text()
    return text.replace("{python}", sys.executable)


async def run_demo(lab: Lab, scenario: str, say: Callable[[str], None]) -> None:
    objects = parse_manifest_text(scenario_manifest(scenario), source=f"{scenario}.yaml")
    store = await open_store(lab.store_url)
    try:
        client = ObjectClient(store)
        for result in await client.apply(objects):
            say(f"{result.ref} {result.action}")
        pods = {obj.name: obj for obj in objects if obj.kind == "Pod"}
        statuses = {}
        for pod_name in pods:
            statuses[pod_name] = (await wait_for_pod(store, "default", pod_name, timeout=60)).get("status") or {}
        say("")
        for pod_name, status in statuses.items():
            say(f"  {pod_name:<12} {status.get('phase'):<8} {status.get('podIP', '-'):<15} "
                f"on {(status.get('sandbox') or {}).get('node', '?')}")
        server_ip = statuses["deathstar"]["podIP"]
        await _wait_for_listener(statuses["tiefighter"]["sandbox"]["netns"], server_ip)
        say("")
        for client_pod, method, path, meaning in STARWARS_REQUESTS:
            reply = await _request(statuses[client_pod]["sandbox"]["netns"], method, f"http://{server_ip}{path}")
            say(f"  {client_pod} {method} {path}  ({meaning}): {reply}")
        endpoints, _ = await store.list(keys.ENDPOINTS)
        say("")
        say(f"{len(endpoints)} endpoints on {len(lab.record.nodes)} node(s). Look around:")
        prefix = f"membrane --lab {lab.record.name}"
        for hint in (
            f"{prefix} get pods -o wide",
            f"{prefix} endpoint list",
            f"{prefix} identity list",
            f"{prefix} ip list",
            f"{prefix} observe --last 20",
            f"{prefix} observe --from-pod default/tiefighter -o json",
            f"{prefix} pod exec default/xwing -- ip route",
            f"{prefix} lab exec node1 -- nft list table inet membrane",
            f"membrane lab down --name {lab.record.name}",
        ):
            say(f"  {hint}")
    finally:
        await store.close()


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
