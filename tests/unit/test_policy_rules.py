"""The rule model: NetworkPolicy, CNP and CCNP normalized into one form, with Cilium's semantics."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from membrane.api.manifest import parse_manifest_text
from membrane.policy.rules import (
    ALLOW_LOCALHOST,
    WILDCARD,
    L4Rule,
    PolicyRule,
    PortSpec,
    RuleOrigin,
    ServiceRef,
    entity_selectors,
    normalize,
    normalize_all,
)
from membrane.policy.selectors import AddressBlock, CIDRSelector, Requirement, Selector, match_label

NS = "io.kubernetes.pod.namespace"


def rules_of(text: str, cluster_name: str = "default") -> tuple[PolicyRule, ...]:
    return normalize_all(parse_manifest_text(text), cluster_name)


def k8s(key: str, value: str) -> Requirement:
    return match_label("k8s", key, value)


def test_network_policy_subject_and_pod_selector_peer_are_scoped_to_the_namespace() -> None:
    (rule,) = rules_of("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
""")
    assert rule.subject == Selector((k8s("app", "web"), k8s(NS, "shop")))
    assert rule.endpoints == (Selector((k8s("app", "client"), k8s(NS, "shop"))),)
    assert (rule.direction, rule.action, rule.default_deny) == ("ingress", "allow", True)
    assert rule.l4 is None  # no ports: every protocol and port
    assert rule.origin == RuleOrigin("NetworkPolicy", "shop", "web", 0, "spec.ingress[0]")
    assert str(rule.origin) == "NetworkPolicy shop/web rule 0 (spec.ingress[0])"


def test_namespace_selector_uses_namespace_labels_and_ands_with_the_pod_selector() -> None:
    (rule,) = rules_of("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: red}}
      podSelector: {matchLabels: {pod: b}}
    - namespaceSelector: {}
""")
    assert rule.endpoints == (
        Selector((k8s("io.cilium.k8s.namespace.labels.team", "red"), k8s("pod", "b"))),
        Selector((Requirement("k8s", NS, "Exists"),)),  # every namespace: pods only
    )


@pytest.mark.parametrize("peers", ["", "  - from: []\n", "  - {}\n"])
def test_missing_or_empty_from_means_every_peer(peers: str) -> None:
    text = f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: p, namespace: x}}
spec:
  podSelector: {{}}
  policyTypes: [Ingress]
  ingress:
{peers or "  - ports: [{port: 80}]"}
"""
    (rule,) = rules_of(text)
    assert rule.endpoints == (WILDCARD,)


def test_ip_block_becomes_an_address_block_with_exceptions() -> None:
    (rule,) = rules_of("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
""")
    # Matched against addresses (pods included), not a CIDR identity.
    assert rule.addresses == (AddressBlock(IPv4Network("10.0.0.0/8"), (IPv4Network("10.1.0.0/16"),), "to[0].ipBlock"),)
    assert rule.peers == () and rule.endpoints == () and rule.has_peers
    assert rule.addresses[0].ranges() == ((0x0A000000, 0x0A00FFFF), (0x0A010000 + 0x10000, 0x0AFFFFFF))


def test_ipv6_ip_block_matches_nothing_and_says_so() -> None:
    (rule,) = rules_of("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: "2001:db8::/32"}
""")
    assert not rule.has_peers  # selects nothing, still isolates
    assert rule.unsupported == ("from[0].ipBlock 2001:db8::/32: IPv6, matches nothing (the cluster is IPv4-only)",)


def test_address_block_ranges_cut_out_nested_and_overlapping_exceptions() -> None:
    block = AddressBlock(IPv4Network("10.0.0.0/24"), tuple(
        IPv4Network(n) for n in ("10.0.0.0/30", "10.0.0.0/31", "10.0.0.8/29", "10.0.0.255/32")))
    assert block.ranges() == ((0x0A000004, 0x0A000007), (0x0A000010, 0x0A0000FE))
    assert block.contains(0x0A000005) and not block.contains(0x0A000009) and not block.contains(0x0A0000FF)


def test_network_policy_ports_default_to_tcp_and_keep_names_and_ranges() -> None:
    (rule,) = rules_of("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports:
    - port: 80
    - {port: 8000, endPort: 8080, protocol: UDP}
    - {port: serve-http}
    - {protocol: SCTP}
""")
    assert rule.l4 == (
        L4Rule(
            (
                PortSpec("TCP", 80),
                PortSpec("UDP", 8000, 8080),
                PortSpec("TCP", "serve-http"),
                PortSpec("SCTP", 0),
            )
        ),
    )


def test_policy_types_decide_which_directions_apply() -> None:
    rules = rules_of("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  ingress:
  - {}
  egress:
  - {}
""")
    summary = [(r.origin.name, r.direction, r.origin.path, r.has_peers, r.l4) for r in rules]
    assert summary == [
        # egress-only: its ingress rules are ignored.
        ("egress-only", "egress", "spec.egress[0]", True, None),
        # isolate: a rule that selects nothing carries the default deny of each listed direction.
        ("isolate", "ingress", "spec.policyTypes", False, ()),
        ("isolate", "egress", "spec.policyTypes", False, ()),
    ]


def test_cnp_subject_and_peers_get_the_namespace_unless_they_name_one() -> None:
    (rule,) = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    - matchLabels: {app: client, k8s:io.kubernetes.pod.namespace: y}
    - matchLabels: {io.kubernetes.pod.namespace: z}
    - matchLabels: {reserved:host: ""}
""")
    assert rule.subject == Selector((match_label("any", "app", "web"), k8s(NS, "x")))
    assert rule.endpoints == (
        Selector((match_label("any", "app", "client"), k8s(NS, "x"))),
        Selector((match_label("any", "app", "client"), k8s(NS, "y"))),
        Selector((match_label("any", NS, "z"),)),
        Selector((match_label("reserved", "host", ""),)),  # reserved labels are never scoped
    )


def test_ccnp_peers_are_limited_to_pods_and_its_subject_is_not_scoped() -> None:
    (rule,) = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{}]
""")
    assert rule.subject == WILDCARD
    assert rule.endpoints == (Selector((Requirement("k8s", NS, "Exists"),)),)
    assert rule.origin == RuleOrigin("CiliumClusterwideNetworkPolicy", "", "p", 0, "spec.egress[0]")
    assert rule.origin.policy == "p"


