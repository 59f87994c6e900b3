"""The desired datapath → the nft ruleset of the table ``inet membrane`` (pure, no I/O).

Primitives: :class:`DesiredDatapath` (what the node's pods need now), :class:`EndpointAddress`,
:func:`build_ruleset`, the base chains declared in :data:`BASE_CHAINS`, and the names of every chain
and set. The agent owns exactly one table, :data:`TABLE_FAMILY` :data:`TABLE_NAME`.

Hook order for a packet a pod sends (inet family; numbers are priorities)::

    pod eth0 ══veth══▶ lxcXXXXXXXXXXX (node namespace)
      prerouting  -400  defrag                        (kernel)
                  -300  raw_prerouting ── iifname "lxc*" ──▶ from_endpoint
                                           IPv4, (iif . ip saddr) ∈ @endpoint_sources → return
                                           IPv6 → drop          (pods are IPv4-only)
                                           anything else → drop (spoofed source)
                  -200  conntrack                     (kernel)
                  -100  nat_prerouting ── @services / @nodeports ──▶ svc_<id>: DNAT to a backend
                   -90  refuse_prerouting ── a frontend without a backend: reset / port unreachable
      routing decision ─── local ──▶ input  0  filter_input   ── from a pod to this node: egress policy
      forward        0  filter_forward ── pod egress, then pod ingress (pol_out / pol_in maps)
      (this node's own packets) output  0  filter_output  ── to a pod: ingress policy
      postrouting  100  nat_postrouting ── ip saddr <this node's pod CIDR> ──▶ masquerade_pods
                                           ip daddr @no_masquerade → return   (pods, nonMasqueradeCIDRs)
                                           oifname "membrane_vxlan" → return  (into the tunnel)
                                           masquerade                         (source: the node address)
                                     ══veth══▶ other pod │ uplink │ tunnel

Anti-spoofing runs at ``raw``, before conntrack, so a spoofed packet never creates a connection
entry. It fails closed: a host veth the ruleset does not know yet (between attach and the next sync)
cannot send at all. ARP is not an IP packet; the node's side of it is locked down per host veth with
``arp_filter=1`` (see :mod:`membrane.datapath.netlink.pyroute`).

Extension points. Base chains only dispatch to regular chains; each feature is a
:class:`Section` — its regular chains, sets and maps, and the dispatch rules it adds to base chains —
and :func:`build_ruleset` concatenates sections in order. A base chain is declared (rendered) only
when some section dispatches from it. Shared names:

- map ``ipcache``: ``ipv4_addr : mark``, flags interval — prefix → identity, non-overlapping
  intervals computed in Python so the most specific prefix wins (policy enforcement);
- maps ``pol_in`` / ``pol_out``: ``iface_index . mark . inet_proto . inet_service : verdict``, flags
  interval — per-endpoint policy, keyed by the endpoint's host veth index; maps ``pol_in_addr`` /
  ``pol_out_addr`` (``iface_index . ipv4_addr . inet_proto . inet_service : verdict``, interval) —
  NetworkPolicy ipBlock allows by remote address; sets ``enforced_in`` /
  ``enforced_out`` (``iface_index``) for endpoints selected by a policy (policy enforcement);
- base chains ``filter_forward``, ``filter_input``, ``filter_output`` (filter: policy) and
  ``nat_postrouting`` (srcnat: masquerade);
- service load balancing (:mod:`membrane.datapath.services`): base chains ``nat_prerouting`` and
  ``nat_output`` (dstnat), ``refuse_prerouting``/``refuse_output`` (filter, dstnat + 10), the maps
  ``services`` (``ipv4_addr . inet_proto . inet_service : verdict``) and ``nodeports``, one chain per
  frontend, and two SNAT rules in ``nat_postrouting`` ahead of masquerade.

Masquerade (:class:`Masquerade`, :func:`masquerade`): traffic from this node's pods to anything outside
the cluster pod pools and the configured non-masquerade CIDRs, leaving through any device but the
tunnel, leaves with the node's address. The exempt destinations are one interval set
(``no_masquerade``), so the rule count never grows with the CIDR list. Pod-to-pod traffic keeps its
source in both routing modes: its destination is in a pool (and in VXLAN mode it also leaves through
the tunnel). NAT rules see only a connection's first packet; conntrack does the rest.

Flow logging (:class:`FlowLog`, :func:`flow_logging`; see also :mod:`membrane.datapath.flowcodes`): ``log
group N`` rules report packets to the agent's NFLOG reader, each with a compact prefix (event,
verdict, reason, rule id). Drops log from the dropping rule itself (:func:`drop_statement`, used by
anti-spoofing and policy). Trace events come from three base chains of their own at priority 200,
after every filter decision at their hook, so they only see packets that go through; each sends pod
traffic to one fixed chain::

    flow_forward (forward)  iifname "lxc*" / oifname "lxc*" ─┐
    flow_input   (input)    iifname "lxc*"                   ├─ goto flow_trace
    flow_output  (output)   oifname "lxc*"                   ┘
    flow_trace   ct status ! confirmed → log NEW   (a connection's first packet: retransmitted
                                                    SYNs find a confirmed entry and stay quiet)
                 TCP → flow_tcp: SYN/FIN/RST → log, by conntrack direction (a retransmitted SYN: no)
                 other protocols: first reply → log, marked with ct label 127 so it is said once

The rule count is fixed: nothing in this path grows with pods or policies. ``flow_log`` None (the
default of :class:`DesiredDatapath`) leaves every log statement out, so the cost can be measured.

Policy enforcement (:class:`PolicyDatapath`; sections :func:`ipcache`, :func:`policy_maps`,
:func:`policy_enforcement`; ``docs/policy.md``): ``ct state established,related accept`` first in
``filter_forward``/``filter_input``/``filter_output``, then egress for packets from a pod's veth
(destination identity from ``ipcache`` on daddr, ``host`` for the node itself) and ingress for
packets to one (source identity on saddr, ``host`` from the node), each a lookup of
``iif|oif . ct mark . l4proto . port`` in ``pol_out``/``pol_in``, then (on a miss) of
``iif|oif . ip daddr|saddr . l4proto . port`` in ``pol_out_addr``/``pol_in_addr`` (NetworkPolicy
ipBlock allows, by address), and a drop for misses of endpoints in ``enforced_*``; deny-rule drops
and audit verdicts go through ``pol_denied_*``/``pol_audit_*``. The order makes a deny anywhere win
and allows a union: the identity map's deny drops before the address map is read, its allow
returns (the address map holds allows only), and its L7 verdict goes to ``pol_l7_*``, which lets an
ipBlock allow through first (a plain allow beats an L7 rule) and drops the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses

from membrane.datapath.flowcodes import (
    DROP_IPV6,
    DROP_LB_SOURCE_RANGE,
    DROP_NO_SERVICE_BACKEND,
    DROP_SPOOFED_SOURCE,
    TRACE_FIRST_REPLY,
    TRACE_NEW,
    TRACE_SERVICE_TRANSLATION,
    TRACE_TCP_ORIGINAL,
    TRACE_TCP_REPLY,
    CodeVerdict,  # policy enforcement
    Direction,  # policy enforcement
    DropReason,  # policy enforcement
    EventKind,  # policy enforcement
    FlowCode,
)
from membrane.datapath.netlink.model import ENDPOINT_IFNAME_PREFIX, TUNNEL_DEVICE, AttachedEndpoint
from membrane.datapath.nft.objects import (
    PRIORITY_DSTNAT,
    PRIORITY_FILTER,
    PRIORITY_RAW,
    PRIORITY_SRCNAT,
    BaseChain,
    Chain,
    Key,  # policy enforcement
    Map,
    Rule,
    Ruleset,
    Set,
    key,
)
from membrane.datapath.services import ServiceDatapath, service_section

TABLE_FAMILY = "inet"
TABLE_NAME = "membrane"
TABLE_COMMENT = "managed by the membrane agent; replaced as a whole on every full sync"

# -- base chains: every hook the agent uses, in one place ---------------------------------------
RAW_PREROUTING = "raw_prerouting"
NAT_PREROUTING = "nat_prerouting"
FILTER_INPUT = "filter_input"
FILTER_FORWARD = "filter_forward"
FILTER_OUTPUT = "filter_output"  # policy enforcement: this node to its pods
NAT_POSTROUTING = "nat_postrouting"
NAT_OUTPUT = "nat_output"  # service load balancing: this node's own connections
REFUSE_PREROUTING = "refuse_prerouting"  # service load balancing: frontends without a backend
REFUSE_OUTPUT = "refuse_output"
FLOW_FORWARD = "flow_forward"
FLOW_INPUT = "flow_input"
FLOW_OUTPUT = "flow_output"

# After every filter chain of its hook: a packet reaching it has been let through (policy drops
# happen before, and are logged by the dropping rule).
PRIORITY_FLOW = 200

BASE_CHAINS: dict[str, BaseChain] = {
    # Before conntrack (-200): drops here leave no conntrack entry behind.
    RAW_PREROUTING: BaseChain(type="filter", hook="prerouting", priority=PRIORITY_RAW),
    NAT_PREROUTING: BaseChain(type="nat", hook="prerouting", priority=PRIORITY_DSTNAT),
    NAT_OUTPUT: BaseChain(type="nat", hook="output", priority=PRIORITY_DSTNAT),
    # Just after dstnat: a packet still addressed to a frontend found no backend there.
    REFUSE_PREROUTING: BaseChain(type="filter", hook="prerouting", priority=PRIORITY_DSTNAT + 10),
    REFUSE_OUTPUT: BaseChain(type="filter", hook="output", priority=PRIORITY_DSTNAT + 10),
    FILTER_INPUT: BaseChain(type="filter", hook="input", priority=PRIORITY_FILTER),
    FILTER_FORWARD: BaseChain(type="filter", hook="forward", priority=PRIORITY_FILTER),
    FILTER_OUTPUT: BaseChain(type="filter", hook="output", priority=PRIORITY_FILTER),  # policy enforcement
    NAT_POSTROUTING: BaseChain(type="nat", hook="postrouting", priority=PRIORITY_SRCNAT),
    FLOW_FORWARD: BaseChain(type="filter", hook="forward", priority=PRIORITY_FLOW),
    FLOW_INPUT: BaseChain(type="filter", hook="input", priority=PRIORITY_FLOW),
    FLOW_OUTPUT: BaseChain(type="filter", hook="output", priority=PRIORITY_FLOW),
}

# -- regular chains, sets and maps ---------------------------------------------------------------
FROM_ENDPOINT = "from_endpoint"
ENDPOINT_SOURCES = "endpoint_sources"
MASQUERADE_PODS = "masquerade_pods"  # "masquerade" itself is an nft keyword
NO_MASQUERADE = "no_masquerade"
FLOW_TRACE = "flow_trace"
FLOW_TCP = "flow_tcp"

ENDPOINT_IFNAME_GLOB = f"{ENDPOINT_IFNAME_PREFIX}*"


@dataclass(frozen=True, order=True)
class EndpointAddress:
    """A local endpoint as the datapath sees it: its host veth index and its pod address."""

    ifindex: int
    ipv4: IPv4Address

    @classmethod
    def of(cls, attached: AttachedEndpoint) -> EndpointAddress:
        return cls(ifindex=attached.host_ifindex, ipv4=attached.pod_ip)


@dataclass(frozen=True)
class Masquerade:
    """What masquerade needs: this node's pod CIDR and the destinations its pods reach with their own
    address (cluster pod pools and non-masquerade CIDRs), merged into non-overlapping prefixes —
    an interval set refuses overlapping elements."""

    pod_cidr: IPv4Network
    exempt: tuple[IPv4Network, ...]
    tunnel_device: str = TUNNEL_DEVICE

    @classmethod
    def of(cls, pod_cidr: IPv4Network, pools: Iterable[IPv4Network], non_masquerade: Iterable[IPv4Network] = (),
           tunnel_device: str = TUNNEL_DEVICE) -> Masquerade:
        merged = tuple(collapse_addresses([*pools, *non_masquerade, pod_cidr]))
        return cls(pod_cidr=pod_cidr, exempt=merged, tunnel_device=tunnel_device)


@dataclass(frozen=True)
class FlowLog:
    """Flow logging: the NFLOG group the log rules report to and how many bytes of each packet
    they copy (IPv4 with options + TCP header fit in 128). ``reply_label`` is the conntrack label
    bit that marks a connection whose first reply was reported."""

    group: int = 4244
    snaplen: int = 128
    reply_label: int = 127

    def __post_init__(self) -> None:
        if not 0 <= self.group <= 0xFFFF:
            raise ValueError(f"NFLOG group {self.group} out of range (0-65535)")
        if not 64 <= self.snaplen <= 0xFFFF:
            raise ValueError(f"snaplen {self.snaplen}: at least 64 bytes (IP and TCP headers)")
        if not 0 <= self.reply_label <= 127:
            raise ValueError(f"ct label bit {self.reply_label} out of range (0-127)")

    def statement(self, code: FlowCode) -> str:
        return f'log prefix "{code.prefix()}" group {self.group} snaplen {self.snaplen}'


@dataclass(frozen=True)
class DesiredDatapath:
    """Everything the ruleset is computed from. Grows with the features (ipcache, policy, services).

    Pod addresses are unique per node by IPAM; this type does not second-guess it (a duplicate would
    only let both veths send from that address, where refusing would stop every sync of the node).
    ``masquerade`` None: pods' traffic leaves with their own addresses (masquerade off).
    ``flow_log`` None: no log rules (observability off).
    ``policy`` None: no policy section (nothing enforced); see :class:`PolicyDatapath`.
    """

    endpoints: frozenset[EndpointAddress] = frozenset()
    masquerade: Masquerade | None = None
    flow_log: FlowLog | None = None
    policy: PolicyDatapath | None = None  # policy enforcement
    services: ServiceDatapath | None = None  # service load balancing

    @classmethod
    def from_endpoints(
        cls, endpoints: Iterable[EndpointAddress], masquerade: Masquerade | None = None,
        flow_log: FlowLog | None = None, policy: PolicyDatapath | None = None,
    ) -> DesiredDatapath:
        return cls(endpoints=frozenset(endpoints), masquerade=masquerade, flow_log=flow_log, policy=policy)


@dataclass(frozen=True)
class Section:
    """One feature's share of the table: dispatch rules for base chains, plus its own objects."""

    dispatch: tuple[tuple[str, Rule], ...] = ()  # (base chain name, rule), in order
    chains: tuple[Chain, ...] = ()
    sets: tuple[Set, ...] = ()
    maps: tuple[Map, ...] = ()


