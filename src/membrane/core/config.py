"""Cluster configuration and the default directories.

``ClusterConfig`` is cluster-wide and lives in the store, written once by the first agent so that
every node agrees on the pools; the pure controllers (IPAM, policy) read it. Field names follow
Cilium's Helm values where one exists (``clusterPoolIPv4PodCIDRList``). The per-node settings
are :class:`membrane.agent.config.AgentConfig`, which composes each feature's own settings
(``membrane.observe.config.HubbleConfig``, ...) -- core knows no feature.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
