"""Labels in Cilium's ``source:key=value`` form, the identity-relevant filter, and canonical sets.

Primitives: :class:`Label`, :func:`identity_labels_for_pod` (the label set an endpoint's identity
is derived from), :func:`canonical` (the sorted string list identities are keyed by).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"

POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"


@dataclass(frozen=True, order=True, slots=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"

    @classmethod
    def parse(cls, text: str, default_source: str = SOURCE_K8S) -> Label:
        """``k8s:app=web``, ``reserved:host``, ``app=web`` (source defaults to k8s)."""
        source, sep, rest = text.partition(":")
        if not sep or "=" in source or "/" in source:
            source, rest = default_source, text
        key, _, value = rest.partition("=")
        return cls(source, key, value)


# Cilium's default identity-relevant label filter (pkg/labelsfilter): these prefixes never make an
# identity, because they are per-pod (names, hashes) and would give every pod its own identity.
_IGNORED_KEY_PATTERNS = [
    re.compile(p)
    for p in (
        r"^io\.kubernetes(?!\.pod\.namespace$)",
        r"^kubernetes\.io",
        r"beta\.kubernetes\.io",
        r"^k8s\.io",
        r"^statefulset\.kubernetes\.io/pod-name$",
        r"^apps\.kubernetes\.io/pod-index$",
        r"^batch\.kubernetes\.io/job-completion-index$",
        r"^batch\.kubernetes\.io/controller-uid$",
        r"^pod-template-generation$",
        r"^pod-template-hash$",
        r"^controller-revision-hash$",
        r"^controller-uid$",
        r"^annotation\.",
        r"^etcd_node$",
        r"^topology\.kubernetes\.io",
    )
]


def is_identity_relevant(key: str) -> bool:
    if key.startswith(("io.cilium.k8s.namespace.labels", "io.cilium.k8s.policy.", "app.kubernetes.io")):
        return True
    return not any(p.search(key) for p in _IGNORED_KEY_PATTERNS)


def identity_labels_for_pod(
    namespace: str,
    pod_labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    service_account: str = "default",
    cluster: str = "default",
) -> frozenset[Label]:
    """The label set Cilium derives a pod's identity from (all with source ``k8s``)."""
    labels = {Label(SOURCE_K8S, k, v) for k, v in pod_labels.items() if is_identity_relevant(k)}
    labels.add(Label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace))
    ns_labels = dict(namespace_labels)
    ns_labels.setdefault("kubernetes.io/metadata.name", namespace)
    labels.update(Label(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + k, v) for k, v in ns_labels.items())
    labels.add(Label(SOURCE_K8S, SERVICE_ACCOUNT_LABEL, service_account))
    labels.add(Label(SOURCE_K8S, CLUSTER_LABEL, cluster))
    return frozenset(labels)


def canonical(labels: Iterable[Label]) -> list[str]:
    """The sorted string form: two label sets get the same identity iff their canonical forms are equal."""
    return sorted(str(label) for label in labels)


def parse_labels(texts: Iterable[str]) -> frozenset[Label]:
    return frozenset(Label.parse(t) for t in texts)
