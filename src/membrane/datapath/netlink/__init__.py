"""Links, addresses, routes, neighbours and FDB entries of the node, its pods and its peers.

The boundary is :class:`Netlink` (protocol); :class:`PyrouteNetlink` talks to the kernel and
:class:`FakeNetlink` keeps the same state in memory. The data types live in ``model``.
"""

from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.netlink.model import (
    ENDPOINT_IFNAME_PREFIX,
    HOST_DEVICE,
    HOST_DEVICE_PEER,
    RTPROT_MEMBRANE,
    TUNNEL_DEVICE,
    AttachedEndpoint,
    EndpointSpec,
    HostDevice,
    OwnedEndpoints,
    OwnedLink,
    OwnedRoute,
    PeerFdbEntry,
    PeerNeighbour,
    PeerRoute,
    RoutingChanges,
    RoutingState,
    TunnelDevice,
    endpoint_ifname,
    is_endpoint_ifname,
    is_peer_route,
    orphaned_links,
    routing_changes,
    vtep_mac,
)
from membrane.datapath.netlink.protocol import Netlink
from membrane.datapath.netlink.pyroute import PyrouteNetlink

__all__ = [
    "ENDPOINT_IFNAME_PREFIX",
    "HOST_DEVICE",
    "HOST_DEVICE_PEER",
    "RTPROT_MEMBRANE",
    "TUNNEL_DEVICE",
    "AttachedEndpoint",
    "EndpointSpec",
    "FakeNetlink",
    "HostDevice",
    "Netlink",
    "OwnedEndpoints",
    "OwnedLink",
    "OwnedRoute",
    "PeerFdbEntry",
    "PeerNeighbour",
    "PeerRoute",
    "PyrouteNetlink",
    "RoutingChanges",
    "RoutingState",
    "TunnelDevice",
    "endpoint_ifname",
    "is_endpoint_ifname",
    "is_peer_route",
    "orphaned_links",
    "routing_changes",
    "vtep_mac",
]
