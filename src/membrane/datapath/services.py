"""Service load balancing in nftables: frontends → per-service chains → DNAT to a backend (pure).

The per-packet cost is constant in the number of services: one verdict-map lookup finds the
frontend's chain, and the chain holds a fixed number of rules however many services exist::

    nat_prerouting (dstnat) / nat_output (host processes)
        ip daddr . l4proto . th dport vmap @services        → goto svc_<id>   (ClusterIP, LB, external IPs)
        fib daddr type local l4proto . th dport vmap @nodeports → goto svc_<id>   (node ports)
    svc_<id>
        [log prefix "mb:x:T:0:31"]              flow logging: the frontend, before DNAT (first packet only)
        [iifname "lxc*" goto svc_<id>_in]       externalTrafficPolicy Local: this node's pods use every backend
        [ip saddr @svc_<id>_a<backend> goto svc_<id>_b<backend>  ...]   session affinity: back to the same backend
        numgen random mod N 0 dnat ip to backend_0 ... dnat ip to backend_N-1      random (the default; a map above 16)
        dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport mod M seed S map @svc_<id>_mg   Maglev
                                          (map: typeof numgen random mod M : ip daddr . tcp dport, M slots)
    svc_<id>_b<backend>   update @svc_<id>_a<backend> { ip saddr timeout T }; dnat ip to backend   (affinity only)

    refuse_prerouting / refuse_output (filter, just after dstnat)
        ip daddr . l4proto . th dport @svc_refuse → svc_no_backend: logged drop
        (SERVICE_BACKEND_NOT_FOUND), TCP reset / ICMP port unreachable: a client learns at once
    nat_postrouting (srcnat, before masquerade)
        ct status dnat ip saddr . ip daddr @svc_hairpin   snat to the pods' gateway  (a pod reaching itself)
        ct status dnat, not from or to a local pod        snat to the node address  (outside client,
                                                           backend on another node: replies come back here)

Only a frontend's own chain changes when its backends change (a chain-granular transaction).
Established connections never meet these rules again (NAT runs on a connection's first packet), so
a backend that is removed or terminating keeps its connections until they end.

Primitives: :class:`ServiceDatapath`, :func:`service_section`, :func:`frontend_chain_name`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, collapse_addresses

from membrane.core.config import ClusterConfig
from membrane.datapath.nft.objects import Chain, Key, Map, Rule, Set, key
from membrane.loadbalancer.jhash import nft_jhash_expr
from membrane.loadbalancer.maglev import MaglevSeed, lookup_table
from membrane.loadbalancer.model import ANY_ADDRESS, Backend, Frontend, dnat_target

SERVICES = "services"
NODEPORTS = "nodeports"
SVC_REFUSE = "svc_refuse"
NODEPORT_REFUSE = "nodeport_refuse"
SVC_HAIRPIN = "svc_hairpin"
SVC_NO_BACKEND = "svc_no_backend"

_PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


def frontend_chain_name(frontend: Frontend) -> str:
    return f"svc_{frontend.id}"


def _backend_suffix(backend: Backend) -> str:
    return f"{int(backend.address):08x}{backend.port:04x}"


@dataclass(frozen=True)
class MaglevSettings:
    """The cluster-wide Maglev parameters: table size M (a prime) and the seed."""

    size: int
    seed: MaglevSeed


@lru_cache(maxsize=4096)
def _maglev_table(backends: tuple[str, ...], size: int, seed: MaglevSeed) -> tuple[str, ...]:
    # Milliseconds per service: a full rebuild of many Maglev services reuses unchanged tables.
    return lookup_table(backends, seed=seed, table_size=size)


class ServiceRenderer:
    """Keeps each frontend's rendered chains, sets and maps between passes: they are a pure function
    of the frontend row (and the Maglev settings), and rows are immutable, so an unchanged frontend
    (the same object) is not rendered again; neither is an unchanged ``services`` map (sorting its
    elements costs more than rendering one chain)."""

    def __init__(self) -> None:
        self._parts: dict[int, tuple[Frontend, object, _Parts, list[Rule]]] = {}
        self._maps: dict[str, Map] = {}

    def selection(self, frontend: Frontend, context: object,
                  render: Callable[[_Parts], list[Rule]]) -> tuple[_Parts, list[Rule]]:
        """``render``'s output for ``frontend``; ``context`` is everything else it depends on
        (the Maglev settings, the log statements)."""
        cached = self._parts.get(id(frontend))
        if cached is not None and cached[0] is frontend and cached[1] == context:
            return cached[2], cached[3]
        parts = _Parts()
        rules = render(parts)
        self._parts[id(frontend)] = (frontend, context, parts, rules)
        return parts, rules

    def forget_except(self, frontends: Sequence[Frontend]) -> None:
        keep = {id(f) for f in frontends}
        self._parts = {k: v for k, v in self._parts.items() if k in keep}

    def map(self, wanted: Map) -> Map:
        """``wanted``, or the equal map built last time (the same object: cheap to compare later)."""
        before = self._maps.get(wanted.name)
        if before is not None and before == wanted:
            return before
        self._maps[wanted.name] = wanted
        return wanted


@dataclass(frozen=True)
class ServiceDatapath:
    """What the service section is rendered from. ``renderer`` (not compared) caches what unchanged
    frontends rendered to in an earlier pass."""

    frontends: tuple[Frontend, ...]
    node_address: IPv4Address
    gateway: IPv4Address
    local_pods: frozenset[IPv4Address] = frozenset()
    maglev: MaglevSettings | None = None
    renderer: ServiceRenderer | None = field(default=None, compare=False)


def maglev_settings(config: ClusterConfig) -> MaglevSettings:
    """The cluster's Maglev parameters (the same on every node)."""
    return MaglevSettings(config.maglevTableSize, MaglevSeed.parse(config.maglevHashSeed))