def anti_spoofing(desired: DesiredDatapath) -> Section:
    """A pod may only send IPv4 from its own address, through its own veth."""
    sources = Set(
        name=ENDPOINT_SOURCES,
        type=("iface_index", "ipv4_addr"),
        comment="host veth index . the only source address allowed through it",
        elements=frozenset(key(e.ifindex, e.ipv4) for e in desired.endpoints),
    )
    from_endpoint = Chain(
        name=FROM_ENDPOINT,
        comment="traffic entering the node from a local pod",
        rules=(
            Rule(f"iif . ip saddr @{ENDPOINT_SOURCES} return", comment="own address"),
            Rule(f"meta nfproto ipv6 {drop_statement(desired, DROP_IPV6)}", comment="pods are IPv4-only"),
            Rule(drop_statement(desired, DROP_SPOOFED_SOURCE), comment="spoofed or unknown source"),
        ),
    )
    return Section(
        dispatch=(
            (
                RAW_PREROUTING,
                # By name, not by a set of known indexes: a veth the ruleset has not caught up with
                # is held back too (fail closed).
                Rule(f'iifname "{ENDPOINT_IFNAME_GLOB}" jump {FROM_ENDPOINT}', comment="from a pod"),
            ),
        ),
        chains=(from_endpoint,),
        sets=(sources,),
    )


