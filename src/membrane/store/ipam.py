"""Node pod-CIDR claims in the store (compare-and-swap, so two nodes never share a subnet).

The pool arithmetic is :mod:`membrane.ipam.pool`'s (pure); this module is where it meets the
store. Primitives: :func:`claim_node_cidr`, :func:`node_cidrs`, :class:`PoolExhausted`.
"""

from __future__ import annotations

import ipaddress

from membrane.core.config import ClusterConfig
from membrane.core.errors import MembraneError
from membrane.ipam.pool import next_free_node_cidr
from membrane.store import keys
from membrane.store.base import Compare, Put, Store


class PoolExhausted(MembraneError):
    """The cluster pools have no free node CIDR left."""


def _cidr_from_key(key: str) -> ipaddress.IPv4Network:
    addr, _, length = key.removeprefix(keys.POD_CIDRS).partition("_")
    return ipaddress.IPv4Network(f"{addr}/{length}")


async def node_cidrs(store: Store) -> dict[ipaddress.IPv4Network, str]:
    kvs, _ = await store.list(keys.POD_CIDRS)
    return {_cidr_from_key(kv.key): kv.value.decode() for kv in kvs}


async def claim_node_cidr(store: Store, node: str, cluster: ClusterConfig) -> ipaddress.IPv4Network:
    """Return the node's pod CIDR, claiming the first free one if it has none."""
    for _ in range(64):
        claimed = await node_cidrs(store)
        for cidr, owner in claimed.items():
            if owner == node:
                return cidr
        candidate = next_free_node_cidr(cluster.pod_pools(), cluster.clusterPoolIPv4MaskSize, claimed)
        if candidate is None:
            pools = ", ".join(cluster.clusterPoolIPv4PodCIDRList)
            raise PoolExhausted(f"no free /{cluster.clusterPoolIPv4MaskSize} left in {pools} for node {node}")
        key = keys.pod_cidr_key(candidate)
        if (await store.txn([Compare(key, 0)], [Put(key, node.encode())])).succeeded:
            return candidate
    raise MembraneError(f"claiming a pod CIDR for node {node} kept conflicting; try again")
