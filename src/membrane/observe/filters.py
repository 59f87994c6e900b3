"""Hubble's flow filters: which flows a FlowFilter, a whitelist and a blacklist select.

Within one FlowFilter every field that is set must match (AND) and the values listed in one field
are alternatives (OR). A request's whitelist selects flows matching *any* of its filters (all flows
when it is empty); its blacklist removes flows matching any of its filters. A field is "set" when
it lists at least one value, as in protobuf.

Pure functions over the Flow message; nothing here does I/O. Invalid filters (a bad CIDR, regular
expression, label selector, port, protocol …) raise InvalidInput with Hubble's wording.

Primitives: :func:`compile_filter`, :class:`FlowMatcher`, :func:`parse_label_selector`,
:func:`fqdn_pattern`, :func:`node_name_pattern`.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from membrane.core.errors import InvalidInput
from membrane.observe.model import DROPPED, HTTP, MSG_ACCESS_LOG, Flow, FlowFilter

Predicate = Callable[[Flow], bool]

DEFAULT_CLUSTER = "default"


# --- addresses ---------------------------------------------------------------------------------


def _ip_filter(values: Sequence[str], get: Callable[[Flow], str]) -> Predicate:
    addresses: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in values:
        try:
            if "/" in value:
                networks.append(ipaddress.ip_network(value, strict=False))
            else:
                ipaddress.ip_address(value)
                addresses.add(value)
        except ValueError:
            kind = "prefix" if "/" in value else "address"
            raise InvalidInput([f"invalid IP {kind} {value!r} in filter"]) from None

    def match(flow: Flow) -> bool:
        ip = get(flow)
        if not ip:
            return False
        if ip in addresses:
            return True
        if networks:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                return False
            return any(address in network for network in networks)
        return False

    return match


# --- names: pods and services ----------------------------------------------------------------------


def parse_namespaced_name(text: str) -> tuple[str, str]:
    """``ns/prefix`` → (ns, prefix); ``prefix`` → ("default", prefix); ``ns/`` → (ns, ""); ``/x`` → ("", x)."""
    parts = text.split("/")
    if len(parts) > 1:
        return parts[0], parts[1]
    if parts[0] == "":
        return "", ""
    return "default", parts[0]


def _name_filter(values: Sequence[str], get: Callable[[Flow], tuple[str, str]]) -> Predicate:
    wanted = []
    for value in values:
        if value == "":
            raise InvalidInput(["invalid filter, name must not be empty"])
        wanted.append(parse_namespaced_name(value))

    def match(flow: Flow) -> bool:
        namespace, name = get(flow)
        if not namespace and not name:
            return False
        return any((not prefix or name.startswith(prefix)) and (not ns or ns == namespace) for ns, prefix in wanted)

    return match


# --- FQDN and node-name patterns --------------------------------------------------------------------

_FQDN_RE = r"(?:[-0-9_a-z]+(?:\.[-0-9_a-z]+)*)"


def _fqdn_regex(pattern: str) -> str:
    pattern = pattern.strip().removesuffix(".").lower()
    if pattern == "":
        raise InvalidInput(["empty pattern"])
    if pattern.endswith("."):
        raise InvalidInput(["multiple trailing dots in pattern"])
    out = []
    for char in pattern:
        if char == ".":
            out.append(r"\.")
        elif char == "*":
            out.append(r"[-.0-9a-z]*")
        elif char in "-_" or "0" <= char <= "9" or "a" <= char <= "z":
            out.append(char)
        else:
            raise InvalidInput([f"{char!r}: invalid rune in pattern"])
    return "".join(out)


def fqdn_pattern(patterns: Sequence[str]) -> re.Pattern[str]:
    """Anchored alternatives; ``*`` matches any run of name characters, dots included."""
    return re.compile(r"\A(?:" + "|".join(_fqdn_regex(p) for p in patterns) + r")\Z")


def node_name_pattern(patterns: Sequence[str]) -> re.Pattern[str]:
    """``[cluster/]node`` patterns, compared against "cluster/node" names."""
    alternatives = []
    for pattern in patterns:
        if pattern == "":
            raise InvalidInput(["empty pattern"])
        parts = pattern.split("/")
        if len(parts) > 2:
            raise InvalidInput(["too many slashes in pattern"])
        cluster, node = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        alternatives.append((_fqdn_regex(cluster) if cluster else _FQDN_RE) + "/"
                            + (_fqdn_regex(node) if node else _FQDN_RE))
    return re.compile(r"\A(?:" + "|".join(alternatives) + r")\Z")


def _compile_regexes(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise InvalidInput([f"invalid {what} filter: {pattern}: {exc}"]) from None
    return compiled


# --- label selectors ----------------------------------------------------------------------------------

# A label as Cilium writes it, "source:key=value"; the selector side spells the key "source.key".
@dataclass(frozen=True, slots=True)
class _Label:
    source: str
    key: str
    value: str


def _parse_flow_label(text: str) -> _Label:
    source = "unspec"
    rest = text
    if text.startswith("$"):
        source, rest = "reserved", text[1:]
    else:
        colon, equals = text.find(":"), text.find("=")
        if colon >= 0 and (equals < 0 or colon < equals):
            source, rest = text[:colon], text[colon + 1:]
    key, _, value = rest.partition("=")
    return _Label(source, key, value)


def _translate_selector(selector: str) -> str:
    """Rewrite each key's ``source:`` prefix to ``source.`` and give bare keys the source "any"."""
    out: list[str] = []
    i, n = 0, len(selector)
    while i < n:
        while i < n and (selector[i].isspace() or selector[i] == "!"):
            out.append(selector[i])
            i += 1
        start = i
        while i < n and not (selector[i].isspace() or selector[i] in "=!,"):
            i += 1
        key = selector[start:i]
        if ":" not in key:
            key = "any:" + key
        out.append(key.replace(":", ".", 1))
        depth = 0
        while i < n:
            char = selector[i]
            depth += (char == "(") - (char == ")")
            out.append(char)
            i += 1
            if char == "," and depth == 0:
                break
    return "".join(out)


