"""Cluster IPs and node ports allocated at apply, with the API server's rules and messages."""

from __future__ import annotations

import asyncio

import pytest

from membrane.api import k8s
from membrane.api.manifest import parse_manifest_text
from membrane.core.config import ClusterConfig
from membrane.store import keys
from membrane.store.base import KeyValue
from membrane.store.memory import MemoryStore
from membrane.store.objects import ApplyRejected, ObjectClient


def service(name: str, spec: str = "selector: {app: web}\n  ports: [{port: 80}]") -> str:
    return f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  {spec}\n"


async def apply(client: ObjectClient, *texts: str) -> list[k8s.Service]:
    results = await client.apply(parse_manifest_text("---\n".join(texts)))
    return [r.object for r in results if isinstance(r.object, k8s.Service)]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(store: MemoryStore) -> ObjectClient:
    return ObjectClient(store)


async def test_cluster_ips_are_handed_out_lowest_first_and_freed_with_the_service(client: ObjectClient) -> None:
    first, second = await apply(client, service("a"), service("b"))
    # .0 is the network, .1 is kept for the cluster's own API service, as in Kubernetes.
    assert (first.spec.clusterIP, second.spec.clusterIP) == ("10.96.0.2", "10.96.0.3")
    assert first.spec.clusterIPs == ("10.96.0.2",) and first.spec.ipFamilies == ("IPv4",)
    await client.delete("svc", "default", "a")
    (third,) = await apply(client, service("c"))
    assert third.spec.clusterIP == "10.96.0.2"


async def test_headless_and_external_name_services_get_no_cluster_ip(client: ObjectClient) -> None:
    headless, external = await apply(
        client, service("h", "clusterIP: None\n  selector: {app: web}\n  ports: [{port: 80}]"),
        service("x", "type: ExternalName\n  externalName: db.example.com"))
    assert headless.spec.clusterIP == "None" and external.spec.clusterIP is None


async def test_node_ports_come_from_the_range_and_load_balancers_may_opt_out(client: ObjectClient) -> None:
    node_port, lb, lb_without = await apply(
        client,
        service("np", "type: NodePort\n  selector: {app: web}\n  ports: [{port: 80, name: a}, {port: 81, name: b}]"),
        service("lb", "type: LoadBalancer\n  selector: {app: web}\n  ports: [{port: 80}]"),
        service("lbx", "type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n  ports: [{port: 80}]"))
    assert [p.nodePort for p in node_port.spec.ports or ()] == [30000, 30001]
    assert [p.nodePort for p in lb.spec.ports or ()] == [30002]
    assert [p.nodePort for p in lb_without.spec.ports or ()] == [None]


async def test_requested_values_are_checked_with_the_api_servers_messages(client: ObjectClient) -> None:
    await apply(client, service("a", "type: NodePort\n  clusterIP: 10.96.0.50\n  ports: [{port: 80, nodePort: 30080}]"))
    with pytest.raises(ApplyRejected, match=r"failed to allocate IP 10\.96\.0\.50: provided IP is already allocated"):
        await apply(client, service("b", "clusterIP: 10.96.0.50\n  ports: [{port: 80}]"))
    with pytest.raises(ApplyRejected, match=r"the provided IP \(10.200.0.1\) is not in the valid range. "
                                            r"The range of valid IPs is 10.96.0.0/12"):
        await apply(client, service("c", "clusterIP: 10.200.0.1\n  ports: [{port: 80}]"))
    with pytest.raises(ApplyRejected, match=r"spec.ports\[0\].nodePort: Invalid value: 30080: "
                                            "provided port is already allocated"):
        await apply(client, service("d", "type: NodePort\n  ports: [{port: 80, nodePort: 30080}]"))
    # The same port number over UDP is another port.
    (udp,) = await apply(client, service("e", "type: NodePort\n  ports: [{port: 80, nodePort: 30080, protocol: UDP}]"))
    assert udp.spec.ports and udp.spec.ports[0].nodePort == 30080


async def test_the_clusters_configured_ranges_are_used_and_a_full_range_rejects_the_whole_apply(
        store: MemoryStore, client: ObjectClient) -> None:
    config = ClusterConfig(serviceClusterIPRange="10.100.0.0/29", nodePortRange="31000-31000")
    await store.put(keys.CLUSTER_CONFIG, config.model_dump_json().encode())
    np = "type: NodePort\n  ports: [{port: 80}]"
    (first,) = await apply(client, service("a", np))
    assert first.spec.clusterIP == "10.100.0.2" and first.spec.ports and first.spec.ports[0].nodePort == 31000
    with pytest.raises(ApplyRejected, match=r"nodePort: failed to allocate a node port: range 31000-31000 is full"):
        await apply(client, service("b"), service("c", np))
    # Nothing of the rejected apply was written.
    assert [s.name for s in await client.list("svc")] == ["a"]
    with pytest.raises(ApplyRejected, match=r"Invalid value: 32000: provided port is not in the valid range. "
                                            r"The range of valid ports is 31000-31000"):
        await apply(client, service("d", "type: NodePort\n  ports: [{port: 80, nodePort: 32000}]"))
    await apply(client, *(service(f"s{i}") for i in range(4)))  # .3 - .6: the range is full now
    with pytest.raises(ApplyRejected, match=r"failed to allocate a service IP: range 10\.100\.0\.0/29 is full"):
        await apply(client, service("full"))


class InterleavingStore(MemoryStore):
    """Lets other tasks run between a read and its answer, as a networked store does."""

    async def get(self, key: str) -> KeyValue | None:
        found = await super().get(key)
        await asyncio.sleep(0)
        return found

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        found = await super().list(prefix)
        await asyncio.sleep(0)
        return found


async def test_concurrent_applies_never_share_an_address() -> None:
    client = ObjectClient(InterleavingStore())
    results = await asyncio.gather(*(apply(client, service(f"svc{i}")) for i in range(8)))
    addresses = [svc.spec.clusterIP for (svc,) in results]
    assert len(set(addresses)) == 8, addresses


async def test_a_reapply_keeps_what_was_allocated(client: ObjectClient) -> None:
    (first,) = await apply(client, service("a", "type: NodePort\n  selector: {app: web}\n  ports: [{port: 80}]"))
    (again,) = await apply(client, service("a", "type: NodePort\n  selector: {app: other}\n  ports: [{port: 80}]"))
    assert again.spec.clusterIP == first.spec.clusterIP
    assert again.spec.ports and first.spec.ports and again.spec.ports[0].nodePort == first.spec.ports[0].nodePort
