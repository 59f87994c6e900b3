"""The policy module: intent tables → compiled policy → desired policy tables, and status back.

    intent: policies · identities · endpoints (every node's) · pods · nodes      local_endpoints
        │  PolicyController.compute (pure; PolicyCompiler and IpcacheBuilder are incremental)
        ▼
    endpoint_policies   host veth index → EndpointPolicy (typed verdicts)   ─┐ read by the datapath
    ipcache             one row: the flattened intervals                     ─┘ module, which renders nft
    policy_status       one row per CNP/CCNP: this node's import and enforcement
        │  Reconciler "policy-status" → ObjectClient.modify_status (a write only when it changes)
        ▼
    status.conditions[Valid] and status.nodes[<node>] of each policy object

Nothing here touches the kernel or speaks nft: the engine's typed output goes into tables, and
:mod:`membrane.agent.datapath` turns it into map elements. A burst of changes (a namespace of
pods, an ``apply -f`` of many policies) costs one recompilation: the controller is debounced.

Primitives: :class:`EndpointPolicyRow`, :class:`IpcacheRow`, :class:`PolicyStatusRow`,
:class:`PolicyTables`, :class:`PolicyController`, :class:`PolicyStatusOperations`,
:func:`policy_module`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from membrane.agent.intent import IntentTables
from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.api.meta import ApiObject
from membrane.api.podrow import PodRow
from membrane.core.errors import InvalidInput, NotFound
from membrane.core.modules import Controller, Module
from membrane.core.reconciler import Reconciler
from membrane.core.statedb import Snapshot, StateDB, Table
from membrane.identity.labels import parse_labels
from membrane.policy.compiler import (
    ImportedPolicy,
    IpcacheBuilder,
    PolicyCompiler,
    enforcement_config,
    policy_endpoint,
)
from membrane.policy.ipcache import IpcacheInterval
from membrane.policy.mapstate import EndpointPolicy, EnforcementConfig
from membrane.policy.status import STATUS_KINDS, desired_status
from membrane.store.objects import now_rfc3339

log = logging.getLogger(__name__)

StatusWriter = Callable[[str, str | None, str, Callable[[ApiObject], Any]], Awaitable[Any]]


@dataclass(frozen=True)
class EndpointPolicyRow:
    """The policy of one local endpoint, keyed by its host veth index."""

    ifindex: int
    endpoint: str  # NS/POD
    policy: EndpointPolicy


@dataclass(frozen=True)
class IpcacheRow:
    """This node's ipcache (one row) and the store revisions of the intent it was computed from."""

    intervals: tuple[IpcacheInterval, ...]
    store_revisions: tuple[tuple[str, int], ...] = ()
    #: The ``local_endpoints`` revision the endpoint policies were computed from: the datapath waits
    #: for it, so a new endpoint's anti-spoofing entry and its policy reach the kernel together.
    local_revision: int = 0
    key: str = "ipcache"


@dataclass(frozen=True)
class PolicyStatusRow:
    """What this node reports for one CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy."""

    key: str  # the store key
    policy: ImportedPolicy
    enforcing: bool
    revision: int  # this agent's policy revision when it imported the current spec


@dataclass(frozen=True)
class PolicyTables:
    endpoint_policies: Table[EndpointPolicyRow]
    ipcache: Table[IpcacheRow]
    status: Table[PolicyStatusRow]

    @classmethod
    def create(cls, db: StateDB) -> PolicyTables:
        return cls(
            endpoint_policies=db.table("endpoint_policies", primary=lambda r: r.ifindex, initialized=False),
            ipcache=db.table("ipcache", primary=lambda r: r.key, initialized=False),
            status=db.table("policy_status", primary=lambda r: r.key, initialized=False),
        )


def _origin_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"


