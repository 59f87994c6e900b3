"""Per-endpoint map state: enforcement, entries, precedence, flattening and nft rendering.

Golden text of the rendered maps lives in ``golden/policy/``; regenerate after an intended change
with ``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_policy_mapstate.py`` and review the diff.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from membrane.api.manifest import parse_manifest_text
from membrane.core.protocols import PROTOCOLS
from membrane.datapath.nft import Map, Ruleset, Set, render_table
from membrane.datapath.policy import (
    POLICY_MAP_TYPE,
    VerdictText,
    audited_elements,
    enforced_elements,
    ipcache_elements,
    policy_map_elements,
)
from membrane.identity.labels import identity_labels_for_pod
from membrane.identity.reserved import HOST, WORLD
from membrane.policy.engine import CompiledPolicy, compile_policies
from membrane.policy.ipcache import flatten_ipcache
from membrane.policy.mapstate import (
    IDENTITY_MAX,
    PORT_MAX,
    PROTO_ANY,
    AddressEntry,
    DirectionPolicy,
    EnforcementConfig,
    MapEntry,
    Match,
    PolicyEndpoint,
    ServiceInfo,
    Verdict,
    compute_policies,
    flatten_address_entries,
    flatten_entries,
)
from membrane.policy.reachability import default_model
from membrane.policy.rules import ALLOW_LOCALHOST, RuleOrigin

GOLDEN = Path(__file__).parent / "golden" / "policy"
TCP, UDP, SCTP, ICMP = PROTOCOLS["TCP"], PROTOCOLS["UDP"], PROTOCOLS["SCTP"], PROTOCOLS["ICMP"]

WEB = identity_labels_for_pod("x", {"app": "web"}, {})
CLIENT = identity_labels_for_pod("x", {"app": "client"}, {})
OTHER = identity_labels_for_pod("y", {"app": "client"}, {})
IDENTITIES = {300: WEB, 301: CLIENT, 302: OTHER}
WEB_PORTS = {"http": frozenset({(TCP, 8080)}), "dns": frozenset({(UDP, 53), (TCP, 53)})}


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs (MEMBRANE_UPDATE_GOLDEN=1 rewrites it)"


def compile_text(text: str, config: EnforcementConfig | None = None, **kwargs: object) -> CompiledPolicy:
    endpoints = [
        PolicyEndpoint("x/web", 300, "x", WEB_PORTS),
        PolicyEndpoint("x/client", 301, "x"),
        PolicyEndpoint("y/client", 302, "y"),
    ]
    named = kwargs.pop("named_ports_by_identity", {300: WEB_PORTS})
    return compile_policies(
        parse_manifest_text(text),
        IDENTITIES,
        endpoints,
        config=config,
        named_ports_by_identity=named,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


WEB_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: "443", protocol: TCP}, {port: "9000", endPort: 9099}]}]
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "9050", protocol: TCP}]}]
"""


def entries_of(compiled: CompiledPolicy, key: str, direction: str) -> set[tuple[object, ...]]:
    policy = compiled.endpoints[key].direction(direction)  # type: ignore[arg-type]
    return {(e.identities, e.proto, e.port_low, e.port_high, e.verdict) for e in policy.entries}


def test_entries_resolve_selectors_ports_and_named_ports() -> None:
    compiled = compile_text(WEB_POLICY)
    world = frozenset({WORLD.id})
    assert entries_of(compiled, "x/web", "ingress") == {
        (frozenset({301}), TCP, 8080, 8080, Verdict.ALLOW),  # named port on the endpoint itself
        (world, TCP, 443, 443, Verdict.ALLOW),
        *((world, proto, 9000, 9099, Verdict.ALLOW) for proto in (TCP, UDP, SCTP)),  # ANY
        (world, TCP, 9050, 9050, Verdict.DENY),
        (frozenset({HOST.id}), PROTO_ANY, 0, PORT_MAX, Verdict.ALLOW),  # the local host
    }
    web = compiled.endpoints["x/web"]
    assert web.ingress.default_deny and web.ingress.enforced and not web.ingress.audit
    assert not web.egress.selected and not web.egress.default_deny and web.egress.entries == ()


