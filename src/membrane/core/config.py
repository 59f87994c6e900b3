"""Agent and cluster configuration.

``AgentConfig`` is per node (flags and ``--config FILE``); ``ClusterConfig`` is cluster-wide and
lives in the store, written once by the first agent so that every node agrees on the pools.
Field names follow Cilium's Helm values where one exists (``clusterPoolIPv4PodCIDRList``).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from membrane.core.errors import InvalidInput

DEFAULT_STATE_DIR = Path("/var/lib/membrane")
DEFAULT_RUN_DIR = Path("/run/membrane")


class ClusterConfig(BaseModel):
    """Settings every node must share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clusterName: str = "default"
    clusterPoolIPv4PodCIDRList: tuple[str, ...] = ("10.244.0.0/16",)
    clusterPoolIPv4MaskSize: int = Field(default=24, ge=8, le=30)
    routingMode: Literal["vxlan", "native"] = "vxlan"
    tunnelPort: int = 8472
    vxlanVNI: int = 2
    # Destinations that pod traffic reaches without masquerade (the pod pools are always included).
    nonMasqueradeCIDRs: tuple[str, ...] = ()
    enableIPv4Masquerade: bool = True
    # Cilium's policy-enforcement mode: "default" enforces on endpoints a policy selects, "always" on
    # every endpoint (default deny), "never" on none.
    policyEnforcementMode: Literal["default", "always", "never"] = "default"
    # Audit: would-be drops are forwarded and reported as AUDIT, everywhere or in these namespaces.
    policyAuditMode: bool = False
    policyAuditNamespaces: tuple[str, ...] = ()

    @field_validator("clusterPoolIPv4PodCIDRList", "nonMasqueradeCIDRs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            ipaddress.IPv4Network(cidr, strict=True)
        return value

    def pod_pools(self) -> list[ipaddress.IPv4Network]:
        return [ipaddress.IPv4Network(c) for c in self.clusterPoolIPv4PodCIDRList]


class HubbleConfig(BaseModel):
    """Flow observability of one agent (Cilium's ``hubble.*`` settings)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Observer gRPC API on TCP (empty: unix socket only); Prometheus metrics (empty: off).
    listenAddress: str = "127.0.0.1:4244"
    metricsServer: str = "127.0.0.1:9965"
    # Flows kept per node: 2^n - 1, at most 65535 (Hubble's eventBufferCapacity).
    eventBufferCapacity: int = 4095
    # Flow export to a JSON-lines file (Hubble's ``hubble.export.static.*``); empty path: off.
    exportFilePath: str = ""
    exportFileMaxSizeMb: int = Field(default=10, ge=1)
    exportFileMaxBackups: int = Field(default=5, ge=0)  # 0 keeps every rotated file, as in Hubble
    # FlowFilter JSON objects (``{"source_pod": ["default/"]}``): export what any allow filter (or
    # none) matches and no deny filter matches.
    exportAllowlist: tuple[dict[str, Any], ...] = ()
    exportDenylist: tuple[dict[str, Any], ...] = ()
    exportFieldMask: tuple[str, ...] = ()

    @field_validator("exportAllowlist", "exportDenylist")
    @classmethod
    def _filters(cls, value: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        export_filters(value)  # refused here, with the field's name, rather than when the agent starts
        return value

    @field_validator("eventBufferCapacity")
    @classmethod
    def _capacity(cls, value: int) -> int:
        if value < 1 or value > 65535 or (value + 1) & value:
            raise ValueError("must be 2^n - 1 and at most 65535 (e.g. 4095, 16383, 65535)")
        return value


def export_filters(filters: tuple[dict[str, Any], ...]) -> list[Any]:
    """FlowFilter JSON objects as the generated protobuf ``flow.FlowFilter``s; ValueError names the
    one that does not parse."""
    # Imported here: the configuration must load without the protobuf runtime's import cost.
    from google.protobuf import json_format

    from membrane.observe.model import FlowFilter

    parsed = []
    for index, data in enumerate(filters):
        try:
            parsed.append(json_format.ParseDict(data, FlowFilter()))
        except json_format.ParseError as exc:
            raise ValueError(f"filter {index}: {str(exc).splitlines()[0]}") from None
    return parsed


class AgentConfig(BaseModel):
    """Settings of one node's agent."""

    model_config = ConfigDict(extra="forbid")

    nodeName: str = Field(default_factory=socket.gethostname)
    store: str = f"sqlite://{DEFAULT_STATE_DIR}/store.db"
    stateDir: Path = DEFAULT_STATE_DIR
    runDir: Path = DEFAULT_RUN_DIR
    # Names of the network namespaces the built-in pod runner creates start with this.
    netnsPrefix: str = "membrane-"
    # Pod interface MTU; 0 derives it from the node's uplink (minus tunnel overhead).
    mtu: int = Field(default=0, ge=0, le=65535)
    # The node's own address on the underlay; empty picks the address of the default route's device.
    nodeIP: str = ""
    # Device facing the underlay; empty picks the default route's device.
    device: str = ""
    heartbeatTTL: float = Field(default=10.0, gt=0)
    hubble: HubbleConfig = Field(default_factory=HubbleConfig)
    # Settings the first agent of a cluster writes to the store.
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def api_socket(self) -> Path:
        return self.runDir / "agent.sock"

    @property
    def cni_queue_dir(self) -> Path:
        return self.runDir / "cni-del-queue"


def load_agent_config(path: Path | None, **overrides: object) -> AgentConfig:
    """Read ``--config FILE`` (YAML) and apply command-line overrides; InvalidInput names the field."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput([f"{path}: {exc}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InvalidInput([f"{path}: expected a mapping of settings"])
        data.update(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        source = str(path) if path else "agent config"
        raise InvalidInput(
            [f"{source}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        ) from None