class PolicyController:
    """Recomputes this node's policy tables from the intent (``compute``: no I/O).

    ``store_revisions()`` gives the store revision each intent prefix reflects, carried into the
    ipcache row so ``status`` can say which store revision the kernel enforces. The enforcement
    settings come from the ``cluster`` table once it has a row (``config`` until then), so a live
    ``membrane config set policyAuditMode=true`` recompiles on every node.
    """

    def __init__(self, intent: IntentTables, local_endpoints: Table[EndpointRecord], tables: PolicyTables,
                 node_name: str, *, cluster_name: str = "default", config: EnforcementConfig | None = None,
                 store_revisions: Callable[[], Mapping[str, int]] = dict) -> None:
        self.intent = intent
        self.local_endpoints = local_endpoints
        self.tables = tables
        self.node_name = node_name
        self.compiler = PolicyCompiler(cluster_name=cluster_name, config=config)
        self._ipcache = IpcacheBuilder(node_name)
        self._store_revisions = store_revisions
        self._policies_writer = tables.endpoint_policies.writer("policy controller")
        self._ipcache_writer = tables.ipcache.writer("policy controller")
        self._status_writer = tables.status.writer("policy controller")
        self.last_compile = 0.0
        self._seen: dict[str, int] = {}  # intent table -> the revision the last computation read
        self._overridden: set[str] = set()  # records the local table had newer than the intent

    # -- reads shared with flow attribution ------------------------------------------------------------

    def pods(self) -> Mapping[tuple[str, str], PodRow]:
        return cast(Mapping[tuple[str, str], PodRow], self.intent.pods.snapshot().as_dict())

    def local_record(self, ifindex: int) -> EndpointRecord | None:
        return next((r for r in self.local_endpoints.snapshot() if r.host_ifindex == ifindex), None)

    # -- the pure step -----------------------------------------------------------------------------------

    def _changed(self, name: str, snapshot: Snapshot[Any]) -> set[Any] | None:
        """The keys of ``snapshot``'s table changed since the last computation (None: all)."""
        changed = snapshot.changed_keys(self._seen.get(name, -1))
        self._seen[name] = snapshot.revision
        return changed

    def compute(self) -> None:
        store_revisions = tuple(sorted(self._store_revisions().items()))
        intent = self.intent
        pods_snapshot, endpoints_snapshot, nodes_snapshot = (
            intent.pods.snapshot(), intent.endpoints.snapshot(), intent.nodes.snapshot())
        pods = cast(Mapping[tuple[str, str], PodRow], pods_snapshot.as_dict())
        cluster = cast(Mapping[str, EndpointRecord], endpoints_snapshot.as_dict())
        # Only what changed since the last computation is looked at: on a large cluster a change
        # touches a handful of the tens of thousands of records.
        changed_records = self._changed("endpoints", endpoints_snapshot)
        changed_pods = self._changed("pods", pods_snapshot)
        changed_nodes = self._changed("nodes", nodes_snapshot)
        local_snapshot = self.local_endpoints.snapshot()
        local = [r for r in local_snapshot if r.state == "ready" and r.host_ifindex]
        # The ipcache covers every node's endpoints, and local records the intent has not seen yet.
        overridden = {r.key for r in local if cluster.get(r.key) is not r}
        if overridden:
            cluster = {**cluster, **{r.key: r for r in local if r.key in overridden}}
        if changed_records is not None:
            changed_records |= overridden | self._overridden
        self._overridden = overridden
        started = time.perf_counter()
        settings = intent.settings()
        changed = self.compiler.update(
            {p.key: p.obj for p in intent.policies.snapshot()},
            {i.id: i.labels for i in intent.identities.snapshot()},
            cluster, pods, enforcement_config(settings.config) if settings is not None else None,
            changed_records=changed_records, changed_pods=changed_pods)
        if changed:
            self.last_compile = time.perf_counter() - started
        endpoints = [(policy_endpoint(r, pods), parse_labels(r.labels)) for r in local]
        policies = self.compiler.endpoint_policies(endpoints)
        rows = [EndpointPolicyRow(r.host_ifindex, f"{r.namespace}/{r.pod}", policies[f"{r.namespace}/{r.pod}"])
                for r in local]
        nodes = cast(Mapping[str, CiliumNode], nodes_snapshot.as_dict())
        intervals = self._ipcache.intervals(cluster, nodes, self.compiler.compiled.cidr_identities,
                                            changed_records=changed_records, changed_nodes=changed_nodes)
        self._policies_writer.replace_all(rows)
        self._ipcache_writer.replace_all([IpcacheRow(intervals, store_revisions, local_snapshot.revision)])
        self._status_writer.replace_all(self._status_rows(rows))

    def _status_rows(self, rows: Sequence[EndpointPolicyRow]) -> list[PolicyStatusRow]:
        selecting: set[str] = set()
        for row in rows:
            for origin in (*row.policy.ingress.selected_by, *row.policy.egress.selected_by):
                selecting.add(_origin_key(origin.kind, origin.namespace, origin.name))
        return [
            PolicyStatusRow(key, policy, _origin_key(policy.kind, policy.namespace, policy.name) in selecting,
                            self.compiler.imported_at.get(key, self.compiler.revision))
            for key, policy in self.compiler.imported.items() if policy.kind in STATUS_KINDS
        ]

    def status(self) -> dict[str, Any]:
        imported = self.compiler.imported.values()
        return {
            "revision": self.compiler.revision,
            "policies": sum(p.ok for p in imported),
            "invalid": sum(not p.ok for p in imported),
            "rules": len(self.compiler.rules),
            "lastCompileSeconds": round(self.last_compile, 4),
        }