def _dnat_one(proto: str, backend: Backend) -> str:
    return f"meta l4proto {proto} dnat ip to {dnat_target(backend.address, backend.port)}"


#: Up to this many backends a random choice is a cascade of rules; above it, one lookup in a map.
#: A set or map is a kernel object of its own: 10,000 services with one anonymous map each took
#: 11.5 s to load with ``nft -f`` where the same services as rule cascades took 1.5 s (measured).
CASCADE_MAX = 16


def _cascade(actions: Sequence[str]) -> list[Rule]:
    """A uniform random choice among ``actions`` without a map, as kube-proxy's iptables mode does
    it: rule i is taken with probability 1/(N-i) by the connections that reach it, so each of the N
    is taken with probability 1/N; the last one takes what is left."""
    count = len(actions)
    rules = [Rule(f"numgen random mod {count - i} 0 {action}") for i, action in enumerate(actions[:-1])]
    return [*rules, Rule(actions[-1])]


def _random(name: str, frontend: Frontend, backends: Sequence[Backend], parts: _Parts) -> list[Rule]:
    proto = _PROTO[frontend.address.protocol]
    if len(backends) <= CASCADE_MAX:
        return _cascade([_dnat_one(proto, b) for b in backends])
    map_name = f"{name}_be"
    parts.maps.append(Map(
        name=map_name, type=("integer",), value_type="ipv4_addr . inet_service",
        typeof=f"numgen random mod {len(backends)} : ip daddr . {proto} dport",
        comment=f"backends of {frontend.name}",
        elements=tuple((key(i), f"{b.address} . {b.port}") for i, b in enumerate(backends)),
    ))
    return [Rule(f"meta l4proto {proto} dnat ip to numgen random mod {len(backends)} map @{map_name}")]


@dataclass
class _Parts:
    chains: list[Chain] = field(default_factory=list)
    sets: list[Set] = field(default_factory=list)
    maps: list[Map] = field(default_factory=list)