def masquerade(settings: Masquerade) -> Section:
    """This node's pods reach the outside with the node's address; pods and exempt CIDRs see pod IPs."""
    exempt = Set(
        name=NO_MASQUERADE,
        type=("ipv4_addr",),
        flags=("interval",),
        comment="cluster pod pools and nonMasqueradeCIDRs: pod traffic to these keeps its source",
        elements=frozenset(key(cidr) for cidr in settings.exempt),
    )
    chain = Chain(
        name=MASQUERADE_PODS,
        comment="traffic from a local pod, on its first packet",
        rules=(
            Rule(f"ip daddr @{NO_MASQUERADE} return", comment="to a pod or a non-masquerade destination"),
            Rule(f'oifname "{settings.tunnel_device}" return', comment="into the tunnel"),
            Rule("counter masquerade", comment="to the outside: the node address"),
        ),
    )
    return Section(
        dispatch=((NAT_POSTROUTING, Rule(f"ip saddr {settings.pod_cidr} jump {MASQUERADE_PODS}",
                                         comment="from a local pod")),),
        chains=(chain,),
        sets=(exempt,),
    )


def drop_statement(desired: DesiredDatapath, code: FlowCode) -> str:
    """``counter drop``, reported as a drop event with ``code`` when flow logging is on."""
    if desired.flow_log is None:
        return "counter drop"
    return f"counter {desired.flow_log.statement(code)} drop"


