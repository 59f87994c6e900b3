"""The slim row of a Pod that every agent keeps for every pod of the cluster.

An agent reads little of a remote pod: its labels and service account (identities, policy
selectors, service selectors), its node (placement), its named container ports (policy and
services resolve named ports) and whether it is terminating. The full :class:`~membrane.api.k8s.Pod`
model costs several KiB per pod; a :class:`PodRow` a few hundred bytes, and pods with the same
labels share one label mapping. The full model is kept only where the spec is needed (this
node's pods: the runner starts their containers): :attr:`PodRow.model`.

Primitives: :class:`PodRow` (built with :meth:`PodRow.of`), :data:`NamedPort`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from membrane.api import k8s
from membrane.core.protocols import PROTOCOLS

#: A named container port: (name, protocol, port), e.g. ("http", "TCP", 8080).
NamedPort = tuple[str, str, int]

_EMPTY: Mapping[str, str] = MappingProxyType({})
# Label mappings shared by pods with equal labels (replicas): bounded, cleared when full.
_SHARED_LABELS: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
_SHARED_LABELS_MAX = 8192


def _labels(labels: Mapping[str, str] | None) -> Mapping[str, str]:
    if not labels:
        return _EMPTY
    items = tuple(sorted(labels.items()))
    shared = _SHARED_LABELS.get(items)
    if shared is None:
        if len(_SHARED_LABELS) >= _SHARED_LABELS_MAX:
            _SHARED_LABELS.clear()
        shared = MappingProxyType({sys.intern(k): sys.intern(v) for k, v in items})
        _SHARED_LABELS[items] = shared
    return shared


@dataclass(frozen=True, slots=True)
class PodRow:
    """What the agent knows of one pod (see the module docstring). Immutable; equal rows are
    equal values (the full model, when kept, takes part)."""

    namespace: str
    name: str
    #: ``spec.nodeName``; "" while the pod is not placed.
    node: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    #: ``spec.serviceAccountName`` ("" when unset: Kubernetes' "default").
    service_account: str = ""
    #: Named ports of the pod's containers, in spec order.
    named_ports: tuple[NamedPort, ...] = ()
    #: The pod has a ``deletionTimestamp``: it is going away.
    terminating: bool = False
    uid: str = ""
    pod_ip: str = ""
    phase: str = ""
    #: ``podutil.IsPodReady``, lenient where membrane has no kubelet: a pod whose status has no
    #: Ready condition (placed by a CNI runtime, whose status nobody writes) counts as ready.
    ready: bool = True
    #: ``spec.hostname`` / ``spec.subdomain`` (a pod named in a headless service's DNS).
    hostname: str = ""
    subdomain: str = ""
    #: The full object, kept for this node's pods only (None elsewhere).
    model: k8s.Pod | None = field(default=None, hash=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @classmethod
    def of(cls, pod: k8s.Pod, *, keep_model: bool = True) -> PodRow:
        """The row of ``pod``; ``keep_model`` keeps the full object in :attr:`model`."""
        meta, spec, status = pod.metadata, pod.spec, pod.status
        ports = tuple((port.name, port.protocol, port.containerPort)
                      for container in spec.containers for port in container.ports or () if port.name)
        return cls(
            namespace=sys.intern(meta.namespace or "default"),
            name=meta.name or "",
            node=sys.intern(spec.nodeName or ""),
            labels=_labels(meta.labels),
            service_account=sys.intern(spec.serviceAccountName or ""),
            named_ports=ports,
            terminating=meta.deletionTimestamp is not None,
            uid=meta.uid or "",
            pod_ip=(status.podIP or "") if status is not None else "",
            phase=sys.intern((status.phase or "") if status is not None else ""),
            ready=next((c.status == "True" for c in (status.conditions if status else None) or ()
                        if c.type == "Ready"), True),
            hostname=spec.hostname or "",
            subdomain=spec.subdomain or "",
            model=pod if keep_model else None,
        )

    def policy_named_ports(self) -> dict[str, frozenset[tuple[int, int]]]:
        """The named ports as policy resolves them: name (lower case) → {(protocol number, port)}
        (what :func:`membrane.policy.mapstate.named_ports_of` gives for the spec)."""
        found: dict[str, set[tuple[int, int]]] = {}
        for name, protocol, port in self.named_ports:
            found.setdefault(name.lower(), set()).add((PROTOCOLS[protocol], port))
        return {name: frozenset(ports) for name, ports in found.items()}
