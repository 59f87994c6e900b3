"""The datapath module: local endpoints and policy tables → desired nft objects → the kernel.

    local_endpoints · endpoint_policies · ipcache · cluster (flow visibility)   (+ masquerade settings)
        │  DatapathController.compute (pure): render_policy → DesiredDatapath → build_ruleset
        ▼
    nft          one row per chain, set and map of the table ``inet membrane``
        │  Reconciler "nft" → NftOperations: one transaction per pass, chain-granular
        │  (NftReconciler.sync); every resync period a read-back repair (NftReconciler.repair)
        ▼
    kernel

A CNI ADD answers only once its endpoint's anti-spoofing entry is in the kernel:
:meth:`DatapathModule.wait_programmed` waits until the nft reconciler has realized a desired table
computed from that revision of ``local_endpoints``. The same bookkeeping tells which store
revision of the intent the kernel enforces (``status``: ``policy.syncedRevisions``).

Primitives: :class:`NftObject`, :class:`DatapathController`, :class:`NftOperations`,
:class:`DatapathModule`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from membrane.agent.intent import ClusterSettings
from membrane.agent.policy import PolicyTables
from membrane.api.endpoint import EndpointRecord
from membrane.core.config import ClusterConfig
from membrane.core.modules import Controller, Module
from membrane.core.reconciler import DEFAULT_RESYNC_INTERVAL, Reconciler
from membrane.core.statedb import StateDB, Table, wait_any
from membrane.datapath.nft.objects import Chain, Map, Ruleset, Set
from membrane.datapath.nft.runner import NftRunner
from membrane.datapath.policy import PolicyRenderer, render_policy
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import (
    TABLE_COMMENT,
    TABLE_FAMILY,
    TABLE_NAME,
    DesiredDatapath,
    EndpointAddress,
    FlowLog,
    Masquerade,
    PolicyDatapath,
    build_ruleset,
)
from membrane.datapath.services import ServiceDatapath, ServiceRenderer, maglev_settings
from membrane.loadbalancer.model import Frontend

NftKind = str  # "chain" | "set" | "map"


@dataclass(frozen=True)
class ServiceInputs:
    """What the service section needs besides the frontends: the address replies to an outside
    client come back to (the node's) and the pods' gateway (the source of a hairpinned connection)."""

    frontends: Table[Frontend]
    node_address: IPv4Address
    gateway: IPv4Address


@dataclass(frozen=True)
class NftObject:
    """One chain, set or map of the owned table. ``order`` keeps the rendered order."""

    name: str
    kind: NftKind
    order: int
    obj: Chain | Set | Map


def nft_objects(ruleset: Ruleset) -> list[NftObject]:
    """The table's objects as rows, in the order the ruleset lists them."""
    objects: list[tuple[NftKind, Chain | Set | Map]] = [
        *(("chain", c) for c in ruleset.chains),
        *(("set", s) for s in ruleset.sets),
        *(("map", m) for m in ruleset.maps),
    ]
    return [NftObject(obj.name, kind, order, obj) for order, (kind, obj) in enumerate(objects)]


def ruleset_of(rows: Sequence[NftObject]) -> Ruleset:
    ordered = sorted(rows, key=lambda r: r.order)
    return Ruleset(
        family=TABLE_FAMILY, table=TABLE_NAME, comment=TABLE_COMMENT,
        chains=tuple(r.obj for r in ordered if isinstance(r.obj, Chain)),
        sets=tuple(r.obj for r in ordered if r.kind == "set" and isinstance(r.obj, Set)),
        maps=tuple(r.obj for r in ordered if isinstance(r.obj, Map)),
    )


class NftOperations:
    """The owned nft table as a batch target: every pass is one atomic transaction."""

    def __init__(self, reconciler: NftReconciler) -> None:
        self.reconciler = reconciler
        self.last_kind = ""

    async def apply(self, desired: Sequence[NftObject], updated: Sequence[NftObject],
                    deleted: Sequence[NftObject]) -> None:
        self.last_kind = (await self.reconciler.sync(ruleset_of(desired))).kind

    async def repair(self, desired: Sequence[NftObject]) -> None:
        self.last_kind = (await self.reconciler.repair(ruleset_of(desired))).kind


StoreRevisions = tuple[tuple[str, int], ...]


def policy_datapath(tables: PolicyTables, renderer: PolicyRenderer) -> tuple[PolicyDatapath, StoreRevisions]:
    """The policy tables rendered as map and set elements (and the store revisions they reflect)."""
    ipcache = tables.ipcache.snapshot().get("ipcache")
    by_ifindex = {row.ifindex: row.policy for row in tables.endpoint_policies.snapshot()}
    renderer.forget(set(by_ifindex))
    rendered = render_policy(by_ifindex, ipcache.intervals if ipcache else (), renderer)
    return rendered, ipcache.store_revisions if ipcache else ()


class DatapathController:
    """Computes the desired nft objects (pure: reads tables, writes the ``nft`` table)."""

    def __init__(self, local_endpoints: Table[EndpointRecord], policy: PolicyTables | None, nft: Table[NftObject],
                 masquerade: Masquerade | None, flow_log: FlowLog | None,
                 cluster: Table[ClusterSettings] | None = None, services: ServiceInputs | None = None) -> None:
        self.local_endpoints = local_endpoints
        self.services = services
        self.policy = policy
        self.cluster = cluster
        self.nft = nft
        self.masquerade = masquerade
        self.flow_log = flow_log
        self._writer = nft.writer("datapath controller")
        self._renderer = PolicyRenderer()
        self._service_renderer = ServiceRenderer()  # unchanged frontends are not rendered again
        #: (nft table revision, local_endpoints revision, store revisions) of each computation.
        self.computed: list[tuple[int, int, tuple[tuple[str, int], ...]]] = []
        #: Set after the next computation.
        self.next_compute = asyncio.Event()
        self._built: tuple[object, ...] | None = None  # what the rows in the table were built from (kept)

    def _flow_log(self) -> FlowLog | None:
        """This agent's log rules, unless the cluster turned flow visibility off (live)."""
        settings = self.cluster.snapshot().get("cluster") if self.cluster is not None else None
        return None if settings is not None and not settings.config.hubbleEnabled else self.flow_log

    def _services(self, endpoints: frozenset[EndpointAddress]) -> ServiceDatapath | None:
        if self.services is None:
            return None
        frontends = tuple(sorted(self.services.frontends.snapshot(), key=lambda f: f.id))
        settings = self.cluster.snapshot().get("cluster") if self.cluster is not None else None
        return ServiceDatapath(frontends, self.services.node_address, self.services.gateway,
                               frozenset(e.ipv4 for e in endpoints),
                               maglev_settings(settings.config if settings is not None else ClusterConfig()),
                               self._service_renderer)

    def compute(self) -> bool:
        """Write the desired nft objects; False when it waited for the policy controller instead."""
        endpoints_snap = self.local_endpoints.snapshot()
        if self.policy is not None:
            computed = self.policy.ipcache.snapshot().get("ipcache")
            if computed is None or computed.local_revision < endpoints_snap.revision:
                # The policy controller has not seen these endpoints yet; it writes its tables next,
                # and that runs this again: a new endpoint never reaches the kernel without its policy.
                return False
        ready = [r for r in endpoints_snap if r.state == "ready" and r.host_ifindex]
        policy = None
        store_revisions: tuple[tuple[str, int], ...] = ()
        if self.policy is not None:
            policy, store_revisions = policy_datapath(self.policy, self._renderer)
        flow_log = self._flow_log()
        endpoints = frozenset(EndpointAddress(r.host_ifindex, r.ipv4) for r in ready)
        # Building the ruleset costs a sort of every map (the ipcache has an element per cluster
        # endpoint): skip it when nothing it is built from changed (the policy controller rewrites
        # its rows with new store revisions on every pass). Equality is cheap here: the renderer
        # hands back the same ipcache tuple while the intervals are unchanged.
        services = self._services(endpoints)
        built = (endpoints, flow_log, policy, services)
        if built != self._built:
            desired = DesiredDatapath(endpoints, self.masquerade, flow_log, policy, services)
            self._writer.replace_all(nft_objects(build_ruleset(desired)))
            self._built = built
        self.computed = [*self.computed[-63:], (self.nft.revision, endpoints_snap.revision, store_revisions)]
        done, self.next_compute = self.next_compute, asyncio.Event()
        done.set()
        return True


class DatapathModule:
    """Wires the controller and the nft reconciler; answers "is this endpoint programmed yet"."""

    def __init__(self, db: StateDB, local_endpoints: Table[EndpointRecord], policy: PolicyTables | None,
                 nft_runner: NftRunner, masquerade: Masquerade | None, flow_log: FlowLog | None, *,
                 cluster: Table[ClusterSettings] | None = None, services: ServiceInputs | None = None,
                 resync_interval: float = DEFAULT_RESYNC_INTERVAL) -> None:
        self.table: Table[NftObject] = db.table("nft", primary=lambda r: r.name, initialized=False)
        self.controller = DatapathController(local_endpoints, policy, self.table, masquerade, flow_log, cluster,
                                             services)
        self.operations = NftOperations(NftReconciler(nft_runner))
        self.reconciler = Reconciler("nft", db, self.table, self.operations, resync_interval=resync_interval)
        reads: tuple[Table[Any], ...] = (local_endpoints,) + ((cluster,) if cluster is not None else ())
        if policy is not None:
            reads += (policy.endpoint_policies, policy.ipcache)
        if services is not None:
            reads += (services.frontends,)
        self._controller = Controller("datapath", reads, self.controller.compute, outputs=[self.table])
        self.module = Module("datapath", reads=reads, writes=(self.table,), start=self._first_sync,
                             controllers=(self._controller,), reconcilers=(self.reconciler,))

    async def _first_sync(self) -> None:
        """Program the kernel once before anything downstream starts (the API answers CNI)."""
        self._controller.run_once()
        await self.reconciler.reconcile_once()

    def _realized(self) -> tuple[int, tuple[tuple[str, int], ...]] | None:
        """(local_endpoints revision, store revisions) the kernel holds, or None before the first pass."""
        realized = self.reconciler.realized_revision
        done = [(ep, store) for nft_rev, ep, store in self.controller.computed if nft_rev <= realized]
        return done[-1] if done else None

    async def wait_programmed(self, endpoints_revision: int, timeout: float = 30.0) -> None:
        """Return once the kernel holds a ruleset computed from ``local_endpoints`` at
        ``endpoints_revision`` or later."""
        async with asyncio.timeout(timeout):
            while True:
                realized = self._realized()
                if realized is not None and realized[0] >= endpoints_revision:
                    return
                # A computation with unchanged rows needs no pass; a changed one waits for it.
                await wait_any([self.reconciler.next_pass, self.controller.next_compute])

    def synced_revisions(self) -> dict[str, int]:
        realized = self._realized()
        return dict(realized[1]) if realized is not None else {}

    def status(self) -> dict[str, Any]:
        health = self.reconciler.health()
        state = "Ok" if not health["errors"] else "Failing"
        summary = (f"{state}   {self.reconciler.passes} passes, {health['fullSyncs']} full resyncs, "
                   f"last {self.operations.last_kind or 'none'}; {health['rows']} chains, sets and maps")
        if health["lastError"] and health["errors"]:
            summary += f"; error: {health['lastError']}"
        return {"summary": summary, "syncs": self.reconciler.passes, "lastSync": health["lastFullSync"]}
