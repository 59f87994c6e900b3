"""``membrane policy get|selectors|trace`` (mirroring ``cilium-dbg policy``), from the store.

Everything here is computed from the store's current state with the agents' own compiler
(:class:`membrane.policy.compiler.PolicyCompiler`): the same objects, identities, endpoint records
and pods give the same endpoint policies, so a trace agrees with what the kernels enforce once
the agents have synced that revision.

Primitives: :class:`StorePolicyView` and :func:`load_policy_view` (the inputs read from the store,
compiled), :func:`imported_rules` (the rules as ``policy get`` prints them),
:func:`format_selectors`, :func:`trace_text`, :func:`enforcement_columns` (``endpoint list``),
:func:`load_service` and :func:`service_trace_text` (``--to service:NS/NAME``: one trace per
backend, the backends derived from the store as the agents derive them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Any

import click

from membrane.api import k8s
from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.api.meta import ApiObject
from membrane.api.registry import POLICY_PLURALS
from membrane.cli.context import CliContext, pass_cli, run_async
from membrane.cli.printers import format_table
from membrane.core.config import ClusterConfig
from membrane.core.errors import InvalidInput, StoreError
from membrane.identity.labels import Label, parse_labels
from membrane.loadbalancer.endpointslices import derive_endpoint_slices, slice_backends
from membrane.policy import (
    CIDRSelector,
    DirectionPolicy,
    EndpointPolicy,
    IpcacheInterval,
    PolicyRule,
    Selector,
    flatten_ipcache,
    format_service_trace,
    format_trace,
    parse_port,
    resolve_peer,
    trace,
    trace_service,
)
from membrane.policy.compiler import PolicyCompiler, enforcement_config, ipcache_entries, policy_endpoint
from membrane.policy.rules import RuleOrigin
from membrane.store import keys
from membrane.store.base import KeyValue, Store
from membrane.store.identities import decode_identity
from membrane.store.objects import decode


@dataclass
class StorePolicyView:
    """The store's policy inputs at one revision, compiled for every endpoint of the cluster."""

    compiler: PolicyCompiler
    records: list[EndpointRecord]
    pods: dict[tuple[str, str], k8s.Pod]
    nodes: dict[str, CiliumNode]
    revision: int  # the newest modification of a policy object (0: none)

    def endpoint_policies(self) -> dict[str, EndpointPolicy]:
        """Every ready endpoint's policy, keyed ``NS/POD``."""
        ready = [r for r in self.records if r.state == "ready"]
        return self.compiler.endpoint_policies((policy_endpoint(r, self.pods), parse_labels(r.labels)) for r in ready)

    def intervals(self, node: str | None) -> tuple[IpcacheInterval, ...]:
        """The ipcache as ``node`` sees it (its own addresses are host, the others remote-node)."""
        entries = ipcache_entries(self.records, self.nodes.values(), node, self.compiler.compiled.cidr_identities)
        return flatten_ipcache(entries)

    def record(self, ref: str) -> EndpointRecord | None:
        for record in self.records:
            if f"{record.namespace}/{record.pod}" == ref and record.state == "ready":
                return record
        return None


async def _cluster_config(store: Store) -> ClusterConfig:
    kv = await store.get(keys.CLUSTER_CONFIG)
    if kv is None:
        return ClusterConfig()
    try:
        return ClusterConfig.model_validate_json(kv.value)
    except ValueError:
        return ClusterConfig()


def _decoded(kvs: Iterable[KeyValue]) -> Iterable[tuple[KeyValue, ApiObject]]:
    """The stored objects decoded once with their models; one that does not decode is left out, as
    the agents leave it out."""
    for kv in kvs:
        try:
            yield kv, decode(kv)
        except StoreError:
            continue


