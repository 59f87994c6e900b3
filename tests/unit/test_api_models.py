"""Real-world manifests are accepted as written; defaults, selectors and kind names behave as upstream."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from membrane.api import cilium, k8s
from membrane.api.manifest import load_objects, parse_manifest_text
from membrane.api.meta import LabelSelector, parse_selector
from membrane.api.registry import KINDS, find_kind, lookup_kind, validate_object
from membrane.core.errors import InvalidInput
from membrane.store.base import KeyValue
from membrane.store.objects import decode, encode

CORPUS = Path(__file__).parent / "golden" / "api" / "corpus"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.iterdir())


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_real_world_manifests_are_accepted(path: Path) -> None:
    manifests = load_objects([str(path)])
    assert manifests, "every corpus file holds objects"
    for manifest in manifests:
        obj = manifest.obj
        assert obj is not None
        # Normalizing twice changes nothing: what is stored validates back to the same object.
        again = validate_object(obj.to_dict(), lookup_kind(obj.kind))
        assert again == obj
        stored = decode(KeyValue("/k", encode(obj), 5, 7))
        assert stored.metadata.resourceVersion == "7"
        assert encode(stored) == encode(obj)


def test_corpus_covers_every_user_kind() -> None:
    kinds = {m.ref.kind for m in load_objects([str(p) for p in corpus_files()])}
    assert kinds == {info.kind for info in KINDS if not info.system}


def test_stdin_and_kind_list_and_directories(tmp_path: Path) -> None:
    text = (CORPUS / "kubectl-output.json").read_text()
    from_stdin = load_objects(["-"], stdin=io.StringIO(text))
    assert [str(m.ref) for m in from_stdin] == ["Service/kubernetes-like"]
    assert from_stdin[0].source == "STDIN"
    from_dir = load_objects([str(CORPUS)])
    assert len(from_dir) == len(load_objects([str(p) for p in corpus_files()]))


def test_service_defaults_follow_the_api_server() -> None:
    (lb, plain) = parse_manifest_text(
        """
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  sessionAffinity: ClientIP
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec:
  ports: [{port: 53, protocol: UDP, targetPort: dns}]
"""
    )
    assert isinstance(lb, k8s.Service) and isinstance(plain, k8s.Service)
    assert lb.spec.ports is not None and lb.spec.ports[0].targetPort == 80
    assert lb.spec.ports[0].protocol == "TCP"
    assert lb.spec.externalTrafficPolicy == "Cluster"
    assert lb.spec.internalTrafficPolicy == "Cluster"
    assert lb.spec.allocateLoadBalancerNodePorts is True
    assert lb.spec.sessionAffinityConfig is not None
    assert lb.spec.sessionAffinityConfig.clientIP is not None
    assert lb.spec.sessionAffinityConfig.clientIP.timeoutSeconds == 10800
    assert plain.spec.type == "ClusterIP"
    assert plain.spec.externalTrafficPolicy is None
    assert plain.spec.ports is not None and plain.spec.ports[0].targetPort == "dns"
    assert plain.namespace == "default"


def test_network_policy_types_default_like_kubernetes() -> None:
    ingress_only, with_egress = parse_manifest_text(
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b}
spec:
  egress: [{}]
"""
    )
    assert isinstance(ingress_only, k8s.NetworkPolicy) and isinstance(with_egress, k8s.NetworkPolicy)
    assert ingress_only.spec.policyTypes == ("Ingress",)
    assert with_egress.spec.policyTypes == ("Ingress", "Egress")
    assert with_egress.spec.podSelector.is_empty