_TOKEN = re.compile(r"\s*(!=|==|=|!|,|\(|\)|>|<|[^\s!=,()<>]+)")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str  # "source.key"
    operator: str  # exists, !exists, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()


def parse_label_selector(selector: str) -> tuple[Requirement, ...]:
    """A Kubernetes label selector whose keys may carry a Cilium source (``k8s:app=web``)."""
    text = _translate_selector(selector)
    tokens = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            break
        tokens.append(match.group(1))
        pos = match.end()
        if not text[pos:].strip():
            break
    requirements: list[Requirement] = []
    i = 0

    def fail(why: str) -> InvalidInput:
        return InvalidInput([f"unable to parse requirement: {why} in selector {selector!r}"])

    def ident() -> str:
        nonlocal i
        if i >= len(tokens) or tokens[i] in ("!=", "==", "=", "!", ",", "(", ")", ">", "<"):
            raise fail("expected a key or value")
        i += 1
        return tokens[i - 1]

    def value() -> str:
        nonlocal i
        if i < len(tokens) and tokens[i] not in (",", ")"):
            return ident()
        return ""

    while i < len(tokens):
        if tokens[i] == "!":
            i += 1
            requirements.append(Requirement(ident(), "!exists"))
        else:
            key = ident()
            op = tokens[i] if i < len(tokens) else ","
            if op == ",":
                requirements.append(Requirement(key, "exists"))
            elif op in ("=", "==", "!="):
                i += 1
                requirements.append(Requirement(key, "!=" if op == "!=" else "=", (value(),)))
            elif op in ("in", "notin"):
                i += 1
                if i >= len(tokens) or tokens[i] != "(":
                    raise fail("expected '(' after " + op)
                i += 1
                values = [value()]
                while i < len(tokens) and tokens[i] == ",":
                    i += 1
                    values.append(value())
                if i >= len(tokens) or tokens[i] != ")":
                    raise fail("expected ')'")
                i += 1
                requirements.append(Requirement(key, op, tuple(values)))
            elif op in (">", "<"):
                i += 1
                number = ident()
                if not re.fullmatch(r"-?\d+", number):
                    raise fail(f"{number!r} is not an integer")
                requirements.append(Requirement(key, "gt" if op == ">" else "lt", (number,)))
            else:
                raise fail(f"unexpected {op!r}")
        if i < len(tokens):
            if tokens[i] != ",":
                raise fail(f"unexpected {tokens[i]!r}")
            i += 1
            if i >= len(tokens):
                raise fail("trailing ','")
    return tuple(requirements)


def _lookup(labels: Sequence[_Label], key: str) -> str | None:
    source, _, name = key.partition(".")
    for label in labels:
        if (source == "any" or source == label.source) and label.key == name:
            return label.value
    return None


