"""The agent's intent: one reflector per store prefix fills one typed table, shared by every module.

    store prefix                        table          row (decoded once, immutable)      key
    /membrane/objects/namespaces/       namespaces     k8s.Namespace                       name
    /membrane/objects/pods/             pods           PodRow             index node        (namespace, name)
    /membrane/objects/ciliumnodes/      nodes          cilium.CiliumNode                   name
    /membrane/objects/{netpol,cnp,ccnp} policies       PolicyObject (store key + model)    store key
    /membrane/identities/id/            identities     IdentityRow                          id
    /membrane/endpoints/                endpoints      EndpointRecord     index node        store key
    /membrane/config/cluster            cluster        ClusterConfig (one row)             "cluster"
    /membrane/objects/services/         services       k8s.Service                          (namespace, name)
    /membrane/objects/endpointslices/   endpointslices k8s.EndpointSlice                    (namespace, name)

Each store transaction becomes one table transaction (a reflector batch never splits a revision),
so a reader never sees half of one. A re-list (after a compaction or a restart of the reflector)
arrives as the difference from what the table holds, deletions included. A value that cannot be decoded is
left out and logged once: its writer went around the API.

A pod is a slim :class:`~membrane.api.podrow.PodRow`; the full ``k8s.Pod`` (``PodRow.model``) is
kept only for this node's pods (``local_node``), whose spec the runner needs: a remote pod costs a
few hundred bytes, not several KiB.

Primitives: :class:`IntentTables`, :class:`PolicyObject`, :class:`IdentityRow`, :class:`ClusterSettings`,
:class:`IntentReflector`, :class:`PodWriter`, :func:`intent_module`, :func:`endpoint_labels`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from membrane.api import cilium, k8s
from membrane.api.endpoint import EndpointRecord
from membrane.api.meta import ApiObject
from membrane.api.podrow import PodRow
from membrane.api.registry import POLICY_PLURALS
from membrane.core.config import ClusterConfig
from membrane.core.errors import MembraneError
from membrane.core.modules import Module
from membrane.core.statedb import StateDB, Table, Writer
from membrane.identity.labels import Label, identity_labels_for_pod, parse_labels
from membrane.store import keys
from membrane.store.base import EventType, KeyValue, Store
from membrane.store.objects import decode
from membrane.store.reflector import Reflector, ReflectorBatch

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class PolicyObject:
    """A stored policy: its store key (the compiler orders rules by it) and its model."""

    key: str
    obj: ApiObject


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """The cluster settings and the store revision they were written at (``status`` reports it)."""

    config: ClusterConfig
    revision: int


@dataclass(frozen=True, slots=True)
class IdentityRow:
    id: int
    labels: frozenset[Label]


@dataclass(frozen=True)
class IntentTables:
    """The intent tables of one agent (see the module docstring)."""

    namespaces: Table[k8s.Namespace]
    pods: Table[PodRow]
    nodes: Table[cilium.CiliumNode]
    policies: Table[PolicyObject]
    identities: Table[IdentityRow]
    endpoints: Table[EndpointRecord]
    cluster: Table[ClusterSettings]
    services: Table[k8s.Service]
    endpointslices: Table[k8s.EndpointSlice]

    @classmethod
    def create(cls, db: StateDB) -> IntentTables:
        return cls(
            namespaces=db.table("namespaces", primary=lambda ns: ns.name),
            pods=db.table("pods", primary=lambda p: (p.namespace, p.name), indexes={"node": lambda p: [p.node]}),
            nodes=db.table("nodes", primary=lambda n: n.name),
            policies=db.table("policies", primary=lambda p: p.key),
            identities=db.table("identities", primary=lambda i: i.id),
            endpoints=db.table("endpoints", primary=lambda e: e.key, indexes={"node": lambda e: [e.node]}),
            cluster=db.table("cluster", primary=lambda c: "cluster"),
            services=db.table("services", primary=lambda s: (s.namespace or "default", s.name)),
            endpointslices=db.table("endpointslices", primary=lambda s: (s.namespace or "default", s.name)),
        )

    def all(self) -> tuple[Table[Any], ...]:
        return (self.namespaces, self.pods, self.nodes, self.policies, self.identities, self.endpoints,
                self.cluster, self.services, self.endpointslices)

    def settings(self) -> ClusterSettings | None:
        """The cluster settings as the store holds them now (None before the initial list)."""
        return self.cluster.snapshot().get("cluster")


def ready_addresses(tables: IntentTables) -> dict[tuple[str, str], str]:
    """(namespace, pod) -> the address of its ready endpoint: the pods services may send to."""
    return {(r.namespace, r.pod): str(r.ipv4) for r in tables.endpoints.snapshot() if r.state == "ready"}


def endpoint_labels(tables: IntentTables, namespace: str, pod: str, cluster_name: str) -> frozenset[Label]:
    """The identity-relevant labels of a pod: its labels, its namespace's, its service account."""
    pod_obj = tables.pods.snapshot().get((namespace, pod))
    ns_obj = tables.namespaces.snapshot().get(namespace)
    pod_labels = pod_obj.labels if pod_obj is not None else {}
    service_account = (pod_obj.service_account if pod_obj is not None else None) or "default"
    ns_labels = ns_obj.labels if ns_obj is not None else {}
    return identity_labels_for_pod(namespace, pod_labels, ns_labels, service_account, cluster_name)


