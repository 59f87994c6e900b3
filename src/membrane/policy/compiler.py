"""The policy compiler: stored policy objects, identities and endpoint records → endpoint policies,
recompiling only what a change requires (pure: no store, no agent, no datapath).

    policy objects ──import (normalize, cached per object, then per body)──▶ rules
    rules, identities, named ports ──compile_policies──▶ repository + selector cache
    identities only changed ──▶ SelectorCache.update (no recompile)
    per endpoint: EndpointPolicy (memoized per identity, namespace and named ports)

It is shared by the agent's policy controller and the CLI (``membrane policy trace|selectors``,
``endpoint list``), so what the CLI computes from the store is what every agent computes from the
same store revision. The ipcache side: :func:`ipcache_entries` (the table) and
:class:`IpcacheBuilder` (this node's flattened intervals, incrementally).

Inputs are the decoded API objects (policies, :class:`~membrane.api.k8s.Pod`,
:class:`~membrane.api.cilium.CiliumNode`: frozen models, replaced rather than changed, so an
unchanged input is recognized by identity) and :class:`~membrane.api.endpoint.EndpointRecord`
values; outputs are the engine's typed :class:`~membrane.policy.EndpointPolicy` and
:class:`~membrane.policy.IpcacheInterval` values, which the datapath renders.

Primitives: :class:`ImportedPolicy`, :func:`import_policy`, :func:`policy_endpoint`,
:func:`same_body`, :func:`node_addresses`, :func:`ipcache_entries`, :class:`IpcacheBuilder`, :class:`PolicyCompiler`,
:func:`enforcement_config`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from membrane.api import cilium, k8s
from membrane.api.endpoint import EndpointRecord
from membrane.api.meta import ApiObject
from membrane.core.config import ClusterConfig
from membrane.core.errors import MembraneError
from membrane.identity.ipcache import EndpointAddress, IpcacheEntry, NodeAddresses, build_ipcache
from membrane.identity.labels import Label
from membrane.identity.reserved import WORLD
from membrane.ipam.pool import router_ip
from membrane.policy.engine import CompiledPolicy, compile_policies
from membrane.policy.ipcache import IpcacheInterval, flatten_ipcache, with_cidr_identities
from membrane.policy.mapstate import (
    EndpointPolicy,
    EnforcementConfig,
    NamedPorts,
    PolicyEndpoint,
    compute_policies,
    named_ports_of,
)
from membrane.policy.rules import PolicyRule, normalize

#: Endpoint record states whose address is in the ipcache (``creating`` holds its address already).
IPCACHE_STATES = ("ready", "creating")
#: The models of the kinds that hold policy.
_POLICY_MODELS: dict[str, type[ApiObject]] = {
    "NetworkPolicy": k8s.NetworkPolicy,
    "CiliumNetworkPolicy": cilium.CiliumNetworkPolicy,
    "CiliumClusterwideNetworkPolicy": cilium.CiliumClusterwideNetworkPolicy,
}


# --- import --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedPolicy:
    """One policy object as the engine took it: its rules, or why it could not be imported.

    ``obj`` is the object last seen under ``key`` (a newer object with the same body replaces it
    without a new import). ``body`` is computed from it on first use, not on import: comparing
    objects by identity and equality settles almost every update without serializing anything."""

    key: str  # the store key
    kind: str
    namespace: str
    name: str
    generation: int
    rules: tuple[PolicyRule, ...] = ()
    error: str = ""
    unsupported: tuple[str, ...] = ()  # parts that select nothing yet
    l7: tuple[str, ...] = ()  # paths of L7 rules: the traffic they select is denied
    obj: ApiObject | None = field(default=None, compare=False, repr=False)
    _body: str | None = field(default=None, compare=False, repr=False)  # body, once computed

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def body(self) -> str:
        """Canonical JSON of everything but metadata and status, with namespace, name and uid:
        what decides recompilation."""
        if self._body is None:
            # Set once on a frozen value: a cache, invisible to equality and hashing.
            object.__setattr__(self, "_body", _model_body(self.obj) if self.obj is not None else "")
        assert self._body is not None
        return self._body


def _canonical(essential: dict[str, Any], namespace: object, name: object, uid: object) -> str:
    essential["@"] = [namespace or "", name or "", uid or ""]
    return json.dumps(essential, sort_keys=True, separators=(",", ":"))


def _model_body(obj: ApiObject) -> str:
    return _canonical(obj.body(), obj.metadata.namespace, obj.metadata.name, obj.metadata.uid)


#: The fields of a policy object that are not its body.
_NOT_BODY = frozenset({"apiVersion", "kind", "metadata", "status"})


def same_body(a: ApiObject, b: ApiObject) -> bool:
    """Whether two objects have the same :attr:`ImportedPolicy.body`, without serializing either:
    the frozen models compare field by field (strict scalars: equal values dump equal), so a
    status write or a label change costs a comparison, not a dump."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    ma, mb = a.metadata, b.metadata
    if (ma.namespace, ma.name, ma.uid) != (mb.namespace, mb.name, mb.uid):
        return False
    return all(getattr(a, name) == getattr(b, name) for name in type(a).model_fields if name not in _NOT_BODY)


