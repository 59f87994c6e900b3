"""Service load balancing as values: frontends, backends and what a node does with them (pure).

A *frontend* is one address a service answers on (Cilium's "service" in ``cilium-dbg service
list``): a ClusterIP, an external IP, a LoadBalancer ingress IP or a node port, with one protocol
and port. Each frontend carries every backend of its service port (for inspection) and the ones new
connections go to on this node (``selected``), after the traffic policies and the termination
rules; ``internal`` is set when connections from this node's pods choose among other backends than
connections from outside (``externalTrafficPolicy: Local``).

Primitives: :class:`L4Addr`, :class:`Backend`, :class:`Frontend`, :class:`BackendCandidate`,
:data:`FrontendType`, :data:`BackendState`, :data:`Algorithm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Literal

FrontendType = Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalIP"]
#: ``active``: takes new connections; ``terminating``: its pod is being deleted, so it only
#: finishes the connections it has (Kubernetes' serving + terminating endpoint).
BackendState = Literal["active", "terminating"]
Algorithm = Literal["random", "maglev"]
Protocol = Literal["TCP", "UDP", "SCTP"]
ServiceRef = tuple[str, str]  # (namespace, name)

@lru_cache(maxsize=1 << 17)
def parse_address(text: str) -> IPv4Address | IPv6Address:
    """``ipaddress.ip_address``, remembered: every backend address of every service is parsed on
    each pass, and parsing costs more than the rest of the pass together (measured at 10,000 services)."""
    return ip_address(text)


@lru_cache(maxsize=1 << 17)
def dnat_target(address: IPv4Address, port: int) -> str:
    """``address:port`` as a DNAT target (rendering it is most of a service chain's cost)."""
    return f"{address}:{port}"


#: A node port frontend answers on every address of the node: its address is this one.
ANY_ADDRESS = IPv4Address(0)


@dataclass(frozen=True, order=True)
class L4Addr:
    address: IPv4Address
    protocol: Protocol
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class Backend:
    address: IPv4Address
    port: int
    node: str | None
    state: BackendState = "active"

    @property
    def key(self) -> str:
        """``address:port``, the backend's name in Maglev tables and affinity sets."""
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, order=True)
class BackendCandidate:
    """One endpoint of a service port as the endpoint slices give it: the input of the controller."""

    address: IPv4Address
    port: int
    protocol: Protocol
    port_name: str
    node: str | None
    state: BackendState


@dataclass(frozen=True)
class Frontend:
    """One frontend of one service port on this node (the row of the ``frontends`` table)."""

    id: int
    service: ServiceRef
    port_name: str
    type: FrontendType
    address: L4Addr
    backends: tuple[Backend, ...]
    selected: tuple[Backend, ...]
    internal: tuple[Backend, ...] | None = None
    algorithm: Algorithm = "random"
    affinity_timeout: int = 0  # seconds; 0 = no session affinity
    external_local: bool = False  # externalTrafficPolicy Local: the client address is kept
    internal_local: bool = False  # internalTrafficPolicy Local
    #: loadBalancerSourceRanges of a LoadBalancer frontend: the outside clients allowed (or, with
    #: ``source_ranges_deny``, refused); this node's pods are never checked. None: no check; an
    #: allow-list of IPv6 ranges only is () (no IPv4 client allowed: fail closed).
    source_ranges: tuple[IPv4Network, ...] | None = None
    source_ranges_deny: bool = False

    @property
    def name(self) -> str:
        return f"{self.service[0]}/{self.service[1]}"

    @property
    def key(self) -> L4Addr:
        return self.address
