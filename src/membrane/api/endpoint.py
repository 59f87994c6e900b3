"""Endpoint records: what the store knows about each attached container (a plain value type).

The record is written (state ``creating``) BEFORE the kernel is touched and removed only AFTER
the kernel is clean, so after a crash the store always names everything the kernel may hold —
that is what makes pruning safe and leaks impossible. The type lives here, apart from the agent
and the store, so pure consumers (the policy compiler, the CLI) can read records without either.

A pod being deleted keeps its record ``ready`` (it is still wired and may finish its
connections) until its node has stopped it; that it is terminating is not a record state: the
pod's ``metadata.deletionTimestamp`` is the one place it is recorded (EndpointSlices carry it).

Primitives: :class:`EndpointRecord`, :data:`EndpointState`, :data:`EndpointOrigin`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Literal

EndpointState = Literal["creating", "ready", "not-ready", "disconnecting"]
EndpointOrigin = Literal["runner", "cni"]
#: Where records are stored (``membrane.store.keys.ENDPOINTS``; a test keeps the two equal).
ENDPOINTS_PREFIX = "/membrane/endpoints/"


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    container_id: str
    endpoint_id: int
    node: str
    namespace: str
    pod: str
    ifname: str
    netns: str
    ipv4: ipaddress.IPv4Address
    identity: int
    labels: tuple[str, ...]
    origin: EndpointOrigin
    state: EndpointState = "creating"
    host_ifname: str = ""
    host_ifindex: int = 0
    mac: str = ""
    created: float = 0.0

    @property
    def key(self) -> str:
        return f"{ENDPOINTS_PREFIX}{self.node}/{self.container_id}"

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["ipv4"] = str(self.ipv4)
        data["labels"] = list(self.labels)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> EndpointRecord:
        data: dict[str, Any] = json.loads(raw)
        data["ipv4"] = ipaddress.IPv4Address(data["ipv4"])
        data["labels"] = tuple(data.get("labels", ()))
        return cls(**data)

    def replace(self, **changes: Any) -> EndpointRecord:
        return dataclasses.replace(self, **changes)
