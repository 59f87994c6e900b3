"""The operator role: one holder at a time, CIDRs for new nodes, removed nodes forgotten, pods placed."""

import json

from membrane.agent.intent import IntentTables, PodWriter
from membrane.agent.operator import Operator, choose_node
from membrane.api.cilium import CiliumNode
from membrane.core.config import ClusterConfig
from membrane.core.statedb import StateDB
from membrane.store import keys
from membrane.store.identities import IdentityAllocator
from membrane.store.memory import ManualClock, MemoryStore
from membrane.testing.agentkit import pod as pod_object


class Intent:
    """Intent tables the test writes, as the reflectors would."""

    def __init__(self) -> None:
        self.tables = IntentTables.create(StateDB())
        self.nodes = self.tables.nodes.writer("test")
        self.pods = PodWriter(self.tables.pods.writer("test"))

CLUSTER = ClusterConfig(clusterPoolIPv4PodCIDRList=("10.244.0.0/22",), clusterPoolIPv4MaskSize=24)


async def node_object(store: MemoryStore, name: str, intent: Intent, cidr: str | None = None) -> None:
    """A node registering: its object in the store, and (as the reflector would) in the intent."""
    spec = {"addresses": [{"type": "InternalIP", "ip": "172.31.0.1"}], "ipam": {"podCIDRs": [cidr]} if cidr else {}}
    obj = {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name}, "spec": spec}
    await store.put(keys.object_key("ciliumnodes", None, name), json.dumps(obj).encode())
    intent.nodes.upsert(CiliumNode.model_validate(obj))


async def pod_cidrs(store: MemoryStore) -> dict[str, list[str]]:
    kvs, _ = await store.list(keys.objects_prefix("ciliumnodes"))
    return {json.loads(kv.value)["metadata"]["name"]: json.loads(kv.value)["spec"]["ipam"].get("podCIDRs", [])
            for kv in kvs}


def operator(store: MemoryStore, node: str, lease: int, intent: Intent | None = None) -> Operator:
    return Operator(store, node, lambda: lease, (intent or Intent()).tables, IdentityAllocator(store), CLUSTER)


async def test_only_one_agent_holds_the_role_and_it_moves_when_the_holder_dies():
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    lease_a, lease_b = await store.grant_lease(10), await store.grant_lease(10)
    a, b = operator(store, "a", lease_a), operator(store, "b", lease_b)
    assert await a.try_acquire()
    assert not await b.try_acquire()
    clock.advance(6)  # a stops keeping its lease alive; b goes on
    await store.keepalive(lease_b)
    clock.advance(6)
    store.expire_leases()
    assert await b.try_acquire()
    assert not await a.try_acquire()


async def test_new_nodes_get_distinct_cidrs_and_removed_nodes_release_theirs():
    store = MemoryStore()
    intent = Intent()
    op = operator(store, "n1", await store.grant_lease(10), intent)
    for name in ("n1", "n2", "n3"):
        await node_object(store, name, intent)
    await op.allocate_node_cidrs()
    cidrs = await pod_cidrs(store)
    assert sorted(c[0] for c in cidrs.values()) == ["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"]

    await store.put(keys.endpoint_key("n3", "c1"), b'{"identity": 300, "ipv4": "10.244.2.2"}')
    await store.put(keys.POD_IPS + "10.244.2.2", keys.endpoint_key("n3", "c1").encode())
    await store.delete(keys.object_key("ciliumnodes", None, "n3"))
    intent.nodes.delete("n3")
    await op.forget_removed_nodes()
    assert (await store.list(keys.endpoints_prefix("n3")))[0] == []
    assert (await store.list(keys.POD_IPS))[0] == []
    await node_object(store, "n4", intent)
    await op.allocate_node_cidrs()
    assert (await pod_cidrs(store))["n4"] == [cidrs["n3"][0]]


async def test_pending_pods_are_spread_over_ready_nodes():
    store = MemoryStore()
    lease = await store.grant_lease(10)
    for name in ("n1", "n2"):
        await store.put(keys.heartbeat_key(name), b"{}", lease=lease)
    intent = Intent()
    for i in range(4):
        pod = pod_object("x", f"p{i}", node=None)
        await store.put(keys.object_key("pods", "x", f"p{i}"), json.dumps(pod.to_dict()).encode())
        intent.pods.upsert(pod)
    await operator(store, "n1", lease, intent).schedule_pending_pods()
    placed = [json.loads(kv.value)["spec"]["nodeName"] for kv in (await store.list(keys.objects_prefix("pods")))[0]]
    assert sorted(placed) == ["n1", "n1", "n2", "n2"]


def test_choose_node_prefers_fewest_pods_then_name():
    assert choose_node([], {}) is None
    assert choose_node(["b", "a"], {}) == "a"
    assert choose_node(["a", "b"], {"a": 2, "b": 1}) == "b"
