"""``membrane policy trace``: the verdict of each direction and the rules that decide it.

The text output is golden (``golden/policy/trace.txt``); regenerate after an intended change with
``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_policy_trace.py`` and review the diff.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from membrane.api.manifest import parse_manifest_text
from membrane.core.errors import InvalidInput
from membrane.identity.reserved import HOST, WORLD
from membrane.policy.engine import CompiledPolicy
from membrane.policy.ipcache import flatten_ipcache
from membrane.policy.mapstate import EnforcementConfig
from membrane.policy.reachability import default_model
from membrane.policy.trace import PolicyTrace, format_trace, parse_port, resolve_peer, trace

GOLDEN = Path(__file__).parent / "golden" / "policy" / "trace.txt"
MODEL = default_model(outside={"ext": "198.51.100.10"})

POLICIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-out, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: z}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: /api/.*}]}
  - toEntities: [world]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: yb-from-x, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: x}}
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: yc-isolated, namespace: y}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Ingress]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-world-into-za}
spec:
  endpointSelector: {matchLabels: {pod: a, k8s:io.kubernetes.pod.namespace: z}}
  ingress:
  - fromEntities: [all]
  ingressDeny:
  - fromEntities: [world]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: zb-visibility, namespace: z}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: c}}]
"""


def compiled(config: EnforcementConfig | None = None) -> CompiledPolicy:
    return MODEL.compile(parse_manifest_text(POLICIES), config)


def run(source: str, destination: str, port: str, config: EnforcementConfig | None = None) -> PolicyTrace:
    result = compiled(config)
    intervals = flatten_ipcache(MODEL.ipcache(result))
    addresses = {pod.ip: pod.key for pod in MODEL.pods}
    src = resolve_peer(source, result.endpoints, intervals, addresses)
    dst = resolve_peer(destination, result.endpoints, intervals, addresses)
    protocol, number = parse_port(port)
    return trace(src, dst, protocol, number)


SCENARIOS = [
    ("allowed by rules on both sides", "x/a", "y/b", "80/TCP", None),
    ("denied by egress default deny", "x/a", "y/b", "81/TCP", None),
    ("isolated without any allow", "y/a", "y/c", "80/TCP", None),
    ("an L7 rule: denied, no L7 proxy yet", "x/a", "z/c", "80/TCP", None),
    ("to the outside", "x/a", "198.51.100.10", "443/TCP", None),
    ("denied by a deny rule", "world", "z/a", "80/TCP", None),
    ("from the local host", "host", "y/c", "10250/TCP", None),
    ("selected without default deny", "y/a", "z/b", "80/UDP", None),
    ("not selected", "y/a", "z/c", "80/TCP", None),
    ("audit mode", "y/a", "y/c", "80/TCP", EnforcementConfig(audit=True)),
    ("enforcement never", "y/a", "y/c", "80/TCP", EnforcementConfig(mode="never")),
    ("enforcement always", "z/b", "z/c", "53/UDP", EnforcementConfig(mode="always")),
]


def test_trace_output_golden() -> None:
    text = "".join(
        f"### {title}\n$ membrane policy trace --from {src} --to {dst} --port {port}\n"
        f"{format_trace(run(src, dst, port, config))}\n"
        for title, src, dst, port, config in SCENARIOS
    )
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "trace output differs (MEMBRANE_UPDATE_GOLDEN=1 rewrites it)"


def test_verdicts_and_deciding_rules() -> None:
    allowed = run("x/a", "y/b", "80/TCP")
    assert allowed.allowed and allowed.outcome == "allowed"
    assert [str(r) for r in allowed.egress.rules] == ["CiliumNetworkPolicy x/xa-out rule 0 (spec.egress[0])"]
    assert [str(r) for r in allowed.ingress.rules] == ["NetworkPolicy y/yb-from-x rule 0 (spec.ingress[0])"]

    denied = run("x/a", "y/b", "81/TCP")
    assert not denied.allowed and denied.egress.reason == "default-deny" and denied.ingress.reason == "default-deny"

    deny_rule = run("198.51.100.10", "z/a", "80/TCP")
    assert deny_rule.source.identity == WORLD.id and deny_rule.egress.reason == "not-an-endpoint"
    assert deny_rule.ingress.reason == "deny-rule" and deny_rule.outcome == "denied"

    audited = run("y/a", "y/c", "80/TCP", EnforcementConfig(audit=True))
    assert audited.allowed and audited.outcome == "audited" and audited.ingress.outcome == "audited"

    # An L7 rule: no proxy yet, so the traffic it selects is denied (audit mode only reports it).
    redirect = run("x/a", "z/c", "80/TCP")
    assert redirect.egress.reason == "redirect" and [s.parser for s in redirect.egress.l7] == ["http"]
    assert not redirect.allowed and redirect.outcome == "denied" and redirect.egress.outcome == "denied"
    assert "the L7 proxy is not available yet" in format_trace(redirect)
    assert run("x/a", "z/c", "80/TCP", EnforcementConfig(audit=True)).outcome == "audited"