# -- decoding: store key/value → row, store key → table key ---------------------------------------------


def _decode_object(kv: KeyValue) -> ApiObject:
    return decode(kv)


def _pod_decoder(local_node: str | None) -> Callable[[KeyValue], PodRow]:
    """Pods as slim rows; the full object only for ``local_node``'s pods (None: for every pod)."""
    def decode_pod(kv: KeyValue) -> PodRow:
        pod = decode(kv)
        if not isinstance(pod, k8s.Pod):
            raise ValueError(f"{kv.key} holds a {pod.kind}, not a Pod")
        return PodRow.of(pod, keep_model=local_node is None or pod.spec.nodeName == local_node)
    return decode_pod


class PodWriter:
    """The pods table's writer for code that has Pod objects (tests, tools that fill the intent
    without reflectors): each pod becomes its :class:`PodRow`, with the full model kept."""

    def __init__(self, writer: Writer[PodRow]) -> None:
        self.writer = writer

    def upsert(self, *pods: k8s.Pod | PodRow) -> None:
        self.writer.upsert(*(p if isinstance(p, PodRow) else PodRow.of(p) for p in pods))

    def delete(self, *keys: tuple[str, str]) -> None:
        self.writer.delete(*keys)


def _decode_policy(kv: KeyValue) -> PolicyObject:
    return PolicyObject(kv.key, decode(kv))


def _decode_identity(kv: KeyValue) -> IdentityRow:
    return IdentityRow(int(kv.key.rsplit("/", 1)[1]), parse_labels(json.loads(kv.value)))


def _decode_endpoint(kv: KeyValue) -> EndpointRecord:
    return EndpointRecord.from_json(kv.value)


def _decode_cluster(kv: KeyValue) -> ClusterSettings:
    return ClusterSettings(ClusterConfig.model_validate_json(kv.value), kv.mod_revision)


def _namespaced_key(prefix: str) -> Callable[[str], Hashable]:
    def key(store_key: str) -> Hashable:
        namespace, _, name = store_key.removeprefix(prefix).rpartition("/")
        return (namespace, name)
    return key


def _name_key(prefix: str) -> Callable[[str], Hashable]:
    return lambda store_key: store_key.removeprefix(prefix)


