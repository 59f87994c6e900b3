"""Inspection commands (mirroring cilium-dbg): status, node list, endpoint list, identity list, ip list,
tunnel list.

Cluster-wide facts come from the store, so these work from any host that reaches it; ``status``
also asks the node's agent over its API socket for what only the agent knows.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.cli.context import CliContext, pass_cli, run_async
from membrane.cli.printers import format_table, human_duration
from membrane.core.config import DEFAULT_RUN_DIR
from membrane.core.errors import InvalidInput
from membrane.identity.ipcache import EndpointAddress, NodeAddresses, build_ipcache
from membrane.identity.labels import Label
from membrane.identity.reserved import MAX_CLUSTER_IDENTITY, MIN_CLUSTER_IDENTITY, RESERVED, RESERVED_BY_ID
from membrane.ipam.pool import router_ip
from membrane.store import keys
from membrane.store.base import Store
from membrane.store.identities import decode_identity
from membrane.store.objects import decode


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(line.rstrip() for line in format_table(headers, rows).splitlines())


@dataclass(frozen=True)
class NodeView:
    name: str
    node_ip: str
    pod_cidrs: list[str]
    routing: str
    ready: bool
    last_heartbeat: float | None
    mtu: int


@dataclass(frozen=True)
class ClusterView:
    nodes: list[NodeView]
    endpoints: list[EndpointRecord]
    identities: dict[int, frozenset[Label]]
    revision: int


async def load_cluster_view(store: Store) -> ClusterView:
    node_kvs, revision = await store.list(keys.objects_prefix("ciliumnodes"))
    beat_kvs, _ = await store.list(keys.HEARTBEATS)
    beats = {kv.key.removeprefix(keys.HEARTBEATS): json.loads(kv.value) for kv in beat_kvs}
    nodes = []
    for kv in node_kvs:
        node = decode(kv)
        if not isinstance(node, CiliumNode):
            continue
        node_ip = node.internal_ip()
        # What the agent adds to its node's status beyond Cilium's fields (routing mode, MTU).
        extra = (node.status.model_extra if node.status is not None else None) or {}
        beat = beats.get(node.name)
        nodes.append(NodeView(
            name=node.name, node_ip=str(node_ip) if node_ip is not None else "",
            pod_cidrs=list(node.spec.ipam.podCIDRs or ()) if node.spec.ipam is not None else [],
            routing=str(extra.get("routing", "")), ready=beat is not None,
            last_heartbeat=beat.get("time") if beat else None, mtu=int(extra.get("mtu", 0)),
        ))
    endpoints = []
    for kv in (await store.list(keys.ENDPOINTS))[0]:
        try:
            endpoints.append(EndpointRecord.from_json(kv.value))
        except (ValueError, TypeError, KeyError):
            continue
    identities = dict(decode_identity(kv) for kv in (await store.list(keys.IDENTITY_BY_ID))[0])
    return ClusterView(sorted(nodes, key=lambda n: n.name), endpoints, identities, revision)


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(int(now - ts), 0)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def format_node_list(view: ClusterView, now: float) -> str:
    rows = [[n.name, n.node_ip, ",".join(n.pod_cidrs), n.routing, "Ready" if n.ready else "NotReady",
             _age(n.last_heartbeat, now)] for n in view.nodes]
    return render_table(["NAME", "IPv4 ADDRESS", "POD CIDR", "ROUTING", "HEALTH", "LAST HEARTBEAT"], rows)


def _label_lines(labels: list[str] | tuple[str, ...]) -> str:
    return "\n".join(labels) if labels else "no labels"


def format_endpoint_list(view: ClusterView, node: str | None,
                         enforcement: Mapping[str, tuple[str, str]] | None = None) -> str:
    """``enforcement``: ``NS/POD`` → (ingress, egress) policy enforcement (``policy_cmd.enforcement_columns``);
    endpoints missing from it (not ready) show Disabled."""
    rows = []
    endpoints = sorted(view.endpoints, key=lambda e: (e.node, e.endpoint_id))
    for ep in endpoints:
        if node and ep.node != node:
            continue
        ingress, egress = (enforcement or {}).get(f"{ep.namespace}/{ep.pod}", ("Disabled", "Disabled"))
        rows.append([str(ep.endpoint_id), ingress, egress, str(ep.identity), _label_lines(ep.labels),
                     "", str(ep.ipv4), ep.state, ep.node, f"{ep.namespace}/{ep.pod}"])
    headers = ["ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IDENTITY", "LABELS (source:key[=value])",
               "IPv6", "IPv4", "STATUS", "NODE", "POD"]
    text = render_table(headers, rows)
    # cilium-dbg prints the enforcement header on two lines; keep the data columns aligned.
    return text


def format_identity_list(view: ClusterView) -> str:
    rows = [[str(r.id), f"reserved:{r.name}"] for r in RESERVED]
    for identity in sorted(view.identities):
        rows.append([str(identity), _label_lines(sorted(str(lbl) for lbl in view.identities[identity]))])
    return render_table(["ID", "LABELS"], rows)


def _identity_text(identity: int, identities: dict[int, frozenset[Label]], numeric: bool) -> str:
    if numeric:
        return str(identity)
    reserved = RESERVED_BY_ID.get(identity)
    if reserved is not None:
        return f"reserved:{reserved.name}"
    labels = identities.get(identity)
    return _label_lines(sorted(str(lbl) for lbl in labels)) if labels else str(identity)


def format_ip_list(view: ClusterView, node: str | None, numeric: bool) -> str:
    nodes = []
    for n in view.nodes:
        if not n.node_ip:
            continue
        cidr = ipaddress.IPv4Network(n.pod_cidrs[0]) if n.pod_cidrs else None
        nodes.append(NodeAddresses(n.name, ipaddress.IPv4Address(n.node_ip), router_ip(cidr) if cidr else None))
    node_ips = {n.name: n.node_ip for n in view.nodes}
    endpoints = [EndpointAddress(ep.ipv4, ep.identity, node_ips.get(ep.node, "")) for ep in view.endpoints
                 if ep.state in ("ready", "creating")]
    entries = build_ipcache(endpoints, nodes, node)
    rows = [[str(e.prefix), _identity_text(e.identity, view.identities, numeric), e.source] for e in entries]
    return render_table(["IP", "IDENTITY", "SOURCE"], rows)


def format_tunnel_list(view: ClusterView, node: str | None) -> str:
    """``cilium-dbg bpf tunnel list``: pod CIDR → node IP. With ``node``, what that node programs (every
    other node's entry); without, every node's. In native routing mode the same pairs are the routes'
    next hops."""
    if node is not None and node not in {n.name for n in view.nodes}:
        raise InvalidInput([f"node {node} is not in the cluster (membrane node list)"])
    entries = []
    for n in view.nodes:
        if n.name == node or not n.node_ip or not n.pod_cidrs:
            continue
        try:
            cidr = ipaddress.IPv4Network(n.pod_cidrs[0])
        except ValueError:
            continue
        entries.append((int(cidr.network_address), cidr.prefixlen, str(cidr), n.node_ip))
    rows = [[cidr, node_ip] for _, _, cidr, node_ip in sorted(entries)]
    return render_table(["TUNNEL", "VALUE"], rows)


def agent_socket_for(cli: CliContext, node: str | None) -> Path:
    """The API socket of ``node``'s agent: the lab's record knows it, else the host's default."""
    lab = cli.lab_record()
    if lab is not None:
        for lab_node in lab.nodes:
            if node is None or lab_node.name == node:
                return lab_node.socket
        raise InvalidInput([f"lab {lab.name} has no node {node}"])
    if node:
        raise InvalidInput([f"node {node}: its agent's API socket is only reachable on that host"])
    return DEFAULT_RUN_DIR / "agent.sock"


def format_status(view: ClusterView, store_url: str, agent: dict[str, Any] | None, agent_error: str,
                  verbose: bool, now: float | None = None) -> str:
    now = time.time() if now is None else now
    ready = sum(n.ready for n in view.nodes)
    lines = [("KVStore", f"Ok   {store_url} (revision {view.revision})"),
             ("Kubernetes", "Disabled")]
    if agent is None:
        lines.append(("Membrane", f"Unavailable   {agent_error}"))
    else:
        controllers = agent.get("controllers", {})
        reconcilers = [r for r in agent.get("reconcilers", []) if r.get("kind") == "reconciler"]
        healthy = sum(1 for c in controllers.values() if c.get("healthy"))
        failing_rows = sum(int(r.get("errors", 0)) for r in reconcilers)
        ipam = agent.get("ipam", {})
        lines += [
            ("Membrane", f"Ok   node {agent['node']} ({agent['nodeIP']} on {agent.get('device', '?')}), "
                         f"agent pid {agent.get('pid')}"),
            ("IPAM", f"IPv4: {ipam.get('allocated', 0)}/{ipam.get('capacity', 0)} allocated from {agent['podCIDR']}"),
            ("Routing", f"Network: {'Tunnel [vxlan]' if agent.get('routing') == 'vxlan' else 'Native'}   "
                        f"Host: Legacy   MTU: {agent.get('mtu')}"),
            ("Endpoints", f"{agent.get('endpoints', {}).get('ready', 0)}/"
                          f"{agent.get('endpoints', {}).get('total', 0)} ready"),
            ("Datapath", str((agent.get("datapath") or {}).get("summary", "unknown"))),
            ("Operator role", "held by this node" if agent.get("operator") else "held by another node"),
            ("Cluster config", _cluster_config_line(agent.get("clusterConfig") or {})),
            ("Controller Status", f"{healthy}/{len(controllers)} healthy"),
            ("Reconcilers", f"{len(reconcilers) - sum(1 for r in reconcilers if r.get('errors'))}/{len(reconcilers)}"
                            f" healthy, {failing_rows} objects failing"),
        ]
    lines += [("Global Identity Range", f"min {MIN_CLUSTER_IDENTITY}, max {MAX_CLUSTER_IDENTITY}"),
              ("Cluster health", f"{ready}/{len(view.nodes)} nodes ready")]
    if verbose and agent is not None:
        for name, ctrl in sorted(agent.get("controllers", {}).items()):
            state = "healthy" if ctrl.get("healthy") else f"failing: {ctrl.get('lastError')}"
            lines.append((f"  {name}", f"{state} (restarts {ctrl.get('restarts', 0)})"))
    width = max(len(k) for k, _ in lines) + 2
    text = "\n".join(f"{(k + ':').ljust(width)}{v}" for k, v in lines)
    if verbose and agent is not None and agent.get("reconcilers"):
        text += "\n" + format_reconcilers(agent["reconcilers"], now)
    return text


def _cluster_config_line(config: dict[str, Any]) -> str:
    revision, applied = config.get("revision", 0), config.get("appliedRevision", 0)
    state = "Ok" if applied >= revision else "Applying"
    return f"{state}   revision {revision}, applied {applied}"


def format_reconcilers(entries: list[dict[str, Any]], now: float) -> str:
    """``status --verbose``: every controller and reconciler, as ``cilium-dbg status --verbose`` lists
    its controllers — when it last succeeded, its failures and their message."""
    rows = []
    for entry in entries:
        name = f"{entry.get('module')}/{entry.get('name')}"
        if entry.get("kind") == "reconciler":
            failing = entry.get("failing") or []
            message = "; ".join(f"{f['key']}: {f['message']}" for f in failing[:3]) or (
                f"last error: {entry['lastError']}" if entry.get("lastError") else "no error")
            last_full = entry.get("lastFullSync") or 0
            rows.append([name, "reconciler",
                         f"{entry.get('done', 0)}/{entry.get('rows', 0)}",
                         f"{human_duration(now - last_full)} ago" if last_full else "never",
                         str(entry.get("errors", 0)), str(sum(int(f.get("retries", 0)) for f in failing)), message])
        else:
            rows.append([name, "controller", "-", "-", str(entry.get("restarts", 0)), "-",
                         entry.get("lastError") or f"{entry.get('runs', 0)} runs, no error"])
    return "Controllers and reconcilers:\n" + format_table(
        ["NAME", "KIND", "DONE/ROWS", "LAST FULL SYNC", "FAILING", "RETRIES", "MESSAGE"], rows)


@click.command("status")
@click.option("--verbose", is_flag=True)
@click.option("--node", help="Which node's agent to ask (lab or local host).")
@pass_cli
@run_async
async def status(cli: CliContext, verbose: bool, node: str | None) -> None:
    """Health of the store, this node's agent and the cluster."""
    from membrane.cni.client import AgentClient, AgentClientError

    store = await cli.open_store()
    try:
        view = await load_cluster_view(store)
    finally:
        await store.close()
    agent: dict[str, Any] | None = None
    error = ""
    try:
        agent = AgentClient(str(agent_socket_for(cli, node)), timeout=5).status()
    except (AgentClientError, InvalidInput) as exc:
        error = str(exc)
    click.echo(format_status(view, store.url, agent, error, verbose))


@click.group("node")
def node_group() -> None:
    """Cluster nodes."""


@node_group.command("list")
@pass_cli
@run_async
async def node_list(cli: CliContext) -> None:
    """Nodes with address, pod CIDR, routing mode and health."""
    store = await cli.open_store()
    try:
        click.echo(format_node_list(await load_cluster_view(store), time.time()))
    finally:
        await store.close()


@click.group("endpoint")
def endpoint_group() -> None:
    """Endpoints (pods attached to the network)."""


@endpoint_group.command("list")
@click.option("--node", help="Only this node's endpoints.")
@pass_cli
@run_async
async def endpoint_list(cli: CliContext, node: str | None) -> None:
    """Endpoints with policy enforcement, identity, labels, address and state."""
    from membrane.cli.policy_cmd import enforcement_columns, load_policy_view

    store = await cli.open_store()
    try:
        # Enforcement is computed from the same store state with the agents' compiler.
        enforcement = enforcement_columns(await load_policy_view(store))
        click.echo(format_endpoint_list(await load_cluster_view(store), node, enforcement))
    finally:
        await store.close()


@click.group("identity")
def identity_group() -> None:
    """Security identities."""


@identity_group.command("list")
@pass_cli
@run_async
async def identity_list(cli: CliContext) -> None:
    """Reserved and allocated identities with their labels."""
    store = await cli.open_store()
    try:
        click.echo(format_identity_list(await load_cluster_view(store)))
    finally:
        await store.close()


@click.group("ip")
def ip_group() -> None:
    """The ipcache: address -> identity."""


@ip_group.command("list")
@click.option("-n", "numeric", is_flag=True, help="Print identities as numbers.")
@click.option("--node", help="The view of this node (host vs remote-node).")
@pass_cli
@run_async
async def ip_list(cli: CliContext, numeric: bool, node: str | None) -> None:
    """Every known prefix with its identity and where it came from."""
    store = await cli.open_store()
    try:
        click.echo(format_ip_list(await load_cluster_view(store), node, numeric))
    finally:
        await store.close()


@click.group("tunnel")
def tunnel_group() -> None:
    """Tunnels to the other nodes: pod CIDR -> node IP."""


@tunnel_group.command("list")
@click.option("--node", help="The tunnels of this node (every other node's pod CIDR).")
@pass_cli
@run_async
async def tunnel_list(cli: CliContext, node: str | None) -> None:
    """Each node's pod CIDR and the node IP it is reached through."""
    store = await cli.open_store()
    try:
        click.echo(format_tunnel_list(await load_cluster_view(store), node))
    finally:
        await store.close()


def format_service_list(frontends: list[dict[str, Any]]) -> str:
    """``cilium-dbg service list``: one row per frontend, one line per backend with its state."""
    rows: list[list[str]] = []
    for entry in frontends:
        backends = entry.get("backends") or []
        first = [str(entry["id"]), entry["frontend"], entry["type"], entry["service"]]
        if not backends:
            rows.append([*first, "(none)"])
            continue
        for index, backend in enumerate(backends):
            state = backend["state"]
            if backend.get("internalOnly"):
                state += ", this node's pods only"
            elif not backend.get("selected") and state == "active":
                state = "not selected"
            line = f"{index + 1} => {backend['address']}/{entry['frontend'].rsplit('/', 1)[1]} ({state})"
            rows.append([*(first if index == 0 else ["", "", "", ""]), line])
    return render_table(["ID", "FRONTEND", "SERVICE TYPE", "SERVICE", "BACKEND"], rows)


@click.group("service")
def service_group() -> None:
    """Service load balancing as one node's agent programs it."""


@service_group.command("list")
@click.option("--node", help="Which node's agent to ask (lab or local host).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@pass_cli
def service_list(cli: CliContext, node: str | None, output: str) -> None:
    """Frontends (ClusterIP, NodePort, LoadBalancer, external IPs) with their backends and state."""
    import json

    from membrane.cni.client import AgentClient, AgentClientError

    try:
        agent = AgentClient(str(agent_socket_for(cli, node)), timeout=5).status()
    except AgentClientError as exc:
        raise InvalidInput([f"agent of node {node or 'local'}: {exc}"]) from None
    frontends = list(agent.get("services") or [])
    if output == "json":
        click.echo(json.dumps(frontends, indent=2))
    else:
        click.echo(format_service_list(frontends))


COMMANDS = [status, node_group, endpoint_group, identity_group, ip_group, tunnel_group, service_group]