def test_lookup_applies_precedence_and_names_the_rules() -> None:
    web = compile_text(WEB_POLICY).endpoints["x/web"].ingress
    rule = lambda path: RuleOrigin("CiliumNetworkPolicy", "x", "web", 0, path)  # noqa: E731
    assert web.lookup(WORLD.id, TCP, 9050).verdict is Verdict.DENY
    assert web.lookup(WORLD.id, TCP, 9050).rules == (rule("spec.ingressDeny[0]"),)
    assert web.lookup(WORLD.id, UDP, 9050).rules == (rule("spec.ingress[1]"),)
    assert web.lookup(301, TCP, 8080).rules == (rule("spec.ingress[0]"),)
    assert web.lookup(302, TCP, 8080).verdict is None  # y/client is not selected (other namespace)
    assert web.lookup(HOST.id, ICMP, 8).rules == (ALLOW_LOCALHOST,)


def test_flattening_is_disjoint_and_agrees_with_lookup_on_random_entries() -> None:
    rng = random.Random(11)
    origins = [RuleOrigin("CiliumNetworkPolicy", "x", f"p{i}", 0, "spec.ingress[0]") for i in range(5)]
    verdicts = [Verdict.ALLOW, Verdict.ALLOW, Verdict.DENY, Verdict.REDIRECT]
    identities = [0, 1, 2, 256, 257, 300, 16777217, IDENTITY_MAX]
    for _ in range(60):
        entries = []
        for _ in range(rng.randint(1, 12)):
            ids = None if rng.random() < 0.3 else frozenset(rng.sample(identities, rng.randint(1, 3)))
            proto = rng.choice([PROTO_ANY, TCP, UDP, ICMP])
            low = rng.choice([0, 53, 79, 80, 81, 1000])
            high = rng.choice([low, low + 1, low + 100, PORT_MAX])
            entries.append(MapEntry(ids, proto, low, min(high, PORT_MAX), rng.choice(verdicts), rng.choice(origins)))
        policy = DirectionPolicy("ingress", "default", (), True, False, tuple(entries))
        boxes = flatten_entries(policy.entries, with_rules=True)
        for _ in range(200):
            point = (
                rng.choice([*identities, 5, 299, 1 << 30]),
                rng.choice([0, 1, 6, 17, 132, 255]),
                rng.choice([0, 52, 53, 54, 79, 80, 81, 82, 180, 181, 1000, 1100, 1101, PORT_MAX]),
            )
            covering = [
                b
                for b in boxes
                if b.identity[0] <= point[0] <= b.identity[1]
                and b.proto[0] <= point[1] <= b.proto[1]
                and b.port[0] <= point[2] <= b.port[1]
            ]
            assert len(covering) <= 1, f"overlapping boxes at {point}: {covering}"
            match = policy.lookup(*point)
            if match.verdict is None:
                assert covering == []
            else:
                assert covering and covering[0].verdict is match.verdict
                assert covering[0].rules == frozenset(match.rules)


def test_flattening_merges_neighbours_with_the_same_outcome() -> None:
    origin = RuleOrigin("NetworkPolicy", "x", "p")
    entries = (
        MapEntry(frozenset({300, 301, 302}), TCP, 80, 80, Verdict.ALLOW, origin),
        MapEntry(frozenset({301}), TCP, 81, 90, Verdict.ALLOW, origin),
        MapEntry(frozenset({301}), TCP, 85, 85, Verdict.DENY, origin),
    )
    boxes = [(b.identity, b.proto, b.port, b.verdict) for b in flatten_entries(entries)]
    assert boxes == [
        ((300, 300), (TCP, TCP), (80, 80), Verdict.ALLOW),
        ((301, 301), (TCP, TCP), (80, 84), Verdict.ALLOW),
        ((301, 301), (TCP, TCP), (85, 85), Verdict.DENY),
        ((301, 301), (TCP, TCP), (86, 90), Verdict.ALLOW),
        ((302, 302), (TCP, TCP), (80, 80), Verdict.ALLOW),
    ]