def test_subjects_selecting_initializing_endpoints_are_not_scoped() -> None:
    (rule,) = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {matchLabels: {reserved:init: ""}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
""")
    assert rule.subject == Selector((match_label("reserved", "init", ""),))
    assert rule.endpoints == (Selector((match_label("any", "app", "a"),)),)


def test_l3_wildcard_empty_list_and_empty_rule() -> None:
    ports_only, empty_list, nothing = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: []
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - {}
""")
    assert ports_only.peers == (WILDCARD,)  # ports without any L3 member: every peer
    assert not empty_list.has_peers  # an L3 member given as an empty list selects nothing
    assert not nothing.has_peers and nothing.l4 is None and nothing.default_deny  # isolates, allows nothing


def test_entities() -> None:
    reserved = lambda name: Selector((Requirement("reserved", name, "Exists"),))  # noqa: E731
    assert entity_selectors("all") == (WILDCARD,)
    assert entity_selectors("world") == entity_selectors("world-ipv4") == (reserved("world"),)
    assert entity_selectors("none") == entity_selectors("world-ipv6") == ()
    assert entity_selectors("remote-node") == (reserved("remote-node"),)
    cluster = entity_selectors("cluster", cluster_name="blue")
    assert reserved("host") in cluster and reserved("kube-apiserver") in cluster
    assert Selector((k8s("io.cilium.k8s.policy.cluster", "blue"),)) in cluster
    assert reserved("world") not in cluster


def test_cidrs_entities_and_unsupported_peers() -> None:
    cidr, cidr_set, entities, nodes = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {}
  egress:
  - toCIDR: [192.168.7.9, 172.16.0.0/12, "fd00::/64"]
  - toCIDRSet:
    - {cidr: 10.0.0.0/8, except: [10.9.0.0/16]}
    - {cidrGroupRef: office}
  - toEntities: [world, host]
  - toNodes: [{matchLabels: {role: db}}]
