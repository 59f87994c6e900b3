"""The agent's in-memory intent: the store objects it acts on, decoded once, keyed by name.

Filled by reflectors (list + watch); read by the controllers. Values are the stored JSON
objects; each change bumps ``version`` so controllers can tell when to recompute.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from membrane.identity.labels import Label, identity_labels_for_pod
from membrane.store import keys
from membrane.store.base import EventType, KeyValue, WatchEvent

PODS = keys.objects_prefix("pods")
NAMESPACES = keys.objects_prefix("namespaces")
NODES = keys.objects_prefix("ciliumnodes")


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
    version: int = 0

    def load(self, prefix: str, kvs: Iterable[KeyValue]) -> None:
        for kv in kvs:
            self._put(prefix, kv)
        self.version += 1

    def apply(self, prefix: str, events: Iterable[WatchEvent]) -> None:
        for event in events:
            if event.type is EventType.PUT:
                self._put(prefix, event.kv)
            else:
                self._delete(prefix, event.kv.key)
        self.version += 1

    def replace_all(self, prefix: str, kvs: Iterable[KeyValue]) -> None:
        if prefix == PODS:
            self.pods.clear()
        elif prefix == NAMESPACES:
            self.namespaces.clear()
        elif prefix == NODES:
            self.nodes.clear()
        self.load(prefix, kvs)

    def _put(self, prefix: str, kv: KeyValue) -> None:
        try:
            obj = json.loads(kv.value)
        except ValueError:
            return
        obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
        if prefix == PODS:
            self.pods[_name_from_key(prefix, kv.key)] = obj
        elif prefix == NAMESPACES:
            self.namespaces[kv.key.removeprefix(prefix)] = obj
        elif prefix == NODES:
            self.nodes[kv.key.removeprefix(prefix)] = obj

    def _delete(self, prefix: str, key: str) -> None:
        if prefix == PODS:
            self.pods.pop(_name_from_key(prefix, key), None)
        elif prefix == NAMESPACES:
            self.namespaces.pop(key.removeprefix(prefix), None)
        elif prefix == NODES:
            self.nodes.pop(key.removeprefix(prefix), None)

    # -- LabelSource -----------------------------------------------------------------------------

    def endpoint_labels(self, namespace: str, pod: str) -> frozenset[Label]:
        pod_obj = self.pods.get((namespace, pod), {})
        pod_labels = pod_obj.get("metadata", {}).get("labels") or {}
        sa = (pod_obj.get("spec") or {}).get("serviceAccountName") or "default"
        ns_labels = (self.namespaces.get(namespace, {}).get("metadata") or {}).get("labels") or {}
        return identity_labels_for_pod(namespace, pod_labels, ns_labels, sa, self.cluster_name)

    def pods_on_node(self, node: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {k: v for k, v in self.pods.items() if (v.get("spec") or {}).get("nodeName") == node}
