"""The lab's address plan and the ``ip`` batches that build it (pure: no I/O).

A lab named ``L`` with N nodes is, on one machine::

     L-underlay: br0 172.31.S.1/24 (the underlay's gateway)
       │ port node1        │ port node2    …     │ port client
       │                   │                     │
     L-node1: eth0       L-node2: eth0         L-client: eth0
     172.31.S.11/24      172.31.S.12/24        172.31.S.100/24
     default via .1      default via .1        default via .1

``S`` (the subnet index) differs between the labs of one machine so that their addresses never
collide. The agent of node k runs inside ``L-nodek`` and names the namespaces it creates for pods
``L-nodek-…``. Everything of the lab is named ``L-…``, which is why a lab name may not contain
``-``: one lab's prefix could otherwise be the start of another lab's name.

With ``--store etcd`` the etcd members run in ``L-underlay`` on the gateway address (no extra
address on br0): member k listens for clients on port 2379 + 2(k-1) and for peers on the port
above it (1 member: 2379/2380; 3 members: 2379/2380, 2381/2382, 2383/2384).

Primitives: :func:`validate_lab_name`, :func:`choose_subnet_index`, :class:`LabPlan` (with
:class:`EtcdEndpoint`), :class:`IpBatch` (``ip -batch`` lines for one namespace) and
:class:`BuildStep` (one named step of ``lab up``, made of batches).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from membrane.core.errors import InvalidInput

Routing = Literal["vxlan", "native"]
StoreKind = Literal["sqlite", "etcd"]

DEFAULT_LAB_NAME = "membrane"
MAX_NODES = 8
NODE_IP_OFFSET = 10  # node k holds .(10+k): node1 is .11
CLIENT_HOST = 100
GATEWAY_HOST = 1
SUBNET_COUNT = 256  # 172.31.0.0/24 … 172.31.255.0/24
UNDERLAY_BRIDGE = "br0"
ETCD_MEMBER_COUNTS = (1, 3)
ETCD_CLIENT_PORT = 2379  # member k: client port 2379 + 2(k-1), peer port one above
ETCD_PORT_STEP = 2
NODE_UPLINK = "eth0"

_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,23}")


def validate_lab_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidInput(
            [
                f"invalid lab name {name!r}: use 1-24 lowercase letters and digits, starting with a letter "
                "(no '-': the lab's namespaces are named LAB-…)"
            ]
        )
    return name


def choose_subnet_index(used: Iterable[int]) -> int:
    """The lowest underlay subnet index no other lab of this machine uses."""
    taken = set(used)
    for index in range(SUBNET_COUNT):
        if index not in taken:
            return index
    raise InvalidInput([f"all {SUBNET_COUNT} lab underlay subnets are in use: remove a lab first"])


def subnet_for_index(index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"172.31.{index}.0/24")


@dataclass(frozen=True)
class IpBatch:
    """Lines for ``ip [-n NETNS] -batch -``; ``netns`` None runs in the caller's namespace."""

    netns: str | None
    lines: tuple[str, ...]


@dataclass(frozen=True)
class BuildStep:
    label: str
    batches: tuple[IpBatch, ...]


@dataclass(frozen=True)
class EtcdEndpoint:
    """Where one etcd member of the lab listens (in the underlay namespace)."""

    name: str
    ip: ipaddress.IPv4Address
    client_port: int
    peer_port: int


