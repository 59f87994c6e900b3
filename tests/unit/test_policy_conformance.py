"""Reachability conformance: the Kubernetes network policy e2e cases, and Cilium's own.

Every case applies policies to the upstream e2e model (namespaces x, y, z; pods a, b, c labelled
``pod=<name>``; namespaces labelled ``ns=<name>`` and ``kubernetes.io/metadata.name``; ports 80/81
over TCP, UDP and SCTP on named ports ``serve-80-tcp`` ...) and compares the whole truth table the
engine computes with the expected one. Rows are sources, columns destinations; ``.`` connects,
``X`` does not. Cases that probe the outside use two addresses outside the cluster: ``ext1`` =
198.51.100.10 and ``ext2`` = 198.51.100.200.

The tables include loopback (a pod to itself) as policy decides it; the upstream suite ignores
loopback, and a kernel run of these tables may too. A NetworkPolicy ``ipBlock`` matches the
peer's address as upstream expects (pods included); Cilium's own ``toCIDR``/``fromCIDR`` keep
Cilium's semantics (a CIDR identity: pods keep their own), and the Cilium cases say so.

The probe is pluggable (:data:`membrane.policy.reachability.Probe`); here every table is checked
against the compiled map state and against the rendered nft elements (looked up as the kernel does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from membrane.api.manifest import parse_manifest_text
from membrane.datapath.policy import rendered_probe
from membrane.policy.mapstate import EnforcementConfig
from membrane.policy.reachability import NetpolModel, Reachability, default_model, engine_probe, probe_matrix

OUTSIDE = {"ext1": "198.51.100.10", "ext2": "198.51.100.200"}


@dataclass(frozen=True)
class Case:
    name: str
    policies: str
    expect: dict[str, str]  # "TCP/80" -> table
    config: EnforcementConfig = field(default_factory=EnforcementConfig)
    pod_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)


def model_for(case: Case) -> NetpolModel:
    return default_model(outside=OUTSIDE, pod_labels=case.pod_labels, namespace_labels=case.namespace_labels)


# --- tables used by several cases --------------------------------------------------------------------------

ALL_OPEN = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""

NOTHING_INTO_X = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   .   .   .   .   .   .
x/b  X   X   X   .   .   .   .   .   .
x/c  X   X   X   .   .   .   .   .   .
y/a  X   X   X   .   .   .   .   .   .
y/b  X   X   X   .   .   .   .   .   .
y/c  X   X   X   .   .   .   .   .   .
z/a  X   X   X   .   .   .   .   .   .
z/b  X   X   X   .   .   .   .   .   .
z/c  X   X   X   .   .   .   .   .   .
"""

NOTHING_OUT_OF_X = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   X   X   X   X   X   X
x/b  X   X   X   X   X   X   X   X   X
x/c  X   X   X   X   X   X   X   X   X
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""

NOTHING_INTO_XA = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""

NOTHING_OUT_OF_XA = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   X   X   X   X   X   X
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""

ONLY_XB_INTO_XA = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""

ONLY_NS_Y_INTO_XA = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""

ONLY_YA_INTO_XA = """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""

# With the two outside addresses as sources and destinations.
ALL_OPEN_EXT = """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  .    .    .    .    .    .    .    .    .    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""


# --- policies ------------------------------------------------------------------------------------------------

