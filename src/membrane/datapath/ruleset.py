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
                  -100  dstnat       · services: frontends → backends        (later)
      routing decision ─── local ──▶ input
      forward        0  filter       · policy: per-endpoint verdict maps     (later)
      postrouting  100  srcnat       · masquerade to the outside             (later)
                                     ══veth══▶ other pod │ uplink │ tunnel

Anti-spoofing runs at ``raw``, before conntrack, so a spoofed packet never creates a connection
entry. It fails closed: a host veth the ruleset does not know yet (between attach and the next sync)
cannot send at all. ARP is not an IP packet; the node's side of it is locked down per host veth with
``arp_filter=1`` (see :mod:`membrane.datapath.netlink.pyroute`).

Extension points. Base chains only dispatch to regular chains; each feature is a
:class:`Section` — its regular chains, sets and maps, and the dispatch rules it adds to base chains —
and :func:`build_ruleset` concatenates sections in order. A base chain is declared (rendered) only
when some section dispatches from it. Names reserved for the work to come:

- map ``ipcache``: ``ipv4_addr : mark``, flags interval — prefix → identity, non-overlapping
  intervals computed in Python so the most specific prefix wins;
- maps ``pol_in`` / ``pol_out``: ``iface_index . mark . inet_proto . inet_service : verdict``, flags
  interval — per-endpoint policy, keyed by the endpoint's host veth index; sets ``enforced_in`` /
  ``enforced_out`` (``iface_index``) for endpoints selected by a policy;
- map ``services``: ``ipv4_addr . inet_proto . inet_service : verdict`` (jump to a per-service chain);
- base chains ``nat_prerouting`` (dstnat), ``filter_forward`` (filter), ``filter_input`` (filter) and
  ``nat_postrouting`` (srcnat, masquerade).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from membrane.datapath.netlink.model import ENDPOINT_IFNAME_PREFIX, AttachedEndpoint
from membrane.datapath.nft.objects import (
    PRIORITY_DSTNAT,
    PRIORITY_FILTER,
    PRIORITY_RAW,
    PRIORITY_SRCNAT,
    BaseChain,
    Chain,
    Map,
    Rule,
    Ruleset,
    Set,
    key,
)

TABLE_FAMILY = "inet"
TABLE_NAME = "membrane"
TABLE_COMMENT = "managed by the membrane agent; replaced as a whole on every full sync"

# -- base chains: every hook the agent uses, in one place ---------------------------------------
RAW_PREROUTING = "raw_prerouting"
NAT_PREROUTING = "nat_prerouting"
FILTER_INPUT = "filter_input"
FILTER_FORWARD = "filter_forward"
NAT_POSTROUTING = "nat_postrouting"

BASE_CHAINS: dict[str, BaseChain] = {
    # Before conntrack (-200): drops here leave no conntrack entry behind.
    RAW_PREROUTING: BaseChain(type="filter", hook="prerouting", priority=PRIORITY_RAW),
    NAT_PREROUTING: BaseChain(type="nat", hook="prerouting", priority=PRIORITY_DSTNAT),
    FILTER_INPUT: BaseChain(type="filter", hook="input", priority=PRIORITY_FILTER),
    FILTER_FORWARD: BaseChain(type="filter", hook="forward", priority=PRIORITY_FILTER),
    NAT_POSTROUTING: BaseChain(type="nat", hook="postrouting", priority=PRIORITY_SRCNAT),
}

# -- regular chains, sets and maps ---------------------------------------------------------------
FROM_ENDPOINT = "from_endpoint"
ENDPOINT_SOURCES = "endpoint_sources"

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
class DesiredDatapath:
    """Everything the ruleset is computed from. Grows with the features (ipcache, policy, services).

    Pod addresses are unique per node by IPAM; this type does not second-guess it (a duplicate would
    only let both veths send from that address, where refusing would stop every sync of the node).
    """

    endpoints: frozenset[EndpointAddress] = frozenset()

    @classmethod
    def from_endpoints(cls, endpoints: Iterable[EndpointAddress]) -> DesiredDatapath:
        return cls(endpoints=frozenset(endpoints))


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
            Rule("meta nfproto ipv6 counter drop", comment="pods are IPv4-only"),
            Rule("counter drop", comment="spoofed or unknown source"),
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


def build_ruleset(desired: DesiredDatapath) -> Ruleset:
    sections = (anti_spoofing(desired),)
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