class IntentReflector:
    """One store prefix into one table: list, then watch; one table transaction per batch."""

    def __init__(self, store: Store, prefix: str, writer: Writer[Any], decode_kv: Callable[[KeyValue], Any],
                 table_key: Callable[[str], Hashable]) -> None:
        self.prefix = prefix
        self.writer = writer
        self._reflector = Reflector(store, prefix)
        self._decode = decode_kv
        self._table_key = table_key
        self._decoded: dict[str, tuple[int, Any]] = {}  # store key -> (mod revision, row or None)
        self.synced = asyncio.Event()
        #: The store revision the table reflects.
        self.revision = 0

    def _row(self, kv: KeyValue) -> Any:
        cached = self._decoded.get(kv.key)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        try:
            row = self._decode(kv)
        except (MembraneError, ValueError, TypeError, KeyError, IndexError) as exc:  # ValidationError is a ValueError
            log.warning("ignoring %s: cannot be decoded: %s", kv.key, exc)
            row = None
        self._decoded[kv.key] = (kv.mod_revision, row)
        return row

    def apply(self, batch: ReflectorBatch) -> None:
        # A re-list's events are the difference from the reflector's previous snapshot, deletions
        # included, so every batch is applied the same way.
        with self.writer.txn() as txn:
            for event in batch.events:
                if event.type is EventType.PUT:
                    row = self._row(event.kv)
                    if row is not None:
                        txn.upsert(row)
                        continue
                self._decoded.pop(event.kv.key, None)
                txn.delete(self._table_key(event.kv.key))
        self.revision = max(self.revision, batch.revision)
        self.synced.set()

    async def run(self) -> None:
        """Follow the prefix until the store closes; a store error ends the run (the lifecycle
        restarts it, and the reflector resumes from the snapshot it kept)."""
        subscription = self._reflector.subscribe()
        reflector = asyncio.create_task(self._reflector.run(), name=f"reflector {self.prefix}")
        try:
            while True:
                following = asyncio.ensure_future(anext(subscription))
                done, _ = await asyncio.wait({following, reflector}, return_when=asyncio.FIRST_COMPLETED)
                if following in done:
                    try:
                        self.apply(following.result())
                    except StopAsyncIteration:
                        return  # the store closed: the agent is stopping
                    continue
                following.cancel()
                reflector.result()  # raises the reflector's error
                return
        finally:
            subscription.close()
            reflector.cancel()
            await asyncio.gather(reflector, return_exceptions=True)


def reflectors(store: Store, tables: IntentTables, *, local_node: str | None = None) -> list[IntentReflector]:
    """One reflector per prefix, each the only writer of its table. ``local_node``: the node whose
    pods keep their full object (None: every pod's)."""
    found = [
        IntentReflector(store, keys.objects_prefix("namespaces"), tables.namespaces.writer("reflector namespaces"),
                        _decode_object, _name_key(keys.objects_prefix("namespaces"))),
        IntentReflector(store, keys.objects_prefix("pods"), tables.pods.writer("reflector pods"),
                        _pod_decoder(local_node), _namespaced_key(keys.objects_prefix("pods"))),
        IntentReflector(store, keys.objects_prefix("ciliumnodes"), tables.nodes.writer("reflector ciliumnodes"),
                        _decode_object, _name_key(keys.objects_prefix("ciliumnodes"))),
        IntentReflector(store, keys.IDENTITY_BY_ID, tables.identities.writer("reflector identities"),
                        _decode_identity, lambda k: int(k.rsplit("/", 1)[1]) if k.rsplit("/", 1)[1].isdigit() else k),
        IntentReflector(store, keys.ENDPOINTS, tables.endpoints.writer("reflector endpoints"),
                        _decode_endpoint, lambda k: k),
        IntentReflector(store, keys.CLUSTER_CONFIG, tables.cluster.writer("reflector cluster config"),
                        _decode_cluster, lambda k: "cluster"),
        IntentReflector(store, keys.objects_prefix("services"), tables.services.writer("reflector services"),
                        _decode_object, _namespaced_key(keys.objects_prefix("services"))),
        IntentReflector(store, keys.objects_prefix("endpointslices"),
                        tables.endpointslices.writer("reflector endpointslices"),
                        _decode_object, _namespaced_key(keys.objects_prefix("endpointslices"))),
    ]
    # Three prefixes, one table: a writer shared by the three reflectors of the policy kinds
    # (they never write the same key).
    policy_writer = tables.policies.writer("reflectors policies")
    found += [IntentReflector(store, keys.objects_prefix(plural), policy_writer, _decode_policy, lambda k: k)
              for plural in POLICY_PLURALS]
    return found


def intent_module(store: Store, tables: IntentTables, *,
                  local_node: str | None = None) -> tuple[Module, list[IntentReflector]]:
    """The intent module: programs nothing; its ``start`` returns once every table holds the
    store's initial list, so no module downstream acts on a partial view. ``local_node``: the node
    whose pods keep their full object (see :func:`reflectors`)."""
    found = reflectors(store, tables, local_node=local_node)

    async def initial_sync() -> None:
        await asyncio.gather(*(r.synced.wait() for r in found))

    module = Module(
        name="intent",
        writes=tables.all(),
        early_tasks={f"reflector {r.prefix}": r.run for r in found},
        start=initial_sync,
    )
    return module, found
