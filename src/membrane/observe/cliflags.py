"""``hubble observe`` flag semantics: filter flags (in command-line order) → a GetFlowsRequest.

Rules, as in Hubble's CLI:

* the same flag repeated is OR (its values go into one FlowFilter field);
* different flags are AND (fields of the same FlowFilter);
* ``--not`` puts the next flag into the blacklist instead of the whitelist;
* two-sided flags (``--ip``, ``--pod``, ``--label``, ``--namespace`` …) build two filters, one
  for the source side and one for the destination side (OR between them), merged into one when
  they come out equal;
* ``--namespace`` and friends qualify the pod/service filters of their side (``ns/``, or every
  namespace with ``--all-namespaces``); a pod without a namespace means namespace ``default``;
* some flags cannot be combined (``--from-ip`` with ``--from-pod``, ``--label`` with
  ``--from-label`` …), and ``--first`` excludes ``--last``, ``--all`` and ``--follow``.

Errors are InvalidInput with Hubble's messages. Pure: no I/O.

Primitives: :data:`FILTER_FLAGS`, :class:`FilterBuilder`, :class:`Selectors`, :func:`build_request`,
:func:`raw_filters_yaml`, :func:`parse_raw_filters`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from membrane.core.errors import InvalidInput
from membrane.observe import gotime
from membrane.observe.jsonpb import parse_json, to_json
from membrane.observe.model import (
    EGRESS,
    INGRESS,
    IP_NOT_USED,
    MESSAGE_TYPE_NAMES,
    MSG_AGENT,
    MSG_TRACE,
    RESERVED_IDENTITY_BY_NAME,
    TRACE_POINT_BY_NAME,
    DropReasonEnum,
    EventTypeFilter,
    FlowFilter,
    GetFlowsRequest,
    HTTPHeader,
    IPv4,
    IPv6,
    IPVersionEnum,
    NetworkInterface,
    TCPFlags,
    VerdictEnum,
    Workload,
)

DEFAULT_LAST = 20
ALL_FLOWS = 2**64 - 1

# Every filter flag: its name and whether it takes a value (the others are switches).
FILTER_FLAGS: dict[str, bool] = {
    "not": False, "uuid": True, "node-name": True, "node-label": True, "from-cluster": True, "cluster": True,
    "to-cluster": True, "protocol": True, "tcp-flags": True, "type": True, "verdict": True,
    "drop-reason-desc": True, "http-status": True, "http-method": True, "http-path": True, "http-url": True,
    "http-header": True, "trace-id": True, "ip-trace-id": True, "from-fqdn": True, "fqdn": True, "to-fqdn": True,
    "from-ip": True, "snat-ip": True, "ip": True, "to-ip": True, "ipv4": False, "ipv6": False, "ip-version": True,
    "from-pod": True, "pod": True, "to-pod": True, "from-namespace": True, "namespace": True,
    "to-namespace": True, "from-all-namespaces": False, "all-namespaces": False, "to-all-namespaces": False,
    "from-label": True, "label": True, "to-label": True, "from-service": True, "service": True,
    "to-service": True, "from-port": True, "port": True, "to-port": True, "from-workload": True,
    "workload": True, "to-workload": True, "from-identity": True, "identity": True, "to-identity": True,
    "traffic-direction": True, "interface": True, "encrypted": False, "unencrypted": False,
}

CONFLICTS: list[list[str]] = [
    ["from-fqdn", "from-ip", "ip", "fqdn", "from-namespace", "namespace", "from-all-namespaces", "all-namespaces"],
    ["from-fqdn", "from-ip", "ip", "fqdn", "from-pod", "pod"],
    ["to-fqdn", "to-ip", "ip", "fqdn", "to-namespace", "namespace", "to-all-namespaces", "all-namespaces"],
    ["to-fqdn", "to-ip", "ip", "fqdn", "to-pod", "pod"],
    ["to-pod", "namespace", "all-namespaces"],
    ["from-pod", "namespace", "all-namespaces"],
    ["to-service", "namespace", "all-namespaces"],
    ["from-service", "namespace", "all-namespaces"],
    ["label", "from-label"],
    ["label", "to-label"],
    ["service", "from-service"],
    ["service", "to-service"],
    ["port", "to-port"],
    ["port", "from-port"],
    ["identity", "to-identity"],
    ["identity", "from-identity"],
    ["workload", "to-workload"],
    ["workload", "from-workload"],
    ["encrypted", "unencrypted"],
]

Update = Callable[[FlowFilter], None]


def _namespace_of(name: str) -> str:
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else ""


def _with_namespaces(names: Sequence[str], namespaces: Sequence[str]) -> list[str]:
    if not namespaces or not names:
        return list(names)
    out: list[str] = []
    for name in names:
        if "/" in name:
            out.append(name)
        else:
            out += [f"{ns}/{name}" for ns in namespaces]
    return out


def _apply_source_namespaces(ff: FlowFilter, namespaces: Sequence[str]) -> None:
    if not ff.source_pod and not ff.source_service:
        ff.source_pod.append("")
    pods, services = _with_namespaces(ff.source_pod, namespaces), _with_namespaces(ff.source_service, namespaces)
    del ff.source_pod[:], ff.source_service[:]
    ff.source_pod.extend(pods)
    ff.source_service.extend(services)


def _apply_destination_namespaces(ff: FlowFilter, namespaces: Sequence[str]) -> None:
    if not ff.destination_pod and not ff.destination_service:
        ff.destination_pod.append("")
    pods = _with_namespaces(ff.destination_pod, namespaces)
    services = _with_namespaces(ff.destination_service, namespaces)
    del ff.destination_pod[:], ff.destination_service[:]
    ff.destination_pod.extend(pods)
    ff.destination_service.extend(services)


@dataclass
class _Tracker:
    """One list (whitelist or blacklist) under construction: a source-side and a destination-side filter."""

    left: FlowFilter | None = None
    right: FlowFilter | None = None
    ns: list[str] = field(default_factory=list)
    src_ns: list[str] = field(default_factory=list)
    dst_ns: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def apply_left(self, update: Update) -> None:
        if self.left is None:
            self.left = FlowFilter()
        update(self.left)

    def apply_right(self, update: Update) -> None:
        if self.right is None:
            self.right = FlowFilter()
        update(self.right)

    def apply(self, update: Update) -> None:
        self.apply_left(update)
        self.apply_right(update)

    def flow_filters(self) -> list[FlowFilter]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns or self.dst_ns):
            return []
        left, right = FlowFilter(), FlowFilter()
        if self.left is not None:
            left.CopyFrom(self.left)
        if self.right is not None:
            right.CopyFrom(self.right)
        if self.dst_ns:
            _apply_destination_namespaces(left, self.dst_ns)
            _apply_destination_namespaces(right, self.dst_ns)
        if self.src_ns:
            _apply_source_namespaces(left, self.src_ns)
            _apply_source_namespaces(right, self.src_ns)
        if self.ns:
            _apply_source_namespaces(left, self.ns)
            _apply_destination_namespaces(right, self.ns)
        return [left] if left == right else [left, right]

    def check_namespace_conflicts(self, ff: FlowFilter | None) -> None:
        if ff is None:
            return
        problems = []
        for namespaces, names in ((self.ns, ff.source_pod), (self.ns, ff.source_service),
                                  (self.ns, ff.destination_pod), (self.ns, ff.destination_service),
                                  (self.src_ns, ff.source_pod), (self.src_ns, ff.source_service),
                                  (self.dst_ns, ff.destination_pod), (self.dst_ns, ff.destination_service)):
            for ns in namespaces:
                for name in names:
                    if (found := _namespace_of(name)) and found != ns:
                        problems.append(f'namespace conflict: "{ns}" does not contain "{name}"')
        for pods, services in ((ff.source_pod, ff.source_service), (ff.destination_pod, ff.destination_service)):
            for pod in pods:
                pod_ns = _namespace_of(pod)
                if not pod_ns:
                    continue
                for service in services:
                    if _namespace_of(service) != pod_ns:
                        problems.append(f'namespace of service "{service}" conflict with pod "{pod_ns}"')
        if problems:
            raise InvalidInput(problems)


def _tcp_flags(value: str) -> TCPFlags:
    flags = TCPFlags()
    for name in value.split(","):
        if name.upper() not in ("SYN", "FIN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS"):
            raise InvalidInput([f"unknown tcp flag: {name}"])
        setattr(flags, name.upper(), True)
    return flags


def _ip_version(value: str) -> IPVersionEnum:
    lowered = value.lower()
    if lowered in ("4", "v4", "ipv4", "ip4"):
        return IPv4
    if lowered in ("6", "v6", "ipv6", "ip6"):
        return IPv6
    return IP_NOT_USED


def _workload(value: str) -> Workload:
    if value == "":
        return Workload()
    if "/" in value:
        kind, name = value.split("/", 1)
        return Workload(kind=kind, name=name)
    return Workload(name=value)


def _identity(value: str) -> int:
    if value in RESERVED_IDENTITY_BY_NAME:
        return RESERVED_IDENTITY_BY_NAME[value]
    if value.isdigit() and int(value) < 2**32:
        return int(value)
    names = " ".join(RESERVED_IDENTITY_BY_NAME)
    raise InvalidInput([f"invalid security identity, expected one of [{names}] or a numeric value"])


def _event_type(value: str) -> EventTypeFilter:
    kind, _, sub = value.partition(":")
    flt = EventTypeFilter()
    known = MESSAGE_TYPE_NAMES.get(kind)
    if known is not None:
        flt.type = known
    elif kind.isdigit():
        flt.type = int(kind)
    else:
        raise InvalidInput([f"unable to parse type '{kind}', not a known type name and unable to parse as "
                            "numeric value"])
    if sub:
        if known == MSG_TRACE and sub in TRACE_POINT_BY_NAME:
            flt.match_sub_type, flt.sub_type = True, TRACE_POINT_BY_NAME[sub]
        elif known == MSG_AGENT and sub in _AGENT_SUBTYPES:
            flt.match_sub_type, flt.sub_type = True, _AGENT_SUBTYPES[sub]
        elif sub.isdigit():
            flt.match_sub_type, flt.sub_type = True, int(sub)
        else:
            raise InvalidInput([f"unable to parse event sub-type '{sub}', not a known sub-type name and unable "
                                "to parse as numeric value"])
    return flt


_VERDICT_NAMES = frozenset(VerdictEnum.keys())
_DROP_REASON_NAMES = frozenset(DropReasonEnum.keys())
_AGENT_SUBTYPES = {"unspecified": 0, "message": 1, "agent-started": 2, "policy-updated": 3, "policy-deleted": 4,
                   "endpoint-regenerate-success": 5, "endpoint-regenerate-failure": 6, "endpoint-created": 7,
                   "endpoint-deleted": 8, "ipcache-upserted": 9, "ipcache-deleted": 10}


class FilterBuilder:
    """Feed it the filter flags in command-line order with :meth:`set`; read the lists afterwards."""

    def __init__(self) -> None:
        self.whitelist = _Tracker()
        self.blacklist = _Tracker()
        self._negate_next = False

    def set(self, name: str, value: str = "") -> None:
        if name == "not":
            if self._negate_next:
                raise InvalidInput(["consecutive --not statements"])
            self._negate_next = True
            return
        tracker = self.blacklist if self._negate_next else self.whitelist
        self._negate_next = False
        self._set(tracker, name, value)

    def finish(self) -> tuple[list[FlowFilter], list[FlowFilter]]:
        """(whitelist, blacklist); a ``--not`` with nothing after it is an error."""
        if self._negate_next:
            raise InvalidInput(["trailing --not found in the arguments"])
        return self.whitelist.flow_filters(), self.blacklist.flow_filters()

    def _set(self, t: _Tracker, name: str, value: str) -> None:
        if name not in FILTER_FLAGS:
            raise InvalidInput([f"unknown filter flag --{name}"])
        if name not in t.changed:
            t.changed.append(name)
        for group in CONFLICTS:
            present = [flag for flag in group if flag in t.changed]
            if len(present) > 1:
                raise InvalidInput([f"filters --{present[0]} and --{present[1]} cannot be combined"])

        def both(field_name: str, item: object) -> None:
            t.apply(lambda f: getattr(f, field_name).append(item))

        def sides(left_field: str, right_field: str, item: object) -> None:
            t.apply_left(lambda f: getattr(f, left_field).append(item))
            t.apply_right(lambda f: getattr(f, right_field).append(item))

        two_sided = {"fqdn": ("source_fqdn", "destination_fqdn"), "pod": ("source_pod", "destination_pod"),
                     "ip": ("source_ip", "destination_ip"), "label": ("source_label", "destination_label"),
                     "service": ("source_service", "destination_service"),
                     "port": ("source_port", "destination_port"),
                     "cluster": ("source_cluster_name", "destination_cluster_name")}
        one_sided = {"uuid": "uuid", "from-fqdn": "source_fqdn", "to-fqdn": "destination_fqdn",
                     "from-pod": "source_pod", "to-pod": "destination_pod", "from-ip": "source_ip",
                     "snat-ip": "source_ip_xlated", "to-ip": "destination_ip", "from-label": "source_label",
                     "to-label": "destination_label", "from-service": "source_service",
                     "to-service": "destination_service", "from-port": "source_port", "to-port": "destination_port",
                     "trace-id": "trace_id", "http-status": "http_status_code", "http-method": "http_method",
                     "http-path": "http_path", "http-url": "http_url", "protocol": "protocol",
                     "node-name": "node_name", "node-label": "node_labels", "from-cluster": "source_cluster_name",
                     "to-cluster": "destination_cluster_name"}
        if name in two_sided:
            sides(*two_sided[name], value)
        elif name in one_sided:
            both(one_sided[name], value)
        elif name == "namespace":
            t.ns.append(value)
        elif name == "from-namespace":
            t.src_ns.append(value)
        elif name == "to-namespace":
            t.dst_ns.append(value)
        elif name == "all-namespaces":
            t.ns.append("")
        elif name == "from-all-namespaces":
            t.src_ns.append("")
        elif name == "to-all-namespaces":
            t.dst_ns.append("")
        elif name == "ipv4":
            both("ip_version", IPv4)
        elif name == "ipv6":
            both("ip_version", IPv6)
        elif name == "ip-version":
            both("ip_version", _ip_version(value))
        elif name == "ip-trace-id":
            if value == "0" or not value.isdigit():
                raise InvalidInput(["invalid --ip-trace-id value; must be greater than 0"])
            both("ip_trace_id", int(value))
        elif name == "verdict":
            if value not in _VERDICT_NAMES:
                raise InvalidInput([f"invalid --verdict value: {value}"])
            both("verdict", VerdictEnum.Value(value))
        elif name == "drop-reason-desc":
            if value == "":
                raise InvalidInput(["empty --drop-reason-desc value"])
            if value not in _DROP_REASON_NAMES:
                raise InvalidInput([f"invalid --drop-reason-desc value: {value}"])
            both("drop_reason_desc", DropReasonEnum.Value(value))
        elif name == "http-header":
            key, sep, header_value = value.partition(":")
            if not sep:
                raise InvalidInput([f'invalid http-header value "{value}", expected name:value'])
            both("http_header", HTTPHeader(key=key, value=header_value))
        elif name == "type":
            both("event_type", _event_type(value))
        elif name in ("workload", "from-workload", "to-workload"):
            workload = _workload(value)
            if name == "workload":
                sides("source_workload", "destination_workload", workload)
            else:
                both("source_workload" if name == "from-workload" else "destination_workload", workload)
        elif name in ("identity", "from-identity", "to-identity"):
            identity = _identity(value)
            if name == "identity":
                sides("source_identity", "destination_identity", identity)
            else:
                both("source_identity" if name == "from-identity" else "destination_identity", identity)
        elif name == "tcp-flags":
            both("tcp_flags", _tcp_flags(value))
        elif name == "traffic-direction":
            direction = value.lower()
            if direction not in ("ingress", "egress"):
                raise InvalidInput([f"{direction}: invalid traffic direction, expected ingress or egress"])
            both("traffic_direction", INGRESS if direction == "ingress" else EGRESS)
        elif name == "interface":
            both("interface", NetworkInterface(name=value))
        elif name in ("encrypted", "unencrypted"):
            both("encrypted", name == "encrypted")
        t.check_namespace_conflicts(t.left)
        t.check_namespace_conflicts(t.right)


@dataclass(frozen=True)
class Selectors:
    """``--last/--first/--all/--follow/--since/--until`` (and whether flows come from a file)."""

    last: int = 0
    first: int = 0
    all: bool = False
    follow: bool = False
    since: str = ""
    until: str = ""
    input_file: bool = False


def build_request(selectors: Selectors, whitelist: Sequence[FlowFilter], blacklist: Sequence[FlowFilter],
                  now_ns: int, field_mask: Sequence[str] = ()) -> GetFlowsRequest:
    s = selectors
    first, last = s.first > 0, s.last > 0
    for clash, both_set in (("--first and --last", first and last), ("--first and --all", first and s.all),
                            ("--first and --follow", first and s.follow), ("--last and --all", last and s.all)):
        if both_set:
            raise InvalidInput([f"cannot set both {clash}"])
    request = GetFlowsRequest(follow=s.follow, first=first)
    if s.since:
        since_ns = _parse_time("since", s.since, now_ns)
        request.since.seconds, request.since.nanos = divmod(since_ns, 1_000_000_000)
    if s.until and not s.follow:  # following has no end
        until_ns = _parse_time("until", s.until, now_ns)
        request.until.seconds, request.until.nanos = divmod(until_ns, 1_000_000_000)
    number = s.first if first else s.last
    if not s.since and not (s.until and not s.follow) and not first:
        if s.all:
            number = ALL_FLOWS
        elif not number and not s.follow and not s.input_file:
            number = DEFAULT_LAST
    request.number = number
    request.whitelist.extend(whitelist)
    request.blacklist.extend(blacklist)
    if field_mask:
        request.field_mask.paths.extend(field_mask)
    return request


def _parse_time(what: str, text: str, now_ns: int) -> int:
    try:
        return gotime.parse_time(text, now_ns)
    except InvalidInput as exc:
        raise InvalidInput([f"failed to parse the {what} time: {exc}"]) from None


def parse_raw_filters(texts: Sequence[str], flag: str) -> list[FlowFilter]:
    """``--allowlist``/``--denylist``: JSON-encoded FlowFilters (several may follow each other)."""
    filters: list[FlowFilter] = []
    decoder = json.JSONDecoder()
    for text in texts:
        pos = 0
        while pos < len(text):
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            try:
                _, end = decoder.raw_decode(text, pos)
                filters.append(parse_json(text[pos:end], FlowFilter()))
            except (ValueError, json_format.ParseError) as exc:
                raise InvalidInput([f"invalid --{flag} flag: failed to decode '{text}': {exc}"]) from None
            pos = end
    return filters


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def raw_filters_yaml(request: GetFlowsRequest) -> str:
    """``--print-raw-filters``: the request's lists as YAML, ready for ``--allowlist``/``--denylist``."""
    out = ""
    for key, filters in (("allowlist", request.whitelist), ("denylist", request.blacklist)):
        if filters:
            out += f"{key}:\n" + "".join(f"    - {_yaml_quote(to_json(f))}\n" for f in filters)
    return out or "{}\n"