async def load_policy_view(store: Store) -> StorePolicyView:
    policies: dict[str, ApiObject] = {}
    revision = 0
    for plural in POLICY_PLURALS:
        kvs, _ = await store.list(keys.objects_prefix(plural))
        for kv, obj in _decoded(kvs):
            policies[kv.key] = obj
            revision = max(revision, kv.mod_revision)
    identities: dict[int, frozenset[Label]] = {}
    for kv in (await store.list(keys.IDENTITY_BY_ID))[0]:
        try:
            identity, labels = decode_identity(kv)
        except (ValueError, TypeError):
            continue
        identities[identity] = labels
    records = []
    for kv in (await store.list(keys.ENDPOINTS))[0]:
        try:
            records.append(EndpointRecord.from_json(kv.value))
        except (ValueError, TypeError, KeyError):
            continue
    pods = {(obj.namespace or "default", obj.name): obj
            for _, obj in _decoded((await store.list(keys.objects_prefix("pods")))[0]) if isinstance(obj, k8s.Pod)}
    nodes = {obj.name: obj for _, obj in _decoded((await store.list(keys.objects_prefix("ciliumnodes")))[0])
             if isinstance(obj, CiliumNode)}
    cluster = await _cluster_config(store)
    compiler = PolicyCompiler(cluster_name=cluster.clusterName, config=enforcement_config(cluster))
    compiler.update(policies, identities, records, pods)
    return StorePolicyView(compiler, records, pods, nodes, revision)


# --- policy get ----------------------------------------------------------------------------------------


def selector_json(selector: Selector) -> dict[str, Any]:
    """A selector as a label selector with ``source:key`` keys, as ``cilium-dbg policy get`` shows."""
    labels: dict[str, str] = {}
    expressions: list[dict[str, Any]] = []
    for req in selector.requirements:
        if req.operator == "In" and len(req.values) == 1 and req.qualified_key not in labels:
            labels[req.qualified_key] = req.values[0]
        else:
            expression: dict[str, Any] = {"key": req.qualified_key, "operator": req.operator}
            if req.values:
                expression["values"] = list(req.values)
            expressions.append(expression)
    out: dict[str, Any] = {}
    if labels:
        out["matchLabels"] = labels
    if expressions:
        out["matchExpressions"] = expressions
    return out


def _entry(rule: PolicyRule) -> dict[str, Any]:
    side = "from" if rule.direction == "ingress" else "to"
    entry: dict[str, Any] = {}
    selectors = [selector_json(s) for s in rule.endpoints]
    selectors += [selector_json(p) for p in rule.peers if isinstance(p, Selector)]
    if selectors:
        entry[f"{side}Endpoints"] = selectors
    cidrs = [p for p in rule.peers if isinstance(p, CIDRSelector)]
    if cidrs:
        entry[f"{side}CIDRSet"] = [
            {"cidr": str(c.prefix), **({"except": [str(e) for e in c.excepts]} if c.excepts else {})} for c in cidrs
        ]
    if rule.addresses:  # NetworkPolicy ipBlock: matched against the peer's address, pods included
        entry["ipBlocks"] = [
            {"cidr": str(b.prefix), **({"except": [str(e) for e in b.excepts]} if b.excepts else {}), "path": b.path}
            for b in rule.addresses
        ]
    if rule.requires:
        entry[f"{side}Requires"] = [selector_json(Selector(rule.requires))]
    if rule.unsupported:
        entry["unsupported"] = list(rule.unsupported)
    if rule.l4 is not None:
        ports = []
        for l4 in rule.l4:
            specs = []
            for spec in l4.ports:
                port: dict[str, Any] = {"port": str(spec.port), "protocol": spec.protocol}
                if spec.end_port:
                    port["endPort"] = spec.end_port
                specs.append(port)
            port_rule: dict[str, Any] = {"ports": specs}
            if l4.l7 is not None:
                port_rule["rules"] = l4.l7.rules.model_dump(mode="json", exclude_none=True)
            ports.append(port_rule)
        entry["toPorts"] = ports
    return entry


def _labels(origin: RuleOrigin) -> list[dict[str, str]]:
    labels = []
    for text in origin.labels():
        source, _, rest = text.partition(":")
        key, _, value = rest.partition("=")
        labels.append({"key": key, "value": value, "source": source})
    return labels


def imported_rules(rules: Iterable[PolicyRule], namespace: str | None = None) -> list[dict[str, Any]]:
    """The engine's rules grouped back into one Cilium rule per policy rule (``spec``/``specs[i]``)."""
    grouped: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for rule in rules:
        origin = rule.origin
        if namespace is not None and origin.namespace != namespace:
            continue
        key = (origin.kind, origin.namespace, origin.name, origin.index)
        item = grouped.get(key)
        if item is None:
            selector_key = "nodeSelector" if rule.host else "endpointSelector"
            item = grouped[key] = {selector_key: selector_json(rule.subject), "labels": _labels(origin)}
            if origin.log:
                item["log"] = {"value": origin.log}
        section = rule.direction + ("Deny" if rule.action == "deny" else "")
        item.setdefault(section, []).append(_entry(rule))
    return [grouped[k] for k in sorted(grouped)]