@dataclass(frozen=True)
class LabPlan:
    name: str
    nodes: int
    subnet_index: int
    client: bool = False
    routing: Routing = "vxlan"
    store: StoreKind = "sqlite"
    etcd_members: int = 1

    def __post_init__(self) -> None:
        validate_lab_name(self.name)
        if self.etcd_members not in ETCD_MEMBER_COUNTS:
            raise InvalidInput([f"--etcd-members must be 1 or 3, not {self.etcd_members}"])
        if self.store != "etcd" and self.etcd_members != 1:
            raise InvalidInput(["--etcd-members needs --store etcd"])
        if not 1 <= self.nodes <= MAX_NODES:
            raise InvalidInput([f"--nodes must be between 1 and {MAX_NODES}, not {self.nodes}"])
        if not 0 <= self.subnet_index < SUBNET_COUNT:
            raise InvalidInput([f"subnet index must be between 0 and {SUBNET_COUNT - 1}"])

    # -- names and addresses --------------------------------------------------------------
    @property
    def prefix(self) -> str:
        """Every namespace of this lab, and every pod namespace its agents create, starts with this."""
        return f"{self.name}-"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return subnet_for_index(self.subnet_index)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + GATEWAY_HOST

    @property
    def underlay_netns(self) -> str:
        return f"{self.prefix}underlay"

    @property
    def client_netns(self) -> str:
        return f"{self.prefix}client"

    @property
    def client_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + CLIENT_HOST

    @property
    def node_numbers(self) -> range:
        return range(1, self.nodes + 1)

    @staticmethod
    def node_name(k: int) -> str:
        return f"node{k}"

    def node_netns(self, k: int) -> str:
        return f"{self.prefix}{self.node_name(k)}"

    def node_ip(self, k: int) -> ipaddress.IPv4Address:
        return self.subnet.network_address + NODE_IP_OFFSET + k

    def etcd_endpoints(self) -> tuple[EtcdEndpoint, ...]:
        """The etcd members (none unless the store is etcd), all on the underlay gateway."""
        if self.store != "etcd":
            return ()
        return tuple(
            EtcdEndpoint(
                name=f"etcd{k}",
                ip=self.gateway,
                client_port=ETCD_CLIENT_PORT + ETCD_PORT_STEP * (k - 1),
                peer_port=ETCD_CLIENT_PORT + ETCD_PORT_STEP * (k - 1) + 1,
            )
            for k in range(1, self.etcd_members + 1)
        )

    def namespaces(self) -> tuple[str, ...]:
        names = [self.underlay_netns, *(self.node_netns(k) for k in self.node_numbers)]
        if self.client:
            names.append(self.client_netns)
        return tuple(names)

    # -- what builds it -------------------------------------------------------------------
    def build_steps(self) -> tuple[BuildStep, ...]:
        """The underlay first, then one step per member; each step leaves a working piece."""
        gateway = f"{self.gateway}/{self.subnet.prefixlen}"
        steps = [
            BuildStep(
                "underlay",
                (
                    IpBatch(None, (f"netns add {self.underlay_netns}",)),
                    IpBatch(
                        self.underlay_netns,
                        (
                            "link set lo up",
                            f"link add {UNDERLAY_BRIDGE} type bridge",
                            f"addr add {gateway} dev {UNDERLAY_BRIDGE}",
                            f"link set {UNDERLAY_BRIDGE} up",
                        ),
                    ),
                ),
            )
        ]
        members = [(self.node_name(k), self.node_netns(k), self.node_ip(k)) for k in self.node_numbers]
        if self.client:
            members.append(("client", self.client_netns, self.client_ip))
        for port, netns, ip in members:
            steps.append(BuildStep(port, self._member_batches(port, netns, ip)))
        return tuple(steps)

    def _member_batches(self, port: str, netns: str, ip: ipaddress.IPv4Address) -> tuple[IpBatch, ...]:
        # The veth is created from the caller's namespace with both ends placed directly, so no
        # half-moved device can be left in the caller's namespace.
        return (
            IpBatch(
                None,
                (
                    f"netns add {netns}",
                    f"link add {NODE_UPLINK} netns {netns} type veth peer name {port} netns {self.underlay_netns}",
                ),
            ),
            IpBatch(self.underlay_netns, (f"link set {port} master {UNDERLAY_BRIDGE}", f"link set {port} up")),
            IpBatch(
                netns,
                (
                    "link set lo up",
                    f"addr add {ip}/{self.subnet.prefixlen} dev {NODE_UPLINK}",
                    f"link set {NODE_UPLINK} up",
                    f"route add default via {self.gateway} dev {NODE_UPLINK}",
                ),
            ),
        )
