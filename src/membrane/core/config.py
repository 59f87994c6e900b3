"""Cluster configuration and the default directories.

``ClusterConfig`` is cluster-wide and lives in the store, written by the first agent so that every
node agrees on the pools; the pure controllers (IPAM, policy) read it. The settings in
:data:`LIVE_SETTINGS` change while the cluster runs (``membrane config set``, :func:`parse_settings`,
:func:`with_settings`); the others are fixed at creation (:data:`FIXED_SETTINGS` says why). Field names follow
Cilium's Helm values where one exists (``clusterPoolIPv4PodCIDRList``). The per-node settings
are :class:`membrane.agent.config.AgentConfig`, which composes each feature's own settings
(``membrane.observe.config.HubbleConfig``, ...) -- core knows no feature.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Sequence
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
    # Flow visibility (Cilium's enable-hubble and hubble-* options). Flow events on or off on every
    # node (an agent whose own hubble.enabled is false has no observer to turn on).
    hubbleEnabled: bool = True
    # The metric families served on the metrics port (Hubble's hubble-metrics names).
    hubbleMetrics: tuple[str, ...] = ("flow", "drop", "tcp", "policy", "dns", "http")
    # None: each agent's own hubble.* setting; a value: every agent's.
    hubbleEventBufferCapacity: int | None = None
    hubbleExportFilePath: str | None = None
    hubbleExportAllowlist: tuple[dict[str, Any], ...] | None = None
    hubbleExportDenylist: tuple[dict[str, Any], ...] | None = None
    # Service load balancing (Kubernetes' --service-cluster-ip-range and --service-node-port-range;
    # Cilium's loadBalancer.algorithm, maglev.tableSize and maglev.hashSeed).
    serviceClusterIPRange: str = "10.96.0.0/12"
    nodePortRange: str = "30000-32767"
    loadBalancerAlgorithm: Literal["random", "maglev"] = "random"
    maglevTableSize: int = 16381
    # base64 of 12 bytes, shared by every node so each picks the same backend for a connection.
    maglevHashSeed: str = "JLfvgnHc2kaSUFaI"

    @field_validator("clusterPoolIPv4PodCIDRList", "nonMasqueradeCIDRs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            ipaddress.IPv4Network(cidr, strict=True)
        return value

    @field_validator("serviceClusterIPRange")
    @classmethod
    def _service_range(cls, value: str) -> str:
        network = ipaddress.IPv4Network(value, strict=True)
        if network.num_addresses < 8:
            raise ValueError("needs at least 8 addresses (a /29)")
        return value

    @field_validator("nodePortRange")
    @classmethod
    def _node_port_range(cls, value: str) -> str:
        low, sep, high = value.partition("-")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise ValueError("expected FIRST-LAST, e.g. 30000-32767")
        if not 1 <= int(low) <= int(high) <= 65535:
            raise ValueError("ports 1-65535, first not above last")
        return f"{int(low)}-{int(high)}"

    @field_validator("maglevTableSize")
    @classmethod
    def _maglev_size(cls, value: int) -> int:
        if value not in MAGLEV_TABLE_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, MAGLEV_TABLE_SIZES))}")
        return value

    @field_validator("maglevHashSeed")
    @classmethod
    def _maglev_seed(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64 (of 12 bytes)") from None
        if len(raw) != 12:
            raise ValueError(f"must be base64 of 12 bytes, not {len(raw)}")
        return value

    @field_validator("hubbleMetrics")
    @classmethod
    def _metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in METRIC_FAMILIES]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRIC_FAMILIES)})")
        return value

    @field_validator("hubbleEventBufferCapacity")
    @classmethod
    def _capacity(cls, value: int | None) -> int | None:
        if value is not None and (value < 1 or value > 65535 or (value + 1) & value):
            raise ValueError("must be 2^n - 1 and at most 65535 (e.g. 4095, 16383, 65535)")
        return value

    def pod_pools(self) -> list[ipaddress.IPv4Network]:
        return [ipaddress.IPv4Network(c) for c in self.clusterPoolIPv4PodCIDRList]

    def service_range(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.serviceClusterIPRange)

    def node_ports(self) -> tuple[int, int]:
        low, _, high = self.nodePortRange.partition("-")
        return int(low), int(high)


#: Cilium's allowed Maglev table sizes (primes; M > 100 x backends keeps disruption near 1 %).
MAGLEV_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)


#: Hubble's metric families (``hubble-metrics``) that membrane serves.
METRIC_FAMILIES = ("flow", "drop", "tcp", "policy", "dns", "http")

#: Cluster settings every agent applies while it runs (``membrane config set``).
LIVE_SETTINGS = frozenset({
    "policyEnforcementMode", "policyAuditMode", "policyAuditNamespaces", "hubbleEnabled", "hubbleMetrics",
    "hubbleEventBufferCapacity", "hubbleExportFilePath", "hubbleExportAllowlist", "hubbleExportDenylist",
    "loadBalancerAlgorithm",
})

#: Why the other settings cannot change in a running cluster.
FIXED_SETTINGS = {
    "clusterName": "identities and flows carry the cluster name: set it when the cluster is created",
    "clusterPoolIPv4PodCIDRList": "pod CIDRs are handed out from it: nodes and pods hold addresses from it",
    "clusterPoolIPv4MaskSize": "pod CIDRs are handed out with it: nodes hold CIDRs of this size",
    "routingMode": "changing the routing mode rewires every node: set it when the cluster is created",
    "tunnelPort": "every node's VXLAN device uses it: set it when the cluster is created",
    "vxlanVNI": "every node's VXLAN device uses it: set it when the cluster is created",
    "nonMasqueradeCIDRs": "each agent reads it when it starts: set it when the cluster is created",
    "enableIPv4Masquerade": "each agent reads it when it starts: set it when the cluster is created",
    "serviceClusterIPRange": "services hold cluster IPs from it: set it when the cluster is created",
    "nodePortRange": "services hold node ports from it: set it when the cluster is created",
    "maglevTableSize": "a new size reshuffles the backend of most connections: set it when the cluster is created",
    "maglevHashSeed": "a new seed reshuffles the backend of most connections: set it when the cluster is created",
}


def parse_settings(assignments: Sequence[str], *, live_only: bool) -> dict[str, Any]:
    """``KEY=VALUE`` strings as settings: VALUE is YAML (``true``, ``[a, b]``, ``{...}``; ``null``: the
    agents' own value); a comma-separated VALUE is a list where the setting is one. InvalidInput names
    the key of every problem; unknown keys and (with ``live_only``) settings that cannot change live
    are refused with the reason."""
    problems: list[str] = []
    found: dict[str, Any] = {}
    fields = ClusterConfig.model_fields
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{assignment!r}: expected KEY=VALUE")
            continue
        if key not in fields:
            problems.append(f"{key}: unknown setting (known: {', '.join(sorted(fields))})")
            continue
        if live_only and key in FIXED_SETTINGS:
            problems.append(f"{key}: cannot change in a running cluster: {FIXED_SETTINGS[key]}")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"{key}: {text!r} is not a value: {str(exc).splitlines()[0]}")
            continue
        annotation = str(fields[key].annotation)
        if "tuple" in annotation and isinstance(value, str) and "dict" not in annotation:
            value = [item.strip() for item in value.split(",") if item.strip()]
        found[key] = value
    if problems:
        raise InvalidInput(problems)
    return found


def with_settings(config: ClusterConfig, changes: dict[str, Any]) -> ClusterConfig:
    """``config`` with ``changes`` applied and validated; InvalidInput names each bad key."""
    try:
        return ClusterConfig.model_validate({**config.model_dump(), **changes})
    except ValidationError as exc:
        raise InvalidInput([f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]) from None
