"""What the agent asks of netlink and what it gets back (pure data, no I/O).

Primitives: :data:`RTPROT_MEMBRANE` (the route protocol number marking routes the agent owns),
:func:`endpoint_ifname` (the host-side veth name of a container), :class:`EndpointSpec`,
:class:`AttachedEndpoint`, :class:`HostDevice`, :class:`OwnedEndpoints`, and
:func:`orphaned_links` (which owned links a prune removes).

Ownership is by name and protocol only: links named ``lxc`` + 11 hex digits are endpoint veths, routes
with protocol 177 are the agent's. Nothing else is ever deleted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from membrane.core.errors import InvalidInput

# rtm_protocol of every route the agent installs (iproute2 prints "proto 177"). Values above
# RTPROT_STATIC (4) up to 255 are free for routing daemons; 177 is not in rt_protos.
RTPROT_MEMBRANE = 177

# Host side of the node's router device pair (Cilium's cilium_host/cilium_net). The router IP,
# the pods' gateway, lives on HOST_DEVICE as a /32.
HOST_DEVICE = "membrane_host"
HOST_DEVICE_PEER = "membrane_net"

ENDPOINT_IFNAME_PREFIX = "lxc"
_ENDPOINT_IFNAME = re.compile(r"^lxc[0-9a-f]{11}$")
IFNAMSIZ = 16  # including the NUL: names are at most 15 characters


def endpoint_ifname(container_id: str) -> str:
    """``lxc`` + 11 hex digits of sha256(container id): stable across retries, 14 characters."""
    return ENDPOINT_IFNAME_PREFIX + hashlib.sha256(container_id.encode()).hexdigest()[:11]


def is_endpoint_ifname(name: str) -> bool:
    return bool(_ENDPOINT_IFNAME.match(name))


def _check_ifname(name: str, what: str) -> str | None:
    if not name or len(name) >= IFNAMSIZ or "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        return f"{what}: {name!r} is not a valid interface name (1-15 characters, no '/' or spaces)"
    return None


@dataclass(frozen=True)
class EndpointSpec:
    """One container to wire: its namespace (a path such as /run/netns/X or /proc/PID/ns/net)."""

    container_id: str
    netns: str
    ifname: str
    pod_ip: IPv4Address
    router_ip: IPv4Address
    mtu: int = 1500

    def __post_init__(self) -> None:
        problems = []
        if not self.container_id:
            problems.append("container_id: must not be empty")
        if not self.netns.startswith("/"):
            problems.append(f"netns: {self.netns!r} must be an absolute path")
        if (problem := _check_ifname(self.ifname, "ifname")) is not None:
            problems.append(problem)
        if not 68 <= self.mtu <= 65535:
            problems.append(f"mtu: {self.mtu} is outside 68-65535")
        if self.pod_ip == self.router_ip:
            problems.append(f"pod_ip: {self.pod_ip} is the router address")
        if problems:
            raise InvalidInput(problems)

    @property
    def host_ifname(self) -> str:
        return endpoint_ifname(self.container_id)


@dataclass(frozen=True)
class AttachedEndpoint:
    """What ``attach_endpoint`` made: enough for the CNI result and the nft endpoint sets."""

    container_id: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    container_ifname: str
    container_ifindex: int
    container_mac: str
    pod_ip: IPv4Address


@dataclass(frozen=True)
class HostDevice:
    """The node's router device after ``ensure_host_device``."""

    ifname: str
    ifindex: int
    router_ip: IPv4Address
    mtu: int


@dataclass(frozen=True)
class OwnedLink:
    ifname: str
    ifindex: int


@dataclass(frozen=True)
class OwnedRoute:
    dst: IPv4Network
    ifname: str
    ifindex: int


@dataclass(frozen=True)
class OwnedEndpoints:
    """Endpoint veths (``lxc…``) and the protocol-177 routes through them, in the node namespace."""

    links: tuple[OwnedLink, ...] = ()
    routes: tuple[OwnedRoute, ...] = ()

    @property
    def ifnames(self) -> frozenset[str]:
        return frozenset(link.ifname for link in self.links)


def orphaned_links(owned: OwnedEndpoints, keep: Collection[str]) -> tuple[str, ...]:
    """Owned endpoint links not in ``keep``, sorted; their routes go with them."""
    keep_set = set(keep)
    return tuple(sorted(name for name in owned.ifnames if is_endpoint_ifname(name) and name not in keep_set))
