"""A synthetic cluster-sized load: 1,000 policies and 5,000 identities, compiled and rendered.

The test checks the result is sound at that size (every endpoint compiled, rendered elements
disjoint, a sample of packets agreeing between map state and rendered boxes). Timing is not
asserted; run this file as a script to print how long each stage takes::

    .venv/bin/python tests/unit/test_policy_scale.py
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from membrane.api.cilium import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy
from membrane.api.k8s import NetworkPolicy
from membrane.api.meta import ApiObject
from membrane.core.protocols import PROTOCOLS
from membrane.datapath.policy import enforced_elements, ipcache_elements, policy_map_elements
from membrane.identity.ipcache import IpcacheEntry
from membrane.identity.labels import Label, identity_labels_for_pod
from membrane.identity.reserved import WORLD
from membrane.policy.engine import CompiledPolicy, compile_policies
from membrane.policy.ipcache import flatten_ipcache, with_cidr_identities
from membrane.policy.mapstate import PolicyEndpoint

NAMESPACES = 50
APPS_PER_NAMESPACE = 100  # 50 x 100 = 5,000 identities
POLICIES = 1000
LOCAL_ENDPOINTS = 110  # Kubernetes' default pod limit per node
TCP = PROTOCOLS["TCP"]


def synthetic_identities() -> dict[int, frozenset[Label]]:
    identities = {}
    for ns in range(NAMESPACES):
        for app in range(APPS_PER_NAMESPACE):
            labels = {"app": f"app-{app}", "tier": ("web", "api", "db")[app % 3]}
            namespace_labels = {"team": f"team-{ns % 7}"}
            identities[256 + ns * APPS_PER_NAMESPACE + app] = identity_labels_for_pod(
                f"ns-{ns}", labels, namespace_labels
            )
    return identities


def _cnp(rng: random.Random, n: int) -> dict[str, Any]:
    ns = rng.randrange(NAMESPACES)
    app, peer = rng.randrange(APPS_PER_NAMESPACE), rng.randrange(APPS_PER_NAMESPACE)
    other_ns = rng.randrange(NAMESPACES)
    port = str(rng.choice([80, 443, 8080, 9000]))
    spec: dict[str, Any] = {
        "endpointSelector": {"matchLabels": {"app": f"app-{app}"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"app": f"app-{peer}"}}],
                "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}],
            },
            {
                "fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": f"ns-{other_ns}"}}],
                "toPorts": [{"ports": [{"port": "8000", "endPort": 8100, "protocol": "TCP"}]}],
            },
        ],
        "egress": [
            {"toEndpoints": [{"matchLabels": {"tier": "db", "k8s:io.kubernetes.pod.namespace": f"ns-{other_ns}"}}]},
            {"toCIDRSet": [{"cidr": f"203.0.{n % 256}.0/24", "except": [f"203.0.{n % 256}.128/25"]}]},
        ],
    }
    if n % 5 == 0:
        spec["ingressDeny"] = [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "22"}]}]}]
    if n % 7 == 0:
        spec["ingress"][0]["toPorts"][0]["rules"] = {"http": [{"method": "GET", "path": "/api/.*"}]}
    return {"kind": "CiliumNetworkPolicy", "metadata": {"name": f"cnp-{n}", "namespace": f"ns-{ns}"}, "spec": spec}


def _np(rng: random.Random, n: int) -> dict[str, Any]:
    ns = rng.randrange(NAMESPACES)
    spec = {
        "podSelector": {"matchLabels": {"tier": rng.choice(["web", "api", "db"])}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"team": f"team-{rng.randrange(7)}"}},
                        "podSelector": {"matchLabels": {"tier": "api"}},
                    },
                    {"ipBlock": {"cidr": "198.51.100.0/24"}},
                ],
                "ports": [{"port": rng.choice([80, 5432, 6379])}],
            }
        ],
    }
    return {"kind": "NetworkPolicy", "metadata": {"name": f"np-{n}", "namespace": f"ns-{ns}"}, "spec": spec}


def _ccnp(rng: random.Random, n: int) -> dict[str, Any]:
    spec = {
        "endpointSelector": {"matchLabels": {"tier": rng.choice(["web", "api"])}},
        "egress": [
            {
                "toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "ns-0", "app": "app-0"}}],
                "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}],
            },
            {"toEntities": ["world"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
        ],
    }
    return {"kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": f"ccnp-{n}"}, "spec": spec}


def synthetic_policies(seed: int = 1) -> list[ApiObject]:
    rng = random.Random(seed)
    makers: list[tuple[Callable[[random.Random, int], dict[str, Any]], type[ApiObject], str]] = [
        (_cnp, CiliumNetworkPolicy, "cilium.io/v2"),
        (_np, NetworkPolicy, "networking.k8s.io/v1"),
        (_ccnp, CiliumClusterwideNetworkPolicy, "cilium.io/v2"),
    ]
    policies = []
    for n in range(POLICIES):
        maker, model, version = makers[0] if n % 10 < 7 else makers[1] if n % 10 < 9 else makers[2]
        data = maker(rng, n)
        policies.append(model.model_validate({"apiVersion": version, **data}))
    return policies


def local_endpoints(rng: random.Random) -> list[PolicyEndpoint]:
    endpoints = []
    for n in range(LOCAL_ENDPOINTS):
        ns, app = rng.randrange(NAMESPACES), rng.randrange(APPS_PER_NAMESPACE)
        named = {"http": frozenset({(TCP, 8080)})}
        endpoints.append(PolicyEndpoint(f"ns-{ns}/pod-{n}", 256 + ns * APPS_PER_NAMESPACE + app, f"ns-{ns}", named))
    return endpoints


def pod_address(identity: int) -> IPv4Address:
    return IPv4Address(int(IPv4Address("10.128.0.0")) + identity)


def run_load() -> tuple[CompiledPolicy, dict[str, float], dict[str, int]]:
    identities = synthetic_identities()
    policies = synthetic_policies()
    endpoints = local_endpoints(random.Random(2))
    timings: dict[str, float] = {}
    # The agent's ipcache (pods and world) exists before policy; only policy prefixes are added.
    base = [IpcacheEntry(IPv4Network("0.0.0.0/0"), WORLD.id, "reserved")]
    base += [IpcacheEntry(IPv4Network((int(pod_address(i)), 32)), i, "custom-resource") for i in identities]

    start = time.perf_counter()
    compiled = compile_policies(policies, identities, endpoints)
    timings["compile"] = time.perf_counter() - start

    start = time.perf_counter()
    ifindex = {key: 10 + n for n, key in enumerate(compiled.endpoints)}
    counts = {}
    for direction in ("ingress", "egress"):
        pairs = [(ifindex[k], p.direction(direction)) for k, p in compiled.endpoints.items()]  # type: ignore[arg-type]
        counts[f"pol_{direction}"] = len(policy_map_elements(pairs))
        counts[f"enforced_{direction}"] = len(enforced_elements(pairs))
    counts["ipcache"] = len(ipcache_elements(flatten_ipcache(with_cidr_identities(base, compiled.cidr_identities))))
    timings["render"] = time.perf_counter() - start
    timings["total"] = timings["compile"] + timings["render"]
    counts["rules"] = len(compiled.rules)
    counts["selectors"] = len(compiled.cache.selections())
    return compiled, timings, counts


def test_synthetic_cluster_load_compiles_and_renders_soundly() -> None:
    compiled, _, counts = run_load()
    assert len(compiled.endpoints) == LOCAL_ENDPOINTS
    assert counts["rules"] >= 3 * POLICIES and counts["pol_ingress"] > 0 and counts["ipcache"] > 5000
    rng = random.Random(5)
    identities = list(compiled.cache.identities)
    for policy in list(compiled.endpoints.values())[:20]:
        for direction in (policy.ingress, policy.egress):
            boxes = direction.flat
            for _ in range(50):
                point = (rng.choice(identities), rng.choice([6, 17]), rng.choice([22, 53, 80, 443, 8050, 9000]))
                covering = [
                    b
                    for b in boxes
                    if b.identity[0] <= point[0] <= b.identity[1]
                    and b.proto[0] <= point[1] <= b.proto[1]
                    and b.port[0] <= point[2] <= b.port[1]
                ]
                assert len(covering) <= 1
                expected = direction.lookup(*point).verdict
                assert (covering[0].verdict if covering else None) is expected


if __name__ == "__main__":
    runs = [run_load()[1:] for _ in range(3)]
    for stage in ("compile", "render", "total"):
        values = sorted(t[stage] for t, _ in runs)
        print(f"{stage:8} median {values[1] * 1000:7.1f} ms  (min {values[0] * 1000:.1f}, max {values[2] * 1000:.1f})")
    print("sizes:", runs[0][1])
