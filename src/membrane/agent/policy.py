"""The agent's policy controller: intent → compiled policy → the datapath's policy elements, and
policy status written back to the policy objects.

    intent: policy objects · identities · every node's endpoint records · pods · CiliumNodes
        │  PolicyCompiler (pure, incremental)
        │    objects ──import (decode + normalize, cached per body)──▶ rules
        │    rules, identities, named ports ──compile_policies──▶ repository + selector cache
        │    identities only changed ──▶ SelectorCache.update (no recompile)
        ▼
    per local endpoint: EndpointPolicy (memoized per identity, namespace and named ports)
        │  policy_datapath(records)                  the ipcache: endpoints, nodes, CIDR identities
        ▼
    PolicyDatapath: pol_in / pol_out / enforced_* / audited_* / ipcache elements ──▶ NodeDatapath.sync

:class:`PolicyCompiler` is pure and shared with the CLI (``membrane policy trace|selectors``,
``endpoint list``), so what the CLI computes from the store is what every agent computes from the
same store revision. :class:`PolicyController` is the agent's loop: woken by the intent's
reflectors, it waits a short debounce so bursts of changes (a namespace of pods, an ``apply -f`` of
many policies) cost one recompilation and one nft transaction, then hands the new state to the
datapath (an element-only sync) and writes status back in the background.

Status (CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy; a NetworkPolicy has no status):

- ``status.conditions[type=Valid]``: ``True`` (reason ``Valid``), ``True`` with reason
  ``Unsupported`` and a message naming the L7 rules (the traffic they select is denied: there is
  no L7 proxy yet) and the parts that select nothing yet (fail closed), or
  ``False`` (reason ``Invalid``) when the policy cannot be imported (it is then not enforced);
  written identically by every node, so concurrent writers converge;
- ``status.nodes[<node>]``: this node's import — ``ok``, ``error``, ``enforcing`` (the policy
  selects at least one endpoint on this node, so its rules are in this node's kernel),
  ``localPolicyRevision`` (this agent's policy revision when it imported the current spec) and
  ``lastUpdated``. Written only when one of those changes, never on every recompilation.

Primitives: :class:`ImportedPolicy`, :func:`import_policy`, :func:`policy_endpoint`,
:func:`ipcache_entries`, :class:`IpcacheBuilder`, :class:`PolicyCompiler`, :func:`desired_status`,
:class:`PolicyController`. The map elements are rendered by :mod:`membrane.datapath.policy`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from membrane.agent.records import EndpointRecord
from membrane.api.meta import ApiObject, Condition
from membrane.api.objects import now_rfc3339
from membrane.api.registry import kind_info
from membrane.core.config import ClusterConfig
from membrane.core.errors import InvalidInput, MembraneError, NotFound
from membrane.datapath.policy import PolicyRenderer, render_policy
from membrane.datapath.ruleset import PolicyDatapath
from membrane.identity.ipcache import EndpointAddress, IpcacheEntry, NodeAddresses, build_ipcache
from membrane.identity.labels import Label, parse_labels
from membrane.identity.reserved import WORLD
from membrane.ipam.pool import router_ip
from membrane.policy import (
    PROTOCOLS,
    CompiledPolicy,
    EndpointPolicy,
    EnforcementConfig,
    IpcacheInterval,
    PolicyEndpoint,
    PolicyRule,
    compile_policies,
    compute_policies,
    flatten_ipcache,
    normalize,
    with_cidr_identities,
)
from membrane.policy.mapstate import NamedPorts

log = logging.getLogger(__name__)

#: Kinds whose objects carry a status the agents write.
STATUS_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
#: Endpoint record states whose address is in the ipcache (``creating`` holds its address already).
IPCACHE_STATES = ("ready", "creating")


# --- import --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedPolicy:
    """One policy object as the engine took it: its rules, or why it could not be imported."""

    key: str  # the store key
    kind: str
    namespace: str
    name: str
    generation: int
    body: str  # canonical JSON of everything but metadata and status: what decides recompilation
    rules: tuple[PolicyRule, ...] = ()
    error: str = ""
    unsupported: tuple[str, ...] = ()  # parts that select nothing yet
    l7: tuple[str, ...] = ()  # paths of L7 rules: the traffic they select is denied
    obj: ApiObject | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return not self.error


def _body(data: Mapping[str, Any]) -> str:
    meta = data.get("metadata") or {}
    essential = {k: v for k, v in data.items() if k not in ("metadata", "status")}
    essential["@"] = [meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", "")]
    return json.dumps(essential, sort_keys=True, separators=(",", ":"))


def _unsupported(rules: Iterable[PolicyRule]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for rule in rules:
        where = rule.origin.path
        for item in rule.unsupported:
            found[f"{where}: {item}"] = None
        if rule.fqdns:
            found[f"{where}: toFQDNs"] = None
        if rule.host:
            found[f"{rule.origin.path or 'spec'}: nodeSelector (host policy)"] = None
    return tuple(found)


def _l7_paths(rules: Iterable[PolicyRule]) -> tuple[str, ...]:
    found = {f"{rule.origin.path}.{l4.l7.path}": None for rule in rules for l4 in rule.l4 or () if l4.l7 is not None}
    return tuple(found)


def import_policy(key: str, data: Mapping[str, Any], cluster_name: str = "default") -> ImportedPolicy:
    """Decode and normalize one stored policy object; failures are reported, not raised."""
    meta = data.get("metadata") or {}
    kind = str(data.get("kind", ""))
    base = ImportedPolicy(key=key, kind=kind, namespace=str(meta.get("namespace") or ""),
                          name=str(meta.get("name", "")), generation=int(meta.get("generation") or 0),
                          body=_body(data))
    try:
        obj = kind_info(kind).model.model_validate(dict(data))
        rules = normalize(obj, cluster_name)
    except (MembraneError, ValueError, TypeError, KeyError) as exc:
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        return dataclasses.replace(base, error=message)
    return dataclasses.replace(base, rules=rules, unsupported=_unsupported(rules), l7=_l7_paths(rules), obj=obj)


# --- endpoints and the ipcache ----------------------------------------------------------------------------


def _pod_spec_ports(pod: Mapping[str, Any] | None) -> NamedPorts:
    """The named container ports of a stored Pod (``named_ports_of`` on the raw object: this runs for
    every pod of the cluster on every recompilation, so no model validation)."""
    found: dict[str, set[tuple[int, int]]] = {}
    for container in ((pod or {}).get("spec") or {}).get("containers") or ():
        for port in container.get("ports") or ():
            name, number = port.get("name"), port.get("containerPort")
            protocol = PROTOCOLS.get(str(port.get("protocol") or "TCP"))
            if name and isinstance(number, int) and protocol is not None:
                found.setdefault(str(name).lower(), set()).add((protocol, number))
    return {name: frozenset(ports) for name, ports in found.items()}


def policy_endpoint(record: EndpointRecord, pods: Mapping[tuple[str, str], Mapping[str, Any]]) -> PolicyEndpoint:
    """An endpoint as policy sees it, keyed ``NS/POD``, with the named ports of its pod's spec."""
    ports = _pod_spec_ports(pods.get((record.namespace, record.pod)))
    return PolicyEndpoint(f"{record.namespace}/{record.pod}", record.identity, record.namespace, ports)