DENY_INGRESS_X = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"""

K8S_CASES = [
    Case(
        "default-deny-ingress",
        DENY_INGRESS_X,
        {"TCP/80": NOTHING_INTO_X, "UDP/80": NOTHING_INTO_X, "SCTP/80": NOTHING_INTO_X},
    ),
    Case(
        "default-deny-all",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   X   X   X   X   X   X
x/b  X   X   X   X   X   X   X   X   X
x/c  X   X   X   X   X   X   X   X   X
y/a  X   X   X   .   .   .   .   .   .
y/b  X   X   X   .   .   .   .   .   .
y/c  X   X   X   .   .   .   .   .   .
z/a  X   X   X   .   .   .   .   .   .
z/b  X   X   X   .   .   .   .   .   .
z/c  X   X   X   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "allow-from-pods-within-namespace-by-pod-selector",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-a-allows-x-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
""",
        {"TCP/80": ONLY_XB_INTO_XA},
    ),
    Case(
        "allow-ingress-for-a-target",
        DENY_INGRESS_X
        + """
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-to-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {}
      namespaceSelector: {}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   X   X   .   .   .   .   .   .
x/b  .   X   X   .   .   .   .   .   .
x/c  .   X   X   .   .   .   .   .   .
y/a  .   X   X   .   .   .   .   .   .
y/b  .   X   X   .   .   .   .   .   .
y/c  .   X   X   .   .   .   .   .   .
z/a  .   X   X   .   .   .   .   .   .
z/b  .   X   X   .   .   .   .   .   .
z/c  .   X   X   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "allow-ingress-from-pods-in-all-namespaces",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-another-ns, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {}
""",
        {"TCP/80": ALL_OPEN},
    ),
    Case(
        "allow-only-from-a-different-namespace-by-namespace-selector",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA},
    ),
    Case(
        "pod-selector-with-match-expressions",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-a-allows-x-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchExpressions: [{key: pod, operator: In, values: [b]}]
""",
        {"TCP/80": ONLY_XB_INTO_XA},
    ),
    Case(
        "namespace-selector-with-match-expressions",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-match-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y]}]
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA},
    ),
    Case(
        "pod-selector-or-namespace-selector",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-match-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]
    - podSelector: {matchLabels: {pod: b}}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "pod-selector-and-namespace-selector",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-podselector-and-nsselector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]
      podSelector: {matchLabels: {pod: b}}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "multiple-pod-selectors-and-namespace-selectors",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-z-pod-b-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]
      podSelector:
        matchExpressions: [{key: pod, operator: In, values: [b, c]}]
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "any-pod-selectors",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-x-pod-b-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - podSelector: {matchLabels: {pod: c}}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "only-from-a-pod-in-a-different-namespace",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-pod-a-via-namespace-pod-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
      podSelector: {matchLabels: {pod: a}}
""",
        {"TCP/80": ONLY_YA_INTO_XA, "UDP/80": ONLY_YA_INTO_XA, "SCTP/80": ONLY_YA_INTO_XA},
    ),
    Case(
        "ports",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    ports:
    - {port: 81, protocol: TCP}
""",
        {"TCP/81": ONLY_NS_Y_INTO_XA, "TCP/80": NOTHING_INTO_XA, "UDP/81": NOTHING_INTO_XA},
    ),
    Case(
        "ports-udp",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-on-port-81-ns-x, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    ports:
    - {port: 81, protocol: UDP}
""",
        {"UDP/81": ONLY_NS_Y_INTO_XA, "TCP/81": NOTHING_INTO_XA},
    ),
    Case(
        "ports-sctp",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-on-port-81-ns-x, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    ports:
    - {port: 81, protocol: SCTP}
""",
        {"SCTP/81": ONLY_NS_Y_INTO_XA, "TCP/81": NOTHING_INTO_XA},
    ),
    Case(
        "multiple-stacked-policies-with-overlapping-pod-selectors",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    ports:
    - {port: 81, protocol: TCP}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    ports:
    - {port: 80, protocol: TCP}
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA, "TCP/81": ONLY_NS_Y_INTO_XA},
    ),
    Case(
        "allow-all",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - {}
""",
        {"TCP/80": ALL_OPEN, "TCP/81": ALL_OPEN, "UDP/80": ALL_OPEN},
    ),
    Case(
        "ingress-on-one-named-port",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - port: serve-81-tcp
""",
        {"TCP/81": ALL_OPEN, "TCP/80": NOTHING_INTO_X, "UDP/81": NOTHING_INTO_X},
    ),
    Case(
        "ingress-from-namespace-on-one-named-port",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    ports:
    - {port: serve-80-tcp, protocol: TCP}
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA, "TCP/81": NOTHING_INTO_XA},
    ),
    Case(
        # A named port with the wrong protocol resolves to nothing.
        "named-port-protocol-must-match",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: udp-name-over-tcp, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - {port: serve-80-udp, protocol: TCP}
""",
        {"TCP/80": NOTHING_INTO_XA, "UDP/80": NOTHING_INTO_XA},
    ),
    Case(
        "egress-on-one-named-port",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports:
    - port: serve-80-tcp
""",
        {"TCP/80": ALL_OPEN, "TCP/81": NOTHING_OUT_OF_X},
    ),
    Case(
        "updated-policy-allow-all-then-deny-all",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-mutate-to-deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress: []
""",
        {"TCP/81": NOTHING_INTO_X},
    ),
    Case(
        "ingress-from-updated-namespace-before",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns2: updated}}
