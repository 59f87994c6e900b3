"""The ipcache, pure: which identity (and which hosting node) every known address has.

Sources, most specific first: endpoint /32s (their pod identity), node addresses (``host`` on
the node itself, ``remote-node`` elsewhere), each node's router IP (likewise), and ``0.0.0.0/0``
as ``world``. The prefixes policies name are added with local CIDR identities by
:func:`membrane.policy.ipcache.with_cidr_identities`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from membrane.identity.reserved import HOST, REMOTE_NODE, WORLD


@dataclass(frozen=True, slots=True, order=True)
class IpcacheEntry:
    prefix: ipaddress.IPv4Network
    identity: int
    source: str  # where the entry came from, as ``cilium-dbg ip list`` prints it
    host_ip: str = ""  # the node that hosts the address (tunnel endpoint)


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    ip: ipaddress.IPv4Address
    identity: int
    node_ip: str


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    name: str
    node_ip: ipaddress.IPv4Address
    router_ip: ipaddress.IPv4Address | None


def build_ipcache(
    endpoints: Iterable[EndpointAddress], nodes: Iterable[NodeAddresses], local_node: str | None
) -> list[IpcacheEntry]:
    entries: dict[ipaddress.IPv4Network, IpcacheEntry] = {
        ipaddress.IPv4Network("0.0.0.0/0"): IpcacheEntry(ipaddress.IPv4Network("0.0.0.0/0"), WORLD.id, "reserved")
    }
    for node in nodes:
        identity = HOST.id if node.name == local_node else REMOTE_NODE.id
        for ip in (node.node_ip, node.router_ip):
            if ip is not None:
                prefix = ipaddress.IPv4Network(ip)
                entries[prefix] = IpcacheEntry(prefix, identity, "node", str(node.node_ip))
    for ep in endpoints:
        prefix = ipaddress.IPv4Network(ep.ip)
        entries[prefix] = IpcacheEntry(prefix, ep.identity, "custom-resource", ep.node_ip)
    return sorted(entries.values())
