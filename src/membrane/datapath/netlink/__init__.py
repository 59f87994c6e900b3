"""Links, addresses, routes and neighbours of the node and its pods.

The boundary is :class:`Netlink` (protocol); :class:`PyrouteNetlink` talks to the kernel and
:class:`FakeNetlink` keeps the same state in memory. The data types live in ``model``.
"""

from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.netlink.model import (
    ENDPOINT_IFNAME_PREFIX,
    HOST_DEVICE,
    HOST_DEVICE_PEER,
    RTPROT_MEMBRANE,
    AttachedEndpoint,
    EndpointSpec,
    HostDevice,
    OwnedEndpoints,
    OwnedLink,
    OwnedRoute,
    endpoint_ifname,
    is_endpoint_ifname,
    orphaned_links,
)
from membrane.datapath.netlink.protocol import Netlink
from membrane.datapath.netlink.pyroute import PyrouteNetlink

__all__ = [
    "ENDPOINT_IFNAME_PREFIX",
    "HOST_DEVICE",
    "HOST_DEVICE_PEER",
    "RTPROT_MEMBRANE",
    "AttachedEndpoint",
    "EndpointSpec",
    "FakeNetlink",
    "HostDevice",
    "Netlink",
    "OwnedEndpoints",
    "OwnedLink",
    "OwnedRoute",
    "PyrouteNetlink",
    "endpoint_ifname",
    "is_endpoint_ifname",
    "orphaned_links",
]