def flow_logging(settings: FlowLog) -> Section:
    """Trace events for pod traffic that goes through: new connections, TCP SYN/FIN/RST, first replies."""
    log = settings.statement
    label = settings.reply_label
    trace = Chain(
        name=FLOW_TRACE,
        comment="trace events of pod traffic let through; entered by goto from the flow_* base chains",
        rules=(
            Rule(f"ct status & confirmed == 0 {log(TRACE_NEW)} return", comment="first packet of a connection"),
            Rule(f"meta l4proto tcp goto {FLOW_TCP}"),
            Rule("ct direction original return", comment="nothing new in the original direction"),
            Rule(f"ct label {label} return", comment="first reply already reported"),
            Rule(f"ct direction reply ct label set {label} {log(TRACE_FIRST_REPLY)}", comment="first reply"),
        ),
    )
    tcp = Chain(
        name=FLOW_TCP,
        comment="TCP flag events: SYN-ACK, FIN, RST in either direction",
        rules=(
            Rule("tcp flags & (fin | syn | rst) == 0 return", comment="no SYN, FIN or RST"),
            Rule("tcp flags & (syn | ack) == syn return", comment="a retransmitted SYN (the first was new)"),
            Rule(f"ct direction original {log(TRACE_TCP_ORIGINAL)} return"),
            Rule(f"ct direction reply {log(TRACE_TCP_REPLY)}"),
        ),
    )
    from_pod = f'iifname "{ENDPOINT_IFNAME_GLOB}" goto {FLOW_TRACE}'
    to_pod = f'oifname "{ENDPOINT_IFNAME_GLOB}" goto {FLOW_TRACE}'
    return Section(
        dispatch=(
            # goto, not jump: a pod-to-pod packet matches both rules and must be reported once.
            (FLOW_FORWARD, Rule(from_pod, comment="from a local pod")),
            (FLOW_FORWARD, Rule(to_pod, comment="to a local pod")),
            (FLOW_INPUT, Rule(from_pod, comment="from a local pod to this node")),
            (FLOW_OUTPUT, Rule(to_pod, comment="from this node to a local pod")),
        ),
        chains=(trace, tcp),
    )