# --- policy selectors ------------------------------------------------------------------------------------


def format_selectors(view: StorePolicyView) -> str:
    """``SELECTOR  LABELS  USERS  IDENTITIES``: every selector of the imported rules, the policies
    owning it, how many rules use it and the identities it selects now."""
    owners: dict[Selector | CIDRSelector, set[str]] = {}
    users: dict[Selector | CIDRSelector, int] = {}
    cache = view.compiler.compiled.cache
    for rule in view.compiler.rules:
        for selector in rule.selectors():
            owners.setdefault(selector, set()).add(rule.origin.policy)
            users[selector] = users.get(selector, 0) + 1
    rows = []
    for selector in sorted(owners, key=str):
        selected = sorted(cache.select(selector))
        rows.append([str(selector), "\n".join(sorted(owners[selector])), str(users[selector]),
                     "\n".join(str(i) for i in selected)])
    text = format_table(["SELECTOR", "LABELS", "USERS", "IDENTITIES"], rows)
    return "\n".join(line.rstrip() for line in text.splitlines())


# --- policy trace ---------------------------------------------------------------------------------------


def trace_text(view: StorePolicyView, source: str, destination: str, port: str) -> str:
    """``membrane policy trace``: the ipcache is the one of the node the decision is made on (the
    destination pod's node, else the source pod's), so node addresses resolve as that node sees them."""
    protocol, number = parse_port(port)
    policies = view.endpoint_policies()
    node = None
    for ref in (destination, source):
        record = view.record(ref)
        if record is not None:
            node = record.node
            break
    for ref in (source, destination):
        if "/" in ref and not ref.replace("/", "").replace(".", "").isdigit() and ref not in policies:
            raise InvalidInput([f"no ready endpoint {ref} (membrane endpoint list)"])
    intervals = view.intervals(node)
    addresses: dict[IPv4Address, str] = {r.ipv4: f"{r.namespace}/{r.pod}" for r in view.records if r.state == "ready"}
    src = resolve_peer(source, policies, intervals, addresses)
    dst = resolve_peer(destination, policies, intervals, addresses)
    return format_trace(trace(src, dst, protocol, number))


SERVICE_PREFIX = "service:"


def _service_ref(text: str) -> tuple[str, str]:
    ref = text.removeprefix(SERVICE_PREFIX)
    namespace, _, name = ref.rpartition("/")
    if not name:
        raise InvalidInput([f"{text!r}: expected service:NS/NAME"])
    return namespace or "default", name


async def load_service(store: Store, text: str) -> tuple[k8s.Service, list[k8s.EndpointSlice]]:
    """The Service ``service:NS/NAME`` names and the EndpointSlices users applied for it."""
    namespace, name = _service_ref(text)
    kv = await store.get(keys.object_key("services", namespace, name))
    service = next((obj for _, obj in _decoded([kv] if kv is not None else [])), None)
    if not isinstance(service, k8s.Service):
        raise InvalidInput([f"no service {namespace}/{name} (membrane get services -n {namespace})"])
    kvs, _ = await store.list(keys.objects_prefix("endpointslices", namespace))
    slices = [obj for _, obj in _decoded(kvs) if isinstance(obj, k8s.EndpointSlice) and obj.service_name == name]
    return service, slices


