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
from ipaddress import IPv4Address, ip_address
from typing import Any

from membrane.agent.intent import IntentTables
from membrane.api import k8s
from membrane.api.podrow import PodRow
from membrane.core.modules import Controller, Module
from membrane.core.statedb import StateDB, Table
from membrane.loadbalancer.endpointslices import derive_endpoint_slices, slice_backends
from membrane.loadbalancer.model import BackendCandidate, Frontend, ServiceRef
from membrane.loadbalancer.services import FrontendIds, LoadBalancerSettings, compute_frontends

#: A burst of pod changes (a rollout) lands in one computation.
DEBOUNCE = 0.02


def _candidates(service: k8s.Service, slices: Iterable[k8s.EndpointSlice]) -> list[BackendCandidate]:
    out: list[BackendCandidate] = []
    for port in service.spec.ports or ():
        for backend in slice_backends(slices, port.name):
            address = ip_address(backend.address)
            if isinstance(address, IPv4Address):
                out.append(BackendCandidate(address, backend.port, port.protocol, port.name or "", backend.node,
                                            backend.state))
    return out


class ServicesController:
    """Computes the ``frontends`` table (pure: reads tables, writes one)."""

    def __init__(self, intent: IntentTables, frontends: Table[Frontend], node: str) -> None:
        self.intent = intent
        self.frontends = frontends
        self.node = node
        self._writer = frontends.writer("services controller")
        self._ids = FrontendIds()

    def _ready_addresses(self) -> dict[tuple[str, str], str]:
        """(namespace, pod) → address of its ready endpoint."""
        return {(r.namespace, r.pod): str(r.ipv4) for r in self.intent.endpoints.snapshot() if r.state == "ready"}

    def compute(self) -> None:
        intent = self.intent
        services = [s for s in intent.services.snapshot() if s.spec.type != "ExternalName"]
        user_slices: dict[ServiceRef, list[k8s.EndpointSlice]] = defaultdict(list)
        for eps in intent.endpointslices.snapshot():
            owner = (eps.metadata.labels or {}).get(k8s.SERVICE_NAME_LABEL)
            if owner:
                user_slices[(eps.namespace or "default", owner)].append(eps)
        candidates: dict[ServiceRef, Sequence[BackendCandidate]] = {}
        selector_services = [s for s in services if s.spec.selector]
        if selector_services:
            ready = self._ready_addresses()
            by_namespace: dict[str, list[PodRow]] = defaultdict(list)
            for pod in intent.pods.snapshot():
                by_namespace[pod.namespace].append(pod)

            def address_of(pod: PodRow) -> str | None:
                return ready.get((pod.namespace, pod.name))

            for service in selector_services:
                namespace = service.namespace or "default"
                slices = derive_endpoint_slices(service, by_namespace.get(namespace, ()), address_of)
                candidates[(namespace, service.name)] = _candidates(service, slices)
        for service in services:
            ref = (service.namespace or "default", service.name)
            if not service.spec.selector:
                candidates[ref] = _candidates(service, user_slices.get(ref, ()))
        settings = intent.settings()
        algorithm = settings.config.loadBalancerAlgorithm if settings is not None else "random"
        rows = compute_frontends(services, candidates, LoadBalancerSettings(self.node, algorithm), self._ids)
        self._writer.replace_all(rows)


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