def test_cilium_policy_keeps_nil_versus_empty_peers() -> None:
    (policy,) = parse_manifest_text(
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: []
  - toPorts: [{ports: [{port: HTTP}]}]
  egress:
  - toEndpoints: [{}]
"""
    )
    assert isinstance(policy, cilium.CiliumNetworkPolicy)
    rule = policy.rules()[0]
    assert rule.ingress is not None and rule.egress is not None
    # An empty list selects nothing, a missing one is a wildcard, [{}] selects everything.
    assert rule.ingress[0].fromEndpoints == ()
    assert rule.ingress[1].fromEndpoints is None
    assert rule.egress[0].toEndpoints is not None and rule.egress[0].toEndpoints[0].is_empty
    port = rule.ingress[1].toPorts[0].ports[0] if rule.ingress[1].toPorts and rule.ingress[1].toPorts[0].ports else None
    assert port is not None and port.protocol == "ANY" and cilium.parse_port(port.port or "") == "http"
    assert policy.to_dict()["spec"]["ingress"][0] == {"fromEndpoints": []}
    assert rule.default_deny() == (True, True)


def test_default_deny_follows_enable_default_deny() -> None:
    rule = cilium.Rule.model_validate({"endpointSelector": {}, "egress": [{}], "enableDefaultDeny": {"egress": False}})
    assert rule.default_deny() == (False, False)


def test_legacy_pool_cidrs_are_read_as_blocks() -> None:
    (pool,) = parse_manifest_text(
        "apiVersion: cilium.io/v2alpha1\nkind: CiliumLoadBalancerIPPool\nmetadata: {name: p}\n"
        "spec: {cidrs: [{cidr: 10.0.10.0/24}]}\n"
    )
    assert isinstance(pool, cilium.CiliumLoadBalancerIPPool)
    assert pool.spec.blocks == (cilium.IPPoolBlock(cidr="10.0.10.0/24"),)
    assert pool.spec.disabled is False


def test_bgp_defaults_match_the_crds() -> None:
    (policy,) = parse_manifest_text(
        "apiVersion: cilium.io/v2alpha1\nkind: CiliumBGPPeeringPolicy\nmetadata: {name: b}\n"
        "spec: {virtualRouters: [{localASN: 65001, neighbors: [{peerAddress: 10.0.0.1/32, peerASN: 65000}]}]}\n"
    )
    assert isinstance(policy, cilium.CiliumBGPPeeringPolicy)
    router = policy.spec.virtualRouters[0]
    neighbor = router.neighbors[0]
    assert router.serviceAdvertisements == ("LoadBalancerIP",)
    assert (neighbor.peerPort, neighbor.holdTimeSeconds, neighbor.keepAliveTimeSeconds) == (179, 90, 30)
    assert (neighbor.eBGPMultihopTTL, neighbor.connectRetryTimeSeconds) == (1, 120)


# --- selectors ---------------------------------------------------------------------------------------------

SELECTOR_CASES = [
    ({}, {"app": "web"}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "web", "tier": "1"}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]}, {"app": "b"}, True),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]}, {"app": "a"}, False),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, {"app": ""}, True),
    ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {"app": ""}, False),
    (
        {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]},
        {"app": "web", "env": "dev"},
        False,
    ),
]


@pytest.mark.parametrize(("selector", "labels", "expected"), SELECTOR_CASES)
def test_label_selector_matches(selector: dict[str, object], labels: dict[str, str], expected: bool) -> None:
    assert LabelSelector.model_validate(selector).matches(labels) is expected


def test_selector_formats_like_kubectl() -> None:
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"role": "db", "app": "web"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "dev"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }
    )
    assert selector.format() == "app=web,!canary,env in (dev,prod),role=db"
    assert LabelSelector().format() == "<none>"


def test_selector_strings_parse_like_kubectl() -> None:
    selector = parse_selector("app=web, tier!=db,env in (prod,dev),!canary,owner")
    assert selector.matches({"app": "web", "env": "dev", "owner": "me"})
    assert not selector.matches({"app": "web", "env": "dev", "owner": "me", "canary": "1"})
    assert not selector.matches({"app": "web", "env": "dev", "owner": "me", "tier": "db"})
    assert not selector.matches({"app": "web", "env": "test", "owner": "me"})
    assert parse_selector("a==b").matches({"a": "b"})
    with pytest.raises(InvalidInput, match=r'invalid label selector "a b": unexpected text'):
        parse_selector("a b")
    with pytest.raises(InvalidInput, match=r'invalid label selector "x=-y"'):
        parse_selector("x=-y")


def test_endpoint_selector_accepts_label_sources() -> None:
    selector = cilium.EndpointSelector.model_validate(
        {
            "matchLabels": {"k8s:app": "web", "reserved:host": "", "io.kubernetes.pod.namespace": "default"},
            "matchExpressions": [{"key": "any:tier", "operator": "Exists"}],
        }
    )
    assert validate_object(
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"endpointSelector": selector.model_dump(exclude_none=True), "ingress": [{}]},
        },
        lookup_kind("cnp"),
    )


# --- kind names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("po", "Pod"),
        ("pods", "Pod"),
        ("Pod", "Pod"),
        ("svc", "Service"),
        ("ns", "Namespace"),
        ("netpol", "NetworkPolicy"),
        ("networkpolicies.networking.k8s.io", "NetworkPolicy"),
        ("cnp", "CiliumNetworkPolicy"),
        ("ciliumnp", "CiliumNetworkPolicy"),
        ("CiliumNetworkPolicies", "CiliumNetworkPolicy"),
        ("cnp.cilium.io", "CiliumNetworkPolicy"),
        ("ccnp", "CiliumClusterwideNetworkPolicy"),
        ("ippools", "CiliumLoadBalancerIPPool"),
        ("ippool", "CiliumLoadBalancerIPPool"),
        ("lbippool", "CiliumLoadBalancerIPPool"),
        ("l2announcement", "CiliumL2AnnouncementPolicy"),
        ("bgpp", "CiliumBGPPeeringPolicy"),
        ("cbgpcluster", "CiliumBGPClusterConfig"),
        ("cbgppeer", "CiliumBGPPeerConfig"),
        ("cbgpadvert", "CiliumBGPAdvertisement"),
        ("cn", "CiliumNode"),
        ("ciliumnodes", "CiliumNode"),
    ],
)
def test_kind_names_resolve_as_kubectl_resolves_them(name: str, kind: str) -> None:
    assert lookup_kind(name).kind == kind


def test_unknown_kind_name_suggests_a_close_one() -> None:
    assert find_kind("cnp.networking.k8s.io") is None
    with pytest.raises(InvalidInput, match=r"unknown resource type 'servics' \(did you mean 'services'\?\)"):
        lookup_kind("servics")
    with pytest.raises(InvalidInput, match=r"^unknown resource type 'deployments'$"):
        lookup_kind("deployments")


def test_resource_names_for_output() -> None:
    assert lookup_kind("po").resource == "pod"
    assert lookup_kind("cnp").resource == "ciliumnetworkpolicy.cilium.io"
    assert lookup_kind("netpol").resource == "networkpolicy.networking.k8s.io"
    assert lookup_kind("ippools").api_versions == ("cilium.io/v2", "cilium.io/v2alpha1")


def test_yaml_anchors_and_merge_keys_work() -> None:
    (a, b) = parse_manifest_text(
        """
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: a
    labels: &labels {app: web, tier: front}
  spec:
    containers: [&c {name: c, command: [sleep, "1"]}]
- apiVersion: v1
  kind: Pod
  metadata:
    name: b
    labels:
      <<: *labels
      tier: back
  spec:
    containers: [*c]
"""
    )
    assert a.labels == {"app": "web", "tier": "front"}
    assert b.labels == {"app": "web", "tier": "back"}
