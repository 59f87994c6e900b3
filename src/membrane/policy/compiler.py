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

import bisect
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from membrane.api import cilium, k8s
from membrane.api.endpoint import EndpointRecord
from membrane.api.meta import ApiObject
from membrane.api.podrow import PodRow
from membrane.core.config import ClusterConfig
from membrane.core.errors import MembraneError
from membrane.identity.ipcache import EndpointAddress, IpcacheEntry, NodeAddresses, build_ipcache
from membrane.identity.labels import Label
from membrane.identity.reserved import HOST, REMOTE_NODE, WORLD
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


#: What the compiler reads of a pod: the full model, or the intent's slim row of it.
PodPorts = k8s.Pod | PodRow


def _pod_spec_ports(pod: PodPorts | None) -> NamedPorts:
    if pod is None:
        return {}
    if isinstance(pod, PodRow):
        return pod.policy_named_ports()
    return named_ports_of(pod.spec)


def policy_endpoint(record: EndpointRecord, pods: Mapping[tuple[str, str], PodPorts]) -> PolicyEndpoint:
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


#: The (address, identity) claims one source (an endpoint record, a node) makes on /32s.
Points = tuple[tuple[int, int], ...]
T = TypeVar("T")


def _sync_claims(cache: dict[str, tuple[T, Points]], claims_at: dict[int, dict[str, int]],
                 current: Mapping[str, T], changed: Iterable[str] | None,
                 points_of: Callable[[str, T], Points], touched: set[int]) -> None:
    """Bring ``cache`` (key -> (source, its points)) and ``claims_at`` (address -> key -> identity)
    up to ``current`` for the keys in ``changed`` (None: every key), adding each address whose
    claims changed to ``touched``. An unchanged source (the same object) costs a lookup."""

    def drop(key: str) -> None:
        cached = cache.pop(key, None)
        for address, _ in cached[1] if cached is not None else ():
            claims = claims_at.get(address, {})
            claims.pop(key, None)
            if not claims:
                claims_at.pop(address, None)
            touched.add(address)

    if changed is None:
        for key in [k for k in cache if k not in current]:
            drop(key)
        changed = current.keys()
    for key in changed:
        source = current.get(key)
        if source is None:
            drop(key)
            continue
        cached = cache.get(key)
        if cached is not None and cached[0] is source:
            continue
        points = points_of(key, source)
        if cached is not None and cached[1] == points:
            cache[key] = (source, points)
            continue
        drop(key)
        cache[key] = (source, points)
        for address, identity in points:
            claims_at.setdefault(address, {})[key] = identity
            touched.add(address)