def node_addresses(nodes: Mapping[str, Mapping[str, Any]]) -> list[NodeAddresses]:
    """The InternalIP and router IP of every CiliumNode (identities host / remote-node)."""
    found = []
    for name, obj in nodes.items():
        spec = obj.get("spec") or {}
        ips = [a.get("ip") for a in spec.get("addresses") or () if a.get("type") == "InternalIP" and a.get("ip")]
        if not ips:
            continue
        cidrs = (spec.get("ipam") or {}).get("podCIDRs") or ()
        try:
            router = router_ip(IPv4Network(cidrs[0])) if cidrs else None
            found.append(NodeAddresses(name, IPv4Address(ips[0]), router))
        except ValueError:
            continue
    return found


def ipcache_entries(
    records: Iterable[EndpointRecord],
    nodes: Mapping[str, Mapping[str, Any]],
    local_node: str | None,
    cidr_identities: Mapping[IPv4Network, int],
) -> list[IpcacheEntry]:
    """This node's ipcache: world, node addresses (host here, remote-node elsewhere), every
    endpoint's /32 and the prefixes policies name."""
    addresses = node_addresses(nodes)
    node_ips = {n.name: str(n.node_ip) for n in addresses}
    endpoints = [EndpointAddress(r.ipv4, r.identity, node_ips.get(r.node, "")) for r in records
                 if r.state in IPCACHE_STATES]
    return with_cidr_identities(build_ipcache(endpoints, addresses, local_node), cidr_identities)