""",
        {"TCP/80": NOTHING_INTO_XA},
    ),
    Case(
        "ingress-from-updated-namespace-after",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns2: updated}}
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA},
        namespace_labels={"y": {"ns2": "updated"}},
    ),
    Case(
        "ingress-from-updated-pod-before",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-pod-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b, pod2: updated}}
""",
        {"TCP/80": NOTHING_INTO_XA},
    ),
    Case(
        "ingress-from-updated-pod-after",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-pod-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b, pod2: updated}}
""",
        {"TCP/80": ONLY_XB_INTO_XA},
        pod_labels={"x/b": {"pod2": "updated"}},
    ),
    Case(
        "deny-ingress-from-pods-on-other-namespaces",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-empty-policy, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   .   .   .   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  X   X   X   .   .   .   .   .   .
y/b  X   X   X   .   .   .   .   .   .
y/c  X   X   X   .   .   .   .   .   .
z/a  X   X   X   .   .   .   .   .   .
z/b  X   X   X   .   .   .   .   .   .
z/c  X   X   X   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "deny-ingress-to-updated-pod-before",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress-via-label-selector, namespace: x}
spec:
  podSelector: {matchLabels: {target: isolated}}
  policyTypes: [Ingress]
""",
        {"TCP/80": ALL_OPEN},
    ),
    Case(
        "deny-ingress-to-updated-pod-after",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress-via-label-selector, namespace: x}
spec:
  podSelector: {matchLabels: {target: isolated}}
  policyTypes: [Ingress]
