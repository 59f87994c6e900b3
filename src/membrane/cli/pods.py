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
@click.option("--grace-period", type=int, default=-1, show_default=True,
              help="Seconds the pod's processes get between SIGTERM and SIGKILL (-1: the pod's "
                   "terminationGracePeriodSeconds, 30 by default; 0: remove the pod at once).")
@click.option("--force", is_flag=True, help="Remove the pod object at once (--grace-period 0).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the pod is gone: processes stopped, endpoint released, object removed.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait (default: the grace period + 30).")
@pass_cli
@run_async
async def pod_delete(cli: CliContext, ref: str, grace_period: int, force: bool, wait: bool,
                     timeout: float | None) -> None:
    """Delete a pod: its processes get SIGTERM, and SIGKILL once the grace period is over; then its
    endpoint, network namespace and object are removed. Meanwhile `get pods` shows it Terminating."""
    namespace, name = parse_pod_ref(ref)
    grace = 0 if force else (None if grace_period < 0 else grace_period)
    store = await cli.open_store()
    try:
        deleted = await ObjectClient(store).delete("Pod", namespace, name, grace_period=grace)
        uid = deleted.metadata.uid
        node = deleted.model_dump().get("spec", {}).get("nodeName")
        if wait and uid:
            limit = timeout if timeout is not None else (deleted.metadata.deletionGracePeriodSeconds or 0) + 30
            await _wait_gone(store, namespace, name, uid, node, limit)
        click.echo(f'pod "{name}" deleted')
    finally:
        await store.close()


async def _wait_gone(store: Store, namespace: str, name: str, uid: str, node: str | None, timeout: float) -> None:
    """Until the pod object of ``uid`` is removed and its node has released its endpoint."""
    deadline = time.monotonic() + timeout
    pod_key = keys.object_key("pods", namespace, name)
    while True:
        kv = await store.get(pod_key)
        present = kv is not None and (json.loads(kv.value).get("metadata") or {}).get("uid") == uid
        if not present and not (node and await store.get(keys.endpoint_key(node, uid)) is not None):
            return
        if time.monotonic() > deadline:
            where = f"node {node}" if node else "its node"
            raise MembraneError(f"pod {namespace}/{name} was deleted but {where} has not released it after "
                                f"{timeout:g}s")
        await asyncio.sleep(0.05)


COMMANDS = [pod]