def service_trace_text(view: StorePolicyView, source: str, service: k8s.Service,
                       user_slices: Iterable[k8s.EndpointSlice], port: str) -> str:
    """``membrane policy trace --to service:NS/NAME``: a trace to every backend of the service port
    (``port`` is the service's port), on the backend's target port. A selector service's backends
    are its ready pods, as the agents derive its slices; a service without a selector has the
    slices users applied. Terminating backends are left out unless nothing else is left (a load
    balancer sends them new connections only then)."""
    protocol, number = parse_port(port)
    ref = f"{service.namespace or 'default'}/{service.name}"
    service_port = next((p for p in service.spec.ports or () if p.port == number and p.protocol == protocol), None)
    if service_port is None:
        known = ", ".join(f"{p.port}/{p.protocol}" for p in service.spec.ports or ()) or "none"
        raise InvalidInput([f"service {ref} has no port {number}/{protocol} (its ports: {known})"])
    policies = view.endpoint_policies()
    if "/" in source and not source.replace("/", "").replace(".", "").isdigit() and source not in policies:
        raise InvalidInput([f"no ready endpoint {source} (membrane endpoint list)"])
    ready = {(r.namespace, r.pod): str(r.ipv4) for r in view.records if r.state == "ready"}
    if service.spec.selector:
        slices = derive_endpoint_slices(service, view.pods.values(),
                                        lambda pod: ready.get((pod.namespace or "default", pod.name)))
    else:
        slices = list(user_slices)
    found = slice_backends(slices, service_port.name)
    active = [b for b in found if b.state == "active"] or found
    addresses: dict[IPv4Address, str] = {r.ipv4: f"{r.namespace}/{r.pod}" for r in view.records if r.state == "ready"}
    source_record = view.record(source)
    source_node = source_record.node if source_record is not None else None
    backends = []
    for backend in active:
        pod = addresses.get(IPv4Address(backend.address))
        record = view.record(pod) if pod else None
        # As for a trace to a pod: the ipcache of the node the ingress decision is made on.
        intervals = view.intervals(record.node if record is not None else source_node)
        peer = resolve_peer(backend.address, policies, intervals, addresses)
        if pod and peer.endpoint is not None:
            peer = replace(peer, name=pod)
        backends.append((peer, backend.address, backend.port))
    src = resolve_peer(source, policies, view.intervals(source_node), addresses)
    cluster_ip = service.spec.clusterIP
    frontend = f"{cluster_ip}:{number}/{protocol}" if cluster_ip and cluster_ip != "None" else "headless"
    result = trace_service(ref, frontend, src, backends, protocol, number, terminating=len(found) - len(active))
    return format_service_trace(result)


# --- endpoint list -------------------------------------------------------------------------------------


def enforcement_text(policy: DirectionPolicy) -> str:
    """cilium-dbg's POLICY column: Enabled (a miss drops), Disabled, or Disabled (Audit)."""
    if policy.default_deny and policy.audit:
        return "Disabled (Audit)"
    return "Enabled" if policy.enforced else "Disabled"


def enforcement_columns(view: StorePolicyView) -> Mapping[str, tuple[str, str]]:
    """``NS/POD`` → (ingress, egress) enforcement of every ready endpoint."""
    return {key: (enforcement_text(p.ingress), enforcement_text(p.egress))
            for key, p in view.endpoint_policies().items()}


# --- commands ------------------------------------------------------------------------------------------


@click.group("policy")
def policy_group() -> None:
    """Network policy: imported rules, selectors, and what would be allowed."""


@policy_group.command("get")
@click.option("-n", "--namespace", help="Only the rules of policies in this namespace.")
@pass_cli
@run_async
async def policy_get(cli: CliContext, namespace: str | None) -> None:
    """The imported rules as JSON, then the policy revision."""
    store = await cli.open_store()
    try:
        view = await load_policy_view(store)
    finally:
        await store.close()
    click.echo(json.dumps(imported_rules(view.compiler.rules, namespace), indent=2))
    click.echo(f"Revision: {view.revision}")


@policy_group.command("selectors")
@pass_cli
@run_async
async def policy_selectors(cli: CliContext) -> None:
    """Every selector in use, its policies, rule count and selected identities."""
    store = await cli.open_store()
    try:
        view = await load_policy_view(store)
    finally:
        await store.close()
    click.echo(format_selectors(view))


@policy_group.command("trace")
@click.option("--from", "source", required=True, metavar="NS/POD|CIDR|ENTITY")
@click.option("--to", "destination", required=True, metavar="NS/POD|CIDR|ENTITY|service:NS/NAME",
              help="service:NS/NAME traces each backend of the service (policy applies after translation).")
@click.option("--port", required=True, metavar="PORT/PROTO",
              help="e.g. 80/TCP, 53/UDP, 8/ICMP (an ICMP type); for a service, the service's port.")
@pass_cli
@run_async
async def policy_trace(cli: CliContext, source: str, destination: str, port: str) -> None:
    """Would SOURCE reach DESTINATION on PORT, and which rules decide."""
    store = await cli.open_store()
    try:
        view = await load_policy_view(store)
        service = await load_service(store, destination) if destination.startswith(SERVICE_PREFIX) else None
    finally:
        await store.close()
    if service is not None:
        click.echo(service_trace_text(view, source, service[0], service[1], port), nl=False)
    else:
        click.echo(trace_text(view, source, destination, port), nl=False)


COMMANDS = [policy_group]
