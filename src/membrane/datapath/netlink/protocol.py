"""The netlink boundary of the agent: :class:`Netlink`.

Implementations: :class:`~membrane.datapath.netlink.pyroute.PyrouteNetlink` (the kernel, through
pyroute2) and :class:`~membrane.datapath.netlink.fake.FakeNetlink` (in memory, for tests without root).
Every method is idempotent and raises :class:`~membrane.core.errors.DatapathError` when the kernel
refuses; nothing is left half-made.
"""

from __future__ import annotations

from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from membrane.datapath.netlink.model import (
    AttachedEndpoint,
    EndpointSpec,
    HostDevice,
    OwnedEndpoints,
    RoutingChanges,
    RoutingState,
    TunnelDevice,
)


class Netlink(Protocol):
    async def ensure_host_device(self, router_ip: IPv4Address, mtu: int) -> HostDevice:
        """Create or repair ``membrane_host``/``membrane_net``: up, MTU, exactly ``router_ip``/32 on
        ``membrane_host``; turn on IPv4 forwarding in the node namespace."""
        ...

    async def attach_endpoint(self, spec: EndpointSpec) -> AttachedEndpoint:
        """Wire one container. A retried ADD (same container id and namespace) returns the same result."""
        ...

    async def detach_endpoint(self, container_id: str, host_ifname: str | None = None) -> None:
        """Delete the container's host veth (its peer and /32 route go with it); fine when already gone."""
        ...

    async def check_endpoint(self, spec: EndpointSpec) -> None:
        """Raise DatapathError naming every piece of the wiring that is not as attach left it."""
        ...

    async def list_owned(self) -> OwnedEndpoints:
        """Endpoint veths and protocol-177 routes through them in the node namespace."""
        ...

    async def prune(self, keep: Collection[str]) -> tuple[str, ...]:
        """Delete endpoint veths whose names are not in ``keep``; return the names removed."""
        ...

    # -- between nodes ----------------------------------------------------------------------------

    async def ensure_tunnel_device(self, device: TunnelDevice) -> bool:
        """Create or repair the VXLAN device: up, MTU, no IPv6 address, no learning. A device whose VNI,
        port, local address, uplink or MAC differ (or that learns) is replaced, and its neighbours, FDB
        entries and routes go with it. True when the device was (re)created."""
        ...

    async def delete_tunnel_device(self) -> bool:
        """Delete ``membrane_vxlan`` (with its neighbours, FDB entries and routes); False when absent."""
        ...

    async def list_routing(self, pools: Collection[IPv4Network]) -> RoutingState:
        """The tunnel device, the peer routes the agent owns (see ``is_peer_route``: protocol 177 through
        the tunnel device, or into one of ``pools`` through any device but an endpoint veth or the router
        device), and the neighbours and FDB entries on the tunnel device."""
        ...

    async def apply_routing(self, changes: RoutingChanges) -> None:
        """Send the changes in order as one batch. Deleting what is gone already is fine. Every piece is
        tried; DatapathError then names each one the kernel refused."""
        ...
