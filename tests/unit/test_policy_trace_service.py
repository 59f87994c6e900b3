"""``membrane policy trace --to service:NS/NAME``: one verdict per backend of the service, with the
deciding rules, computed from the store as the agents compute them (policy after translation)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from typing import Any

import pytest

from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.cli.policy_cmd import load_policy_view, load_service, service_trace_text
from membrane.core.errors import InvalidInput
from membrane.identity.labels import canonical, identity_labels_for_pod
from membrane.store import keys
from membrane.store.memory import MemoryStore
from membrane.store.objects import ObjectClient

NS_LABELS = {"kubernetes.io/metadata.name": "default"}
PODS = {"client": {"app": "client"}, "web-0": {"app": "web", "tier": "a"}, "web-1": {"app": "web", "tier": "b"},
        "other": {"app": "other"}}
IDENTITIES = {"client": 300, "web-0": 301, "web-1": 302, "other": 303}
ADDRESSES = {"client": "10.244.1.10", "web-0": "10.244.1.11", "web-1": "10.244.2.12", "other": "10.244.1.13"}

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-a-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {tier: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-b-isolated, namespace: default}
spec:
  podSelector: {matchLabels: {tier: b}}
  policyTypes: [Ingress]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 90, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: default, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- addresses: ["10.244.1.11"]
- addresses: ["198.51.100.7"]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.12
  selector: {app: nothing}
  ports: [{port: 80}]
"""


def _pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": PODS[name]},
            "spec": {"nodeName": "node2" if name == "web-1" else "node1",
                     "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def _record(name: str, index: int) -> EndpointRecord:
    labels = tuple(canonical(identity_labels_for_pod("default", PODS[name], NS_LABELS)))
    node = "node2" if name == "web-1" else "node1"
    return EndpointRecord(f"c-{name}", index, node, "default", name, "eth0", f"/run/netns/{name}",
                          IPv4Address(ADDRESSES[name]), IDENTITIES[name], labels, "runner", "ready",
                          f"lxc{index:011x}", 100 + index, "")


async def _store() -> MemoryStore:
    store = MemoryStore()
    await ObjectClient(store).apply(parse_manifest_text(OBJECTS))
    for index, name in enumerate(PODS, start=1):
        record = _record(name, index)
        await store.put(record.key, record.to_json())
        await store.put(keys.identity_id_key(record.identity),
                        json.dumps(list(record.labels)).encode())
        await store.put(keys.object_key("pods", "default", name), json.dumps(_pod(name)).encode())
    return store


async def _trace(source: str, service: str, port: str) -> str:
    store = await _store()
    view = await load_policy_view(store)
    found, slices = await load_service(store, service)
    return service_trace_text(view, source, found, slices, port)


async def test_each_backend_gets_its_verdict_and_deciding_rules() -> None:
    text = await _trace("default/client", "service:default/web", "80/TCP")
    lines = text.splitlines()
    assert lines[0] == "Tracing default/client -> service default/web (10.96.0.10:80/TCP) on 80/TCP: 2 backends"
    assert "after the service address is translated (as in Cilium)" in lines[1]
    verdicts = [line for line in lines if line.startswith("default/web-")]
    assert verdicts == [
        "default/web-0 (10.244.1.11:8080/TCP, identity 301): ALLOWED",
        "default/web-1 (10.244.2.12:8080/TCP, identity 302): DENIED",
    ]
    assert "      NetworkPolicy default/web-a-from-client rule 0 (spec.ingress[0])" in lines
    assert "  Ingress to default/web-1: DENIED" in lines and "    NetworkPolicy default/web-b-isolated" in text
    assert lines[-1] == "Final verdict: DENIED to 1 of 2 backends (default/web-1)"


async def test_a_service_without_selector_traces_the_slices_users_applied() -> None:
    text = await _trace("default/client", "service:default/manual", "90/TCP")
    verdicts = [line for line in text.splitlines() if "/TCP, identity" in line]
    assert verdicts == ["default/web-0 (10.244.1.11:8080/TCP, identity 301): ALLOWED",
                        "198.51.100.7 (198.51.100.7:8080/TCP, identity 2 (world)): ALLOWED"]
    assert text.splitlines()[-1] == "Final verdict: ALLOWED (every backend)"


async def test_a_service_without_backends_and_bad_arguments() -> None:
    text = await _trace("default/other", "service:default/empty", "80/TCP")
    assert ": 0 backends" in text.splitlines()[0]
    assert text.splitlines()[-1].startswith("Final verdict: DENIED (no backend")
    with pytest.raises(InvalidInput, match="has no port 81/TCP"):
        await _trace("default/client", "service:default/web", "81/TCP")
    with pytest.raises(InvalidInput, match="no service default/nope"):
        await _trace("default/client", "service:nope", "80/TCP")