# -- policy enforcement (identity-based verdict maps) ---------------------------------------------
# Chains and maps of the policy section; "policy" itself is an nft keyword, hence the pol_ prefix.
IPCACHE = "ipcache"
POL_IN = "pol_in"
POL_OUT = "pol_out"
#: Per-endpoint verdict maps keyed by the remote *address* (NetworkPolicy ipBlock), next to the
#: identity maps; they hold allows only (NetworkPolicy has no deny).
POL_IN_ADDR = "pol_in_addr"
POL_OUT_ADDR = "pol_out_addr"
ENFORCED_IN = "enforced_in"
ENFORCED_OUT = "enforced_out"
AUDITED_IN = "audited_in"
AUDITED_OUT = "audited_out"
POL_EGRESS = "pol_egress"
POL_EGRESS_TO_HOST = "pol_egress_to_host"
POL_EGRESS_CHECK = "pol_egress_check"
POL_INGRESS = "pol_ingress"
POL_INGRESS_FROM_HOST = "pol_ingress_from_host"
POL_INGRESS_CHECK = "pol_ingress_check"
POL_DENIED_OUT = "pol_denied_out"
POL_DENIED_IN = "pol_denied_in"
#: Would-be drops of endpoints in audit mode go through these chains (and are let through): the
#: place where audit verdicts are logged.
POL_AUDIT_OUT = "pol_audit_out"
POL_AUDIT_IN = "pol_audit_in"
#: Traffic an L7 rule selects goes through these chains: without an L7 proxy it is dropped (fail
#: closed), not let through at L4.
POL_L7_OUT = "pol_l7_out"
POL_L7_IN = "pol_l7_in"

#: The policy map key (``membrane.datapath.policy.POLICY_MAP_TYPE``) and the identity the node itself has.
POLICY_KEY_TYPE = ("iface_index", "mark", "inet_proto", "inet_service")
#: The key of ``pol_in_addr``/``pol_out_addr``: the remote address takes the identity's place.
POLICY_ADDRESS_KEY_TYPE = ("iface_index", "ipv4_addr", "inet_proto", "inet_service")
HOST_IDENTITY = 1
WORLD_IDENTITY = 2
_ICMP_TOKEN = "icmp"
_ALL_PORTS = "0-65535"

# Flow codes of the policy section (rule ids 20-27): drops by a deny rule (Cilium's POLICY_DENY),
# by default deny (POLICY_DENIED), audited would-be drops, and drops of traffic an L7 rule selects
# (POLICY_DENIED: no proxy to hand it to yet).
RULE_POLICY_DENY_EGRESS = 20
RULE_POLICY_DENY_INGRESS = 21
RULE_POLICY_DENIED_EGRESS = 22
RULE_POLICY_DENIED_INGRESS = 23
RULE_POLICY_AUDIT_EGRESS = 24
RULE_POLICY_AUDIT_INGRESS = 25
RULE_POLICY_L7_EGRESS = 26
RULE_POLICY_L7_INGRESS = 27
_EGRESS, _INGRESS = Direction.EGRESS, Direction.INGRESS
DROP_POLICY_DENY_EGRESS = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENY,
                                   RULE_POLICY_DENY_EGRESS, _EGRESS)
DROP_POLICY_DENY_INGRESS = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENY,
                                    RULE_POLICY_DENY_INGRESS, _INGRESS)
DROP_POLICY_DENIED_EGRESS = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED,
                                     RULE_POLICY_DENIED_EGRESS, _EGRESS)
DROP_POLICY_DENIED_INGRESS = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED,
                                      RULE_POLICY_DENIED_INGRESS, _INGRESS)
AUDIT_POLICY_EGRESS = FlowCode(EventKind.POLICY_VERDICT, CodeVerdict.AUDIT, DropReason.POLICY_DENIED,
                               RULE_POLICY_AUDIT_EGRESS, _EGRESS)
AUDIT_POLICY_INGRESS = FlowCode(EventKind.POLICY_VERDICT, CodeVerdict.AUDIT, DropReason.POLICY_DENIED,
                                RULE_POLICY_AUDIT_INGRESS, _INGRESS)
DROP_POLICY_L7_EGRESS = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED,
                                 RULE_POLICY_L7_EGRESS, _EGRESS)
DROP_POLICY_L7_INGRESS = FlowCode(EventKind.DROP, CodeVerdict.DROPPED, DropReason.POLICY_DENIED,
                                  RULE_POLICY_L7_INGRESS, _INGRESS)