""",
        {"TCP/80": NOTHING_INTO_XA},
        pod_labels={"x/a": {"target": "isolated"}},
    ),
    Case(
        "deny-egress-by-pod-selector",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress-pod-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
""",
        {"TCP/80": NOTHING_OUT_OF_XA},
    ),
    Case(
        "deny-egress-from-all-pods-in-a-namespace",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress-ns-x, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
""",
        {"TCP/80": NOTHING_OUT_OF_X},
    ),
    Case(
        "ingress-and-egress-together",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-pod-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress, Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
  egress:
  - ports:
    - port: 80
""",
        {
            "TCP/80": ONLY_XB_INTO_XA,
            "TCP/81": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   X   X   X   X   X   X
x/b  .   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
""",
        },
    ),
    Case(
        "egress-denied-on-the-client-even-if-the-server-allows",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-to-ns-y-pod-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
      podSelector: {matchLabels: {pod: a}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-xa-on-ya-match-selector, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}
      podSelector: {matchLabels: {pod: a}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-xa-on-yb-match-selector, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}
      podSelector: {matchLabels: {pod: a}}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   .   X   X   X   X   X
x/b  .   .   .   X   X   .   .   .   .
x/c  .   .   .   X   X   .   .   .   .
y/a  .   .   .   X   X   .   .   .   .
y/b  .   .   .   X   X   .   .   .   .
y/c  .   .   .   X   X   .   .   .   .
z/a  .   .   .   X   X   .   .   .   .
z/b  .   .   .   X   X   .   .   .   .
z/c  .   .   .   X   X   .   .   .   .
"""
        },
    ),
    Case(
        "egress-to-a-pod-in-a-different-namespace",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-to-ns-y-pod-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
      podSelector: {matchLabels: {pod: a}}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   .   X   X   X   X   X
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "any-port-on-a-specific-protocol",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-by-proto, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - protocol: TCP
""",
        {"TCP/80": ALL_OPEN, "TCP/81": ALL_OPEN, "UDP/80": NOTHING_INTO_XA},
    ),
    Case(
        "multiple-ingress-policies-port-80-only",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-port-80, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - port: 80
""",
        {"TCP/81": NOTHING_INTO_X, "TCP/80": ALL_OPEN},
    ),
    Case(
        "multiple-ingress-policies-allow-all-takes-precedence",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-port-80, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - port: 80
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - {}
""",
        {"TCP/81": ALL_OPEN},
    ),
    Case(
        "multiple-egress-policies-port-80-only",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-egress-port-80, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports:
    - port: 80
""",
        {"TCP/81": NOTHING_OUT_OF_X, "TCP/80": ALL_OPEN},
    ),
    Case(
        "multiple-egress-policies-allow-all-takes-precedence",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-egress-port-80, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports:
    - port: 80
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - {}
""",
        {"TCP/81": ALL_OPEN},
    ),
    Case("policies-deleted", "", {"TCP/80": ALL_OPEN}),
    Case(
        # Upstream: an ipBlock matches the peer's address, pods included; x/a reaches only y/b.
        "egress-to-server-in-cidr-block",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.2.11/32}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    X    X    X    .    X    X    X    X    X    X
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # Upstream: x/a egress to x/a's address/4 (0.0.0.0/4: every pod, not the outside) except
        # x/b/32; only x/a -> x/b is blocked among the pods.
        "except-clause-egress-cidr-block",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.1.10/4, except: [10.244.1.11/32]}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  .    X    .    .    .    .    .    .    .    X    X
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # Upstream, right after the previous case: the same policy replaced by one whose cidr is
        # exactly the address the old one excepted; x/a now reaches x/b and nothing else.
        "cidr-of-the-former-except-replaces-the-policy",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.1.11/32}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    .    X    X    X    X    X    X    X    X    X
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # Upstream: an except is no deny. A second policy allowing the excepted pod address wins.
        "except-is-not-a-deny",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.1.10/4, except: [10.244.1.11/32]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-to-xb, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.244.1.11/32}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  .    .    .    .    .    .    .    .    .    X    X
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # Upstream: ingress into x/a from y/b's address only.
        "ingress-from-pod-address-in-cidr-block",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-from-yb-address, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: 10.244.2.11/32}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    .    .    .    .    .    .    .    .    .    .
x/b  X    .    .    .    .    .    .    .    .    .    .
x/c  X    .    .    .    .    .    .    .    .    .    .
y/a  X    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  X    .    .    .    .    .    .    .    .    .    .
z/a  X    .    .    .    .    .    .    .    .    .    .
z/b  X    .    .    .    .    .    .    .    .    .    .
z/c  X    .    .    .    .    .    .    .    .    .    .
ext1 X    .    .    .    .    .    .    .    .    .    .
ext2 X    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # Upstream: ingress into x/a from 0.0.0.0/4 (every pod, not the outside) except y/b.
        "ingress-from-cidr-block-except-one-pod",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-except-yb, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: 10.244.1.10/4, except: [10.244.2.11/32]}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  .    .    .    .    .    .    .    .    .    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  X    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 X    .    .    .    .    .    .    .    .    .    .
ext2 X    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        "egress-to-outside-cidr-block-with-except",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    X    X    X    X    X    X    X    X    .    X
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # An address in one policy's except and another policy's cidr is allowed (allows are a union).
        "address-in-both-cidr-and-except-is-allowed",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-to-ext2, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 198.51.100.200/32}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    X    X    X    X    X    X    X    X    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        "ingress-from-outside-cidr-block",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-outside, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: 198.51.100.0/25}
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    .    .    .    .    .    .    .    .    .    .
x/b  X    .    .    .    .    .    .    .    .    .    .
x/c  X    .    .    .    .    .    .    .    .    .    .
y/a  X    .    .    .    .    .    .    .    .    .    .
y/b  X    .    .    .    .    .    .    .    .    .    .
y/c  X    .    .    .    .    .    .    .    .    .    .
z/a  X    .    .    .    .    .    .    .    .    .    .
z/b  X    .    .    .    .    .    .    .    .    .    .
z/c  X    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 X    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        "ingress-and-egress-controlled-independently",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-egress-for-target, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress-via-label-selector, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
""",
        {"TCP/80": NOTHING_INTO_XA},
    ),
    Case(
        "sctp-is-not-tcp",
        DENY_INGRESS_X
        + """
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-only-sctp-ingress-on-port-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - {port: 81, protocol: SCTP}
""",
        {
            "TCP/81": NOTHING_INTO_X,
            "SCTP/81": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   X   X   .   .   .   .   .   .
x/b  .   X   X   .   .   .   .   .   .
x/c  .   X   X   .   .   .   .   .   .
y/a  .   X   X   .   .   .   .   .   .
y/b  .   X   X   .   .   .   .   .   .
y/c  .   X   X   .   .   .   .   .   .
z/a  .   X   X   .   .   .   .   .   .
z/b  .   X   X   .   .   .   .   .   .
z/c  .   X   X   .   .   .   .   .   .
""",
        },
    ),
    Case(
        "pods-selected-by-an-sctp-allow-are-isolated",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-only-sctp-ingress-on-port-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - {port: 80, protocol: SCTP}
""",
        {"TCP/81": NOTHING_INTO_XA, "SCTP/80": ALL_OPEN},
    ),
    Case(
        "tcp-not-allowed-by-a-udp-only-policy",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-only-udp-ingress-on-port-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - {port: 81, protocol: UDP}
""",
        {"TCP/81": NOTHING_INTO_XA, "UDP/81": ALL_OPEN},
    ),
    Case(
        "namespace-selector-match-labels-default-ns-label",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-a-via-ns-selector-for-immutable-ns-label, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA},
    ),
    Case(
        "namespace-selector-match-expressions-default-ns-label-egress",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-match-selector-for-immutable-ns-label, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}]
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   X   X   X   .   .   .
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "end-port-range",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-port-range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
    ports:
    - {port: 79, endPort: 81, protocol: TCP}
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA, "TCP/81": ONLY_NS_Y_INTO_XA, "UDP/80": NOTHING_INTO_XA},
    ),
    Case(
        "end-port-range-excluding-80",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-port-range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - {port: 81, endPort: 8080, protocol: TCP}
""",
        {"TCP/80": NOTHING_INTO_XA, "TCP/81": ALL_OPEN},
    ),
    Case(
        # Without policyTypes the API server defaults them from the rules present: an egress rule
        # makes it Ingress + Egress, so the pod is isolated for ingress too.
        "policy-types-defaulted-from-rules",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-rules-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - to:
    - podSelector: {}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   X   X   X   X   X   X
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  X   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        # Ingress rules in a policy whose policyTypes name only Egress do not apply.
        "rules-of-unlisted-policy-type-are-ignored",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
  egress:
  - {}
""",
        {"TCP/80": ALL_OPEN},
    ),
]


CILIUM_CASES = [
    Case(
        # fromEndpoints in a CNP stay within the policy's namespace.
        "cnp-from-endpoints-implicit-namespace",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-from-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: b}
""",
        {"TCP/80": ONLY_XB_INTO_XA, "UDP/81": ONLY_XB_INTO_XA},
    ),
    Case(
        "cnp-from-endpoints-other-namespace",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-from-yb, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: b, k8s:io.kubernetes.pod.namespace: y}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  X   .   .   .   .   .   .   .   .
y/a  X   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  X   .   .   .   .   .   .   .   .
z/a  X   .   .   .   .   .   .   .   .
z/b  X   .   .   .   .   .   .   .   .
z/c  X   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        # fromEndpoints [{}] in a CNP: every pod of the policy's namespace.
        "cnp-empty-endpoint-selector-is-the-namespace",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: same-namespace, namespace: x}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  .    .    .    .    .    .    .    .    .    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  X    X    X    .    .    .    .    .    .    .    .
