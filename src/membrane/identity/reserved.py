"""Reserved identities (Cilium's numbering) and the identity ranges.

    0        unknown            1-255      reserved
    256-65535  cluster-wide, allocated in the store by compare-and-swap
    16777217+  local scope (CIDR and FQDN selectors); never leaves the node
"""

from __future__ import annotations

from dataclasses import dataclass

from membrane.identity.labels import SOURCE_RESERVED, Label


@dataclass(frozen=True, slots=True)
class ReservedIdentity:
    id: int
    name: str

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset({Label(SOURCE_RESERVED, self.name)})


UNKNOWN = ReservedIdentity(0, "unknown")
HOST = ReservedIdentity(1, "host")
WORLD = ReservedIdentity(2, "world")
UNMANAGED = ReservedIdentity(3, "unmanaged")
HEALTH = ReservedIdentity(4, "health")
INIT = ReservedIdentity(5, "init")
REMOTE_NODE = ReservedIdentity(6, "remote-node")
KUBE_APISERVER = ReservedIdentity(7, "kube-apiserver")
INGRESS = ReservedIdentity(8, "ingress")

RESERVED: tuple[ReservedIdentity, ...] = (
    HOST, WORLD, UNMANAGED, HEALTH, INIT, REMOTE_NODE, KUBE_APISERVER, INGRESS,
)
RESERVED_BY_ID = {r.id: r for r in (UNKNOWN, *RESERVED)}
RESERVED_BY_NAME = {r.name: r for r in (UNKNOWN, *RESERVED)}

MIN_CLUSTER_IDENTITY = 256
MAX_CLUSTER_IDENTITY = 65535
MIN_LOCAL_IDENTITY = (1 << 24) | 1


def identity_name(identity: int) -> str:
    """How Hubble prints an identity: reserved ones by name, others by number."""
    reserved = RESERVED_BY_ID.get(identity)
    return reserved.name if reserved else str(identity)


def next_free_identity(used: set[int], after: int) -> int | None:
    """The first unused cluster identity after ``after``, wrapping around once."""
    span = MAX_CLUSTER_IDENTITY - MIN_CLUSTER_IDENTITY + 1
    start = max(after + 1, MIN_CLUSTER_IDENTITY)
    for offset in range(span):
        candidate = MIN_CLUSTER_IDENTITY + (start - MIN_CLUSTER_IDENTITY + offset) % span
        if candidate not in used:
            return candidate
    return None