def selector_matches(requirements: Sequence[Requirement], labels: Sequence[_Label]) -> bool:
    for req in requirements:
        value = _lookup(labels, req.key)
        match req.operator:
            case "exists":
                ok = value is not None
            case "!exists":
                ok = value is None
            case "=" | "in":
                ok = value is not None and value in req.values
            case "!=" | "notin":
                ok = value is None or value not in req.values
            case _:  # gt, lt
                try:
                    ok = value is not None and (int(value) > int(req.values[0]) if req.operator == "gt"
                                                else int(value) < int(req.values[0]))
                except ValueError:
                    ok = False
        if not ok:
            return False
    return True


def _label_filter(selectors: Sequence[str], get: Callable[[Flow], Iterable[str]], what: str) -> Predicate:
    try:
        parsed = [parse_label_selector(s) for s in selectors]
    except InvalidInput as exc:
        raise InvalidInput([f"invalid {what} label filter: {p}" for p in exc.problems]) from None

    def match(flow: Flow) -> bool:
        labels = [_parse_flow_label(text) for text in get(flow)]
        return any(selector_matches(reqs, labels) for reqs in parsed)

    return match


# --- L4 -----------------------------------------------------------------------------------------------


def _ports(flow: Flow) -> tuple[int, int] | None:
    which = flow.l4.WhichOneof("protocol") if flow.HasField("l4") else None
    if which in ("TCP", "UDP", "SCTP"):
        l4 = getattr(flow.l4, which)
        return int(l4.source_port), int(l4.destination_port)
    return None


def _port_filter(values: Sequence[str], index: int, what: str) -> Predicate:
    wanted = set()
    for value in values:
        if not value.isdigit() or int(value) > 65535:
            raise InvalidInput([f"invalid {what} port filter: invalid port {value!r}"])
        wanted.add(int(value))

    def match(flow: Flow) -> bool:
        ports = _ports(flow)
        return ports is not None and ports[index] in wanted

    return match


_L4_PROTOCOLS = {"icmp": ("ICMPv4", "ICMPv6"), "icmpv4": ("ICMPv4",), "icmpv6": ("ICMPv6",), "tcp": ("TCP",),
                 "udp": ("UDP",), "sctp": ("SCTP",), "vrrp": ("VRRP",), "igmp": ("IGMP",)}
_L7_PROTOCOLS = {"dns": "dns", "http": "http", "kafka": "kafka"}


def _protocol_filter(values: Sequence[str]) -> Predicate:
    l4: set[str] = set()
    l7: set[str] = set()
    for value in values:
        name = value.lower()
        if name in _L4_PROTOCOLS:
            l4.update(_L4_PROTOCOLS[name])
        elif name in _L7_PROTOCOLS:
            l7.add(_L7_PROTOCOLS[name])
        else:
            raise InvalidInput([f"invalid protocol filter: unknown protocol: {value!r}"])

    def match(flow: Flow) -> bool:
        if flow.HasField("l4") and flow.l4.WhichOneof("protocol") in l4:
            return True
        return flow.HasField("l7") and flow.l7.WhichOneof("record") in l7

    return match


_TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")


def _tcp_flags_filter(wanted: Sequence[object]) -> Predicate:
    sets = [[name for name in _TCP_FLAG_NAMES if getattr(flags, name)] for flags in wanted]

    def match(flow: Flow) -> bool:
        if not (flow.HasField("l4") and flow.l4.HasField("TCP") and flow.l4.TCP.HasField("flags")):
            return False
        flags = flow.l4.TCP.flags
        return any(all(getattr(flags, name) for name in names) for names in sets)

    return match


# --- L7 --------------------------------------------------------------------------------------------------

_STATUS_FULL = re.compile(r"^[1-5][0-9]{2}$")
_STATUS_PREFIX = re.compile(r"^[1-5][0-9]?\+$")


def _http(flow: Flow) -> HTTP | None:
    if flow.HasField("l7") and flow.l7.HasField("http"):
        return flow.l7.http
    return None


def _status_filter(values: Sequence[str]) -> Predicate:
    full, prefixes = set(), []
    for value in values:
        if _STATUS_FULL.match(value):
            full.add(value)
        elif _STATUS_PREFIX.match(value):
            prefixes.append(value.removesuffix("+"))
        else:
            raise InvalidInput([f"invalid http status code filter: invalid status code prefix: {value!r}"])

    def match(flow: Flow) -> bool:
        http = _http(flow)
        if http is None or not http.code:
            return False
        code = f"{http.code:03d}"
        return code in full or any(code.startswith(p) for p in prefixes)

    return match