def _selection(name: str, frontend: Frontend, backends: Sequence[Backend], maglev: MaglevSettings | None,
               parts: _Parts) -> list[Rule]:
    """The rules of chain ``name`` that send a new connection to one of ``backends``."""
    proto = _PROTO[frontend.address.protocol]
    if not backends:
        return []
    if frontend.algorithm == "maglev" and maglev is not None and len(backends) > 1:
        table = _maglev_table(tuple(b.key for b in backends), maglev.size, maglev.seed)
        by_key = {b.key: b for b in backends}
        map_name = f"{name}_mg"
        parts.maps.append(Map(
            name=map_name, type=("integer",), value_type="ipv4_addr . inet_service",
            typeof=f"numgen random mod {maglev.size} : ip daddr . {proto} dport",
            comment=f"Maglev lookup table of {frontend.name}",
            elements=tuple((key(slot), f"{by_key[k].address} . {by_key[k].port}") for slot, k in enumerate(table)),
        ))
        expression = nft_jhash_expr(proto, table_size=maglev.size, seed=maglev.seed.jhash_seed,
                                    affinity=bool(frontend.affinity_timeout))
        return [Rule(f"dnat ip to {expression} map @{map_name}",
                     comment="Maglev: every node picks the same backend for a connection")]
    if not frontend.affinity_timeout:
        return _random(name, frontend, backends, parts)
    rules: list[Rule] = []
    verdicts = []
    for index, backend in enumerate(backends):
        suffix = _backend_suffix(backend)
        affinity, chain = f"{name}_a{suffix}", f"{name}_b{suffix}"
        parts.sets.append(Set(name=affinity, type=("ipv4_addr",), flags=("dynamic", "timeout"),
                              comment=f"clients of {backend.key} ({frontend.name} session affinity)"))
        parts.chains.append(Chain(name=chain, comment=f"{frontend.name} -> {backend.key}", rules=(
            Rule(f"update @{affinity} {{ ip saddr timeout {frontend.affinity_timeout}s }}"),
            Rule(_dnat_one(proto, backend)),
        )))
        rules.append(Rule(f"ip saddr @{affinity} goto {chain}", comment="session affinity"))
        verdicts.append(f"{index} : goto {chain}")
    if len(backends) <= CASCADE_MAX:
        return rules + _cascade([f"goto {name}_b{_backend_suffix(b)}" for b in backends])
    rules.append(Rule(f"numgen random mod {len(backends)} vmap {{ {', '.join(verdicts)} }}"))
    return rules


def _source_check(name: str, frontend: Frontend, log_denied: str, parts: _Parts) -> list[Rule]:
    """loadBalancerSourceRanges: outside clients (not this node's pods) outside the allow-list,
    or inside the deny-list, are dropped before any backend is chosen."""
    ranges = frontend.source_ranges
    if ranges is None:
        return []
    drop = f"counter {log_denied} drop".replace("  ", " ")
    outside = 'iifname != "lxc*"'
    if not ranges:
        return [Rule(f"{outside} {drop}", comment="loadBalancerSourceRanges: no IPv4 client allowed")]
    set_name = f"{name}_src"
    parts.sets.append(Set(name=set_name, type=("ipv4_addr",), flags=("interval",),
                          comment=f"loadBalancerSourceRanges of {frontend.name}",
                          elements=frozenset(key(n) for n in collapse_addresses(ranges))))
    if frontend.source_ranges_deny:
        return [Rule(f"{outside} ip saddr @{set_name} {drop}", comment="loadBalancerSourceRanges (deny-list)")]
    return [Rule(f"{outside} ip saddr != @{set_name} {drop}", comment="loadBalancerSourceRanges")]


