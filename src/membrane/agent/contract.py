"""What the agent's API offers the CNI plugin and the pod runner (the server is ``agent.api``).

The plugin sends one :class:`CniRequest` per CNI invocation; the agent answers with a CNI result
(ADD) or nothing (DEL, CHECK), or raises :class:`CniFailure` carrying a CNI spec error code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from membrane.core.errors import MembraneError

# CNI spec error codes (SPEC.md "Error"): 1-99 are reserved for the spec.
CNI_ERR_INCOMPATIBLE_VERSION = 1
CNI_ERR_UNSUPPORTED_FIELD = 2
CNI_ERR_UNKNOWN_CONTAINER = 3
CNI_ERR_INVALID_ENV = 4
CNI_ERR_IO = 5
CNI_ERR_DECODE = 6
CNI_ERR_INVALID_NETCONF = 7
CNI_ERR_TRY_AGAIN = 11
# Plugin-specific codes are 100+.
CNI_ERR_IPAM_EXHAUSTED = 100
CNI_ERR_AGENT_UNAVAILABLE = 101
CNI_ERR_DATAPATH = 102


@dataclass(frozen=True)
class CniRequest:
    command: str  # "ADD" | "DEL" | "CHECK"
    container_id: str
    netns: str  # path of the container's network namespace (may be empty on DEL)
    ifname: str
    args: dict[str, str] = field(default_factory=dict)  # CNI_ARGS, e.g. K8S_POD_NAMESPACE
    netconf: dict[str, Any] = field(default_factory=dict)  # the network configuration, with prevResult

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE") or "default"

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME") or self.container_id[:12]


class CniFailure(MembraneError):
    """A CNI error: ``code`` per the spec, ``msg`` one line, ``details`` optional."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        self.code = code
        self.msg = msg
        self.details = details
        super().__init__(msg if not details else f"{msg}: {details}")

    def to_json(self, cni_version: str = "1.0.0") -> dict[str, Any]:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}


class EndpointService(Protocol):
    async def cni_add(self, request: CniRequest) -> dict[str, Any]:
        """Attach the container; return the CNI 1.0.0 result (interfaces, ips, routes, dns)."""
        ...

    async def cni_del(self, request: CniRequest) -> None:
        """Detach the container; succeeds when there is nothing to remove."""
        ...

    async def cni_check(self, request: CniRequest) -> None:
        """Raise CniFailure when the container's networking is not as ADD left it."""
        ...