y/b  X    X    X    .    .    .    .    .    .    .    .
y/c  X    X    X    .    .    .    .    .    .    .    .
z/a  X    X    X    .    .    .    .    .    .    .    .
z/b  X    X    X    .    .    .    .    .    .    .    .
z/c  X    X    X    .    .    .    .    .    .    .    .
ext1 X    X    X    .    .    .    .    .    .    .    .
ext2 X    X    X    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # fromEndpoints [{}] in a CCNP: every pod of every namespace, but not the outside.
        "ccnp-empty-endpoint-selector-is-every-pod",
        """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: pods-only}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{}]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  .    .    .    .    .    .    .    .    .    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 X    .    .    X    .    .    X    .    .    .    .
ext2 X    .    .    X    .    .    X    .    .    .    .
"""
        },
    ),
    Case(
        "entity-world",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-from-world, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEntities: [world]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    .    .    .    .    .    .    .    .    .    .
x/b  X    .    .    .    .    .    .    .    .    .    .
x/c  X    .    .    .    .    .    .    .    .    .    .
y/a  X    .    .    .    .    .    .    .    .    .    .
y/b  X    .    .    .    .    .    .    .    .    .    .
y/c  X    .    .    .    .    .    .    .    .    .    .
z/a  X    .    .    .    .    .    .    .    .    .    .
z/b  X    .    .    .    .    .    .    .    .    .    .
z/c  X    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        "entity-cluster",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-from-cluster, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEntities: [cluster]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  .    .    .    .    .    .    .    .    .    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 X    .    .    .    .    .    .    .    .    .    .
ext2 X    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        "entity-all",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-from-all, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEntities: [all]
""",
        {"TCP/80": ALL_OPEN_EXT},
    ),
    Case(
        "entity-world-egress",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-to-world, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toEntities: [world]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    X    X    X    X    X    X    X    X    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        "entity-none-isolates-without-allowing",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-none, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEntities: [none]
""",
        {"TCP/80": NOTHING_INTO_XA},
    ),
    Case(
        "cidr-set-with-except",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-to-cidr, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDRSet:
    - cidr: 198.51.100.0/24
      except: [198.51.100.128/25]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    X    X    X    X    X    X    X    X    .    X
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # Unlike a NetworkPolicy ipBlock, a CNP toCIDR naming a pod's address does not match the pod
        # (its own identity wins in the ipcache): x/a is isolated with nothing allowed.
        "to-cidr-of-a-pod-address-is-not-the-pod",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-to-yb-address, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDR: [10.244.2.11/32]
""",
        {"TCP/80": NOTHING_OUT_OF_XA},
    ),
    Case(
        # 0.0.0.0/0 is the world: the outside, but no pod (pods keep their identities).
        "cidr-everything-is-world-not-pods",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-to-anywhere, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDR: [0.0.0.0/0]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    X    X    X    X    X    X    X    X    .    .
x/b  .    .    .    .    .    .    .    .    .    .    .
x/c  .    .    .    .    .    .    .    .    .    .    .
y/a  .    .    .    .    .    .    .    .    .    .    .
y/b  .    .    .    .    .    .    .    .    .    .    .
y/c  .    .    .    .    .    .    .    .    .    .    .
z/a  .    .    .    .    .    .    .    .    .    .    .
z/b  .    .    .    .    .    .    .    .    .    .    .
z/c  .    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 .    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        "from-cidr-single-address",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-from-ext1, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromCIDR: [198.51.100.10]
""",
        {
            "TCP/80": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    .    .    .    .    .    .    .    .    .    .
x/b  X    .    .    .    .    .    .    .    .    .    .
x/c  X    .    .    .    .    .    .    .    .    .    .
y/a  X    .    .    .    .    .    .    .    .    .    .
y/b  X    .    .    .    .    .    .    .    .    .    .
y/c  X    .    .    .    .    .    .    .    .    .    .
z/a  X    .    .    .    .    .    .    .    .    .    .
z/b  X    .    .    .    .    .    .    .    .    .    .
z/c  X    .    .    .    .    .    .    .    .    .    .
ext1 .    .    .    .    .    .    .    .    .    .    .
ext2 X    .    .    .    .    .    .    .    .    .    .
"""
        },
    ),
    Case(
        # A deny in one policy wins over an allow-all in another, whatever the order.
        "deny-takes-precedence",
        """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: allow-everything-into-x}
spec:
  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: x}}
  ingress:
  - fromEntities: [all]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-b, namespace: x}
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {pod: b}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   .   .   .   .   .   .
x/b  X   X   X   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        # Deny a port for everyone while another rule allows all ports from a peer.
        "deny-port-wins-over-allow-all-ports",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: y}
  ingressDeny:
  - toPorts:
    - ports: [{port: "81", protocol: TCP}]