class IpcacheBuilder:
    """This node's ipcache intervals, kept up to date incrementally: the /32 of an endpoint record is
    rebuilt only when that record object changed (the intent replaces a record on every write), and
    the table is flattened again only when an entry, a node or a policy prefix changed (else the
    same tuple object is returned, so a renderer can skip it). The result equals
    :func:`ipcache_entries` flattened (endpoints win over nodes, nodes over policy prefixes)."""

    def __init__(self, local_node: str | None) -> None:
        self.local_node = local_node
        self._records: dict[str, tuple[EndpointRecord, tuple[IPv4Network, int] | None]] = {}
        self._others: tuple[object, ...] | None = None
        self._intervals: tuple[IpcacheInterval, ...] = ()

    def intervals(
        self,
        records: Mapping[str, EndpointRecord],
        nodes: Mapping[str, Mapping[str, Any]],
        cidr_identities: Mapping[IPv4Network, int],
    ) -> tuple[IpcacheInterval, ...]:
        changed = False
        for key in [k for k in self._records if k not in records]:
            del self._records[key]
            changed = True
        for key, record in records.items():
            cached = self._records.get(key)
            if cached is not None and cached[0] is record:
                continue
            entry = (IPv4Network((int(record.ipv4), 32)), record.identity) if record.state in IPCACHE_STATES else None
            if cached is None or cached[1] != entry:
                changed = True
            self._records[key] = (record, entry)
        others = (tuple((n, id(obj)) for n, obj in nodes.items()), tuple(sorted(cidr_identities.items())))
        if changed or others != self._others:
            self._others = others
            endpoints = [entry for _, entry in self._records.values() if entry is not None]
            world = IPv4Network("0.0.0.0/0")
            fixed = [e for e in build_ipcache((), node_addresses(nodes), self.local_node) if e.prefix != world]
            table: list[IpcacheEntry | tuple[IPv4Network, int]] = [
                *endpoints, *fixed, (world, WORLD.id), *cidr_identities.items()]
            self._intervals = flatten_ipcache(table)
        return self._intervals


# --- the compiler --------------------------------------------------------------------------------------


