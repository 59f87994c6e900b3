"""Output as kubectl prints it: aligned tables, ages, YAML and JSON documents.

Primitives:

- :func:`format_table` -- columns padded like kubectl's tabwriter (3 spaces between columns,
  minimum cell width 6, last column unpadded); reusable by every table-printing command.
- :func:`human_duration` / :func:`age` -- kubectl's ``AGE`` rendering (``45s``, ``3m12s``, ``5h``, ``12d``).
- :func:`object_table` -- the ``get`` table of one kind (kind-specific columns, ``-o wide``, ``-A``).
- :func:`to_yaml`, :func:`to_json`, :func:`list_document` -- ``-o yaml|json`` documents.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from membrane.api import k8s
from membrane.api.meta import ApiObject, condition

NONE = "<none>"

# kubectl's tabwriter settings (k8s.io/cli-runtime/pkg/printers/tabwriter.go).
_MIN_WIDTH = 6
_PADDING = 3


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render rows under headers; every line ends with a newline, the last column is not padded.

    A cell with newlines continues on the following lines (cilium-dbg prints label lists so).
    """
    lines = [list(headers)]
    for row in rows:
        parts = [str(cell).split("\n") for cell in row]
        height = max((len(p) for p in parts), default=1)
        lines += [[p[i] if i < len(p) else "" for p in parts] for i in range(height)]
    columns = max(len(line) for line in lines)
    widths = [
        max(_MIN_WIDTH, max((len(line[i]) for line in lines if i < len(line)), default=0) + _PADDING)
        for i in range(columns)
    ]
    out = []
    for line in lines:
        cells = [cell.ljust(widths[i]) if i < len(line) - 1 else cell for i, cell in enumerate(line)]
        out.append("".join(cells))
    return "".join(f"{line}\n" for line in out)


def human_duration(seconds: float) -> str:
    """kubectl's ``duration.HumanDuration``."""
    total = int(seconds)
    if total < -1:
        return "<invalid>"
    if total < 0:
        return "0s"
    if total < 120:
        return f"{total}s"
    minutes = total // 60
    if minutes < 10:
        rest = total % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = total // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if rest == 0 else f"{hours // 24 // 365}y{rest}d"
    return f"{hours // 24 // 365}y"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(timestamp: str | None, now: datetime) -> str:
    created = parse_time(timestamp)
    if created is None:
        return "<unknown>"
    return human_duration((now - created).total_seconds())


# --- documents -----------------------------------------------------------------------------------------


def list_document(objects: Sequence[ApiObject]) -> dict[str, Any]:
    """What ``get -o yaml|json`` prints for several objects: a ``v1 List``."""
    return {
        "apiVersion": "v1",
        "items": [obj.to_dict() for obj in objects],
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


class _KubectlDumper(yaml.SafeDumper):
    """Quotes strings that need quoting with double quotes, as kubectl's YAML printer does."""

    def choose_scalar_style(self) -> str:
        style = super().choose_scalar_style()
        return '"' if style == "'" else str(style)


def to_yaml(data: Any) -> str:
    return yaml.dump(
        data, Dumper=_KubectlDumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 16
    )


def to_json(data: Any) -> str:
    return json.dumps(data, indent=4, ensure_ascii=False) + "\n"


# --- tables --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Any, datetime], str]
    wide_only: bool = False


def _age(obj: ApiObject, now: datetime) -> str:
    return age(obj.metadata.creationTimestamp, now)


def _or_none(value: str | None) -> str:
    return value if value else NONE


def _pod_ready(pod: k8s.Pod, _now: datetime) -> str:
    statuses = (pod.status.containerStatuses if pod.status else None) or ()
    ready = sum(1 for s in statuses if s.ready)
    return f"{ready}/{len(pod.spec.containers)}"


def _pod_status(pod: k8s.Pod, _now: datetime) -> str:
    # A reduced form of kubectl's printPod: phase, then the pod reason, then container reasons.
    status = pod.status
    if pod.metadata.deletionTimestamp:
        return "Terminating"
    if status is None:
        return "Unknown"
    reason = status.reason or status.phase or "Unknown"
    for container in reversed(status.containerStatuses or ()):
        state = container.state if isinstance(container.state, dict) else {}
        waiting, terminated = state.get("waiting"), state.get("terminated")
        if isinstance(waiting, dict) and waiting.get("reason"):
            reason = str(waiting["reason"])
        elif isinstance(terminated, dict):
            if terminated.get("reason"):
                reason = str(terminated["reason"])
            elif terminated.get("signal"):
                reason = f"Signal:{terminated['signal']}"
            else:
                reason = f"ExitCode:{terminated.get('exitCode', 0)}"
    return reason


def _pod_restarts(pod: k8s.Pod, _now: datetime) -> str:
    statuses = (pod.status.containerStatuses if pod.status else None) or ()
    return str(sum(s.restartCount for s in statuses))


def _svc_ports(svc: k8s.Service, _now: datetime) -> str:
    parts = []
    for port in svc.spec.ports or ():
        if port.nodePort:
            parts.append(f"{port.port}:{port.nodePort}/{port.protocol}")
        else:
            parts.append(f"{port.port}/{port.protocol}")
    return ",".join(parts) or NONE


def _lb_ingress(svc: k8s.Service, wide: bool) -> list[str]:
    lb = svc.status.loadBalancer if svc.status else None
    values = [item.ip or item.hostname or "" for item in ((lb.ingress if lb else None) or ())]
    values = [v for v in values if v]
    text = ",".join(values)
    # kubectl shortens a long ingress list outside -o wide.
    if not wide and len(text) > 16:
        return [text[:13] + "..."]
    return values


def _svc_external_ip(svc: k8s.Service, _now: datetime, wide: bool = False) -> str:
    spec = svc.spec
    external = list(spec.externalIPs or ())
    if spec.type in ("ClusterIP", "NodePort"):
        return ",".join(external) or NONE
    if spec.type == "LoadBalancer":
        values = _lb_ingress(svc, wide) + external
        return ",".join(values) or "<pending>"
    return spec.externalName or NONE


def _svc_selector(svc: k8s.Service, _now: datetime) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((svc.spec.selector or {}).items())) or NONE