""",
        {"TCP/80": ONLY_NS_Y_INTO_XA, "TCP/81": NOTHING_INTO_XA, "UDP/81": ONLY_NS_Y_INTO_XA},
    ),
    Case(
        "egress-deny",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-no-z, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toEntities: [all]
  egressDeny:
  - toEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: z}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   .   .   .   X   X   X
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "port-range",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-range, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - toPorts:
    - ports: [{port: "81", endPort: 90}]
""",
        {"TCP/81": ALL_OPEN, "UDP/81": ALL_OPEN, "SCTP/81": ALL_OPEN, "TCP/80": NOTHING_INTO_XA},
    ),
    Case(
        # A port with protocol ANY is TCP, UDP and SCTP.
        "any-protocol",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-80-any, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: b}
    toPorts:
    - ports: [{port: "80", protocol: ANY}]
""",
        {
            "TCP/80": ONLY_XB_INTO_XA,
            "UDP/80": ONLY_XB_INTO_XA,
            "SCTP/80": ONLY_XB_INTO_XA,
            "TCP/81": NOTHING_INTO_XA,
        },
    ),
    Case(
        "named-port-in-cnp",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-named, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - toPorts:
    - ports: [{port: serve-81-udp, protocol: UDP}]
""",
        {"UDP/81": ALL_OPEN, "UDP/80": NOTHING_INTO_XA, "TCP/81": NOTHING_INTO_XA},
    ),
    Case(
        # Egress to a named port resolves on the destination pods.
        "named-port-egress-in-cnp",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-named-egress, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: y}
    toPorts:
    - ports: [{port: serve-81-tcp}]