def _mapping_body(data: Mapping[str, Any]) -> str:
    meta = data.get("metadata") or {}
    essential = {k: v for k, v in data.items() if k not in ("metadata", "status")}
    return _canonical(essential, meta.get("namespace"), meta.get("name"), meta.get("uid"))


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


def _error_text(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def import_policy(key: str, obj: ApiObject | Mapping[str, Any], cluster_name: str = "default") -> ImportedPolicy:
    """Normalize one policy object; failures are reported in ``error``, not raised.

    A model is taken as validated; a mapping (a stored object not decoded yet) is validated as its
    kind's model first."""
    if not isinstance(obj, ApiObject):
        return _import_mapping(key, obj, cluster_name)
    meta = obj.metadata
    base = ImportedPolicy(key=key, kind=obj.kind, namespace=meta.namespace or "", name=meta.name or "",
                          generation=meta.generation or 0, obj=obj)
    try:
        if type(obj) not in _POLICY_MODELS.values():
            raise ValueError(f"{obj.kind!r} is not a policy kind")
        rules = normalize(obj, cluster_name)
    except (MembraneError, ValueError, TypeError, KeyError) as exc:
        return dataclasses.replace(base, error=_error_text(exc))
    return dataclasses.replace(base, rules=rules, unsupported=_unsupported(rules), l7=_l7_paths(rules))


def _import_mapping(key: str, data: Mapping[str, Any], cluster_name: str) -> ImportedPolicy:
    kind = str(data.get("kind", ""))
    try:
        model = _POLICY_MODELS.get(kind)
        if model is None:
            raise ValueError(f"{kind!r} is not a policy kind")
        obj = model.model_validate(dict(data))
    except (MembraneError, ValueError, TypeError, KeyError) as exc:
        meta = data.get("metadata") or {}
        return ImportedPolicy(key=key, kind=kind, namespace=str(meta.get("namespace") or ""),
                              name=str(meta.get("name", "")), generation=int(meta.get("generation") or 0),
                              error=_error_text(exc), _body=_mapping_body(data))
    return import_policy(key, obj, cluster_name)


# --- endpoints and the ipcache ----------------------------------------------------------------------------


def _pod_spec_ports(pod: k8s.Pod | None) -> NamedPorts:
    return named_ports_of(pod.spec) if pod is not None else {}


def policy_endpoint(record: EndpointRecord, pods: Mapping[tuple[str, str], k8s.Pod]) -> PolicyEndpoint:
    """An endpoint as policy sees it, keyed ``NS/POD``, with the named ports of its pod's spec."""
    ports = _pod_spec_ports(pods.get((record.namespace, record.pod)))
    return PolicyEndpoint(f"{record.namespace}/{record.pod}", record.identity, record.namespace, ports)


def node_addresses(nodes: Iterable[cilium.CiliumNode]) -> list[NodeAddresses]:
    """The InternalIP and router IP of every CiliumNode that has an IPv4 InternalIP (identities
    host / remote-node)."""
    found = []
    for node in nodes:
        node_ip = node.internal_ip()
        if node_ip is None:
            continue
        cidr = node.pod_cidr()
        found.append(NodeAddresses(node.name, node_ip, router_ip(cidr) if cidr is not None else None))
    return found


def ipcache_entries(
    records: Iterable[EndpointRecord],
    nodes: Iterable[cilium.CiliumNode],
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
    the table is flattened again only when an entry, a node object (compared by identity: nodes are
    replaced, never changed) or a policy prefix changed (else the same tuple object is returned, so
    a renderer can skip it). The result equals
    :func:`ipcache_entries` flattened (endpoints win over nodes, nodes over policy prefixes)."""

    def __init__(self, local_node: str | None) -> None:
        self.local_node = local_node
        self._records: dict[str, tuple[EndpointRecord, tuple[IPv4Network, int] | None]] = {}
        # The node objects themselves (kept alive, so identity comparisons stay sound) and the prefixes.
        self._nodes: tuple[tuple[str, cilium.CiliumNode], ...] | None = None
        self._prefixes: tuple[tuple[IPv4Network, int], ...] = ()
        self._intervals: tuple[IpcacheInterval, ...] = ()

    def intervals(
        self,
        records: Mapping[str, EndpointRecord],
        nodes: Mapping[str, cilium.CiliumNode],
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
        prefixes = tuple(sorted(cidr_identities.items()))
        if changed or prefixes != self._prefixes or not self._same_nodes(nodes):
            self._nodes = tuple(nodes.items())
            self._prefixes = prefixes
            endpoints = [entry for _, entry in self._records.values() if entry is not None]
            world = IPv4Network("0.0.0.0/0")
            fixed = [e for e in build_ipcache((), node_addresses(nodes.values()), self.local_node)
                     if e.prefix != world]
            table: list[IpcacheEntry | tuple[IPv4Network, int]] = [
                *endpoints, *fixed, (world, WORLD.id), *cidr_identities.items()]
            self._intervals = flatten_ipcache(table)
        return self._intervals

    def _same_nodes(self, nodes: Mapping[str, cilium.CiliumNode]) -> bool:
        last = self._nodes
        if last is None or len(last) != len(nodes):
            return False
        return all(name in nodes and nodes[name] is node for name, node in last)


# --- the compiler --------------------------------------------------------------------------------------


class PolicyCompiler:
    """Policy objects, identities and endpoints in; endpoint policies out — recompiling only what
    a change requires:

    - a policy body or the named ports of an identity changed → ``compile_policies`` again (CIDR
      identity numbers kept); a policy object is looked at only when it is not the object imported
      last, and then compared field by field (:func:`same_body`), never serialized;
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
        # By id(record): the record and pod are kept alive here, so identity comparisons stay sound.
        self._ports: dict[int, tuple[EndpointRecord, k8s.Pod | None, NamedPorts]] = {}

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
        policies: Mapping[str, ApiObject],
        identities: Mapping[int, frozenset[Label]],
        records: Iterable[EndpointRecord],
        pods: Mapping[tuple[str, str], k8s.Pod],
        config: EnforcementConfig | None = None,
    ) -> bool:
        """Take the current inputs (and the enforcement settings, when given); True when verdicts may
        have changed. New settings (a live ``membrane config set``) recompile everything."""
        settings_changed = config is not None and config != self.config
        if config is not None:
            self.config = config
        policies_changed = self._import(policies) or settings_changed
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
        self, records: Iterable[EndpointRecord], pods: Mapping[tuple[str, str], k8s.Pod]
    ) -> dict[int, NamedPorts]:
        """Every identity's named ports (the union over its pods: egress named ports resolve on
        these), re-reading a pod's ports only when its record or Pod
        object changed (the intent replaces both on every write), and merging again only then."""
        seen: dict[int, tuple[EndpointRecord, k8s.Pod | None, NamedPorts]] = {}
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

    def _import(self, policies: Mapping[str, ApiObject]) -> bool:
        changed = False
        for key in [k for k in self.imported if k not in policies]:
            del self.imported[key]
            self.imported_at.pop(key, None)
            changed = True
        for key, obj in policies.items():
            current = self.imported.get(key)
            if current is not None and current.obj is not None:
                if obj is current.obj:
                    continue
                if same_body(obj, current.obj):
                    # Only status or metadata changed: the same import, holding the newer object (so the
                    # next update settles by identity again).
                    self.imported[key] = dataclasses.replace(current, obj=obj)
                    continue
            self.imported[key] = import_policy(key, obj, self.cluster_name)
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


# --- settings ----------------------------------------------------------------------------------------


def enforcement_config(cluster: ClusterConfig) -> EnforcementConfig:
    """The cluster's policy settings as the engine takes them (agents and ``policy trace`` alike)."""
    return EnforcementConfig(mode=cluster.policyEnforcementMode, audit=cluster.policyAuditMode,
                             audit_namespaces=frozenset(cluster.policyAuditNamespaces))