def _url_path(url: str) -> str | None:
    """The path of a request URI (absolute URL or absolute path), None when it is neither."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme and not url.startswith("/"):
        return None
    return urllib.parse.unquote(parts.path)


def _workload_filter(workloads: Sequence[tuple[str, str]], which: str) -> Predicate:
    def match(flow: Flow) -> bool:
        return any((not name or name == w.name) and (not kind or kind == w.kind)
                   for w in getattr(flow, which).workloads for name, kind in workloads)

    return match


def _cluster_filter(names: frozenset[str], which: str) -> Predicate:
    return lambda flow: getattr(flow, which).cluster_name in names


# --- building --------------------------------------------------------------------------------------------


def _endpoint_ns_pod(which: str) -> Callable[[Flow], tuple[str, str]]:
    return lambda flow: (getattr(flow, which).namespace, getattr(flow, which).pod_name)


def _service_ns_name(which: str) -> Callable[[Flow], tuple[str, str]]:
    return lambda flow: (getattr(flow, which).namespace, getattr(flow, which).name)


def compile_filter(ff: FlowFilter) -> Predicate:
    """One FlowFilter as a predicate: all of its set fields must match."""
    checks: list[Predicate] = []
    add = checks.append

    if ff.uuid:
        uuids = set(ff.uuid)
        add(lambda f: f.uuid in uuids)
    if ff.event_type:
        types = [(int(t.type), bool(t.match_sub_type), int(t.sub_type)) for t in ff.event_type]

        def event_match(f: Flow) -> bool:
            if not f.HasField("event_type"):
                return False
            return any((not t or f.event_type.type == t) and (not match_sub or f.event_type.sub_type == sub)
                       for t, match_sub, sub in types)

        add(event_match)
    if ff.verdict:
        verdicts = set(ff.verdict)
        add(lambda f: f.verdict in verdicts)
    if ff.drop_reason_desc:
        reasons = set(ff.drop_reason_desc)
        add(lambda f: f.drop_reason_desc in reasons)
    if ff.reply:
        replies = set(ff.reply)

        def reply_match(f: Flow) -> bool:
            # A drop with no direction counts as "not a reply"; other flows without one match nothing.
            if not f.HasField("is_reply") and f.verdict != DROPPED:
                return False
            return bool(f.is_reply.value) in replies

        add(reply_match)
    if ff.encrypted:
        encrypted = set(ff.encrypted)
        add(lambda f: bool(f.IP.encrypted) in encrypted)
    if ff.source_identity:
        ids = set(ff.source_identity)
        add(lambda f: f.HasField("source") and f.source.identity in ids)
    if ff.destination_identity:
        dids = set(ff.destination_identity)
        add(lambda f: f.HasField("destination") and f.destination.identity in dids)
    if ff.protocol:
        add(_protocol_filter(ff.protocol))
    if ff.source_ip:
        add(_ip_filter(ff.source_ip, lambda f: f.IP.source))
    if ff.destination_ip:
        add(_ip_filter(ff.destination_ip, lambda f: f.IP.destination))
    if ff.source_ip_xlated:
        add(_ip_filter(ff.source_ip_xlated, lambda f: f.IP.source_xlated))
    if ff.source_pod:
        add(_name_filter(ff.source_pod, _endpoint_ns_pod("source")))
    if ff.destination_pod:
        add(_name_filter(ff.destination_pod, _endpoint_ns_pod("destination")))
    for field, which in (("source_workload", "source"), ("destination_workload", "destination")):
        workloads = [(w.name, w.kind) for w in getattr(ff, field)]
        if workloads:
            add(_workload_filter(workloads, which))
    if ff.source_service:
        add(_name_filter(ff.source_service, _service_ns_name("source_service")))
    if ff.destination_service:
        add(_name_filter(ff.destination_service, _service_ns_name("destination_service")))
    if ff.source_fqdn:
        src_re = fqdn_pattern(ff.source_fqdn)
        add(lambda f: any(src_re.match(name) for name in f.source_names))
    if ff.destination_fqdn:
        dst_re = fqdn_pattern(ff.destination_fqdn)
        add(lambda f: any(dst_re.match(name) for name in f.destination_names))
    if ff.dns_query:
        queries = _compile_regexes(ff.dns_query, "DNS query")
        add(lambda f: f.HasField("l7") and f.l7.HasField("dns") and any(q.search(f.l7.dns.query) for q in queries))
    if ff.source_label:
        add(_label_filter(ff.source_label, lambda f: f.source.labels, "source"))
    if ff.destination_label:
        add(_label_filter(ff.destination_label, lambda f: f.destination.labels, "destination"))
    if ff.node_labels:
        add(_label_filter(ff.node_labels, lambda f: f.node_labels, "node"))
    if ff.source_port:
        add(_port_filter(ff.source_port, 0, "source"))
    if ff.destination_port:
        add(_port_filter(ff.destination_port, 1, "destination"))
    _add_http(ff, add)
    if ff.tcp_flags:
        add(_tcp_flags_filter(list(ff.tcp_flags)))
    if ff.node_name:
        node_re = node_name_pattern(ff.node_name)

        def node_match(f: Flow) -> bool:
            name = f.node_name
            if not name:
                return False
            return bool(node_re.match(name if "/" in name else f"{DEFAULT_CLUSTER}/{name}"))

        add(node_match)
    for field, which in (("source_cluster_name", "source"), ("destination_cluster_name", "destination")):
        names = list(getattr(ff, field))
        if names:
            if "" in names:
                raise InvalidInput(["invalid filter, name must not be empty"])
            add(_cluster_filter(frozenset(names), which))
    if ff.ip_version:
        versions = set(ff.ip_version)
        add(lambda f: f.IP.ipVersion in versions)
    if ff.trace_id:
        trace_ids = set(ff.trace_id)
        add(lambda f: f.trace_context.parent.trace_id in trace_ids)
    if ff.traffic_direction:
        directions = set(ff.traffic_direction)
        add(lambda f: f.traffic_direction in directions)
    if ff.HasField("experimental") and ff.experimental.cel_expression:
        raise InvalidInput(["CEL expression filters are not supported"])
    if ff.interface:
        interfaces = [(int(i.index), i.name) for i in ff.interface]
        add(lambda f: f.HasField("interface") and any(
            (not index or index == f.interface.index) and (not name or name == f.interface.name)
            for index, name in interfaces))
    if ff.ip_trace_id:
        ip_trace_ids = set(ff.ip_trace_id)
        add(lambda f: f.ip_trace_id.trace_id in ip_trace_ids)

    def all_match(flow: Flow) -> bool:
        return all(check(flow) for check in checks)

    return all_match


def _add_http(ff: FlowFilter, add: Callable[[Predicate], None]) -> None:
    l7_only = not ff.event_type or any(t.type == MSG_ACCESS_LOG for t in ff.event_type)

    def require_l7(what: str) -> None:
        if not l7_only:
            raise InvalidInput([f"filtering by {what} requires the event type filter to only match 'l7' events"])

    if ff.http_status_code:
        require_l7("http status code")
        add(_status_filter(ff.http_status_code))
    if ff.http_method:
        require_l7("http method")
        methods = {m.lower() for m in ff.http_method}
        add(lambda f: (h := _http(f)) is not None and bool(h.method)
            and h.method.lower() in methods)
    if ff.http_path:
        require_l7("http path")
        paths = _compile_regexes(ff.http_path, "http path")

        def path_match(f: Flow) -> bool:
            http = _http(f)
            if http is None or not http.url:
                return False
            path = _url_path(http.url)
            return path is not None and any(p.search(path) for p in paths)

        add(path_match)
    if ff.http_url:
        require_l7("http url")
        urls = _compile_regexes(ff.http_url, "http url")
        add(lambda f: (h := _http(f)) is not None and bool(h.url)
            and any(u.search(h.url) for u in urls))
    if ff.http_header:
        require_l7("http headers")
        headers = {(h.key, h.value) for h in ff.http_header}
        add(lambda f: (h := _http(f)) is not None and any(
            (x.key, x.value) in headers for x in h.headers))


@dataclass(frozen=True)
class FlowMatcher:
    """A request's whitelist and blacklist: (any whitelist filter, or none given) and no blacklist filter."""

    allow: tuple[Predicate, ...] = ()
    deny: tuple[Predicate, ...] = ()

    @classmethod
    def build(cls, whitelist: Iterable[FlowFilter] = (), blacklist: Iterable[FlowFilter] = ()) -> FlowMatcher:
        return cls(tuple(compile_filter(f) for f in whitelist), tuple(compile_filter(f) for f in blacklist))

    @property
    def empty(self) -> bool:
        return not self.allow and not self.deny

    def __call__(self, flow: Flow) -> bool:
        if self.allow and not any(check(flow) for check in self.allow):
            return False
        return not any(check(flow) for check in self.deny)