""")
    assert cidr.peers == (
        CIDRSelector(IPv4Network("192.168.7.9/32")),
        CIDRSelector(IPv4Network("172.16.0.0/12")),
    )  # IPv6 is dropped: pods and the ipcache are IPv4-only
    assert cidr_set.peers == (CIDRSelector(IPv4Network("10.0.0.0/8"), (IPv4Network("10.9.0.0/16"),)),)
    assert cidr_set.unsupported == ("toCIDRSet.cidrGroup",)
    assert entities.peers == entity_selectors("world") + entity_selectors("host")
    assert nodes.unsupported == ("toNodes",) and not nodes.has_peers


def test_deny_rules_ports_l7_and_icmp() -> None:
    http, icmp, deny = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "8080", protocol: TCP}, {port: HTTP, protocol: TCP}]
      rules:
        http: [{method: GET, path: /public/.*}]
  - icmps:
    - fields: [{type: EchoRequest}, {family: IPv6, type: 128}, {type: "3"}]
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "22", endPort: 23}]}]
""")
    (l4,) = http.l4 or ()
    assert l4.ports == (PortSpec("TCP", 8080), PortSpec("TCP", "http"))  # Cilium port names: lower-cased
    assert l4.l7 is not None and l4.l7.parser == "http"
    assert l4.l7.rules.http is not None and l4.l7.rules.http[0].path == "/public/.*"
    assert icmp.l4 == (L4Rule((PortSpec("ICMP", 8), PortSpec("ICMPv6", 128), PortSpec("ICMP", 3))),)
    assert icmp.peers == (WILDCARD,)
    assert deny.action == "deny" and deny.origin.path == "spec.ingressDeny[0]"
    assert deny.l4 == (L4Rule((PortSpec("ANY", 22, 23),)),)


def test_enable_default_deny_and_rule_index_and_log() -> None:
    rules = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {matchLabels: {a: "1"}}
  egress:
  - toEntities: [world]
specs:
- endpointSelector: {matchLabels: {a: "2"}}
  enableDefaultDeny: {ingress: false}
  log: {value: visibility}
  ingress:
  - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{}]}}]
  egress:
  - toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
""")
    assert [(r.origin.index, r.origin.path, r.direction, r.default_deny, r.origin.log) for r in rules] == [
        (0, "spec.egress[0]", "egress", True, ""),
        (1, "specs[0].ingress[0]", "ingress", False, "visibility"),
        (1, "specs[0].egress[0]", "egress", True, "visibility"),
    ]
    dns = rules[2].l4
    assert dns is not None and dns[0].l7 is not None and dns[0].l7.parser == "dns"


def test_requires_are_kept_as_scoped_requirements() -> None:
    (rule,) = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {}
  ingress:
  - fromRequires: [{matchLabels: {env: prod}}]
""")
    assert rule.requires == (match_label("any", "env", "prod"), k8s(NS, "x"))
    assert not rule.has_peers  # requirements narrow other rules, they allow nothing themselves


def test_to_services() -> None:
    by_name, by_labels = rules_of("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {}
  egress:
  - toServices: [{k8sService: {serviceName: db}}]
  - toServices: [{k8sServiceSelector: {selector: {matchLabels: {tier: data}}, namespace: y}}]
""")
    assert by_name.services == (ServiceRef("x", "db"),)
    assert by_labels.services == (ServiceRef("y", selector=Selector((match_label("any", "tier", "data"),))),)


def test_host_policies_are_marked_and_other_kinds_have_no_rules() -> None:
    objects = parse_manifest_text("""
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-fw}
spec:
  nodeSelector: {matchLabels: {role: worker}}
  ingress:
  - fromEntities: [cluster]
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
""")
    host_rules = normalize(objects[0])
    assert [r.host for r in host_rules] == [True]
    assert normalize(objects[1]) == ()


def test_origins_name_policies_as_flows_do() -> None:
    origin = RuleOrigin("CiliumNetworkPolicy", "x", "web", 2, "specs[1].ingress[0]")
    assert origin.labels() == (
        "k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
        "k8s:io.cilium.k8s.policy.name=web",
        "k8s:io.cilium.k8s.policy.namespace=x",
    )
    assert str(ALLOW_LOCALHOST) == "implicit allow from the local host"