def _condition_status(type_: str) -> Callable[[Any, datetime], str]:
    def cell(obj: Any, _now: datetime) -> str:
        found = condition(obj.status.conditions if obj.status else None, type_)
        return found.status if found else NONE

    return cell


def _condition_message(type_: str) -> Callable[[Any, datetime], str]:
    def cell(obj: Any, _now: datetime) -> str:
        found = condition(obj.status.conditions if obj.status else None, type_)
        return found.message if found and found.message else NONE

    return cell


def _more(items: list[str], count: int, limit: int = 3) -> str:
    # kubectl's listWithMoreString: the first three, then how many more; <unset> when empty.
    text = ",".join(items[:limit])
    if count > limit:
        return f"{text} + {count - limit} more..."
    return text or "<unset>"


def _slice_ports(eps: k8s.EndpointSlice, _now: datetime) -> str:
    ports = eps.ports or ()
    return _more([str(p.port) if p.port is not None else (p.name or "*") for p in ports], len(ports))


def _slice_endpoints(eps: k8s.EndpointSlice, _now: datetime) -> str:
    addresses = [address for endpoint in eps.endpoints for address in endpoint.addresses]
    return _more(addresses, len(addresses))


_AGE = Column("AGE", _age)

COLUMNS: dict[str, list[Column]] = {
    "Namespace": [Column("STATUS", lambda ns, _n: (ns.status.phase if ns.status else None) or "Active"), _AGE],
    "Pod": [
        Column("READY", _pod_ready),
        Column("STATUS", _pod_status),
        Column("RESTARTS", _pod_restarts),
        _AGE,
        Column("IP", lambda p, _n: _or_none(p.status.podIP if p.status else None), wide_only=True),
        Column("NODE", lambda p, _n: _or_none(p.spec.nodeName), wide_only=True),
        Column(
            "NOMINATED NODE", lambda p, _n: _or_none(p.status.nominatedNodeName if p.status else None), wide_only=True
        ),
        Column("READINESS GATES", lambda p, _n: NONE, wide_only=True),
    ],
    "Service": [
        Column("TYPE", lambda s, _n: s.spec.type),
        Column("CLUSTER-IP", lambda s, _n: _or_none(s.spec.clusterIP)),
        Column("EXTERNAL-IP", _svc_external_ip),
        Column("PORT(S)", _svc_ports),
        _AGE,
        Column("SELECTOR", _svc_selector, wide_only=True),
    ],
    "NetworkPolicy": [Column("POD-SELECTOR", lambda p, _n: p.spec.podSelector.format()), _AGE],
    "EndpointSlice": [
        Column("ADDRESSTYPE", lambda s, _n: s.addressType),
        Column("PORTS", _slice_ports),
        Column("ENDPOINTS", _slice_endpoints),
        _AGE,
    ],
    # Cilium's printer columns, in the CRDs' order (Age before Valid).
    "CiliumNetworkPolicy": [_AGE, Column("VALID", _condition_status("Valid"))],
    "CiliumClusterwideNetworkPolicy": [_AGE, Column("VALID", _condition_status("Valid"))],
    "CiliumLoadBalancerIPPool": [
        Column("DISABLED", lambda p, _n: "true" if p.spec.disabled else "false"),
        Column("CONFLICTING", _condition_status("cilium.io/PoolConflict")),
        Column("IPS AVAILABLE", _condition_message("cilium.io/IPsAvailable")),
        _AGE,
    ],
    "CiliumNode": [
        Column("CILIUMINTERNALIP", lambda n, _n: _or_none(n.address("CiliumInternalIP"))),
        Column("INTERNALIP", lambda n, _n: _or_none(n.address("InternalIP"))),
        _AGE,
    ],
}


def object_table(
    kind: str, objects: Sequence[ApiObject], *, now: datetime, wide: bool = False, namespace_column: bool = False
) -> str:
    """The ``get`` table for objects of one kind."""
    columns = [c for c in COLUMNS.get(kind, [_AGE]) if wide or not c.wide_only]
    headers = (["NAMESPACE"] if namespace_column else []) + ["NAME"] + [c.header for c in columns]
    rows = []
    for obj in objects:
        cells = [obj.metadata.namespace or ""] if namespace_column else []
        cells.append(obj.name)
        for column in columns:
            if column.cell is _svc_external_ip:
                cells.append(_svc_external_ip(obj, now, wide))  # type: ignore[arg-type]
            else:
                cells.append(column.cell(obj, now))
        rows.append(cells)
    return format_table(headers, rows)


__all__ = [
    "COLUMNS",
    "NONE",
    "Column",
    "age",
    "format_table",
    "human_duration",
    "list_document",
    "object_table",
    "to_json",
    "to_yaml",
]
