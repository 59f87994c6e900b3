"""The observer's settings in an agent's configuration (Cilium's ``hubble.*`` values).

Primitives: :class:`HubbleConfig`, :func:`export_filters` (the export allow/deny lists as
``flow.FlowFilter`` messages; also what refuses a bad one when the configuration is loaded).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class HubbleConfig(BaseModel):
    """Flow observability of one agent (Cilium's ``hubble.*`` settings)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # The relay the CLI on this host talks to by default (membrane observe, flows status|nodes),
    # as HOST:PORT; empty: the local agent's observer. The agent itself does not use it.
    relayAddress: str = ""
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