""",
        {
            "TCP/81": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   .   .   .   X   X   X
x/b  .   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
""",
            "TCP/80": NOTHING_OUT_OF_XA,
        },
    ),
    Case(
        # enableDefaultDeny false: the allow adds nothing, the endpoint stays open.
        "enable-default-deny-false",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-open, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: b}
""",
        {"TCP/80": ALL_OPEN},
    ),
    Case(
        # ... but its deny rules still apply.
        "enable-default-deny-false-with-deny",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-deny-only, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {pod: b}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   .   .   .   .   .   .
x/b  X   .   .   .   .   .   .   .   .
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  .   .   .   .   .   .   .   .   .
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        # Another policy that does isolate wins: one default-deny request is enough.
        "enable-default-deny-false-next-to-an-isolating-policy",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-open, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: b}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-isolate, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - {}
""",
        {"TCP/80": ONLY_XB_INTO_XA},
    ),
    Case(
        # Ports without any L3 member: every peer, including the outside.
        "to-ports-only-is-the-l3-wildcard",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-port-80, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
""",
        {
            "TCP/80": ALL_OPEN_EXT,
            "TCP/81": """
-    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c  ext1 ext2
x/a  X    .    .    .    .    .    .    .    .    .    .
x/b  X    .    .    .    .    .    .    .    .    .    .
x/c  X    .    .    .    .    .    .    .    .    .    .
y/a  X    .    .    .    .    .    .    .    .    .    .
y/b  X    .    .    .    .    .    .    .    .    .    .
y/c  X    .    .    .    .    .    .    .    .    .    .
z/a  X    .    .    .    .    .    .    .    .    .    .
z/b  X    .    .    .    .    .    .    .    .    .    .
z/c  X    .    .    .    .    .    .    .    .    .    .
ext1 X    .    .    .    .    .    .    .    .    .    .
ext2 X    .    .    .    .    .    .    .    .    .    .
""",
        },
    ),
    Case(
        # An L3 member given as an empty list selects nothing, even with ports.
        "empty-from-endpoints-selects-nothing",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-empty, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: []
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
""",
        {"TCP/80": NOTHING_INTO_XA},
    ),
    Case(
        "ccnp-egress-only-within-namespace-x",
        """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: only-to-x}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: x}
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   X   X   X   X   X   X
x/b  .   .   .   X   X   X   X   X   X
x/c  .   .   .   X   X   X   X   X   X
y/a  .   .   .   X   X   X   X   X   X
y/b  .   .   .   X   X   X   X   X   X
y/c  .   .   .   X   X   X   X   X   X
z/a  .   .   .   X   X   X   X   X   X
z/b  .   .   .   X   X   X   X   X   X
z/c  .   .   .   X   X   X   X   X   X
"""
        },
    ),
    Case(
        # fromRequires narrows the fromEndpoints of every rule selecting the same endpoint.
        "from-requires",
        """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: require-namespace-y}
spec:
  endpointSelector: {}
  ingress:
  - fromRequires:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: y}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: allow-pods}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   X   X   X   X   X   X
x/b  X   X   X   X   X   X   X   X   X
x/c  X   X   X   X   X   X   X   X   X
y/a  .   .   .   .   .   .   .   .   .
y/b  .   .   .   .   .   .   .   .   .
y/c  .   .   .   .   .   .   .   .   .
z/a  X   X   X   X   X   X   X   X   X
z/b  X   X   X   X   X   X   X   X   X
z/c  X   X   X   X   X   X   X   X   X
"""
        },
    ),
    Case(
        # NetworkPolicy, CNP and CCNP combine: allows are a union, a deny wins.
        "kinds-combine",
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: xa-from-xb, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-from-xc, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: c}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-b-anywhere}
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {pod: b}
  ingress:
  - fromEntities: [all]