#: The verdict texts policy map elements carry (``membrane.datapath.policy.VerdictText``
#: takes them as ``allow``/``deny``/``audit``/``redirect``): an allow returns to the base chain, so
#: the egress check of a pod-to-pod packet is followed by the ingress check of its destination.
VERDICT_RETURN = "return"
EGRESS_DENY = f"goto {POL_DENIED_OUT}"
INGRESS_DENY = f"goto {POL_DENIED_IN}"
EGRESS_AUDIT = f"goto {POL_AUDIT_OUT}"
INGRESS_AUDIT = f"goto {POL_AUDIT_IN}"
EGRESS_L7 = f"goto {POL_L7_OUT}"
INGRESS_L7 = f"goto {POL_L7_IN}"

Element = tuple[Key, str]


@dataclass(frozen=True)
class PolicyDatapath:
    """The policy engine's output for this node, as map and set elements rendered by
    :mod:`membrane.datapath.policy` (see ``docs/policy.md``):

    - ``ipcache``: disjoint address intervals → identity (``flatten_ipcache``/``ipcache_elements``),
      covering ``0.0.0.0/0`` (world) so every lookup finds an identity;
    - ``ingress`` / ``egress``: the elements of ``pol_in`` / ``pol_out`` keyed
      ``host veth index . remote identity . protocol . port`` (``policy_map_elements`` with the
      verdict texts above); for ICMP the port is the ICMP type, as the renderer writes it;
    - ``ingress_addresses`` / ``egress_addresses``: the elements of ``pol_in_addr`` /
      ``pol_out_addr`` keyed ``host veth index . remote address . protocol . port`` (NetworkPolicy
      ipBlock allows, ``address_map_elements``);
    - ``enforced_*``: endpoints whose misses drop; ``audited_*``: endpoints whose misses are only
      reported (audit mode).
    """

    ipcache: tuple[Element, ...] = ()
    ingress: tuple[Element, ...] = ()
    egress: tuple[Element, ...] = ()
    ingress_addresses: tuple[Element, ...] = ()
    egress_addresses: tuple[Element, ...] = ()
    enforced_ingress: frozenset[Key] = frozenset()
    enforced_egress: frozenset[Key] = frozenset()
    audited_ingress: frozenset[Key] = frozenset()
    audited_egress: frozenset[Key] = frozenset()


def _icmp_port(port: str) -> str:
    """An ICMP type (range) as the key the datapath looks up: the first 16 bits of the ICMP header,
    type * 256 + code, so type T is the range T*256 to T*256+255 (every code)."""
    if port == _ALL_PORTS:
        return port
    low, _, high = port.partition("-")
    first, last = int(low) * 256, int(high or low) * 256 + 255
    return f"{first}-{last}"


def _policy_elements(elements: Iterable[Element]) -> tuple[Element, ...]:
    """Engine elements as the datapath keys them: ICMP types widened to type and code, and a single
    port written as a range (``80-80``): nft 1.0.6 cannot delete an element of a concatenated
    interval map whose components are all single values ("No such file or directory"), so partial
    syncs would fall back to replacing the table."""
    out = []
    for element_key, value in elements:
        port = element_key[3]
        if element_key[2] == _ICMP_TOKEN:
            port = _icmp_port(port)
        elif "-" not in port:
            port = f"{port}-{port}"
        out.append(((*element_key[:3], port), value))
    return tuple(out)


def _lookups(direction_map: str, iface: str, remote: str = "ct mark", what: str = "") -> tuple[Rule, ...]:
    """The verdict map lookups of one direction: ports for everything but ICMP, whose type and code
    (the first 16 bits of its header, which nft reads as ``th sport``) take the port's place.
    ``remote`` is the remote identity (``ct mark``) or, for the address maps, the remote address."""
    concat = f"{iface} . {remote} . meta l4proto"
    prefix = f"{what}: " if what else ""
    return (
        Rule(f"meta l4proto != icmp {concat} . th dport vmap @{direction_map}", comment=f"{prefix}ports"),
        Rule(f"meta l4proto icmp {concat} . th sport vmap @{direction_map}",
             comment=f"{prefix}ICMP: type and code, the first 16 bits of its header"),
    )


def _address_lookups(direction_map: str, iface: str, address: str) -> tuple[Rule, ...]:
    return _lookups(direction_map, iface, address, "ipBlock by address")


def ipcache(policy: PolicyDatapath) -> Section:
    """The map from address to security identity (for policy, and for anyone who needs a peer's
    identity in the packet path)."""
    return Section(maps=(
        Map(name=IPCACHE, type=("ipv4_addr",), value_type="mark", flags=("interval",),
            comment="address -> security identity: disjoint intervals, the most specific prefix wins",
            elements=policy.ipcache),
    ))