def service_section(desired: ServiceDatapath, log_refused: str, log_denied: str = "",
                    log_translation: str = "") -> tuple[
        list[tuple[str, Rule]], list[Chain], list[Set], list[Map]]:
    """(dispatch rules by base chain name, chains, sets, maps) of the service section. The base
    chain names are the caller's (``membrane.datapath.ruleset``): ``nat_prerouting``,
    ``nat_output``, ``refuse_prerouting``, ``refuse_output``, ``nat_postrouting``. ``no_backend`` is the
    log statement of a refused connection, ``log_denied`` of one loadBalancerSourceRanges drops,
    ``log_translation`` of the event that reports a connection's frontend before DNAT (NFLOG cannot
    carry conntrack's original tuple here, so the observer pairs this event with the translated
    packet's); "" without flow logging."""
    parts = _Parts()
    services: list[tuple[Key, str]] = []
    nodeports: list[tuple[Key, str]] = []
    refuse: set[Key] = set()
    nodeport_refuse: set[Key] = set()
    for frontend in desired.frontends:
        name = frontend_chain_name(frontend)
        proto = _PROTO[frontend.address.protocol]
        addr = frontend.address
        is_nodeport = addr.address == ANY_ADDRESS
        if not frontend.selected:
            if is_nodeport:
                nodeport_refuse.add(key(proto, addr.port))
            else:
                refuse.add(key(addr.address, proto, addr.port))
        if not frontend.selected and not frontend.internal:
            continue

        def render(own: _Parts, frontend: Frontend = frontend, name: str = name) -> list[Rule]:
            rules: list[Rule] = _source_check(name, frontend, log_denied, own)
            if log_translation:
                rules.append(Rule(log_translation, comment="the frontend, before DNAT"))
            if frontend.internal:
                inner = f"{name}_in"
                own.chains.append(Chain(name=inner, comment=f"{frontend.name} from this node's pods: every backend",
                                        rules=tuple(_selection(inner, frontend, frontend.internal, desired.maglev,
                                                               own))))
                rules.append(Rule(f'iifname "lxc*" goto {inner}', comment="this node's pods"))
            rules += _selection(name, frontend, frontend.selected, desired.maglev, own)
            own.chains.append(Chain(name=name, comment=f"{frontend.type} {frontend.address} of {frontend.name}",
                                    rules=tuple(rules)))
            return rules

        if desired.renderer is not None:
            own, _ = desired.renderer.selection(frontend, (desired.maglev, log_denied, log_translation), render)
        else:
            own = _Parts()
            render(own)
        parts.chains += own.chains
        parts.sets += own.sets
        parts.maps += own.maps
        if is_nodeport:
            nodeports.append((key(proto, addr.port), f"goto {name}"))
        else:
            services.append((key(addr.address, proto, addr.port), f"goto {name}"))
    if desired.renderer is not None:
        desired.renderer.forget_except(desired.frontends)
    keep = desired.renderer.map if desired.renderer is not None else (lambda m: m)
    parts.maps += [keep(m) for m in (
        Map(name=SERVICES, type=("ipv4_addr", "inet_proto", "inet_service"), value_type="verdict",
            comment="frontends: address . protocol . port -> the service's chain", elements=tuple(services)),
        Map(name=NODEPORTS, type=("inet_proto", "inet_service"), value_type="verdict",
            comment="node ports (on every address of this node) -> the service's chain", elements=tuple(nodeports)),
    )]
    parts.sets += [
        Set(name=SVC_REFUSE, type=("ipv4_addr", "inet_proto", "inet_service"),
            comment="frontends without a backend for this client: refused at once", elements=frozenset(refuse)),
        Set(name=NODEPORT_REFUSE, type=("inet_proto", "inet_service"),
            comment="node ports without a backend for this client: refused at once",
            elements=frozenset(nodeport_refuse)),
        Set(name=SVC_HAIRPIN, type=("ipv4_addr", "ipv4_addr"),
            comment="a local pod reaching itself through a service",
            elements=frozenset(key(ip, ip) for ip in desired.local_pods)),
    ]
    parts.chains.append(Chain(name=SVC_NO_BACKEND, comment="a service without a backend: refused, never silent",
                              rules=(Rule(f"counter {log_refused}".strip()),
                                     Rule("meta l4proto tcp reject with tcp reset"),
                                     Rule("reject with icmp type port-unreachable"))))
    lookup = f"ip daddr . meta l4proto . th dport vmap @{SERVICES}"
    nodeport = f"fib daddr type local meta l4proto . th dport vmap @{NODEPORTS}"
    # Filter chains see every packet: only a connection's first one is looked at, and the set
    # lookup comes before the (costlier) FIB lookup.
    refuse_rules = (
        Rule("ct state != new return", comment="only a connection's first packet can be refused"),
        Rule(f"ip daddr . meta l4proto . th dport @{SVC_REFUSE} goto {SVC_NO_BACKEND}", comment="no backend"),
        Rule(f"meta l4proto . th dport @{NODEPORT_REFUSE} fib daddr type local goto {SVC_NO_BACKEND}",
             comment="node port without a backend"),
    )
    # A base chain costs every packet at its hook something: each hook is only entered when it has
    # work (no service: no service hook at all; refusal chains only while a frontend has no backend).
    dispatch: list[tuple[str, Rule]] = []
    if services:
        dispatch += [("nat_prerouting", Rule(lookup, comment="service frontends")),
                     ("nat_output", Rule(lookup, comment="service frontends, from this node"))]
    if nodeports:
        dispatch += [("nat_prerouting", Rule(nodeport, comment="node ports")),
                     ("nat_output", Rule(nodeport, comment="node ports, from this node"))]
    if refuse or nodeport_refuse:
        dispatch += [*(("refuse_prerouting", r) for r in refuse_rules),
                     *(("refuse_output", r) for r in refuse_rules)]
    if services or nodeports:
        dispatch += [
            ("nat_postrouting", Rule(f"ct status dnat ip saddr . ip daddr @{SVC_HAIRPIN} snat ip to {desired.gateway}",
                                     comment="hairpin: the reply must come back through this node")),
            ("nat_postrouting", Rule(f'ct status dnat iifname != "lxc*" oifname != "lxc*" '
                                     f"snat ip to {desired.node_address}",
                                     comment="outside client, remote backend: replies return through this node")),
        ]
    return dispatch, parts.chains, parts.sets, parts.maps
