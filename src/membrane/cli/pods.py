"""``membrane pod run|exec|delete``: workloads for the built-in runner.

``pod run`` writes a Pod object (exactly what ``apply`` of a Pod with a command writes) and waits
for the node's agent to report it Running; ``pod exec`` runs a command in the pod's network
namespace on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from typing import Any

import click

from membrane.api.registry import ObjectInvalid, kind_info, validate_object
from membrane.cli.context import CliContext, pass_cli, run_async
from membrane.core.errors import AlreadyExists, InvalidInput, MembraneError, NotFound
from membrane.store import keys
from membrane.store.base import Store
from membrane.store.objects import ObjectClient

_PORT = re.compile(
    r"^(?:(?P<name>[a-z0-9]([-a-z0-9]*[a-z0-9])?):)?(?P<port>\d+)(?:/(?P<proto>TCP|UDP|SCTP|tcp|udp|sctp))?$"
)


def parse_pod_ref(ref: str) -> tuple[str, str]:
    namespace, sep, name = ref.partition("/")
    if not sep or not namespace or not name:
        raise InvalidInput([f"{ref!r}: expected NAMESPACE/NAME"])
    return namespace, name


def build_pod(name: str, namespace: str, node: str | None, labels: tuple[str, ...], ports: tuple[str, ...],
              command: tuple[str, ...]) -> dict[str, Any]:
    label_map: dict[str, str] = {}
    problems = []
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"-l {item}: expected key=value")
        label_map[key] = value
    port_list = []
    for item in ports:
        match = _PORT.match(item)
        if not match:
            problems.append(f"--port {item}: expected [name:]port[/TCP|UDP|SCTP]")
            continue
        port: dict[str, Any] = {"containerPort": int(match["port"]), "protocol": (match["proto"] or "TCP").upper()}
        if match["name"]:
            port["name"] = match["name"]
        port_list.append(port)
    if problems:
        raise InvalidInput(problems)
    container: dict[str, Any] = {"name": name, "image": "membrane/runner"}
    if command:
        container["command"] = list(command)
    if port_list:
        container["ports"] = port_list
    pod: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, **({"labels": label_map} if label_map else {})},
        "spec": {"containers": [container], **({"nodeName": node} if node else {})},
    }
    return pod


async def wait_for_pod(store: Store, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """Poll until the pod is Running (or finished); MembraneError naming its phase on timeout."""
    key = keys.object_key("pods", namespace, name)
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        kv = await store.get(key)
        if kv is None:
            raise NotFound(f'pods "{name}" not found')
        obj = json.loads(kv.value)
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Running", "Succeeded", "Failed"):
            return obj
        await asyncio.sleep(0.05)
    phase = (obj.get("status") or {}).get("phase") or "Pending"
    node = (obj.get("spec") or {}).get("nodeName") or "no node yet"
    raise MembraneError(f"pod {namespace}/{name} is still {phase} after {timeout:g}s ({node}); is its agent running?")


@click.group("pod")
def pod() -> None:
    """Run, enter and delete pods (the built-in runner)."""


@pod.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--node", help="Place the pod on this node (default: spread over ready nodes).")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE")
@click.option("--port", "ports", multiple=True, metavar="NAME:PORT/PROTO")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the pod is Running.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_cli
@run_async
async def pod_run(cli: CliContext, name: str, namespace: str, node: str | None, labels: tuple[str, ...],
                  ports: tuple[str, ...], wait: bool, timeout: float, command: tuple[str, ...]) -> None:
    """Start a pod running COMMAND in its own network namespace: pod run NAME -n NS -- CMD [ARGS...]"""
    data = build_pod(name, namespace, node, labels, ports, command)
    try:
        obj = validate_object(data, kind_info("Pod"))
    except ObjectInvalid as exc:
        raise InvalidInput([f"pod {namespace}/{name}: {line}" for line in exc.problems]) from None
    store = await cli.open_store()
    try:
        client = ObjectClient(store)
        if await client.find("Pod", namespace, name) is not None:
            raise AlreadyExists(f'pods "{name}" already exists in namespace {namespace}')
        if node and await client.find("CiliumNode", None, node) is None:
            raise NotFound(f'node "{node}" not found (membrane node list shows the nodes)')
        await client.apply([obj])
        if not wait:
            click.echo(f"pod/{name} created")
            return
        status = (await wait_for_pod(store, namespace, name, timeout)).get("status") or {}
        click.echo(f"pod/{name} created ({status.get('podIP', 'no IP')} on "
                   f"{(status.get('sandbox') or {}).get('node', '?')}, {status.get('phase')})")
    finally:
        await store.close()


@pod.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("ref", metavar="NS/NAME")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_cli
def pod_exec(cli: CliContext, ref: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside the pod's network namespace: pod exec NS/NAME -- CMD [ARGS...]"""
    try:
        netns = asyncio.run(_pod_netns(cli, ref))
    except MembraneError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    try:
        os.execvp("nsenter", ["nsenter", f"--net={netns}", "--", *command])
    except OSError as exc:
        click.echo(f"Error: cannot run {command[0]}: {exc.strerror}", err=True)
        sys.exit(1)


async def _pod_netns(cli: CliContext, ref: str) -> str:
    namespace, name = parse_pod_ref(ref)
    store = await cli.open_store()
    try:
        kv = await store.get(keys.object_key("pods", namespace, name))
    finally:
        await store.close()
    if kv is None:
        raise NotFound(f'pods "{name}" not found in namespace {namespace}')
    status = json.loads(kv.value).get("status") or {}
    netns = (status.get("sandbox") or {}).get("netns")
    if status.get("phase") != "Running" or not netns:
        raise MembraneError(f"pod {ref} is not running (phase {status.get('phase') or 'Pending'})")
    if not os.path.exists(netns):
        node = (status.get("sandbox") or {}).get("node", "its node")
        raise MembraneError(f"pod {ref} runs on {node}: its network namespace {netns} is not on this machine")
    return str(netns)


@pod.command("delete")
@click.argument("ref", metavar="NS/NAME")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the pod's endpoint is gone.")
@click.option("--timeout", default=30.0, show_default=True)
@pass_cli
@run_async
async def pod_delete(cli: CliContext, ref: str, wait: bool, timeout: float) -> None:
    """Delete a pod: its processes stop, its endpoint and network namespace are removed."""
    namespace, name = parse_pod_ref(ref)
    store = await cli.open_store()
    try:
        deleted = await ObjectClient(store).delete("Pod", namespace, name)
        uid = deleted.metadata.uid
        node = deleted.model_dump().get("spec", {}).get("nodeName")
        if wait and uid and node:
            deadline = time.monotonic() + timeout
            while await store.get(keys.endpoint_key(node, uid)) is not None:
                if time.monotonic() > deadline:
                    raise MembraneError(f"pod {ref} was deleted but node {node} has not released it after {timeout:g}s")
                await asyncio.sleep(0.05)
        click.echo(f'pod "{name}" deleted')
    finally:
        await store.close()


COMMANDS = [pod]