class PolicyCompiler:
    """Policy objects, identities and endpoints in; endpoint policies out — recompiling only what
    a change requires:

    - a policy body or the named ports of an identity changed → ``compile_policies`` again (CIDR
      identity numbers kept);
    - identities appeared or went → ``SelectorCache.update``, selections adjusted in place;
    - otherwise (status writes, pod status, endpoints of known identities) → nothing.

    Endpoint policies are memoized per (identity, namespace, named ports) until the next change.
    ``revision`` grows with every change that can alter a verdict.
    """

    def __init__(self, *, cluster_name: str = "default", config: EnforcementConfig | None = None) -> None:
        self.cluster_name = cluster_name
        self.config = config or EnforcementConfig()
        self.revision = 0
        self.imported: dict[str, ImportedPolicy] = {}
        self.imported_at: dict[str, int] = {}  # store key -> revision that imported its current body
        self._compiled: CompiledPolicy | None = None
        self._named: dict[int, NamedPorts] = {}
        self._identities: dict[int, frozenset[Label]] = {}
        self._memo: dict[tuple[object, ...], EndpointPolicy] = {}
        self._ports: dict[int, tuple[EndpointRecord, object, NamedPorts]] = {}  # by id(record): kept alive here

    @property
    def compiled(self) -> CompiledPolicy:
        if self._compiled is None:
            self._compiled = compile_policies((), {}, (), config=self.config, cluster_name=self.cluster_name)
        return self._compiled

    @property
    def rules(self) -> tuple[PolicyRule, ...]:
        return self.compiled.rules

    def update(
        self,
        policies: Mapping[str, Mapping[str, Any]],
        identities: Mapping[int, frozenset[Label]],
        records: Iterable[EndpointRecord],
        pods: Mapping[tuple[str, str], Mapping[str, Any]],
    ) -> bool:
        """Take the current inputs; True when verdicts may have changed."""
        policies_changed = self._import(policies)
        named = self._named_ports(records, pods)
        identities = dict(identities)
        if policies_changed or named != self._named or self._compiled is None:
            previous = self._compiled.cidr_identities if self._compiled is not None else None
            rules = [rule for key in sorted(self.imported) for rule in self.imported[key].rules]
            self._compiled = compile_policies(
                rules, identities, (), config=self.config, named_ports_by_identity=named,
                cluster_name=self.cluster_name, previous_cidr_identities=previous,
            )
            self._named = named
            self._identities = identities
            self._changed()
            return True
        if identities != self._identities:
            added = {i: labels for i, labels in identities.items() if self._identities.get(i) != labels}
            removed = [i for i in self._identities if i not in identities]
            self.compiled.cache.update(added, removed)
            self._identities = identities
            self._changed()
            return True
        return False

    def _named_ports(
        self, records: Iterable[EndpointRecord], pods: Mapping[tuple[str, str], Mapping[str, Any]]
    ) -> dict[int, NamedPorts]:
        """Every identity's named ports (the union over its pods: egress named ports resolve on
        these), re-reading a pod's ports only when its record or Pod
        object changed (the intent replaces both on every write), and merging again only then."""
        seen: dict[int, tuple[EndpointRecord, object, NamedPorts]] = {}
        changed = False
        previous = self._ports
        for record in records:
            pod = pods.get((record.namespace, record.pod))
            cached = previous.get(id(record))
            if cached is not None and cached[0] is record and cached[1] is pod:
                seen[id(record)] = cached
                continue
            seen[id(record)] = (record, pod, _pod_spec_ports(pod))
            changed = True
        self._ports = seen
        if not changed and len(seen) == len(previous):
            return self._named
        merged: dict[int, dict[str, set[tuple[int, int]]]] = {}
        for record, _, ports in seen.values():
            for name, values in ports.items():
                merged.setdefault(record.identity, {}).setdefault(name, set()).update(values)
        return {identity: {n: frozenset(p) for n, p in named.items()} for identity, named in merged.items()}

    def _import(self, policies: Mapping[str, Mapping[str, Any]]) -> bool:
        changed = False
        for key in [k for k in self.imported if k not in policies]:
            del self.imported[key]
            self.imported_at.pop(key, None)
            changed = True
        for key, data in policies.items():
            current = self.imported.get(key)
            if current is not None and current.body == _body(data):
                continue
            self.imported[key] = import_policy(key, data, self.cluster_name)
            self.imported_at[key] = self.revision + 1
            changed = True
        return changed

    def _changed(self) -> None:
        self.revision += 1
        self._memo.clear()

    def endpoint_policies(
        self, endpoints: Iterable[tuple[PolicyEndpoint, frozenset[Label]]]
    ) -> dict[str, EndpointPolicy]:
        """The policy of each endpoint (with its identity's labels, for identities the selector
        cache has not seen yet — an endpoint added a moment ago)."""
        compiled = self.compiled
        wanted = list(endpoints)
        cache = compiled.cache
        unknown = {e.identity: labels for e, labels in wanted if cache.labels_of(e.identity) is None and labels}
        if unknown:
            compiled.cache.update(unknown)
            self._identities.update(unknown)
            self._memo.clear()
        result: dict[str, EndpointPolicy] = {}
        missing: list[PolicyEndpoint] = []
        for endpoint, _ in wanted:
            found = self._memo.get(self._signature(endpoint))
            if found is None:
                missing.append(endpoint)
            else:
                result[endpoint.key] = EndpointPolicy(endpoint, found.ingress, found.egress)
        if missing:
            computed = compute_policies(missing, compiled.repository, compiled.cache, self.config,
                                        named_ports_by_identity=self._named)
            for endpoint in missing:
                policy = computed[endpoint.key]
                self._memo[self._signature(endpoint)] = policy
                result[endpoint.key] = policy
        return result

    @staticmethod
    def _signature(endpoint: PolicyEndpoint) -> tuple[object, ...]:
        return (endpoint.identity, endpoint.namespace, endpoint.named_ports_signature)


# --- status ----------------------------------------------------------------------------------------------


def valid_condition(policy: ImportedPolicy) -> Condition:
    """``Valid``: imported (with the unsupported parts named: L7 rules, whose traffic is denied, and
    peers that select nothing yet), or why not."""
    if not policy.ok:
        return Condition(type="Valid", status="False", reason="Invalid", message=policy.error,
                         observedGeneration=policy.generation or None)
    if policy.unsupported or policy.l7:
        parts = []
        if policy.l7:
            parts.append(", ".join(policy.l7) + ": L7 rules are not enforced yet; the traffic they select is denied")
        if policy.unsupported:
            parts.append("not enforced yet, selects nothing: " + "; ".join(policy.unsupported))
        message = ". ".join(parts)
        return Condition(type="Valid", status="True", reason="Unsupported", message=message[:500],
                         observedGeneration=policy.generation or None)
    return Condition(type="Valid", status="True", reason="Valid", message="Policy validation succeeded",
                     observedGeneration=policy.generation or None)