def policy_maps(policy: PolicyDatapath) -> Section:
    """Per-endpoint verdict maps and the sets of isolated and audited endpoints."""
    interval = ("interval",)
    maps = (
        Map(name=POL_IN, type=POLICY_KEY_TYPE, value_type="verdict", flags=interval,
            comment="ingress: host veth . source identity . protocol . port (ICMP: type*256+code)",
            elements=_policy_elements(policy.ingress)),
        Map(name=POL_OUT, type=POLICY_KEY_TYPE, value_type="verdict", flags=interval,
            comment="egress: host veth . destination identity . protocol . port (ICMP: type*256+code)",
            elements=_policy_elements(policy.egress)),
        Map(name=POL_IN_ADDR, type=POLICY_ADDRESS_KEY_TYPE, value_type="verdict", flags=interval,
            comment="ingress ipBlock allows: host veth . source address . protocol . port",
            elements=_policy_elements(policy.ingress_addresses)),
        Map(name=POL_OUT_ADDR, type=POLICY_ADDRESS_KEY_TYPE, value_type="verdict", flags=interval,
            comment="egress ipBlock allows: host veth . destination address . protocol . port",
            elements=_policy_elements(policy.egress_addresses)),
    )
    sets = (
        Set(name=ENFORCED_IN, type=("iface_index",), comment="ingress default deny: a miss drops",
            elements=policy.enforced_ingress),
        Set(name=ENFORCED_OUT, type=("iface_index",), comment="egress default deny: a miss drops",
            elements=policy.enforced_egress),
        Set(name=AUDITED_IN, type=("iface_index",), comment="ingress audit mode: a miss is reported, not dropped",
            elements=policy.audited_ingress),
        Set(name=AUDITED_OUT, type=("iface_index",), comment="egress audit mode: a miss is reported, not dropped",
            elements=policy.audited_egress),
    )
    return Section(maps=maps, sets=sets)


def policy_enforcement(desired: DesiredDatapath) -> Section:
    """Identity-based policy for local pods: egress where a packet enters from a pod's veth,
    ingress where it leaves through one, with the remote identity from the ipcache; uses the
    objects of :func:`ipcache` and :func:`policy_maps`.

    Established and related traffic is accepted first, so only a connection's first packet meets
    the maps, and a policy change never cuts a connection. The remote identity lands in ``ct mark``
    (no packet mark: routing and the tunnel never see it). The rule count is fixed: policies, pods
    and identities only change set and map elements.
    """

    def audit(code: FlowCode) -> Rule:
        log = f" {desired.flow_log.statement(code)}" if desired.flow_log is not None else ""
        return Rule(f"counter{log} return", comment="would be dropped: audit mode lets it through")

    chains = (
        Chain(name=POL_EGRESS, comment="egress of a local pod to a routed destination",
              rules=(Rule(f"ct mark set {WORLD_IDENTITY}", comment="world unless the ipcache knows better"),
                     Rule(f"ct mark set ip daddr map @{IPCACHE}", comment="destination identity"),
                     Rule(f"goto {POL_EGRESS_CHECK}"))),
        Chain(name=POL_EGRESS_TO_HOST, comment="egress of a local pod to this node",
              rules=(Rule(f"ct mark set {HOST_IDENTITY} goto {POL_EGRESS_CHECK}", comment="the host identity"),)),
        Chain(name=POL_EGRESS_CHECK,
              comment="pol_out, then pol_out_addr: allow returns, deny drops, a miss drops when enforced",
              rules=(*_lookups(POL_OUT, "iif"),
                     *_address_lookups(POL_OUT_ADDR, "iif", "ip daddr"),
                     Rule(f"iif @{ENFORCED_OUT} {drop_statement(desired, DROP_POLICY_DENIED_EGRESS)}",
                          comment="egress default deny"),
                     Rule(f"iif @{AUDITED_OUT} goto {POL_AUDIT_OUT}", comment="egress audit"))),
        Chain(name=POL_INGRESS, comment="ingress of a local pod from a routed source (local pod, tunnel, outside)",
              rules=(Rule(f"ct mark set {WORLD_IDENTITY}", comment="world unless the ipcache knows better"),
                     Rule(f"ct mark set ip saddr map @{IPCACHE}", comment="source identity"),
                     Rule(f"goto {POL_INGRESS_CHECK}"))),
        Chain(name=POL_INGRESS_FROM_HOST, comment="ingress of a local pod from this node",
              rules=(Rule(f"ct mark set {HOST_IDENTITY} goto {POL_INGRESS_CHECK}", comment="the host identity"),)),
        Chain(name=POL_INGRESS_CHECK,
              comment="pol_in, then pol_in_addr: allow returns, deny drops, a miss drops when enforced",
              rules=(*_lookups(POL_IN, "oif"),
                     *_address_lookups(POL_IN_ADDR, "oif", "ip saddr"),
                     Rule(f"oif @{ENFORCED_IN} {drop_statement(desired, DROP_POLICY_DENIED_INGRESS)}",
                          comment="ingress default deny"),
                     Rule(f"oif @{AUDITED_IN} goto {POL_AUDIT_IN}", comment="ingress audit"))),
        Chain(name=POL_DENIED_OUT, comment="egress denied by a deny rule",
              rules=(Rule(drop_statement(desired, DROP_POLICY_DENY_EGRESS)),)),
        Chain(name=POL_DENIED_IN, comment="ingress denied by a deny rule",
              rules=(Rule(drop_statement(desired, DROP_POLICY_DENY_INGRESS)),)),
        # A plain allow beats an L7 rule: an ipBlock allow of the address still lets it through.
        Chain(name=POL_L7_OUT, comment="egress an L7 rule selects: no L7 proxy yet, denied unless an ipBlock allows",
              rules=(*_address_lookups(POL_OUT_ADDR, "iif", "ip daddr"),
                     Rule(drop_statement(desired, DROP_POLICY_L7_EGRESS)))),
        Chain(name=POL_L7_IN, comment="ingress an L7 rule selects: no L7 proxy yet, denied unless an ipBlock allows",
              rules=(*_address_lookups(POL_IN_ADDR, "oif", "ip saddr"),
                     Rule(drop_statement(desired, DROP_POLICY_L7_INGRESS)))),
        Chain(name=POL_AUDIT_OUT, comment="egress audit verdicts", rules=(audit(AUDIT_POLICY_EGRESS),)),
        Chain(name=POL_AUDIT_IN, comment="ingress audit verdicts", rules=(audit(AUDIT_POLICY_INGRESS),)),
    )
    established = Rule("ct state established,related accept", comment="replies and connections already allowed")
    from_pod = f'iifname "{ENDPOINT_IFNAME_GLOB}"'
    to_pod = f'oifname "{ENDPOINT_IFNAME_GLOB}"'
    return Section(
        dispatch=(
            (FILTER_FORWARD, established),
            # A pod-to-pod packet takes both: egress at its source, then ingress at its destination.
            (FILTER_FORWARD, Rule(f"{from_pod} jump {POL_EGRESS}", comment="from a local pod")),
            (FILTER_FORWARD, Rule(f"{to_pod} jump {POL_INGRESS}", comment="to a local pod")),
            (FILTER_INPUT, established),
            (FILTER_INPUT, Rule(f"{from_pod} jump {POL_EGRESS_TO_HOST}", comment="from a local pod to this node")),
            (FILTER_OUTPUT, established),
            (FILTER_OUTPUT, Rule(f"{to_pod} jump {POL_INGRESS_FROM_HOST}", comment="from this node to a local pod")),
        ),
        chains=chains,
    )


