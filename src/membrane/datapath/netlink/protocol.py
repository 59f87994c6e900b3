"""The netlink boundary of the agent: :class:`Netlink`.

Implementations: :class:`~membrane.datapath.netlink.pyroute.PyrouteNetlink` (the kernel, through
pyroute2) and :class:`~membrane.datapath.netlink.fake.FakeNetlink` (in memory, for tests without root).
Every method is idempotent and raises :class:`~membrane.core.errors.DatapathError` when the kernel
refuses; nothing is left half-made.
"""

from __future__ import annotations

from collections.abc import Collection
from ipaddress import IPv4Address
from typing import Protocol

from membrane.datapath.netlink.model import AttachedEndpoint, EndpointSpec, HostDevice, OwnedEndpoints


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