def test_a_plain_allow_beats_an_l7_redirect_and_a_deny_beats_both() -> None:
    compiled = compile_text("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: y}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
    ingress = compiled.endpoints["x/web"].ingress
    redirect = ingress.lookup(WORLD.id, TCP, 80)
    assert redirect.verdict is Verdict.REDIRECT and [s.parser for s in redirect.l7] == ["http"]
    assert ingress.lookup(301, TCP, 80).verdict is Verdict.ALLOW
    assert ingress.lookup(302, TCP, 80).verdict is Verdict.DENY
    verdicts = VerdictText(redirect="jump l7_{parser}")
    rendered = dict(policy_map_elements([(4, ingress)], verdicts))
    assert rendered[("4", "301", "tcp", "80")] == "accept"
    assert rendered[("4", "302", "tcp", "80")] == "drop"
    assert rendered[("4", "303-4294967295", "tcp", "80")] == "jump l7_http"
    # Without a redirect text (no L7 proxy), the traffic the L7 rule selects is dropped, not allowed.
    assert dict(policy_map_elements([(4, ingress)]))[("4", "303-4294967295", "tcp", "80")] == "drop"


def test_egress_named_ports_resolve_per_destination_identity() -> None:
    compiled = compile_text(
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts: [{ports: [{port: http, protocol: TCP}]}]
""",
        named_ports_by_identity={300: WEB_PORTS, 302: {"http": frozenset({(TCP, 80)})}},
    )
    assert entries_of(compiled, "x/client", "egress") == {
        (frozenset({300}), TCP, 8080, 8080, Verdict.ALLOW),
        (frozenset({302}), TCP, 80, 80, Verdict.ALLOW),
    }


def test_l3_only_rules_cover_every_protocol_and_icmp_rules_the_type() -> None:
    compiled = compile_text("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
  - icmps: [{fields: [{type: EchoRequest}]}]
""")
    ingress = compiled.endpoints["x/web"].ingress
    assert ingress.lookup(301, PROTOCOLS["VRRP"], 0).verdict is Verdict.ALLOW
    assert ingress.lookup(WORLD.id, ICMP, 8).verdict is Verdict.ALLOW
    assert ingress.lookup(WORLD.id, ICMP, 0).verdict is None


def test_enforcement_modes_and_audit() -> None:
    deny_x = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"""
    default = compile_text(deny_x).endpoints
    assert default["x/web"].ingress.enforced and default["x/web"].egress.enforced
    assert not default["y/client"].ingress.selected and not default["y/client"].ingress.default_deny

    never = compile_text(deny_x, EnforcementConfig(mode="never")).endpoints["x/web"].ingress
    assert never.selected and not never.default_deny and never.entries == ()

    always = compile_text("", EnforcementConfig(mode="always")).endpoints["y/client"]
    assert always.ingress.enforced and always.egress.enforced and not always.ingress.selected

    audited = compile_text(deny_x, EnforcementConfig(audit_namespaces=frozenset({"x"}))).endpoints
    assert audited["x/web"].ingress.default_deny and audited["x/web"].ingress.audit
    assert not audited["x/web"].ingress.enforced
    pairs = [(4, audited["x/web"].ingress), (5, audited["x/client"].ingress), (6, audited["y/client"].ingress)]
    assert enforced_elements(pairs) == frozenset()
    assert audited_elements(pairs) == {("4",), ("5",)}

    no_localhost = compile_text(deny_x, EnforcementConfig(allow_localhost=False)).endpoints["x/web"].ingress
    assert no_localhost.entries == ()


def test_explicit_denies_of_an_audited_endpoint_render_as_audit() -> None:
    compiled = compile_text(WEB_POLICY, EnforcementConfig(audit=True))
    rendered = dict(policy_map_elements([(4, compiled.endpoints["x/web"].ingress)], VerdictText(audit="jump audit")))
    assert rendered[("4", "2", "tcp", "9050")] == "jump audit"


def test_to_services_select_the_pods_behind_the_service() -> None:
    compiled = compile_text(
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices: [{k8sService: {serviceName: web}}]
  - toServices: [{k8sService: {serviceName: external}}]
""",
        services=[ServiceInfo("x", "web", selector={"app": "web"}), ServiceInfo("x", "external")],
    )
    assert entries_of(compiled, "x/client", "egress") == {(frozenset({300}), PROTO_ANY, 0, PORT_MAX, Verdict.ALLOW)}