class PolicyStatusOperations:
    """Writes one policy's status for this node (``ObjectClient.modify_status``: nothing is written
    when the status is unchanged, so a full resync costs reads)."""

    def __init__(self, node_name: str, write_status: StatusWriter) -> None:
        self.node_name = node_name
        self._write_status = write_status

    async def update(self, row: PolicyStatusRow) -> None:
        policy = row.policy
        now = now_rfc3339()

        def compute(obj: ApiObject) -> dict[str, Any]:
            current = getattr(obj, "status", None)
            data = current.model_dump(mode="json", exclude_none=True) if current is not None else None
            return desired_status(data, policy, self.node_name, row.enforcing, row.revision, now)

        try:
            await self._write_status(policy.kind, policy.namespace or None, policy.name, compute)
        except NotFound:
            return  # deleted meanwhile: the row goes with the next computation
        except InvalidInput as exc:
            # The stored object itself does not validate (written around the API): its status
            # cannot be written either. Reported once by the reconciler, not retried forever.
            log.warning("cannot write the status of %s %s: %s", policy.kind, policy.name, exc)

    async def delete(self, row: PolicyStatusRow) -> None:
        """The policy is gone, and its status with it."""

    async def prune(self, rows: Sequence[PolicyStatusRow]) -> None:
        """Nothing to prune: statuses live inside the policy objects."""


def policy_module(db: StateDB, intent: IntentTables, local_endpoints: Table[EndpointRecord],
                  controller: PolicyController, write_status: StatusWriter | None, *,
                  resync_interval: float, debounce: float = 0.02) -> Module:
    tables = controller.tables
    # A new local endpoint waits for its policy (a CNI ADD answers once both are in the kernel): no
    # debounce for it; bursts of store changes are debounced.
    compute = Controller("policy", [*intent.all(), local_endpoints], controller.compute, debounce=debounce,
                         urgent=[local_endpoints], outputs=[tables.endpoint_policies, tables.ipcache, tables.status])
    reconcilers: tuple[Reconciler[Any], ...] = ()
    if write_status is not None:
        reconcilers = (Reconciler("policy-status", db, tables.status,
                                  PolicyStatusOperations(controller.node_name, write_status),
                                  resync_interval=resync_interval),)

    async def first_compile() -> None:
        # Before the datapath's first sync: restored endpoints are never programmed without policy.
        compute.run_once()

    return Module("policy", reads=(*intent.all(), local_endpoints),
                  writes=(tables.endpoint_policies, tables.ipcache, tables.status),
                  start=first_compile, controllers=(compute,), reconcilers=reconcilers)