""",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  .   .   .   .   .   .   .   .   .
x/b  X   X   X   X   X   X   X   X   X
x/c  .   .   .   .   .   .   .   .   .
y/a  .   .   .   .   .   .   .   .   .
y/b  X   X   X   X   X   X   X   X   X
y/c  .   .   .   .   .   .   .   .   .
z/a  .   .   .   .   .   .   .   .   .
z/b  X   X   X   X   X   X   X   X   X
z/c  .   .   .   .   .   .   .   .   .
"""
        },
    ),
    Case(
        "audit-mode-lets-everything-pass",
        DENY_INGRESS_X,
        {"TCP/80": ALL_OPEN},
        config=EnforcementConfig(audit=True),
    ),
    Case(
        "audit-mode-per-namespace",
        DENY_INGRESS_X
        + """
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress]
""",
        {"TCP/80": NOTHING_INTO_X},
        config=EnforcementConfig(audit_namespaces=frozenset({"y"})),
    ),
    Case(
        "enforcement-always-isolates-everything",
        "",
        {
            "TCP/80": """
-   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a  X   X   X   X   X   X   X   X   X
x/b  X   X   X   X   X   X   X   X   X
x/c  X   X   X   X   X   X   X   X   X
y/a  X   X   X   X   X   X   X   X   X
y/b  X   X   X   X   X   X   X   X   X
y/c  X   X   X   X   X   X   X   X   X
z/a  X   X   X   X   X   X   X   X   X
z/b  X   X   X   X   X   X   X   X   X
z/c  X   X   X   X   X   X   X   X   X
"""
        },
        config=EnforcementConfig(mode="always"),
    ),
    Case(
        "enforcement-never-enforces-nothing",
        DENY_INGRESS_X,
        {"TCP/80": ALL_OPEN},
        config=EnforcementConfig(mode="never"),
    ),
    Case(
        # With enable-non-default-deny-policies off, enableDefaultDeny: false is ignored.
        "non-default-deny-policies-disabled",
        """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xa-open, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: b}
""",
        {"TCP/80": ONLY_XB_INTO_XA},
        config=EnforcementConfig(non_default_deny_policies=False),
    ),
]

CASES = K8S_CASES + CILIUM_CASES


PROBES = {"engine": engine_probe, "rendered": rendered_probe}


@pytest.mark.parametrize("probe_kind", PROBES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reachability_matches_the_expected_truth_table(case: Case, probe_kind: str) -> None:
    """``engine``: the compiled map state; ``rendered``: the nft elements the kernel would load."""
    model = model_for(case)
    compiled = model.compile(parse_manifest_text(case.policies), case.config)
    probe = PROBES[probe_kind](model, compiled)
    for port_spec, table in case.expect.items():
        protocol, port = port_spec.split("/")
        expected = Reachability.parse(table)
        observed = probe_matrix(probe, expected.sources, expected.destinations, protocol, int(port))
        assert not expected.mismatches(observed), f"{case.name} {port_spec}\n{expected.comparison(observed)}"


def test_every_case_expects_some_isolation_or_is_an_explicit_open_case() -> None:
    # Guards against tables that could never fail because nothing in them is ever denied.
    open_cases = {
        "allow-ingress-from-pods-in-all-namespaces",
        "policies-deleted",
        "deny-ingress-to-updated-pod-before",
        "rules-of-unlisted-policy-type-are-ignored",
        "enable-default-deny-false",
        "entity-all",
        "audit-mode-lets-everything-pass",
        "enforcement-never-enforces-nothing",
        "multiple-ingress-policies-allow-all-takes-precedence",
        "multiple-egress-policies-allow-all-takes-precedence",
        "allow-all",
    }
    for case in CASES:
        denies = any("X" in table for table in case.expect.values())
        assert denies or case.name in open_cases, case.name


def test_a_mismatch_is_reported_as_readable_tables() -> None:
    expected = Reachability.parse(NOTHING_INTO_X)
    observed = Reachability.parse(ALL_OPEN)
    report = expected.comparison(observed)
    assert report.startswith("expected:\n-   x/a  x/b")
    assert "comparison (X = differs):" in report
    assert len(expected.mismatches(observed)) == 27


def test_tables_round_trip_through_text() -> None:
    table = Reachability.parse(NOTHING_OUT_OF_XA)
    assert Reachability.parse(table.format()) == table
    with pytest.raises(ValueError, match="expected 9 cells"):
        Reachability.parse("- x/a x/b x/c y/a y/b y/c z/a z/b z/c\nx/a . .")