class IpcacheBuilder:
    """This node's ipcache intervals, kept up to date incrementally.

    Every /32 of the table (endpoints, node and router addresses, /32 policy prefixes) is a point
    over a background of the shorter prefixes (world and the policy prefixes), so a change of
    endpoints or nodes re-flattens only the intervals next to the addresses it moved: the result
    is spliced into the previous one, whose interval objects are kept (a renderer recognises them
    by identity). ``changed_records``/``changed_nodes`` name the keys changed since the last call
    (a table's :meth:`~membrane.core.statedb.Snapshot.changed_keys`); without them every record and
    node is compared with the last one seen (records are replaced on every write, nodes compared
    by identity). When nothing changed the same tuple object is returned. The result equals
    :func:`ipcache_entries` flattened (endpoints win over nodes, nodes over policy prefixes)."""

    #: More moved addresses than this in one call: one linear flattening instead of local ones.
    FULL_REBUILD = 512

    def __init__(self, local_node: str | None) -> None:
        self.local_node = local_node
        # record key -> (record, its point (address, identity) or None)
        self._records: dict[str, tuple[EndpointRecord, Points]] = {}
        # node name -> (node object, its points); the objects are kept alive for identity comparisons
        self._nodes: dict[str, tuple[cilium.CiliumNode, tuple[tuple[int, int], ...]]] = {}
        # address -> claims in arrival order: endpoints (the first wins), nodes (the last wins)
        self._endpoint_at: dict[int, dict[str, int]] = {}
        self._node_at: dict[int, dict[str, int]] = {}
        self._prefix_points: dict[int, int] = {}
        self._prefixes: tuple[tuple[IPv4Network, int], ...] | None = None
        self._background: list[tuple[int, int, int]] = []
        self._background_starts: list[int] = []
        self._points: dict[int, int] = {}  # address -> the identity that wins there
        self._sorted: list[int] = []  # the points' addresses, sorted
        self._out: list[IpcacheInterval] = []
        self._out_ints: list[tuple[int, int, int]] = []
        self._out_starts: list[int] = []
        self._intervals: tuple[IpcacheInterval, ...] = ()

    def intervals(
        self,
        records: Mapping[str, EndpointRecord],
        nodes: Mapping[str, cilium.CiliumNode],
        cidr_identities: Mapping[IPv4Network, int],
        *,
        changed_records: Iterable[str] | None = None,
        changed_nodes: Iterable[str] | None = None,
    ) -> tuple[IpcacheInterval, ...]:
        touched: set[int] = set()
        self._update_records(records, changed_records, touched)
        self._update_nodes(nodes, changed_nodes, touched)
        prefixes = tuple(sorted(cidr_identities.items()))
        if prefixes != self._prefixes:
            self._set_prefixes(prefixes)
            self._rebuild()
            return self._intervals
        moved = []
        for address in touched:
            identity = self._resolve(address)
            if identity == self._points.get(address):
                continue
            moved.append(address)
            if identity is None:
                del self._points[address]
                del self._sorted[bisect.bisect_left(self._sorted, address)]
            else:
                if address not in self._points:
                    bisect.insort(self._sorted, address)
                self._points[address] = identity
        if len(moved) > self.FULL_REBUILD:
            self._rebuild()
        elif moved:
            for address in moved:
                self._refresh(address)
            self._intervals = tuple(self._out)
        return self._intervals

    # -- sources -----------------------------------------------------------------------------------------

    def _update_records(self, records: Mapping[str, EndpointRecord], changed: Iterable[str] | None,
                        touched: set[int]) -> None:
        def points(_key: str, record: EndpointRecord) -> Points:
            return ((int(record.ipv4), record.identity),) if record.state in IPCACHE_STATES else ()

        _sync_claims(self._records, self._endpoint_at, records, changed, points, touched)

    def _update_nodes(self, nodes: Mapping[str, cilium.CiliumNode], changed: Iterable[str] | None,
                      touched: set[int]) -> None:
        def points(name: str, node: cilium.CiliumNode) -> Points:
            identity = HOST.id if name == self.local_node else REMOTE_NODE.id
            return tuple((int(ip), identity) for address in node_addresses([node])
                         for ip in (address.node_ip, address.router_ip) if ip is not None)

        _sync_claims(self._nodes, self._node_at, nodes, changed, points, touched)

    def _resolve(self, address: int) -> int | None:
        """The identity of a /32: an endpoint's, else a node's, else a /32 policy prefix's."""
        claims = self._endpoint_at.get(address)
        if claims:
            return next(iter(claims.values()))
        claims = self._node_at.get(address)
        if claims:
            return next(reversed(claims.values()))
        return self._prefix_points.get(address)

    def _set_prefixes(self, prefixes: tuple[tuple[IPv4Network, int], ...]) -> None:
        self._prefixes = prefixes
        self._prefix_points = {int(p.network_address): i for p, i in prefixes if p.prefixlen == 32}
        world = IPv4Network("0.0.0.0/0")
        background = flatten_ipcache([(world, WORLD.id), *((p, i) for p, i in prefixes if p.prefixlen < 32)])
        self._background = [(int(b.first), int(b.last), b.identity) for b in background]
        self._background_starts = [first for first, _, _ in self._background]

    # -- flattening ----------------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        addresses = self._endpoint_at.keys() | self._node_at.keys() | self._prefix_points.keys()
        self._points = {a: i for a in addresses if (i := self._resolve(a)) is not None}
        self._sorted = sorted(self._points)
        self._out_ints = self._flatten(0, 0xFFFFFFFF)
        self._out = [_interval(t) for t in self._out_ints]
        self._out_starts = [first for first, _, _ in self._out_ints]
        self._intervals = tuple(self._out)

    def _refresh(self, address: int) -> None:
        """Re-flatten the intervals around ``address`` (its neighbours decide what merges)."""
        starts = self._out_starts
        i = bisect.bisect_right(starts, max(address - 1, 0)) - 1
        j = bisect.bisect_right(starts, min(address + 1, 0xFFFFFFFF)) - 1
        first, last = self._out_ints[i][0], self._out_ints[j][1]
        fresh = self._flatten(first, last)
        kept = dict(zip(self._out_ints[i:j + 1], self._out[i:j + 1], strict=True))
        self._out[i:j + 1] = [kept.get(t) or _interval(t) for t in fresh]
        self._out_ints[i:j + 1] = fresh
        starts[i:j + 1] = [f for f, _, _ in fresh]

    def _flatten(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """The disjoint intervals of ``first``..``last``, neighbours with one identity merged."""
        out: list[tuple[int, int, int]] = []
        points, background, starts = self._points, self._background, self._background_starts

        def emit(low: int, high: int, identity: int) -> None:
            if out and out[-1][2] == identity:
                out[-1] = (out[-1][0], high, identity)
            else:
                out.append((low, high, identity))

        def fill(low: int, high: int) -> None:
            k = bisect.bisect_right(starts, low) - 1
            while low <= high:
                _, end, identity = background[k]
                emit(low, min(end, high), identity)
                low = end + 1
                k += 1

        cursor = first
        sorted_points = self._sorted
        for address in sorted_points[bisect.bisect_left(sorted_points, first):
                                     bisect.bisect_right(sorted_points, last)]:
            if cursor < address:
                fill(cursor, address - 1)
            emit(address, address, points[address])
            cursor = address + 1
        if cursor <= last:
            fill(cursor, last)
        return out


def _interval(ints: tuple[int, int, int]) -> IpcacheInterval:
    return IpcacheInterval(IPv4Address(ints[0]), IPv4Address(ints[1]), ints[2])


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
        # By record key: the record and pod are kept alive here, so identity comparisons stay sound.
        self._port_entries: dict[str, tuple[EndpointRecord, PodPorts | None, NamedPorts]] = {}
        self._records_of_pod: dict[tuple[str, str], set[str]] = {}
        self._members: dict[int, set[str]] = {}  # identity -> keys of its records

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
        records: Iterable[EndpointRecord] | Mapping[str, EndpointRecord],
        pods: Mapping[tuple[str, str], PodPorts],
        config: EnforcementConfig | None = None,
        *,
        changed_records: Iterable[str] | None = None,
        changed_pods: Iterable[tuple[str, str]] | None = None,
    ) -> bool:
        """Take the current inputs (and the enforcement settings, when given); True when verdicts may
        have changed. New settings (a live ``membrane config set``) recompile everything.

        ``changed_records`` (record keys) and ``changed_pods`` (namespace, name) may name what
        changed since the last call, with ``records`` a mapping by record key: the named ports are
        then updated from those alone."""
        settings_changed = config is not None and config != self.config
        if config is not None:
            self.config = config
        policies_changed = self._import(policies) or settings_changed
        named = self._named_ports(records, pods, changed_records, changed_pods)
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
        self,
        records: Iterable[EndpointRecord] | Mapping[str, EndpointRecord],
        pods: Mapping[tuple[str, str], PodPorts],
        changed_records: Iterable[str] | None,
        changed_pods: Iterable[tuple[str, str]] | None,
    ) -> dict[int, NamedPorts]:
        """Every identity's named ports (the union over its pods: egress named ports resolve on
        these). Only the records named by ``changed_records`` and the records of the pods named by
        ``changed_pods`` are looked at when both are given (else every record, compared with the
        record and pod seen last: the intent replaces both on every write), and only the
        identities whose pods changed are merged again."""
        entries = self._port_entries
        if changed_records is None or changed_pods is None or not isinstance(records, Mapping):
            by_key = records if isinstance(records, Mapping) else {r.key: r for r in records}
            check: set[str] = set(by_key) | set(entries)
        else:
            by_key = records
            check = set(changed_records)
            for pod_key in changed_pods:
                check |= self._records_of_pod.get(pod_key, set())
        dirty: set[int] = set()
        for key in check:
            record = by_key.get(key)
            old = entries.get(key)
            pod = pods.get((record.namespace, record.pod)) if record is not None else None
            if old is not None:
                if record is not None and old[0] is record and old[1] is pod:
                    continue
                self._forget_ports(key, old[0])
            if record is None:
                if old is not None:
                    dirty.add(old[0].identity)
                continue
            ports = _pod_spec_ports(pod)
            entries[key] = (record, pod, ports)
            self._records_of_pod.setdefault((record.namespace, record.pod), set()).add(key)
            self._members.setdefault(record.identity, set()).add(key)
            if old is None or old[0].identity != record.identity or old[2] != ports:
                dirty.add(record.identity)
                if old is not None:
                    dirty.add(old[0].identity)
        if not dirty:
            return self._named
        named = dict(self._named)
        for identity in dirty:
            merged: dict[str, set[tuple[int, int]]] = {}
            for key in self._members.get(identity, ()):
                for name, values in entries[key][2].items():
                    merged.setdefault(name, set()).update(values)
            if merged:
                named[identity] = {n: frozenset(p) for n, p in merged.items()}
            else:
                named.pop(identity, None)
        return named

    def _forget_ports(self, key: str, record: EndpointRecord) -> None:
        del self._port_entries[key]
        _discard(self._records_of_pod, (record.namespace, record.pod), key)
        _discard(self._members, record.identity, key)

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


def _discard(index: dict[Any, set[str]], value: Any, key: str) -> None:
    members = index.get(value)
    if members is not None:
        members.discard(key)
        if not members:
            del index[value]


# --- settings ----------------------------------------------------------------------------------------


def enforcement_config(cluster: ClusterConfig) -> EnforcementConfig:
    """The cluster's policy settings as the engine takes them (agents and ``policy trace`` alike)."""
    return EnforcementConfig(mode=cluster.policyEnforcementMode, audit=cluster.policyAuditMode,
                             audit_namespaces=frozenset(cluster.policyAuditNamespaces))