def test_peers_resolve_by_name_address_cidr_and_entity() -> None:
    result = compiled()
    intervals = flatten_ipcache(MODEL.ipcache(result))
    addresses = {pod.ip: pod.key for pod in MODEL.pods}
    by_name = resolve_peer("y/b", result.endpoints, intervals, addresses)
    by_address = resolve_peer("10.244.2.11", result.endpoints, intervals, addresses)
    assert by_name.endpoint is not None and by_address.endpoint is by_name.endpoint
    assert by_address.identity == by_name.identity
    # An address the agent does not host still finds its identity through the ipcache.
    remote = resolve_peer("10.244.2.11", {}, intervals)
    assert remote.endpoint is None and remote.identity == by_name.identity
    assert resolve_peer("198.51.100.0/24", result.endpoints, intervals).identity == WORLD.id
    assert resolve_peer("host", result.endpoints).identity == HOST.id
    with pytest.raises(InvalidInput, match="unknown peer 'nope'"):
        resolve_peer("nope", result.endpoints)
    with pytest.raises(InvalidInput, match="only IPv4"):
        resolve_peer("fd00::1", result.endpoints)
    assert IPv4Address("10.244.2.11") in addresses


def test_port_argument() -> None:
    assert parse_port("80/TCP") == ("TCP", 80)
    assert parse_port("53/udp") == ("UDP", 53)
    assert parse_port("8080") == ("TCP", 8080)
    assert parse_port("8/icmp") == ("ICMP", 8)
    for bad in ("http/TCP", "80/GRE", "70000/TCP"):
        with pytest.raises(InvalidInput, match="invalid port"):
            parse_port(bad)


IP_BLOCKS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: xa-to-block, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {pod: c}}
    - ipBlock: {cidr: 10.244.2.0/24, except: [10.244.2.12/32]}
    ports: [{port: 80}]
"""


def test_an_ip_block_matches_pod_and_outside_addresses_and_is_named() -> None:
    result = MODEL.compile(parse_manifest_text(IP_BLOCKS))
    intervals = flatten_ipcache(MODEL.ipcache(result))
    addresses = {pod.ip: pod.key for pod in MODEL.pods}

    def run_block(source: str, destination: str, port: str = "80/TCP") -> PolicyTrace:
        src = resolve_peer(source, result.endpoints, intervals, addresses)
        dst = resolve_peer(destination, result.endpoints, intervals, addresses)
        return trace(src, dst, *parse_port(port))

    # Pod to pod by name: y/b's address (10.244.2.11) lies in the block.
    to_pod = run_block("x/a", "y/b")
    assert to_pod.allowed and to_pod.egress.reason == "rule"
    assert [str(r) for r in to_pod.egress.rules] == [
        "NetworkPolicy x/xa-to-block rule 0 (spec.egress[0].to[1].ipBlock)"
    ]
    assert "spec.egress[0].to[1].ipBlock" in format_trace(to_pod)
    # The same by address, and an address of the block no pod holds.
    assert run_block("x/a", "10.244.2.11").allowed and run_block("x/a", "10.244.2.200").allowed
    # The except (y/c) and outside the block (z/a) fall to the default deny; the port must match.
    assert run_block("x/a", "y/c").egress.reason == "default-deny"
    assert not run_block("x/a", "z/a").allowed and not run_block("x/a", "y/b", "81/TCP").allowed
    # The podSelector peer of the same rule still matches by identity.
    assert [str(r) for r in run_block("x/a", "x/c").egress.rules] == [
        "NetworkPolicy x/xa-to-block rule 0 (spec.egress[0])"
    ]
