"""The agent's in-memory intent: the store objects it acts on, decoded once, keyed by name.

Filled by reflectors (list + watch); read by the controllers. Values are the stored JSON
objects; each change bumps ``version`` so controllers can tell when to recompute.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from membrane.api.endpoint import EndpointRecord
from membrane.identity.labels import Label, identity_labels_for_pod, parse_labels
from membrane.store import keys
from membrane.store.base import EventType, KeyValue, WatchEvent

PODS = keys.objects_prefix("pods")
NAMESPACES = keys.objects_prefix("namespaces")
NODES = keys.objects_prefix("ciliumnodes")
# -- policy inputs (agent/policy.py): policy objects, identities, every node's endpoint records --
NETWORK_POLICIES = keys.objects_prefix("networkpolicies")
CILIUM_POLICIES = keys.objects_prefix("ciliumnetworkpolicies")
CLUSTERWIDE_POLICIES = keys.objects_prefix("ciliumclusterwidenetworkpolicies")
POLICY_PREFIXES = (NETWORK_POLICIES, CILIUM_POLICIES, CLUSTERWIDE_POLICIES)
IDENTITIES = keys.IDENTITY_BY_ID
ENDPOINTS = keys.ENDPOINTS


def _name_from_key(prefix: str, key: str) -> tuple[str, str]:
    rest = key.removeprefix(prefix)
    namespace, _, name = rest.rpartition("/")
    return namespace, name


@dataclass
class Intent:
    cluster_name: str = "default"
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # CiliumNode objects by name
    # -- policy inputs --
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)  # policy objects by store key
    identities: dict[int, frozenset[Label]] = field(default_factory=dict)  # identity -> labels
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)  # every node's records by store key
    #: The store revision each prefix is known up to (the reflector's batch revision, else the
    #: newest event): lets the policy controller report which revision its datapath reflects.
    revisions: dict[str, int] = field(default_factory=dict)
    version: int = 0

    def load(self, prefix: str, kvs: Iterable[KeyValue]) -> None:
        for kv in kvs:
            self._put(prefix, kv)
        self.version += 1

    def apply(self, prefix: str, events: Iterable[WatchEvent], revision: int | None = None) -> None:
        newest = self.revisions.get(prefix, 0)
        for event in events:
            if event.type is EventType.PUT:
                self._put(prefix, event.kv)
            else:
                self._delete(prefix, event.kv.key)
            newest = max(newest, event.kv.mod_revision)
        self.revisions[prefix] = max(newest, revision or 0)
        self.version += 1

    def replace_all(self, prefix: str, kvs: Iterable[KeyValue]) -> None:
        if prefix == PODS:
            self.pods.clear()
        elif prefix == NAMESPACES:
            self.namespaces.clear()
        elif prefix == NODES:
            self.nodes.clear()
        elif prefix in POLICY_PREFIXES:
            for key in [k for k in self.policies if k.startswith(prefix)]:
                del self.policies[key]
        elif prefix == IDENTITIES:
            self.identities.clear()
        elif prefix == ENDPOINTS:
            self.endpoints.clear()
        self.load(prefix, kvs)

    def _put(self, prefix: str, kv: KeyValue) -> None:
        if prefix in (IDENTITIES, ENDPOINTS):
            self._put_policy_input(prefix, kv)
            return
        try:
            obj = json.loads(kv.value)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
        if prefix == PODS:
            self.pods[_name_from_key(prefix, kv.key)] = obj
        elif prefix == NAMESPACES:
            self.namespaces[kv.key.removeprefix(prefix)] = obj
        elif prefix == NODES:
            self.nodes[kv.key.removeprefix(prefix)] = obj
        elif prefix in POLICY_PREFIXES:
            self.policies[kv.key] = obj

    def _put_policy_input(self, prefix: str, kv: KeyValue) -> None:
        """Identities and endpoint records; an unreadable value is skipped (its writer is to blame)."""
        try:
            if prefix == IDENTITIES:
                identity = int(kv.key.rsplit("/", 1)[1])
                self.identities[identity] = parse_labels(json.loads(kv.value))
            else:
                self.endpoints[kv.key] = EndpointRecord.from_json(kv.value)
        except (ValueError, TypeError, KeyError):
            return

    def _delete(self, prefix: str, key: str) -> None:
        if prefix == PODS:
            self.pods.pop(_name_from_key(prefix, key), None)
        elif prefix == NAMESPACES:
            self.namespaces.pop(key.removeprefix(prefix), None)
        elif prefix == NODES:
            self.nodes.pop(key.removeprefix(prefix), None)
        elif prefix in POLICY_PREFIXES:
            self.policies.pop(key, None)
        elif prefix == IDENTITIES:
            number = key.rsplit("/", 1)[1]
            if number.isdigit():
                self.identities.pop(int(number), None)
        elif prefix == ENDPOINTS:
            self.endpoints.pop(key, None)

    # -- LabelSource -----------------------------------------------------------------------------

    def endpoint_labels(self, namespace: str, pod: str) -> frozenset[Label]:
        pod_obj = self.pods.get((namespace, pod), {})
        pod_labels = pod_obj.get("metadata", {}).get("labels") or {}
        sa = (pod_obj.get("spec") or {}).get("serviceAccountName") or "default"
        ns_labels = (self.namespaces.get(namespace, {}).get("metadata") or {}).get("labels") or {}
        return identity_labels_for_pod(namespace, pod_labels, ns_labels, sa, self.cluster_name)

    def pods_on_node(self, node: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {k: v for k, v in self.pods.items() if (v.get("spec") or {}).get("nodeName") == node}
