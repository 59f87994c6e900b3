import ipaddress

import pytest

from membrane.core.config import ClusterConfig
from membrane.ipam.pool import next_free_node_cidr, next_free_pod_ip, pod_capacity, router_ip
from membrane.store import keys
from membrane.store.ipam import PoolExhausted, claim_node_cidr, node_cidrs
from membrane.store.memory import MemoryStore

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def test_node_cidrs_are_carved_in_pool_order_skipping_taken():
    pools = [N("10.244.0.0/23"), N("10.250.0.0/24")]
    assert next_free_node_cidr(pools, 24, []) == N("10.244.0.0/24")
    assert next_free_node_cidr(pools, 24, [N("10.244.0.0/24")]) == N("10.244.1.0/24")
    assert next_free_node_cidr(pools, 24, [N("10.244.0.0/23")]) == N("10.250.0.0/24")
    assert next_free_node_cidr(pools, 24, [N("10.244.0.0/23"), N("10.250.0.0/24")]) is None


def test_mask_larger_than_pool_is_skipped():
    assert next_free_node_cidr([N("10.1.0.0/26"), N("10.2.0.0/16")], 24, []) == N("10.2.0.0/24")


def test_pod_ips_skip_network_router_and_broadcast():
    cidr = N("10.244.3.0/29")  # .0 network, .1 router, .2-.6 pods, .7 broadcast
    assert router_ip(cidr) == A("10.244.3.1")
    assert pod_capacity(cidr) == 5
    used: set[ipaddress.IPv4Address] = set()
    got = []
    while (ip := next_free_pod_ip(cidr, used, got[-1] if got else None)) is not None:
        used.add(ip)
        got.append(ip)
    assert got == [A(f"10.244.3.{i}") for i in range(2, 7)]


def test_released_address_is_reused_last():
    cidr = N("10.244.3.0/29")
    used = {A("10.244.3.2"), A("10.244.3.4")}
    # .3 was just released and .4 was the last handed out: the next is .5, not .3.
    assert next_free_pod_ip(cidr, used, A("10.244.3.4")) == A("10.244.3.5")
    used |= {A("10.244.3.5"), A("10.244.3.6")}
    assert next_free_pod_ip(cidr, used, A("10.244.3.6")) == A("10.244.3.3")


async def test_two_nodes_never_share_a_cidr_and_claims_are_stable():
    store = MemoryStore()
    cluster = ClusterConfig(clusterPoolIPv4PodCIDRList=("10.244.0.0/23",), clusterPoolIPv4MaskSize=24)
    a = await claim_node_cidr(store, "a", cluster)
    b = await claim_node_cidr(store, "b", cluster)
    assert a != b
    assert await claim_node_cidr(store, "a", cluster) == a
    with pytest.raises(PoolExhausted, match=r"no free /24 left in 10\.244\.0\.0/23 for node c"):
        await claim_node_cidr(store, "c", cluster)
    await store.delete(keys.pod_cidr_key(a))  # node a removed: the operator drops its claim
    assert await claim_node_cidr(store, "c", cluster) == a
    assert await node_cidrs(store) == {a: "c", b: "b"}
