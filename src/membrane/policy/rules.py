"""The three policy kinds, normalized into one internal rule form (pure, no I/O).

``NetworkPolicy``, ``CiliumNetworkPolicy`` and ``CiliumClusterwideNetworkPolicy`` all become
tuples of :class:`PolicyRule`: one per entry of a direction section (``ingress[i]``,
``egressDeny[j]``, ...), each tagged with its :class:`RuleOrigin` (kind, namespace/name, rule
index, field path) so that traces and flows can name the rule that decided.

Translation follows Cilium (``pkg/k8s/network_policy.go`` and the CRD parsing in
``pkg/k8s/apis/cilium.io/utils``):

- the subject of a CNP or NetworkPolicy is ANDed with ``k8s:io.kubernetes.pod.namespace=<ns>``;
  peer selectors of a CNP that do not name a pod namespace are limited to the policy's
  namespace, those of a CCNP to pods (``k8s:io.kubernetes.pod.namespace`` exists); selectors on
  ``reserved:`` labels are left alone, and so is everything for subjects selecting
  ``reserved:init``;
- NetworkPolicy peers: ``podSelector`` alone = pods of the policy namespace; ``namespaceSelector``
  = namespace labels (``io.cilium.k8s.namespace.labels.<key>``), ``{}`` = every namespace, ANDed
  with a ``podSelector`` of the same peer; ``ipBlock`` = an :class:`AddressBlock`, matched against
  the peer's address as upstream Kubernetes does (pods and nodes included; an IPv6 block matches
  nothing in this IPv4-only cluster and is reported unsupported); a missing or empty
  ``from``/``to`` = every peer; ``ports`` default to TCP, a missing ``port`` = all ports,
  ``endPort`` = a range; only the directions named in ``policyTypes`` apply, and a listed
  direction without rules is default-deny through a rule that selects nothing;
- Cilium rules: no L3 member at all + ``toPorts``/``icmps`` = every peer (the L3 wildcard); an
  L3 member given as an empty list selects nothing; a rule with neither peers nor ports (``{}``)
  allows nothing but still makes the subject default-deny;
- entities become selectors on ``reserved:`` labels (``cluster`` adds the pods of the local
  cluster, ``all`` is the wildcard); ``fromRequires``/``toRequires`` are kept as requirements the
  compiler ANDs into the ``fromEndpoints``/``toEndpoints`` selectors of every rule that selects the
  same endpoint in the same direction;
- L7 rules (HTTP, DNS, Kafka, generic) are carried on their L4 rule (not enforced yet: there is
  no L7 proxy); ``toServices`` is carried and resolved by the compiler to the selectors of the
  services it names; ``toFQDNs``, node, group and CIDR-group peers are carried but not supported
  yet: they select nothing (fail closed).

Primitives: :class:`RuleOrigin`, :class:`PortSpec`, :class:`L4Rule`, :class:`ServiceRef`,
:class:`PolicyRule`, :func:`normalize`, :func:`normalize_all`, :func:`entity_selectors`,
:func:`selector_from_k8s`, :func:`selector_from_cilium`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, ip_network
from typing import Literal

from membrane.api import cilium, k8s
from membrane.api.meta import ApiObject, LabelSelector, split_cilium_label_key
from membrane.identity.labels import CLUSTER_LABEL, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL
from membrane.policy.selectors import (
    ANY_SOURCE,
    SOURCE_RESERVED,
    WILDCARD,
    AddressBlock,
    CIDRSelector,
    PeerSelector,
    Requirement,
    Selector,
    match_label,
)

Direction = Literal["ingress", "egress"]
Action = Literal["allow", "deny"]
PolicyKind = Literal["NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]
DIRECTIONS: tuple[Direction, Direction] = ("ingress", "egress")

SOURCE_K8S = "k8s"
DEFAULT_NAMESPACE = "default"
#: The label the init pseudo-identity carries; subjects selecting it get no namespace scoping.
INIT_KEY = (SOURCE_RESERVED, "init")


@dataclass(frozen=True, slots=True, order=True)
class RuleOrigin:
    """Where a rule comes from: ``kind namespace/name``, the rule index in the policy
    (``spec`` is 0, ``specs`` follow) and the field path of the section entry."""

    kind: str
    namespace: str  # "" for cluster-wide policies
    name: str
    index: int = 0
    path: str = ""
    log: str = ""  # ``spec.log.value``, copied into Flow.policy_log

    @property
    def policy(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def labels(self) -> tuple[str, ...]:
        """The rule labels Cilium derives for a policy (Hubble's ``Policy.labels``)."""
        labels = [
            f"k8s:io.cilium.k8s.policy.derived-from={self.kind}",
            f"k8s:io.cilium.k8s.policy.name={self.name}",
        ]
        if self.namespace:
            labels.append(f"k8s:io.cilium.k8s.policy.namespace={self.namespace}")
        return tuple(labels)

    def __str__(self) -> str:
        if self.kind == IMPLICIT_KIND:
            return self.name
        where = f" ({self.path})" if self.path else ""
        return f"{self.kind} {self.policy} rule {self.index}{where}"


IMPLICIT_KIND = "Implicit"
#: The implicit rule that lets the local host reach its endpoints (kubelet probes).
ALLOW_LOCALHOST = RuleOrigin(IMPLICIT_KIND, "", "implicit allow from the local host")


# --- L4 -----------------------------------------------------------------------------------------------

L4Protocol = Literal["TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "VRRP", "IGMP", "ANY"]


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One port (or range, or named port) on a protocol. ``port`` 0 = every port."""

    protocol: str
    port: int | str = 0  # a number, or a lower-cased port name
    end_port: int | None = None

    def __str__(self) -> str:
        if self.port == 0 and self.end_port is None:
            return f"{self.protocol}" if self.protocol != "ANY" else "any"
        port = f"{self.port}-{self.end_port}" if self.end_port else str(self.port)
        return f"{port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class L7Spec:
    """The L7 part of a port rule, carried for the proxy: the parser and the upstream rules."""

    parser: str  # "http", "dns", "kafka" or the generic l7proto name
    rules: cilium.L7Rules = field(hash=False)
    path: str = ""  # where in the section entry, e.g. ``toPorts[0].rules.http``


@dataclass(frozen=True, slots=True)
class L4Rule:
    """Ports (ORed) and the L7 rules that apply to them."""

    ports: tuple[PortSpec, ...]
    l7: L7Spec | None = None


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A ``toServices`` entry: a service by name, or services by their labels (namespace None = any)."""

    namespace: str | None
    name: str | None = None
    selector: Selector | None = None


# --- rules ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One normalized rule: subject, direction, allow/deny, peers and L4 (+L7).

    Peers are ORed: ``endpoints`` (the ``fromEndpoints``/``toEndpoints`` selectors, to which
    ``fromRequires`` requirements apply), ``peers`` (entities, CIDRs, the wildcard), ``addresses``
    (NetworkPolicy ``ipBlock`` peers, matched against the peer's address), ``services``
    (resolved by the compiler), ``fqdns`` (kept for a DNS proxy; they select nothing yet) and the
    other peers not supported yet (``unsupported``).
    A rule with no peer at all selects nothing. ``l4`` None means every protocol and port.
    """

    origin: RuleOrigin
    subject: Selector
    direction: Direction
    action: Action
    default_deny: bool = True
    endpoints: tuple[Selector, ...] = ()
    peers: tuple[PeerSelector, ...] = ()
    addresses: tuple[AddressBlock, ...] = ()
    services: tuple[ServiceRef, ...] = ()
    fqdns: tuple[cilium.FQDNSelector, ...] = ()
    unsupported: tuple[str, ...] = ()
    requires: tuple[Requirement, ...] = ()
    l4: tuple[L4Rule, ...] | None = None
    host: bool = False  # the subject is a node (host firewall), not an endpoint

    @property
    def has_peers(self) -> bool:
        return bool(self.endpoints or self.peers or self.addresses or self.services or self.fqdns)

    def selectors(self) -> Iterator[PeerSelector]:
        yield self.subject
        yield from self.endpoints
        yield from self.peers


# --- selectors from the API models ---------------------------------------------------------------------


def _requirements(selector: LabelSelector, default_source: str | None, key_prefix: str = "") -> list[Requirement]:
    def split(key: str) -> tuple[str, str]:
        if default_source is not None:
            return default_source, key_prefix + key
        source, name = split_cilium_label_key(key)
        return source, key_prefix + name

    reqs: list[Requirement] = []
    for key, value in (selector.matchLabels or {}).items():
        source, name = split(key)
        reqs.append(Requirement(source, name, "In", (value,)))
    for expr in selector.matchExpressions or ():
        source, name = split(expr.key)
        reqs.append(Requirement(source, name, expr.operator, tuple(expr.values or ())))
    return reqs


def selector_from_k8s(selector: LabelSelector | None, key_prefix: str = "") -> Selector:
    """A Kubernetes label selector as a selector on ``k8s:``-sourced labels."""
    if selector is None:
        return WILDCARD
    return Selector(tuple(_requirements(selector, SOURCE_K8S, key_prefix)))


def selector_from_cilium(selector: LabelSelector | None) -> Selector:
    """A Cilium endpoint selector: keys may name their source (``k8s:app``), else ``any``."""
    if selector is None:
        return WILDCARD
    return Selector(tuple(_requirements(selector, None)))


def _names_pod_namespace(selector: Selector) -> bool:
    return selector.has_key(SOURCE_K8S, POD_NAMESPACE_LABEL) or selector.has_key(ANY_SOURCE, POD_NAMESPACE_LABEL)


def _scoped(selector: Selector, namespace: str | None, matches_init: bool, *, peer: bool) -> Selector:
    """Cilium's ``getEndpointSelector``: limit a selector to the policy's namespace (CNP) or to
    pods (CCNP) unless it names a namespace itself, selects ``reserved:`` labels, or the subject
    selects initializing endpoints (which have no namespace label yet)."""
    if peer and selector.has_source(SOURCE_RESERVED):
        return selector
    if matches_init or _names_pod_namespace(selector):
        return selector
    if namespace is None:
        return selector.and_(Requirement(SOURCE_K8S, POD_NAMESPACE_LABEL, "Exists"))
    return selector.and_(match_label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace))


def _reserved(name: str) -> Selector:
    return Selector((Requirement(SOURCE_RESERVED, name, "Exists"),))


_CLUSTER_RESERVED = ("host", "remote-node", "init", "ingress", "health", "unmanaged", "kube-apiserver")


def entity_selectors(entity: str, cluster_name: str = "default") -> tuple[Selector, ...]:
    """The selectors an entity stands for (the cluster is IPv4-only: ``world-ipv6`` selects nothing)."""
    if entity == "all":
        return (WILDCARD,)
    if entity in ("world", "world-ipv4"):
        return (_reserved("world"),)
    if entity in ("world-ipv6", "none"):
        return ()
    if entity == "cluster":
        pods = Selector((match_label(SOURCE_K8S, CLUSTER_LABEL, cluster_name),))
        return (*(_reserved(name) for name in _CLUSTER_RESERVED), pods)
    return (_reserved(entity),)


@functools.lru_cache(maxsize=4096)
def _cidr(text: str) -> IPv4Network | None:
    network = ip_network(text, strict=False)
    return network if isinstance(network, IPv4Network) else None


def _cidr_selector(cidr: str, excepts: Iterable[str] = ()) -> CIDRSelector | None:
    prefix = _cidr(cidr)
    if prefix is None:
        return None  # IPv6: pods and the ipcache are IPv4-only
    return CIDRSelector(prefix, tuple(e for e in (_cidr(x) for x in excepts) if e is not None))


# --- ports ---------------------------------------------------------------------------------------------

# ICMP type names Cilium accepts (pkg/policy/api/icmp.go), per family.
ICMP_TYPES: dict[str, dict[str, int]] = {
    "IPv4": {
        "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
        "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
        "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
        "ExtendedEchoReply": 43,
    },
    "IPv6": {
        "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
        "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
        "MulticastListenerDone": 132, "RouterSolicitation": 133, "RouterAdvertisement": 134,
        "NeighborSolicitation": 135, "NeighborAdvertisement": 136, "RedirectMessage": 137,
        "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139, "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141, "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144, "HomeAgentAddressDiscoveryReply": 145,
        "MobilePrefixSolicitation": 146, "MobilePrefixAdvertisement": 147,
        "DuplicateAddressRequestCodeSuffix": 157, "DuplicateAddressConfirmationCodeSuffix": 158,
        "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161,
    },
}  # fmt: skip


def _port_spec(port: cilium.PortProtocol) -> PortSpec:
    if port.port in (None, ""):
        return PortSpec(port.protocol, 0)
    number = cilium.parse_port(port.port)
    end = port.endPort if port.endPort and isinstance(number, int) and port.endPort > number else None
    return PortSpec(port.protocol, number, end)


def _l7(rules: cilium.L7Rules | None, index: int) -> L7Spec | None:
    if rules is None or rules.is_empty:
        return None
    for parser in ("http", "dns", "kafka"):
        if getattr(rules, parser) is not None:
            return L7Spec(parser, rules, f"toPorts[{index}].rules.{parser}")
    return L7Spec(rules.l7proto or "l7", rules, f"toPorts[{index}].rules.l7proto")


def _l4_from_port_rules(
    port_rules: Iterable[cilium.PortRule | cilium.PortDenyRule] | None,
    icmps: Iterable[cilium.ICMPRule] | None,
) -> tuple[L4Rule, ...] | None:
    if port_rules is None and icmps is None:
        return None
    rules: list[L4Rule] = []
    for index, rule in enumerate(port_rules or ()):
        l7 = _l7(rule.rules, index) if isinstance(rule, cilium.PortRule) else None
        rules.append(L4Rule(tuple(_port_spec(p) for p in rule.ports or ()), l7))
    for icmp in icmps or ():
        specs = []
        for item in icmp.fields:
            protocol = "ICMP" if item.family == "IPv4" else "ICMPv6"
            value = item.type
            if isinstance(value, str):
                value = int(value) if value.isdigit() else ICMP_TYPES[item.family][value]
            specs.append(PortSpec(protocol, value))
        rules.append(L4Rule(tuple(specs)))
    return tuple(rules)


# --- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ------------------------------------------------


@dataclass(frozen=True)
class _L3:
    """The peer fields of one ingress or egress entry, under direction-neutral names."""

    prefix: str
    endpoints: tuple[cilium.EndpointSelector, ...] | None
    requires: tuple[cilium.EndpointSelector, ...] | None
    cidrs: tuple[str, ...] | None
    cidr_sets: tuple[cilium.CIDRRule, ...] | None
    entities: tuple[str, ...] | None
    nodes: tuple[cilium.EndpointSelector, ...] | None
    groups: tuple[cilium.Groups, ...] | None
    services: tuple[cilium.ServiceSelectorRef, ...] | None = None
    fqdns: tuple[cilium.FQDNSelector, ...] | None = None

    @classmethod
    def of(cls, item: CiliumSectionEntry) -> _L3:
        if isinstance(item, cilium.IngressRule | cilium.IngressDenyRule):
            return cls(
                "from",
                item.fromEndpoints,
                item.fromRequires,
                item.fromCIDR,
                item.fromCIDRSet,
                item.fromEntities,
                item.fromNodes,
                item.fromGroups,
            )
        return cls(
            "to",
            item.toEndpoints,
            item.toRequires,
            item.toCIDR,
            item.toCIDRSet,
            item.toEntities,
            item.toNodes,
            item.toGroups,
            item.toServices,
            item.toFQDNs if isinstance(item, cilium.EgressRule) else None,
        )

    @property
    def absent(self) -> bool:
        """No L3 member at all (``fromRequires`` does not count: it only narrows other rules)."""
        members = (
            self.endpoints,
            self.cidrs,
            self.cidr_sets,
            self.entities,
            self.nodes,
            self.groups,
            self.services,
            self.fqdns,
        )
        return all(m is None for m in members)


CiliumSectionEntry = cilium.IngressRule | cilium.IngressDenyRule | cilium.EgressRule | cilium.EgressDenyRule


def _cilium_rule(
    base: PolicyRule, item: CiliumSectionEntry, namespace: str | None, matches_init: bool, cluster_name: str
) -> PolicyRule:
    l3 = _L3.of(item)
    l4 = _l4_from_port_rules(item.toPorts, item.icmps)
    endpoints = tuple(_scoped(selector_from_cilium(s), namespace, matches_init, peer=True) for s in l3.endpoints or ())
    peers: list[PeerSelector] = []
    unsupported: list[str] = []
    for text in l3.cidrs or ():
        if (cidr := _cidr_selector(text)) is not None:
            peers.append(cidr)
    for cidr_rule in l3.cidr_sets or ():
        if cidr_rule.cidr is None:
            unsupported.append(f"{l3.prefix}CIDRSet.cidrGroup")
        elif (cidr := _cidr_selector(cidr_rule.cidr, cidr_rule.except_ or ())) is not None:
            peers.append(cidr)
    for entity in l3.entities or ():
        peers.extend(entity_selectors(entity, cluster_name))
    if l3.nodes:
        unsupported.append(f"{l3.prefix}Nodes")
    if l3.groups:
        unsupported.append(f"{l3.prefix}Groups")
    services: list[ServiceRef] = []
    for ref in l3.services or ():
        if ref.k8sService is not None:
            services.append(ServiceRef(ref.k8sService.namespace or namespace, ref.k8sService.serviceName))
        elif ref.k8sServiceSelector is not None:
            selector = selector_from_cilium(ref.k8sServiceSelector.selector)
            services.append(ServiceRef(ref.k8sServiceSelector.namespace or namespace, selector=selector))
    if l3.absent and l4 is not None:
        peers.append(WILDCARD)  # ports without any L3 member: every peer
    requires = tuple(
        req
        for sel in l3.requires or ()
        for req in _scoped(selector_from_cilium(sel), namespace, matches_init, peer=False).requirements
    )
    return replace(
        base,
        endpoints=tuple(dict.fromkeys(endpoints)),
        peers=tuple(dict.fromkeys(peers)),
        services=tuple(services),
        fqdns=tuple(l3.fqdns or ()),
        unsupported=tuple(unsupported),
        requires=requires,
        l4=l4,
    )


def _cilium_rules(
    policy: cilium.CiliumNetworkPolicy | cilium.CiliumClusterwideNetworkPolicy, cluster_name: str
) -> Iterator[PolicyRule]:
    clusterwide = isinstance(policy, cilium.CiliumClusterwideNetworkPolicy)
    namespace = None if clusterwide else (policy.namespace or DEFAULT_NAMESPACE)
    paths = (["spec"] if policy.spec is not None else []) + [f"specs[{i}]" for i in range(len(policy.specs or ()))]
    for index, (path, rule) in enumerate(zip(paths, policy.rules(), strict=True)):
        host = rule.endpointSelector is None
        raw_subject = selector_from_cilium(rule.nodeSelector if host else rule.endpointSelector)
        matches_init = raw_subject.has_key(*INIT_KEY)
        subject = raw_subject
        if not host and namespace is not None and not matches_init:
            subject = raw_subject.and_(match_label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace))
        ingress_deny, egress_deny = rule.default_deny()
        log = (rule.log.value or "") if rule.log is not None else ""
        sections: tuple[tuple[Direction, Action, str, bool], ...] = (
            ("ingress", "allow", "ingress", ingress_deny),
            ("ingress", "deny", "ingressDeny", ingress_deny),
            ("egress", "allow", "egress", egress_deny),
            ("egress", "deny", "egressDeny", egress_deny),
        )
        for direction, action, field_name, default_deny in sections:
            for position, item in enumerate(getattr(rule, field_name) or ()):
                origin = RuleOrigin(
                    policy.kind, namespace or "", policy.name, index, f"{path}.{field_name}[{position}]", log
                )
                base = PolicyRule(origin, subject, direction, action, default_deny=default_deny, host=host)
                yield _cilium_rule(base, item, namespace, matches_init, cluster_name)


# --- NetworkPolicy ---------------------------------------------------------------------------------------


def _address_block(block: k8s.IPBlock, path: str) -> AddressBlock | None:
    """An ipBlock as addresses; None for an IPv6 block (pods and nodes are IPv4-only)."""
    prefix = _cidr(block.cidr)
    if prefix is None:
        return None
    excepts = tuple(e for e in (_cidr(x) for x in block.except_ or ()) if e is not None)
    return AddressBlock(prefix, excepts, path)


def _np_peer(peer: k8s.NetworkPolicyPeer, namespace: str) -> Selector:
    pods = selector_from_k8s(peer.podSelector) if peer.podSelector is not None else WILDCARD
    if peer.namespaceSelector is not None:
        namespaces = selector_from_k8s(peer.namespaceSelector, key_prefix=NAMESPACE_LABELS_PREFIX)
        if namespaces.is_wildcard:  # every namespace: any pod (not the host, not the world)
            namespaces = Selector((Requirement(SOURCE_K8S, POD_NAMESPACE_LABEL, "Exists"),))
        return namespaces.and_(*pods.requirements)
    return pods.and_(match_label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace))


def _np_ports(ports: tuple[k8s.NetworkPolicyPort, ...] | None) -> tuple[L4Rule, ...] | None:
    if not ports:
        return None
    specs = []
    for port in ports:
        number: int | str = 0 if port.port is None else port.port
        if isinstance(number, str):
            number = number.lower()
        end = port.endPort if isinstance(number, int) and port.endPort and port.endPort > number else None
        specs.append(PortSpec(port.protocol, number, end))
    return (L4Rule(tuple(specs)),)


def _network_policy_rules(policy: k8s.NetworkPolicy) -> Iterator[PolicyRule]:
    namespace = policy.namespace or DEFAULT_NAMESPACE
    spec = policy.spec
    subject = selector_from_k8s(spec.podSelector).and_(match_label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace))
    types = spec.policyTypes or (("Ingress", "Egress") if spec.egress else ("Ingress",))
    PeersAndPorts = tuple[tuple[k8s.NetworkPolicyPeer, ...] | None, tuple[k8s.NetworkPolicyPort, ...] | None]
    sections: tuple[tuple[Direction, str, list[PeersAndPorts]], ...] = (
        ("ingress", "Ingress", [(item.from_, item.ports) for item in spec.ingress or ()]),
        ("egress", "Egress", [(item.to, item.ports) for item in spec.egress or ()]),
    )
    for direction, policy_type, items in sections:
        if policy_type not in types:
            continue  # a direction not named in policyTypes is not affected by this policy
        if not items:
            # Isolated without any allow: a rule that selects nothing carries the default deny.
            origin = RuleOrigin(policy.kind, namespace, policy.name, 0, "spec.policyTypes")
            yield PolicyRule(origin=origin, subject=subject, direction=direction, action="allow", l4=())
            continue
        for position, (raw_peers, ports) in enumerate(items):
            endpoints: list[Selector] = []
            addresses: list[AddressBlock] = []
            unsupported: list[str] = []
            side = "from" if direction == "ingress" else "to"
            if not raw_peers:
                endpoints.append(WILDCARD)  # missing or empty: every peer
            for index, peer in enumerate(raw_peers or ()):
                if peer.ipBlock is None:
                    endpoints.append(_np_peer(peer, namespace))
                elif (block := _address_block(peer.ipBlock, f"{side}[{index}].ipBlock")) is not None:
                    addresses.append(block)
                else:
                    unsupported.append(
                        f"{side}[{index}].ipBlock {peer.ipBlock.cidr}: IPv6, matches nothing (the cluster is IPv4-only)"
                    )
            yield PolicyRule(
                origin=RuleOrigin(policy.kind, namespace, policy.name, 0, f"spec.{direction}[{position}]"),
                subject=subject,
                direction=direction,
                action="allow",
                endpoints=tuple(dict.fromkeys(endpoints)),
                addresses=tuple(dict.fromkeys(addresses)),
                unsupported=tuple(unsupported),
                l4=_np_ports(ports),
            )


# --- entry points ------------------------------------------------------------------------------------------


def normalize(policy: ApiObject, cluster_name: str = "default") -> tuple[PolicyRule, ...]:
    """The rules of one policy object (NetworkPolicy, CNP or CCNP); other kinds have none."""
    if isinstance(policy, k8s.NetworkPolicy):
        return tuple(_network_policy_rules(policy))
    if isinstance(policy, cilium.CiliumNetworkPolicy | cilium.CiliumClusterwideNetworkPolicy):
        return tuple(_cilium_rules(policy, cluster_name))
    return ()


def normalize_all(policies: Iterable[ApiObject], cluster_name: str = "default") -> tuple[PolicyRule, ...]:
    """The rules of many policies, in a stable order (kind, namespace, name, rule index, path)."""
    rules = [rule for policy in policies for rule in normalize(policy, cluster_name)]
    return tuple(sorted(rules, key=lambda r: (r.origin.kind, r.origin.namespace, r.origin.name, r.origin.index)))
