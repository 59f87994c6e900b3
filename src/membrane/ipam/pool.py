"""Cluster-pool IPAM, pure: node pod CIDRs carved from the cluster pools, pod IPs from a node CIDR.

Cilium's cluster-pool mode: ``clusterPoolIPv4PodCIDRList`` is split into subnets of
``clusterPoolIPv4MaskSize``; each node owns one; pods get addresses from their node's subnet.
The first host address of a node's subnet is the node's router IP (the pods' gateway).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address


def next_free_node_cidr(
    pools: Sequence[IPv4Network], mask_size: int, taken: Iterable[IPv4Network]
) -> IPv4Network | None:
    """The first subnet of ``mask_size`` in pool order that overlaps nothing taken."""
    taken_list = list(taken)
    for pool in pools:
        if mask_size < pool.prefixlen:
            continue
        for subnet in pool.subnets(new_prefix=mask_size):
            if not any(subnet.overlaps(t) for t in taken_list):
                return subnet
    return None


def router_ip(node_cidr: IPv4Network) -> IPv4Address:
    return node_cidr.network_address + 1


def pod_capacity(node_cidr: IPv4Network) -> int:
    """Addresses pods can get: all but network, broadcast and the router."""
    return max(node_cidr.num_addresses - 3, 0)


def next_free_pod_ip(
    node_cidr: IPv4Network, used: set[IPv4Address], after: IPv4Address | None = None
) -> IPv4Address | None:
    """The first free pod address after ``after`` (wrapping), so a just-released address is reused last.

    Reusing an address at once would let stale conntrack entries and neighbour caches of the
    previous owner meet the new one.
    """
    first = int(node_cidr.network_address) + 2  # skip network and router
    last = int(node_cidr.broadcast_address) - 1
    if last < first:
        return None
    span = last - first + 1
    start = int(after) + 1 if after is not None and first <= int(after) <= last else first
    for offset in range(span):
        candidate = IPv4Address(first + (start - first + offset) % span)
        if candidate not in used:
            return candidate
    return None
