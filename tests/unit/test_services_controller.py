"""The agent's services controller: intent tables in, ``frontends`` rows out — backends follow pods
and their endpoints, applied slices feed selectorless services, settings apply live, and a pass
recomputes only the services whose inputs changed."""

from __future__ import annotations

from ipaddress import IPv4Address

from membrane.agent.intent import ClusterSettings, IntentTables, PodWriter
from membrane.agent.services import ServicesController
from membrane.api import k8s
from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.core.config import ClusterConfig
from membrane.core.statedb import StateDB, Table
from membrane.loadbalancer.model import Frontend
from membrane.testing.agentkit import pod


def service(name: str, spec: str, namespace: str = "default") -> k8s.Service:
    (obj,) = parse_manifest_text(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  {spec}\n")
    assert isinstance(obj, k8s.Service)
    return obj


def record(namespace: str, name: str, ip: str, node: str = "node1", state: str = "ready") -> EndpointRecord:
    return EndpointRecord(f"c-{namespace}-{name}", 1, node, namespace, name, "eth0", "/ns", IPv4Address(ip), 1000,
                          (), "runner", state)  # type: ignore[arg-type]


class Harness:
    def __init__(self) -> None:
        db = StateDB()
        self.intent = IntentTables.create(db)
        self.frontends: Table[Frontend] = db.table("frontends", primary=lambda f: f.address)
        self.controller = ServicesController(self.intent, self.frontends, "node1")
        self.services = self.intent.services.writer("test")
        self.slices = self.intent.endpointslices.writer("test")
        self.pods = PodWriter(self.intent.pods.writer("test"))
        self.endpoints = self.intent.endpoints.writer("test")
        self.cluster = self.intent.cluster.writer("test")

    def rows(self) -> dict[str, Frontend]:
        self.controller.compute()
        return {f"{f.name} {f.address}": f for f in self.frontends.snapshot()}

    def backends(self, name: str) -> list[str]:
        (row,) = [f for f in self.rows().values() if f.name == name]
        return [f"{b.address} {b.state}" for b in row.selected]


WEB = "clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]"


def test_backends_are_the_matching_pods_with_a_ready_endpoint() -> None:
    h = Harness()
    h.services.upsert(service("web", WEB))
    h.pods.upsert(pod("default", "a", {"app": "web"}), pod("default", "b", {"app": "web"}, node="node2"),
                  pod("default", "c", {"app": "other"}), pod("prod", "d", {"app": "web"}))
    h.endpoints.upsert(record("default", "a", "10.244.0.5"), record("default", "b", "10.244.1.5", "node2"),
                       record("default", "c", "10.244.0.6"), record("prod", "d", "10.244.0.7"))
    assert h.backends("default/web") == ["10.244.0.5 active", "10.244.1.5 active"]
    h.endpoints.upsert(record("default", "b", "10.244.1.5", "node2", state="not-ready"))
    assert h.backends("default/web") == ["10.244.0.5 active"]
    terminating = pod("default", "a", {"app": "web"})
    terminating = terminating.model_copy(update={"metadata": terminating.metadata.model_copy(
        update={"deletionTimestamp": "2026-12-07T10:00:00Z"})})
    h.pods.upsert(terminating)
    assert h.backends("default/web") == ["10.244.0.5 terminating"]  # nothing else is left: it still serves


def test_a_selectorless_service_uses_the_slices_applied_for_it() -> None:
    h = Harness()
    h.services.upsert(service("manual", "clusterIP: 10.96.0.11\n  ports: [{port: 80}]"))
    assert h.backends("default/manual") == []
    (eps,) = parse_manifest_text(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        "metadata: {name: manual-1, namespace: default, labels: {kubernetes.io/service-name: manual}}\n"
        "addressType: IPv4\nports: [{port: 9000}]\n"
        "endpoints: [{addresses: [192.168.7.1]}, {addresses: [192.168.7.2], conditions: {ready: false}}]\n")
    assert isinstance(eps, k8s.EndpointSlice)
    h.slices.upsert(eps)
    (row,) = h.rows().values()
    assert [(str(b.address), b.port) for b in row.selected] == [("192.168.7.1", 9000)]


def test_the_cluster_default_algorithm_applies_live() -> None:
    h = Harness()
    h.services.upsert(service("web", WEB))
    assert {f.algorithm for f in h.rows().values()} == {"random"}
    h.cluster.upsert(ClusterSettings(ClusterConfig(loadBalancerAlgorithm="maglev"), 7))
    assert {f.algorithm for f in h.rows().values()} == {"maglev"}


def test_a_pass_recomputes_only_the_services_whose_inputs_changed() -> None:
    h = Harness()
    h.services.upsert(service("web", WEB), service("api", WEB.replace("10.96.0.10", "10.96.0.12"), "prod"))
    h.pods.upsert(pod("default", "a", {"app": "web"}), pod("prod", "b", {"app": "web"}))
    h.endpoints.upsert(record("default", "a", "10.244.0.5"), record("prod", "b", "10.244.0.6"))
    before = h.rows()
    h.pods.upsert(pod("prod", "c", {"app": "web"}))
    h.endpoints.upsert(record("prod", "c", "10.244.0.7"))
    after = h.rows()
    web, api = "default/web 10.96.0.10:80/TCP", "prod/api 10.96.0.12:80/TCP"
    assert after[web] is before[web]  # the same row object: nothing downstream renders it again
    assert after[api] is not before[api] and len(after[api].selected) == 2
