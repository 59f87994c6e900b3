"""The services module: Services and their endpoints → this node's ``frontends`` table.

    services · endpointslices · pods · endpoints · cluster   (intent tables)
        │  ServicesController.compute (pure): endpoint slices (derived for selector services, the
        │  user's for the others) → backend candidates → compute_frontends
        ▼
    frontends    one row per frontend (address . protocol . port), with its backends

The datapath controller renders ``frontends`` into the nft table (``membrane.datapath.services``);
the observer names a flow's service from it; ``membrane service list`` prints it.

A selector service's backends come from the slices this agent derives itself from the pods and
endpoints it sees (the same function the operator uses to publish them), so a backend change does
not wait for the operator role; a service without a selector uses the slices users apply.

Primitives: :class:`ServicesController`, :func:`services_module`, :func:`frontend_rows`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

from membrane.agent.intent import IntentTables, ready_addresses
from membrane.api import k8s
from membrane.api.podrow import PodRow
from membrane.core.modules import Controller, Module
from membrane.core.statedb import StateDB, Table
from membrane.loadbalancer.endpointslices import derive_endpoint_slices, slice_backends
from membrane.loadbalancer.model import BackendCandidate, Frontend, FrontendType, L4Addr, ServiceRef, parse_address
from membrane.loadbalancer.services import FrontendIds, LoadBalancerSettings, service_frontends

#: A burst of pod changes (a rollout) lands in one computation.
DEBOUNCE = 0.02


def _candidates(service: k8s.Service, slices: Iterable[k8s.EndpointSlice]) -> list[BackendCandidate]:
    out: list[BackendCandidate] = []
    for port in service.spec.ports or ():
        for backend in slice_backends(slices, port.name):
            address = parse_address(backend.address)
            if isinstance(address, IPv4Address):
                out.append(BackendCandidate(address, backend.port, port.protocol, port.name or "", backend.node,
                                            backend.state))
    return out


class ServicesController:
    """Computes the ``frontends`` table (pure: reads tables, writes one).

    Incremental: a service's frontends are recomputed only when what they are derived from changed
    (the Service object itself; for a selector service its namespace's pods and their ready
    addresses, for the others the slices naming it). Rows are immutable and replaced on change,
    so "changed" is an identity test, and an unchanged service's frontends are the very objects
    of the previous pass (the datapath controller's per-frontend cache relies on that)."""

    def __init__(self, intent: IntentTables, frontends: Table[Frontend], node: str) -> None:
        self.intent = intent
        self.frontends = frontends
        self.node = node
        self._writer = frontends.writer("services controller")
        self._ids = FrontendIds()
        # ref -> (inputs, frontends of that service, unnumbered)
        self._per_service: dict[ServiceRef, tuple[tuple[object, ...], list[tuple[FrontendType, Frontend]]]] = {}
        self._settings: LoadBalancerSettings | None = None
        self._numbered: dict[int, tuple[Frontend, Frontend]] = {}  # id(unnumbered) -> (it, numbered row)

    def compute(self) -> None:
        intent = self.intent
        settings_row = intent.settings()
        algorithm = settings_row.config.loadBalancerAlgorithm if settings_row is not None else "random"
        settings = LoadBalancerSettings(self.node, algorithm)
        if settings != self._settings:
            self._per_service.clear()
            self._settings = settings
        services = sorted((s for s in intent.services.snapshot() if s.spec.type != "ExternalName"),
                          key=lambda s: (s.namespace or "default", s.name))
        user_slices: dict[ServiceRef, list[k8s.EndpointSlice]] = defaultdict(list)
        for eps in intent.endpointslices.snapshot():
            owner = (eps.metadata.labels or {}).get(k8s.SERVICE_NAME_LABEL)
            if owner:
                user_slices[(eps.namespace or "default", owner)].append(eps)
        pods_by_namespace: dict[str, tuple[PodRow, ...]] = {}
        addresses_by_namespace: dict[str, tuple[str | None, ...]] = {}
        ready: dict[tuple[str, str], str] = {}
        if any(s.spec.selector for s in services):
            ready = ready_addresses(intent)
            grouped: dict[str, list[PodRow]] = defaultdict(list)
            for pod in intent.pods.snapshot():
                grouped[pod.namespace].append(pod)
            for namespace, pods in grouped.items():
                pods_by_namespace[namespace] = tuple(pods)
                addresses_by_namespace[namespace] = tuple(ready.get((namespace, p.name)) for p in pods)

        def address_of(pod: PodRow) -> str | None:
            return ready.get((pod.namespace, pod.name))

        previous, self._per_service = self._per_service, {}
        claimed: dict[L4Addr, tuple[FrontendType, Frontend]] = {}
        for service in services:
            namespace = service.namespace or "default"
            ref = (namespace, service.name)
            own = tuple(sorted(user_slices.get(ref, ()), key=lambda e: e.name))
            if service.spec.selector:
                inputs: tuple[object, ...] = (service, pods_by_namespace.get(namespace, ()),
                                              addresses_by_namespace.get(namespace, ()))
            else:
                inputs = (service, own)
            cached = previous.get(ref)
            if cached is not None and cached[0] == inputs:
                result = cached[1]
            else:
                slices = derive_endpoint_slices(service, pods_by_namespace.get(namespace, ()), address_of) \
                    if service.spec.selector else own
                result = service_frontends(service, _candidates(service, slices), settings)
            self._per_service[ref] = (inputs, result)
            for kind, frontend in result:
                claimed.setdefault(frontend.address, (kind, frontend))
        numbers = self._ids.assign((addr, kind) for addr, (kind, _) in claimed.items())
        numbered: dict[int, tuple[Frontend, Frontend]] = {}
        rows: list[Frontend] = []
        for addr, (kind, frontend) in claimed.items():
            number = numbers[(addr, kind)]
            memo = self._numbered.get(id(frontend))
            # The same unnumbered object with the same id: the same row as before.
            row = memo[1] if memo is not None and memo[0] is frontend and memo[1].id == number \
                else replace(frontend, id=number)
            numbered[id(frontend)] = (frontend, row)
            rows.append(row)
        self._numbered = numbered
        self._write(rows)

    def _write(self, rows: Sequence[Frontend]) -> None:
        """Upsert the rows that are not the very objects the table holds; delete the rest."""
        current = self.frontends.snapshot()
        wanted = {row.address: row for row in rows}
        with self._writer.txn() as txn:
            for address, row in wanted.items():
                if current.get(address) is not row:
                    txn.upsert(row)
            for key in current.primary_keys():
                if key not in wanted:
                    txn.delete(key)


def services_module(db: StateDB, intent: IntentTables, node: str) -> tuple[Module, Table[Frontend]]:
    frontends: Table[Frontend] = db.table("frontends", primary=lambda f: f.address,
                                          indexes={"service": lambda f: [f.service]}, initialized=False)
    controller = ServicesController(intent, frontends, node)
    reads = (intent.services, intent.endpointslices, intent.pods, intent.endpoints, intent.cluster)
    module = Module("services", reads=reads, writes=(frontends,),
                    controllers=(Controller("services", reads, controller.compute, outputs=[frontends],
                                            debounce=DEBOUNCE),))
    return module, frontends


def frontend_rows(frontends: Iterable[Frontend]) -> list[dict[str, Any]]:
    """The frontends as ``membrane service list`` and the agent API show them."""
    return [
        {
            "id": f.id, "frontend": str(f.address), "type": f.type, "service": f.name, "port": f.port_name,
            "algorithm": f.algorithm, "sessionAffinityTimeout": f.affinity_timeout,
            "backends": [
                # selected: new connections go there; internalOnly: only from this node's pods
                # (externalTrafficPolicy Local sends outside clients to this node's backends).
                {"address": f"{b.address}:{b.port}", "node": b.node or "", "state": b.state,
                 "selected": b in f.selected,
                 "internalOnly": b not in f.selected and f.internal is not None and b in f.internal}
                for b in f.backends
            ],
        }
        for f in sorted(frontends, key=lambda f: f.id)
    ]