def desired_status(
    current: Mapping[str, Any] | None, policy: ImportedPolicy, node: str, enforcing: bool, revision: int, now: str
) -> dict[str, Any]:
    """The object's new status: the Valid condition and this node's entry, everything else kept.
    Times change only when what they date changes, so an unchanged status is byte-identical."""
    status = dict(current or {})
    valid = valid_condition(policy).model_dump(mode="json", exclude_none=True)
    conditions = [dict(c) for c in status.get("conditions") or () if c.get("type") != "Valid"]
    old_valid = next((c for c in status.get("conditions") or () if c.get("type") == "Valid"), None)
    same = old_valid is not None and all(old_valid.get(k) == valid.get(k) for k in ("status", "reason", "message"))
    valid["lastTransitionTime"] = old_valid.get("lastTransitionTime", now) if same and old_valid else now
    status["conditions"] = [valid, *conditions]
    entry: dict[str, Any] = {"ok": policy.ok, "enforcing": enforcing and policy.ok, "localPolicyRevision": revision}
    if policy.error:
        entry["error"] = policy.error
    nodes = dict(status.get("nodes") or {})
    old = nodes.get(node) or {}
    if {k: v for k, v in old.items() if k != "lastUpdated"} != entry:
        entry["lastUpdated"] = now
    else:
        entry["lastUpdated"] = old.get("lastUpdated", now)
    nodes[node] = entry
    status["nodes"] = nodes
    return status


# --- the controller ------------------------------------------------------------------------------------


StatusWriter = Callable[[str, str | None, str, Callable[[ApiObject], Any]], Awaitable[Any]]


def enforcement_config(cluster: ClusterConfig) -> EnforcementConfig:
    """The cluster's policy settings as the engine takes them (agents and ``policy trace`` alike)."""
    return EnforcementConfig(mode=cluster.policyEnforcementMode, audit=cluster.policyAuditMode,
                             audit_namespaces=frozenset(cluster.policyAuditNamespaces))