def test_replicas_share_their_computation() -> None:
    compiled = compile_policies(
        parse_manifest_text(WEB_POLICY),
        IDENTITIES,
        [PolicyEndpoint(f"x/web-{n}", 300, "x", WEB_PORTS) for n in range(3)],
    )
    policies = list(compiled.endpoints.values())
    assert policies[0].ingress is policies[1].ingress is policies[2].ingress
    assert [p.endpoint.key for p in policies] == ["x/web-0", "x/web-1", "x/web-2"]


def test_rendered_maps_golden() -> None:
    """The whole policy part of the table for the e2e model and a mixed set of policies."""
    model = default_model(pods=("a", "b"), namespaces=("x", "y"))
    compiled = model.compile(
        parse_manifest_text("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: xa-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    ports:
    - {port: serve-80-tcp}
    - {port: 8000, endPort: 8100, protocol: UDP}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xb, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  egress:
  - toCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}]
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
  egressDeny:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y, pod: b}}]
""")
    )
    ifindex = {key: 10 + n for n, key in enumerate(compiled.endpoints)}
    pairs = {
        d: [(ifindex[k], p.direction(d)) for k, p in compiled.endpoints.items()]  # type: ignore[arg-type]
        for d in ("ingress", "egress")
    }
    verdicts = VerdictText(redirect="jump l7_{parser}")
    ruleset = Ruleset(
        family="inet",
        table="membrane",
        sets=(
            Set("enforced_in", ("iface_index",), elements=enforced_elements(pairs["ingress"])),
            Set("enforced_out", ("iface_index",), elements=enforced_elements(pairs["egress"])),
        ),
        maps=(
            Map(
                "ipcache",
                ("ipv4_addr",),
                "mark",
                ("interval",),
                ipcache_elements(flatten_ipcache(model.ipcache(compiled))),
            ),
            Map("pol_in", POLICY_MAP_TYPE, "verdict", ("interval",), policy_map_elements(pairs["ingress"], verdicts)),
            Map("pol_out", POLICY_MAP_TYPE, "verdict", ("interval",), policy_map_elements(pairs["egress"], verdicts)),
        ),
    )
    numbers = model.identities()
    legend = "".join(
        f"# {pod.key}: {pod.ip}, identity {numbers[model.identity_labels(pod)]}, ifindex {ifindex[pod.key]}\n"
        for pod in model.pods
    )
    legend += "".join(f"# {prefix}: identity {number}\n" for prefix, number in compiled.cidr_identities.items())
    assert_golden("maps.nft", legend + render_table(ruleset))


@pytest.mark.parametrize("mode", ["default", "always", "never"])
def test_rendered_elements_never_overlap(mode: str) -> None:
    compiled = compile_text(WEB_POLICY, EnforcementConfig(mode=mode))  # type: ignore[arg-type]
    keys = [k for k, _ in policy_map_elements((n, p.ingress) for n, p in enumerate(compiled.endpoints.values()))]
    assert len(keys) == len(set(keys))


def test_redirects_fail_closed_and_audited_denies_follow_the_allow_text_unless_set() -> None:
    text = VerdictText(allow="continue")
    assert text.of(Verdict.ALLOW, "", audit=False) == "continue"
    assert text.of(Verdict.REDIRECT, "http", audit=False) == "drop"  # no L7 proxy: never the allow text
    assert text.of(Verdict.DENY, "", audit=True) == "continue"
    assert text.of(Verdict.REDIRECT, "http", audit=True) == "continue"  # audit mode: reported, let through
    assert text.of(Verdict.DENY, "", audit=False) == "drop"
    explicit = VerdictText(redirect="jump l7_{parser}", audit="jump audit")
    assert explicit.of(Verdict.REDIRECT, "dns", audit=False) == "jump l7_dns"
    assert explicit.of(Verdict.REDIRECT, "dns", audit=True) == "jump audit"
    assert explicit.of(Verdict.DENY, "", audit=True) == "jump audit"


def test_identity_changes_flow_through_the_cache_into_recomputed_policies() -> None:
    """The agent's incremental path: a pod relabelled → its identity changes → recompute."""
    compiled = compile_text("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: trusted}}]
""")
    web = [PolicyEndpoint("x/web", 300, "x", WEB_PORTS)]
    assert compiled.endpoints["x/web"].ingress.lookup(301, TCP, 80).verdict is None

    trusted = identity_labels_for_pod("x", {"app": "client", "role": "trusted"}, {})
    changes = compiled.cache.update({301: trusted})
    assert [change.added for change in changes.selectors.values()] == [frozenset({301})]
    after = compute_policies(web, compiled.repository, compiled.cache, compiled.config)
    assert after["x/web"].ingress.lookup(301, TCP, 80).verdict is Verdict.ALLOW

    compiled.cache.update(removed=[301])
    gone = compute_policies(web, compiled.repository, compiled.cache, compiled.config)
    assert gone["x/web"].ingress.lookup(301, TCP, 80).verdict is None


def test_flattened_address_boxes_are_disjoint_and_agree_with_lookup() -> None:
    rng = random.Random(12)
    origins = [RuleOrigin("NetworkPolicy", "x", f"p{i}", 0, "spec.ingress[0].from[0].ipBlock") for i in range(4)]
    bounds = [0, 10, 11, 12, 100, 255, 256, 1000, (1 << 32) - 1]
    for _ in range(60):
        entries = []
        for _ in range(rng.randint(1, 10)):
            cuts = sorted(rng.sample(bounds, 4))
            ranges = ((cuts[0], cuts[1]), (cuts[2] + 1, cuts[3])) if cuts[2] + 1 <= cuts[3] else ((cuts[0], cuts[1]),)
            proto = rng.choice([PROTO_ANY, TCP, UDP])
            low = rng.choice([0, 80, 81])
            high = rng.choice([low, low + 1, PORT_MAX])
            entries.append(AddressEntry(ranges, proto, low, min(high, PORT_MAX), Verdict.ALLOW, rng.choice(origins)))
        policy = DirectionPolicy("ingress", "default", (), True, False, (), tuple(entries))
        boxes = flatten_address_entries(policy.addresses, with_rules=True)
        for _ in range(200):
            address = rng.choice([*bounds, 5, 13, 99, 101, 999, 1001])
            proto, port = rng.choice([1, 6, 17]), rng.choice([0, 79, 80, 81, 82, PORT_MAX])
            covering = [
                b for b in boxes
                if b.addresses[0] <= address <= b.addresses[1] and b.proto[0] <= proto <= b.proto[1]
                and b.port[0] <= port <= b.port[1]
            ]
            assert len(covering) <= 1, f"overlapping boxes at {address}: {covering}"
            match = policy.lookup(WORLD.id, proto, port, address)
            assert policy.lookup(WORLD.id, proto, port).verdict is None  # addresses only with an address
            if match.verdict is None:
                assert covering == []
            else:
                assert covering and covering[0].verdict is match.verdict
                assert covering[0].rules == frozenset(match.rules)


def test_an_identity_deny_beats_an_address_allow_and_an_address_allow_beats_an_l7_rule() -> None:
    origin = RuleOrigin("CiliumNetworkPolicy", "x", "p")
    block = RuleOrigin("NetworkPolicy", "x", "b", 0, "spec.ingress[0].from[0].ipBlock")
    allow = AddressEntry(((100, 200),), PROTO_ANY, 0, PORT_MAX, Verdict.ALLOW, block)
    deny = MapEntry(frozenset({300}), TCP, 80, 80, Verdict.DENY, origin)
    l7 = MapEntry(frozenset({301}), TCP, 80, 80, Verdict.REDIRECT, origin)
    policy = DirectionPolicy("ingress", "default", (), True, False, (deny, l7), (allow,))
    assert policy.lookup(300, TCP, 80, 150).verdict is Verdict.DENY
    assert policy.lookup(301, TCP, 80, 150) == Match(Verdict.ALLOW, (block,))
    assert policy.lookup(301, TCP, 80, 250).verdict is Verdict.REDIRECT