# -- end policy enforcement -----------------------------------------------------------------------


def load_balancing(desired: DesiredDatapath, services: ServiceDatapath) -> Section:
    """Service frontends, DNAT to backends, refusal without backends (:mod:`membrane.datapath.services`)."""
    flow_log = desired.flow_log
    refused = flow_log.statement(DROP_NO_SERVICE_BACKEND) if flow_log is not None else ""
    denied = flow_log.statement(DROP_LB_SOURCE_RANGE) if flow_log is not None else ""
    translation = flow_log.statement(TRACE_SERVICE_TRANSLATION) if flow_log is not None else ""
    dispatch, chains, sets, maps = service_section(services, refused, denied, translation)
    return Section(dispatch=tuple(dispatch), chains=tuple(chains), sets=tuple(sets), maps=tuple(maps))


def build_ruleset(desired: DesiredDatapath) -> Ruleset:
    sections = [anti_spoofing(desired)]
    if desired.policy is not None:  # policy enforcement
        sections += [ipcache(desired.policy), policy_maps(desired.policy), policy_enforcement(desired)]
    if desired.services is not None:  # before masquerade: its SNAT rules come first in nat_postrouting
        sections.append(load_balancing(desired, desired.services))
    if desired.masquerade is not None:
        sections.append(masquerade(desired.masquerade))
    if desired.flow_log is not None:
        sections.append(flow_logging(desired.flow_log))
    base_rules: dict[str, list[Rule]] = {}
    for section in sections:
        for chain_name, rule in section.dispatch:
            if chain_name not in BASE_CHAINS:
                raise ValueError(f"{chain_name} is not a declared base chain")
            base_rules.setdefault(chain_name, []).append(rule)
    base_chains = tuple(
        Chain(name=name, base=spec, rules=tuple(base_rules[name]))
        for name, spec in BASE_CHAINS.items()
        if name in base_rules
    )
    return Ruleset(
        family=TABLE_FAMILY,
        table=TABLE_NAME,
        comment=TABLE_COMMENT,
        chains=base_chains + tuple(c for s in sections for c in s.chains),
        sets=tuple(x for s in sections for x in s.sets),
        maps=tuple(x for s in sections for x in s.maps),
    )
