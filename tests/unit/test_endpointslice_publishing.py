"""The operator publishes the EndpointSlices of selector Services: a pod being deleted stays in its
slice as terminating for its grace period, then leaves it; slices a user wrote are left alone."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

from membrane.agent.intent import IntentTables
from membrane.agent.operator import Operator
from membrane.api import k8s
from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.api.podrow import PodRow
from membrane.cli.printers import object_table
from membrane.core.config import ClusterConfig
from membrane.core.statedb import StateDB
from membrane.store import keys
from membrane.store.identities import IdentityAllocator
from membrane.store.memory import MemoryStore
from membrane.store.objects import ObjectClient, decode

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: external}
spec:
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: external-1
  labels: {kubernetes.io/service-name: external}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints: [{addresses: [10.9.0.5]}]
"""


def web_pod(name: str) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: web}}}}
spec:
  nodeName: node1
  containers: [{{name: web, image: i, ports: [{{name: http, containerPort: 8080}}]}}]
"""


class Cluster:
    """A store, the intent tables as the reflectors would fill them, and the operator."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.client = ObjectClient(self.store, clock=lambda: "2026-05-01T10:00:00Z")
        self.intent = IntentTables.create(StateDB())
        self.pods = self.intent.pods.writer("test")
        self.services = self.intent.services.writer("test")
        self.slices_writer = self.intent.endpointslices.writer("test")
        self.endpoints = self.intent.endpoints.writer("test")
        self.operator = Operator(self.store, "node1", lambda: 1, self.intent, IdentityAllocator(self.store),
                                 ClusterConfig())

    async def sync(self) -> None:
        """What the reflectors do: the pods, services and slices of the store into the tables."""
        kvs, _ = await self.store.list(keys.objects_prefix("pods"))
        self.pods.replace_all(PodRow.of(p) for p in (decode(kv) for kv in kvs) if isinstance(p, k8s.Pod))
        for plural, writer in (("services", self.services), ("endpointslices", self.slices_writer)):
            kvs, _ = await self.store.list(keys.objects_prefix(plural))
            writer.replace_all(decode(kv) for kv in kvs)  # type: ignore[misc]

    async def publish(self) -> tuple[int, int]:
        await self.sync()
        return await self.operator.publish_endpoint_slices()

    def endpoint(self, pod: str, index: int) -> EndpointRecord:
        record = EndpointRecord(container_id=f"c-{pod}", endpoint_id=index, node="node1", namespace="default",
                                pod=pod, ifname="eth0", netns="/run/netns/x",
                                ipv4=ipaddress.IPv4Address(f"10.244.0.{index}"), identity=1000, labels=(),
                                origin="runner", state="ready")
        self.endpoints.upsert(record)
        return record

    async def slices(self) -> list[k8s.EndpointSlice]:
        found = await self.client.list("endpointslices")
        return [s for s in found if isinstance(s, k8s.EndpointSlice)]

    async def revision(self) -> int:
        return (await self.store.list(keys.objects_prefix("endpointslices")))[1]


def conditions(eps: k8s.EndpointSlice) -> dict[str, tuple[bool | None, bool | None, bool | None]]:
    return {e.targetRef.name or "": (e.conditions.ready, e.conditions.serving, e.conditions.terminating)
            for e in eps.endpoints if e.targetRef}


async def test_a_deleted_pod_is_terminating_in_its_slice_then_leaves_it() -> None:
    cluster = Cluster()
    await cluster.client.apply(parse_manifest_text("---\n".join([MANIFESTS, web_pod("a"), web_pod("b")])))
    await cluster.sync()
    cluster.endpoint("a", 2)
    b = cluster.endpoint("b", 3)

    assert await cluster.publish() == (1, 0)
    derived, user = sorted(await cluster.slices(), key=lambda s: s.name != "external-1")[::-1]
    assert user.name == "external-1"
    assert derived.name.startswith("web-") and derived.labels[k8s.SERVICE_NAME_LABEL] == "web"
    assert derived.ports == (k8s.EndpointPort(name="http", port=8080),)  # the named targetPort, resolved
    assert conditions(derived) == {"a": (True, True, False), "b": (True, True, False)}
    table = object_table("EndpointSlice", [derived, user], now=datetime(2026, 5, 1, 10, 5, tzinfo=UTC))
    assert [line.split()[:4] for line in table.splitlines()] == [  # AGE: the operator stamps its own clock
        ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"],
        [derived.name, "IPv4", "8080", "10.244.0.2,10.244.0.3"],
        ["external-1", "IPv4", "5432", "10.9.0.5"],
    ]

    # Nothing changed: nothing is written.
    revision = await cluster.revision()
    assert await cluster.publish() == (0, 0)
    assert await cluster.revision() == revision

    # b is deleted: during its grace period it stays, terminating (and still serving).
    await cluster.client.delete("Pod", "default", "b")
    await cluster.sync()
    assert await cluster.publish() == (1, 0)
    [derived] = [s for s in await cluster.slices() if s.name.startswith("web-")]
    assert conditions(derived) == {"a": (True, True, False), "b": (False, True, True)}

    # Its node has stopped it: the endpoint and the object are gone, and so is its entry.
    cluster.endpoints.delete(b.key)
    assert await cluster.client.finish_deletion("Pod", "default", "b", (await cluster.client.get(
        "Pod", "default", "b")).metadata.uid or "")
    await cluster.sync()
    await cluster.publish()
    [derived] = [s for s in await cluster.slices() if s.name.startswith("web-")]
    assert conditions(derived) == {"a": (True, True, False)}

    # The service goes: so does its slice; the user's slice of the selectorless service stays.
    await cluster.client.delete("Service", "default", "web")
    assert await cluster.publish() == (0, 1)
    assert [s.name for s in await cluster.slices()] == ["external-1"]


async def test_a_users_slice_is_never_replaced_or_removed() -> None:
    cluster = Cluster()
    await cluster.client.apply(parse_manifest_text("---\n".join([MANIFESTS, web_pod("a")])))
    await cluster.sync()
    cluster.endpoint("a", 2)
    await cluster.publish()
    [derived] = [s for s in await cluster.slices() if s.name.startswith("web-")]
    # A user takes over the derived slice's name with a slice of their own.
    mine = derived.model_copy(update={"metadata": derived.metadata.model_copy(
        update={"labels": {k8s.SERVICE_NAME_LABEL: "web", k8s.MANAGED_BY_LABEL: "me"}})})
    await cluster.client.apply([mine])
    await cluster.client.delete("Service", "default", "web")
    await cluster.publish()
    assert sorted(s.name for s in await cluster.slices()) == sorted(["external-1", derived.name])


async def test_a_terminating_pod_of_a_removed_node_is_removed() -> None:
    cluster = Cluster()
    await cluster.client.apply(parse_manifest_text(web_pod("a")))
    await cluster.client.delete("Pod", "default", "a")
    await cluster.sync()
    await cluster.operator.remove_pods_of_removed_nodes()  # node1 has no CiliumNode: nobody will stop it
    assert await cluster.client.find("Pod", "default", "a") is None