class PolicyController:
    """Keeps this node's policy current: recompiles on wake-ups (debounced), asks the datapath to
    sync, and writes policy status back.

    ``intent`` is the agent's :class:`~membrane.agent.intent.Intent` (read: ``policies``,
    ``identities``, ``endpoints``, ``pods``, ``nodes``). ``sync_datapath`` re-renders the datapath,
    which calls :meth:`policy_datapath`; ``write_status`` is ``ObjectClient.modify_status`` (None:
    no status writes).
    """

    def __init__(
        self,
        intent: Any,
        node_name: str,
        *,
        cluster_name: str = "default",
        config: EnforcementConfig | None = None,
        sync_datapath: Callable[[], Awaitable[None]] | None = None,
        write_status: StatusWriter | None = None,
        wake: asyncio.Event | None = None,
        debounce: float = 0.02,
    ) -> None:
        self.intent = intent
        self.node_name = node_name
        self.compiler = PolicyCompiler(cluster_name=cluster_name, config=config)
        self.renderer = PolicyRenderer()
        self.wake = wake or asyncio.Event()
        self._sync_datapath = sync_datapath
        self._write_status = write_status
        self._debounce = debounce
        self._status_wake = asyncio.Event()
        self._written: dict[str, tuple[str, bool, int]] = {}  # key -> (body, enforcing, revision) written
        self._enforcing: dict[str, bool] = {}
        self._ipcache = IpcacheBuilder(node_name)
        self.last_compile = 0.0
        self.syncs = 0
        #: Store revision of each intent prefix that the last completed datapath sync reflects.
        self.synced_revisions: dict[str, int] = dict(getattr(intent, "revisions", {}))

    # -- computing -------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Take the intent as it is now; True when the datapath needs a new rendering."""
        intent = self.intent
        records = list(intent.endpoints.values())
        started = time.perf_counter()
        changed = self.compiler.update(intent.policies, intent.identities, records, intent.pods)
        if changed:
            self.last_compile = time.perf_counter() - started
        return changed

    def policy_datapath(self, records: Iterable[EndpointRecord]) -> PolicyDatapath:
        """The ruleset's policy inputs for this node's (ready) endpoint records. Records the intent
        has not caught up with yet (an endpoint added a moment ago) are included as given."""
        local = [r for r in records if r.host_ifindex]
        pods = self.intent.pods
        endpoints = [(policy_endpoint(r, pods), parse_labels(r.labels)) for r in local]
        policies = self.compiler.endpoint_policies(endpoints)
        by_ifindex = {r.host_ifindex: policies[f"{r.namespace}/{r.pod}"] for r in local}
        self.renderer.forget(set(by_ifindex))
        # The ipcache covers every node's endpoints (and local records the intent has not seen yet).
        cluster = self.intent.endpoints
        if any(cluster.get(r.key) is not r for r in local):
            cluster = {**cluster, **{r.key: r for r in local}}
        ipcache = self._ipcache.intervals(cluster, self.intent.nodes, self.compiler.compiled.cidr_identities)
        selecting: dict[str, bool] = {}
        for policy in policies.values():
            for origin in (*policy.ingress.selected_by, *policy.egress.selected_by):
                selecting[_origin_key(origin.kind, origin.namespace, origin.name)] = True
        if selecting != self._enforcing:
            self._enforcing = selecting
            self._status_wake.set()
        return render_policy(by_ifindex, ipcache, self.renderer)

    def status(self) -> dict[str, Any]:
        imported = self.compiler.imported.values()
        return {
            "revision": self.compiler.revision,
            "policies": sum(p.ok for p in imported),
            "invalid": sum(not p.ok for p in imported),
            "rules": len(self.compiler.rules),
            "lastCompileSeconds": round(self.last_compile, 4),
            "syncs": self.syncs,
            # prefix -> store revision the kernel reflects (per prefix: a reflector delivers in order)
            "syncedRevisions": self.synced_revisions,
        }

    # -- the loop --------------------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._status_loop()) if self._write_status is not None else None
        try:
            while True:
                await self.wake.wait()
                # Debounce: let a burst of reflector batches land, then recompute once.
                await asyncio.sleep(self._debounce)
                self.wake.clear()
                seen = dict(getattr(self.intent, "revisions", {}))
                changed = self.refresh()
                # Also when no verdict changed: endpoints or nodes may have moved the ipcache. An
                # unchanged rendering costs no nft call.
                if self._sync_datapath is not None:
                    await self._sync_datapath()
                    self.syncs += 1
                self.synced_revisions = seen
                if changed:
                    self._status_wake.set()  # after the sync: status reports what the kernel holds
        finally:
            if writer is not None:
                writer.cancel()

    async def _status_loop(self) -> None:
        while True:
            await self._status_wake.wait()
            self._status_wake.clear()
            try:
                await self.write_statuses()
            except Exception as exc:  # a store hiccup must not end status reporting: retry
                log.warning("writing policy status failed (retrying in 1 s): %s", exc)
                await asyncio.sleep(1.0)
                self._status_wake.set()

    async def write_statuses(self) -> int:
        """Write this node's status into every policy object whose entry changed; returns how many."""
        assert self._write_status is not None
        written = 0
        for key, policy in list(self.compiler.imported.items()):
            if policy.kind not in STATUS_KINDS:
                continue
            enforcing = self._enforcing.get(_origin_key(policy.kind, policy.namespace, policy.name), False)
            revision = self.compiler.imported_at.get(key, self.compiler.revision)
            state = (policy.body, enforcing, revision)
            if self._written.get(key) == state:
                continue
            now = now_rfc3339()

            def compute(obj: ApiObject, policy: ImportedPolicy = policy, enforcing: bool = enforcing,
                        revision: int = revision, now: str = now) -> dict[str, Any]:
                current = getattr(obj, "status", None)
                data = current.model_dump(mode="json", exclude_none=True) if current is not None else None
                return desired_status(data, policy, self.node_name, enforcing, revision, now)

            try:
                await self._write_status(policy.kind, policy.namespace or None, policy.name, compute)
            except NotFound:
                continue  # deleted meanwhile
            except InvalidInput as exc:
                # The stored object itself does not validate (written around the API): its status
                # cannot be written either; say so once, not on every retry.
                log.warning("cannot write the status of %s %s: %s", policy.kind, policy.name, exc)
            self._written[key] = state
            written += 1
        for key in [k for k in self._written if k not in self.compiler.imported]:
            del self._written[key]
        return written


def _origin_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"
