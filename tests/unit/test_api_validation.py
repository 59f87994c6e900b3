# ruff: noqa: E501 -- the expected error lines are compared verbatim and read best unbroken
"""Every way a manifest can be wrong gets exactly one line naming file, object, field path and reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from membrane.api.manifest import load_objects
from membrane.core.errors import InvalidInput

POD = """
apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  containers:
  - name: web
    image: nginx
"""

# (id, manifest, expected problem lines with FILE for the file name)
CASES: list[tuple[str, str, list[str]]] = [
    # --- Pod
    (
        "pod-misspelled-field",
        POD.replace("image: nginx", "imagee: nginx"),
        ["FILE: Pod/web: spec.containers[0].imagee: unknown field"],
    ),
    (
        "pod-port-as-string",
        POD + "    ports:\n    - containerPort: '80'\n",
        ["FILE: Pod/web: spec.containers[0].ports[0].containerPort: must be an integer"],
    ),
    (
        "pod-port-out-of-range",
        POD + "    ports:\n    - containerPort: 70000\n",
        [
            "FILE: Pod/web: spec.containers[0].ports[0].containerPort: invalid value 70000: must be between 1 and 65535, inclusive"
        ],
    ),
    (
        "pod-bad-port-name",
        POD + "    ports:\n    - containerPort: 80\n      name: Web_Port\n",
        [
            'FILE: Pod/web: spec.containers[0].ports[0].name: invalid value "Web_Port": '
            "a port name must contain only lowercase alphanumerics or '-' and at least one letter"
        ],
    ),
    (
        "pod-duplicate-container",
        POD + "  - name: web\n",
        ['FILE: Pod/web: spec.containers[1].name: duplicate value "web"'],
    ),
    (
        "pod-duplicate-port-name",
        POD + "    ports:\n    - {containerPort: 80, name: http}\n  - name: side\n    ports:\n"
        "    - {containerPort: 81, name: http}\n",
        ['FILE: Pod/web: spec.containers[1].ports[0].name: duplicate value "http"'],
    ),
    (
        "pod-no-containers",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: []}\n",
        ["FILE: Pod/web: spec.containers: required value"],
    ),
    (
        "pod-no-spec",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n",
        ["FILE: Pod/web: spec: required value"],
    ),
    (
        "pod-uppercase-name",
        POD.replace("name: web\nspec", "name: Web\nspec"),
        [
            'FILE: Pod/Web: metadata.name: invalid value "Web": must be a lowercase RFC 1123 subdomain: '
            "lowercase alphanumerics, '-' or '.', starting and ending with an alphanumeric (e.g. 'example.com')"
        ],
    ),
    (
        "pod-bad-label",
        POD.replace("name: web\nspec", "name: web\n  labels:\n    app: -web\nspec"),
        [
            'FILE: Pod/web: metadata.labels: invalid value "-web" for label "app": must be empty or consist of '
            "alphanumerics, '-', '_' or '.', and must start and end with an alphanumeric"
        ],
    ),
    (
        "pod-label-not-a-string",
        POD.replace("name: web\nspec", "name: web\n  labels:\n    enabled: true\nspec"),
        ["FILE: Pod/web: metadata.labels.enabled: must be a string"],
    ),
    (
        "pod-restart-policy",
        POD + "  restartPolicy: Sometimes\n",
        [
            'FILE: Pod/web: spec.restartPolicy: unsupported value "Sometimes": supported values: "Always", "OnFailure", "Never"'
        ],
    ),
    (
        "pod-misspelled-metadata",
        POD.replace("metadata:", "metdata:"),
        ["FILE: Pod (document 1): metdata: unknown field"],
    ),
    # --- Service
    (
        "svc-type",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: Loadbalancer, ports: [{port: 80}]}\n",
        [
            'FILE: Service/web: spec.type: unsupported value "Loadbalancer": supported values: '
            '"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"'
        ],
    ),
    (
        "svc-nodeport-on-clusterip",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, nodePort: 30080}]}\n",
        ['FILE: Service/web: spec.ports[0].nodePort: may not be used when `type` is "ClusterIP"'],
    ),
    (
        "svc-nodeport-range",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 8080}]}\n",
        [
            "FILE: Service/web: spec.ports[0].nodePort: invalid value 8080: provided port is not in the valid range. "
            "The range of valid ports is 30000-32767"
        ],
    ),
    (
        "svc-unnamed-ports",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}, {port: 443, name: https}]}\n",
        [
            "FILE: Service/web: spec.ports[0].name: required value: a service with more than one port must name every port"
        ],
    ),
    (
        "svc-no-ports",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}}\n",
        ["FILE: Service/web: spec.ports: required value"],
    ),
    (
        "svc-target-port-name",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: HTTP}]}\n",
        [
            'FILE: Service/web: spec.ports[0].targetPort: invalid value "HTTP": '
            "a port name must contain only lowercase alphanumerics or '-' and at least one letter"
        ],
    ),
    (
        "svc-external-name-missing",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {type: ExternalName}\n",
        ["FILE: Service/db: spec.externalName: required value"],
    ),
    (
        "svc-bad-cluster-ip",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
        [
            'FILE: Service/web: spec.clusterIP: invalid value "10.96.0.300": '
            "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff), or 'None'"
        ],
    ),
    (
        "svc-lb-only-fields",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {ports: [{port: 80}], loadBalancerSourceRanges: [10.0.0.0/8], externalTrafficPolicy: Local}\n",
        [
            "FILE: Service/web: spec.externalTrafficPolicy: may only be set for externally-accessible services",
            "FILE: Service/web: spec.loadBalancerSourceRanges: may only be used when `type` is 'LoadBalancer'",
        ],
    ),
    (
        "svc-name-starts-with-digit",
        "apiVersion: v1\nkind: Service\nmetadata: {name: 1web}\nspec: {ports: [{port: 80}]}\n",
        [
            'FILE: Service/1web: metadata.name: invalid value "1web": must be a lowercase RFC 1035 label: '
            "lowercase alphanumerics or '-', starting with a letter and ending with an alphanumeric (e.g. 'my-name')"
        ],
    ),
    (
        "svc-affinity-timeout",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}], sessionAffinity: ClientIP,"
        " sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}\n",
        [
            "FILE: Service/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: invalid value 0: "
            "must be greater than 0 and less than 86400"
        ],
    ),
    # --- NetworkPolicy
    (
        "netpol-ipblock-and-selector",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n"
        "spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}\n",
        ["FILE: NetworkPolicy/np: spec.ingress[0].from[0]: may not specify both ipBlock and another peer"],
    ),
    (
        "netpol-empty-peer",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {egress: [{to: [{}]}]}\n",
        ["FILE: NetworkPolicy/np: spec.egress[0].to[0]: must specify a peer"],
    ),
    (
        "netpol-except-outside",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n"
        "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}\n",
        [
            'FILE: NetworkPolicy/np: spec.egress[0].to[0].ipBlock.except[0]: invalid value "10.1.0.0/24": must be a strict subset of `cidr`'
        ],
    ),
    (
        # The API server's check, entry by entry: equal to the cidr, another family, outside it.
        "netpol-except-not-a-strict-subset",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n"
        "spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, "
        "except: [10.0.1.0/24, 10.0.0.0/16, 'fd00::/64', 10.0.0.0/8]}}]}]}\n",
        [
            'FILE: NetworkPolicy/np: spec.ingress[0].from[0].ipBlock.except[1]: invalid value "10.0.0.0/16": '
            "must be a strict subset of `cidr`",
            'FILE: NetworkPolicy/np: spec.ingress[0].from[0].ipBlock.except[2]: invalid value "fd00::/64": '
            "must be a strict subset of `cidr`",
            'FILE: NetworkPolicy/np: spec.ingress[0].from[0].ipBlock.except[3]: invalid value "10.0.0.0/8": '
            "must be a strict subset of `cidr`",
        ],
    ),
    (
        "netpol-bad-cidr",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n"
        "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0}}]}]}\n",
        [
            'FILE: NetworkPolicy/np: spec.egress[0].to[0].ipBlock.cidr: invalid value "10.0.0.0": '
            "must be a CIDR in address/length notation (e.g. 10.0.0.0/8 or fd00::/64)"
        ],
    ),
    (
        "netpol-end-port-below-port",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n"
        "spec: {ingress: [{ports: [{port: 9000, endPort: 8000}]}]}\n",
        [
            "FILE: NetworkPolicy/np: spec.ingress[0].ports[0].endPort: invalid value 8000: must be greater than or equal to `port`"
        ],
    ),
    (
        "netpol-icmp",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n"
        "spec: {ingress: [{ports: [{protocol: ICMP}]}]}\n",
        [
            'FILE: NetworkPolicy/np: spec.ingress[0].ports[0].protocol: unsupported value "ICMP": supported values: "TCP", "UDP", "SCTP"'
        ],
    ),
    (
        "netpol-selector-values",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n"
        "spec:\n  podSelector:\n    matchExpressions:\n    - {key: app, operator: In}\n"
        "    - {key: tier, operator: Exists, values: [web]}\n",
        [
            "FILE: NetworkPolicy/np: spec.podSelector.matchExpressions[0].values: must be specified when `operator` is 'In' or 'NotIn'",
            "FILE: NetworkPolicy/np: spec.podSelector.matchExpressions[1].values: "
            "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
        ],
    ),
    (
        "netpol-policy-type-case",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {policyTypes: [ingress]}\n",
        [
            'FILE: NetworkPolicy/np: spec.policyTypes[0]: unsupported value "ingress": supported values: "Ingress", "Egress"'
        ],
    ),
    # --- CiliumNetworkPolicy
    (
        "cnp-port-as-number",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports:\n      - port: 80\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.ingress[0].toPorts[0].ports[0].port: must be a string: write the port in quotes ("80")'
        ],
    ),
    (
        "cnp-port-out-of-range",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports:\n      - port: '65536'\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.ingress[0].toPorts[0].ports[0].port: invalid value "65536": must be between 0 and 65535, inclusive'
        ],
    ),
    (
        "cnp-end-port-below-port",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toPorts:\n    - ports:\n      - {port: '8080', endPort: 80}\n",
        [
            "FILE: CiliumNetworkPolicy/r: spec.egress[0].toPorts[0].ports[0].endPort: invalid value 80: must be greater than or equal to port 8080"
        ],
    ),
    (
        "cnp-protocol-case",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toPorts:\n    - ports:\n      - {port: '80', protocol: tcp}\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.egress[0].toPorts[0].ports[0].protocol: unsupported value "tcp": supported values: '
            '"TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "VRRP", "IGMP", "ANY"'
        ],
    ),
    (
        "cnp-l3-combination",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n    fromCIDR: [10.0.0.0/8]\n",
        ["FILE: CiliumNetworkPolicy/r: spec.ingress[0]: combining fromEndpoints and fromCIDR is not supported"],
    ),
    (
        "cnp-unknown-entity",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toEntities: [wrold]\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.egress[0].toEntities[0]: unsupported value "wrold": supported values: '
            '"all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node", "kube-apiserver", '
            '"ingress", "init", "health", "unmanaged", "none"'
        ],
    ),
    (
        "cnp-dns-on-ingress",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: '53', protocol: UDP}]\n"
        "      rules: {dns: [{matchPattern: '*'}]}\n",
        ["FILE: CiliumNetworkPolicy/r: spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress"],
    ),
    (
        "cnp-http-on-udp",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: '80', protocol: UDP}]\n"
        "      rules: {http: [{method: GET}]}\n",
        [
            "FILE: CiliumNetworkPolicy/r: spec.ingress[0].toPorts[0].ports[0].protocol: "
            "L7 rules can only apply to TCP (not UDP) except for DNS rules"
        ],
    ),
    (
        "cnp-l7-on-port-zero",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: '0', protocol: TCP}]\n"
        "      rules: {http: [{}]}\n",
        [
            "FILE: CiliumNetworkPolicy/r: spec.ingress[0].toPorts[0].ports[0].port: L7 rules can not be used when a port is 0"
        ],
    ),
    (
        "cnp-two-l7-types",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toPorts:\n    - ports: [{port: '53', protocol: TCP}]\n"
        "      rules: {http: [{}], dns: [{matchName: cilium.io}]}\n",
        [
            "FILE: CiliumNetworkPolicy/r: spec.egress[0].toPorts[0].rules: only one L7 rule type may be given per port rule, got http, dns"
        ],
    ),
    (
        "cnp-bad-http-regex",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n"
        "      rules: {http: [{path: '/v1/(unclosed'}]}\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.ingress[0].toPorts[0].rules.http[0].path: invalid value "/v1/(unclosed": '
            "is not a valid regular expression: missing ), unterminated subpattern at position 4"
        ],
    ),
    (
        "cnp-fqdn-both",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: a.io, matchPattern: '*.a.io'}]\n",
        [
            "FILE: CiliumNetworkPolicy/r: spec.egress[0].toFQDNs[0]: exactly one of matchName or matchPattern is required"
        ],
    ),
    (
        "cnp-fqdn-bad-name",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: 'https://a.io'}]\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.egress[0].toFQDNs[0].matchName: invalid value "https://a.io": '
            "must be a DNS name made of letters, digits, '-', '_' and '.'"
        ],
    ),
    (
        "cnp-no-subject",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\nspec:\n  ingress: [{}]\n",
        ["FILE: CiliumNetworkPolicy/r: spec: exactly one of endpointSelector or nodeSelector is required"],
    ),
    (
        "cnp-no-sections",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\nspec:\n  endpointSelector: {}\n",
        ["FILE: CiliumNetworkPolicy/r: spec: at least one of ingress, ingressDeny, egress or egressDeny is required"],
    ),
    (
        "cnp-no-spec",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n",
        ["FILE: CiliumNetworkPolicy/r: spec: required value: a policy needs `spec` or `specs`"],
    ),
    (
        "cnp-node-selector",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "specs:\n- nodeSelector: {}\n  ingress: [{}]\n",
        [
            "FILE: CiliumNetworkPolicy/r: specs[0].nodeSelector: not allowed in a CiliumNetworkPolicy "
            "(host policies need a CiliumClusterwideNetworkPolicy)"
        ],
    ),
    (
        "ccnp-host-policy-l7",
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  nodeSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n"
        "      rules: {http: [{}]}\n",
        [
            "FILE: CiliumClusterwideNetworkPolicy/r: spec.ingress[0].toPorts[0].rules: host policies do not support L7 rules"
        ],
    ),
    (
        "cnp-except-outside-cidr",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/16, except: [10.1.0.0/24]}]\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.egress[0].toCIDRSet[0].except[0]: invalid value "10.1.0.0/24": is not contained in the cidr 10.0.0.0/16'
        ],
    ),
    (
        "cnp-bad-from-cidr",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - fromCIDR: [10.0.0.0/33]\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.ingress[0].fromCIDR[0]: invalid value "10.0.0.0/33": '
            "must be a valid CIDR (e.g. 10.0.0.0/8 or fd00::/64)"
        ],
    ),
    (
        "cnp-icmps-with-ports",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - icmps: [{fields: [{type: 8}]}]\n"
        "    toPorts: [{ports: [{port: '80'}]}]\n",
        [
            "FILE: CiliumNetworkPolicy/r: spec.egress[0].icmps: icmps may not be combined with toPorts in one rule; use a separate rule"
        ],
    ),
    (
        "cnp-icmp-type",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - icmps: [{fields: [{type: PacketTooBig}]}]\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.egress[0].icmps[0].fields[0].type: invalid value "PacketTooBig": '
            "is not an IPv4 ICMP type name (e.g. EchoRequest)"
        ],
    ),
    (
        "cnp-services-with-ports",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  egress:\n  - toServices: [{k8sService: {serviceName: db}}]\n"
        "    toPorts: [{ports: [{port: '5432'}]}]\n",
        ["FILE: CiliumNetworkPolicy/r: spec.egress[0]: combining toServices and toPorts is not supported"],
    ),
    (
        "cnp-unknown-label-source",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {matchLabels: {'k8z:app': web}}\n  ingress: [{}]\n",
        [
            'FILE: CiliumNetworkPolicy/r: spec.endpointSelector.matchLabels: invalid label key "k8z:app": unknown label '
            'source "k8z" (known: any, cidr, cidrgroup, cni, container, directory, fqdn, k8s, node, reserved, unspec)'
        ],
    ),
    (
        "cnp-misspelled-field",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoint: [{}]\n",
        ["FILE: CiliumNetworkPolicy/r: spec.ingress[0].fromEndpoint: unknown field"],
    ),
    (
        "cnp-deny-with-l7",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingressDeny:\n  - toPorts:\n    - ports: [{port: '80'}]\n"
        "      rules: {http: [{}]}\n",
        ["FILE: CiliumNetworkPolicy/r: spec.ingressDeny[0].toPorts[0].rules: unknown field"],
    ),
    (
        "cnp-log-too-long",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: r}\n"
        "spec:\n  endpointSelector: {}\n  ingress: [{}]\n  log: {value: " + "x" * 33 + "}\n",
        [
            f'FILE: CiliumNetworkPolicy/r: spec.log.value: invalid value "{"x" * 33}": must be at most 32 printable characters'
        ],
    ),
    # --- LB-IPAM, L2
    (
        "pool-cidr-and-range",
        "apiVersion: cilium.io/v2\nkind: CiliumLoadBalancerIPPool\nmetadata: {name: p}\n"
        "spec: {blocks: [{cidr: 10.0.0.0/24, start: 10.0.0.1}]}\n",
        [
            "FILE: CiliumLoadBalancerIPPool/p: spec.blocks[0]: a block is either a `cidr` or a `start`/`stop` range, not both"
        ],
    ),
    (
        "pool-reversed-range",
        "apiVersion: cilium.io/v2\nkind: CiliumLoadBalancerIPPool\nmetadata: {name: p}\n"
        "spec: {blocks: [{start: 10.0.0.9, stop: 10.0.0.1}]}\n",
        [
            'FILE: CiliumLoadBalancerIPPool/p: spec.blocks[0].stop: invalid value "10.0.0.1": must not be lower than start 10.0.0.9'
        ],
    ),
    (
        "pool-unquoted-no",
        "apiVersion: cilium.io/v2\nkind: CiliumLoadBalancerIPPool\nmetadata: {name: p}\n"
        "spec: {blocks: [{cidr: 10.0.0.0/24}], allowFirstLastIPs: No}\n",
        [
            "FILE: CiliumLoadBalancerIPPool/p: spec.allowFirstLastIPs: "
            'must be "Yes" or "No" in quotes: YAML reads an unquoted Yes or No as a boolean'
        ],
    ),
    (
        "pool-no-blocks",
        "apiVersion: cilium.io/v2\nkind: CiliumLoadBalancerIPPool\nmetadata: {name: p}\nspec: {disabled: false}\n",
        ["FILE: CiliumLoadBalancerIPPool/p: spec.blocks: required value: a pool needs at least one block"],
    ),
    (
        "l2-bad-interface-regex",
        "apiVersion: cilium.io/v2alpha1\nkind: CiliumL2AnnouncementPolicy\nmetadata: {name: l2}\n"
        "spec: {interfaces: ['eth[0-9']}\n",
        [
            'FILE: CiliumL2AnnouncementPolicy/l2: spec.interfaces[0]: invalid value "eth[0-9": '
            "is not a valid regular expression: unterminated character set at position 3"
        ],
    ),
    # --- BGP
    (
        "bgp-timers",
        "apiVersion: cilium.io/v2\nkind: CiliumBGPPeerConfig\nmetadata: {name: peer}\n"
        "spec: {timers: {holdTimeSeconds: 9, keepAliveTimeSeconds: 30}}\n",
        [
            "FILE: CiliumBGPPeerConfig/peer: spec.timers.keepAliveTimeSeconds: invalid value 30: can not be larger than holdTimeSeconds (9)"
        ],
    ),
    (
        "bgp-peer-without-address",
        "apiVersion: cilium.io/v2\nkind: CiliumBGPClusterConfig\nmetadata: {name: c}\n"
        "spec: {bgpInstances: [{name: i, localASN: 0, peers: [{name: tor}]}]}\n",
        [
            "FILE: CiliumBGPClusterConfig/c: spec.bgpInstances[0].localASN: invalid value 0: must be between 1 and 4294967295, inclusive",
            "FILE: CiliumBGPClusterConfig/c: spec.bgpInstances[0].peers[0]: one of peerAddress or autoDiscovery must be set",
        ],
    ),
    (
        "bgp-duplicate-instances",
        "apiVersion: cilium.io/v2\nkind: CiliumBGPClusterConfig\nmetadata: {name: c}\n"
        "spec: {bgpInstances: [{name: i}, {name: i}]}\n",
        ['FILE: CiliumBGPClusterConfig/c: spec.bgpInstances[1]: duplicate value "i"'],
    ),
    (
        "bgp-service-advert-without-service",
        "apiVersion: cilium.io/v2\nkind: CiliumBGPAdvertisement\nmetadata: {name: a}\n"
        "spec: {advertisements: [{advertisementType: Service}, {advertisementType: PodCIDR, selector: {}}]}\n",
        [
            "FILE: CiliumBGPAdvertisement/a: spec.advertisements[0].service: required for the 'Service' advertisementType",
            "FILE: CiliumBGPAdvertisement/a: spec.advertisements[1].selector: not allowed for the 'PodCIDR' advertisementType",
        ],
    ),
    (
        "bgpp-neighbor-address",
        "apiVersion: cilium.io/v2alpha1\nkind: CiliumBGPPeeringPolicy\nmetadata: {name: b}\n"
        "spec: {virtualRouters: [{localASN: 64512, neighbors: [{peerAddress: 10.0.0.1, peerASN: 64512}]}]}\n",
        [
            'FILE: CiliumBGPPeeringPolicy/b: spec.virtualRouters[0].neighbors[0].peerAddress: invalid value "10.0.0.1": '
            "must be a CIDR in address/length notation (e.g. 10.0.0.0/8 or fd00::/64)"
        ],
    ),
    # --- envelope
    ("no-kind", "apiVersion: v1\nmetadata: {name: x}\n", ["FILE: document 1: kind: required value"]),
    ("no-api-version", "kind: Pod\nmetadata: {name: x}\n", ["FILE: Pod/x: apiVersion: required value"]),
    (
        "wrong-api-version",
        "apiVersion: cilium.io/v2alpha1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\n",
        [
            'FILE: CiliumNetworkPolicy/x: apiVersion: "cilium.io/v2alpha1" is not served for kind CiliumNetworkPolicy (use cilium.io/v2)'
        ],
    ),
    (
        "unknown-kind",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n",
        [
            'FILE: Deployment/x: kind: unknown kind "Deployment" (accepted kinds: Namespace, Pod, Service, '
            "NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, CiliumLoadBalancerIPPool, "
            "CiliumL2AnnouncementPolicy, CiliumBGPPeeringPolicy, CiliumBGPClusterConfig, CiliumBGPPeerConfig, "
            "CiliumBGPAdvertisement, CiliumNode, EndpointSlice)"
        ],
    ),
    (
        "kind-case",
        "apiVersion: v1\nkind: service\nmetadata: {name: x}\n",
        ['FILE: service/x: kind: unknown kind "service" (did you mean "Service"?)'],
    ),
    (
        "system-kind",
        "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata: {name: node1}\n",
        ["FILE: CiliumNode/node1: CiliumNode objects are maintained by the membrane agents and cannot be applied"],
    ),
    (
        "not-a-mapping",
        "- apiVersion: v1\n  kind: Pod\n",
        ["FILE: document 1: expected an object with apiVersion, kind and metadata, got list"],
    ),
    (
        "yaml-syntax",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n labels: {}\n",
        [
            "FILE: line 5, column 2: expected <block end>, but found '<block mapping start>' (while parsing a block mapping at line 1)"
        ],
    ),
    (
        "yaml-duplicate-key",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  name: web2\nspec: {containers: [{name: c}]}\n",
        ['FILE: line 5, column 3: mapping key "name" already defined at line 4'],
    ),
    (
        "json-syntax",
        '{"apiVersion": "v1",\n "kind": "Pod",\n "metadata": {"name": "web"},}\n',
        ["FILE: line 3, column 30: Expecting property name enclosed in double quotes"],
    ),
    (
        "duplicate-object",
        POD + "---\n" + POD,
        ["FILE: Pod/web: defined more than once (also in FILE, document 1)"],
    ),
    (
        "several-problems-at-once",
        POD.replace("image: nginx", "imagee: nginx") + "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {type: NodePort, ports: [{port: 80, nodePort: 1}]}\n",
        [
            "FILE: Pod/web: spec.containers[0].imagee: unknown field",
            "FILE: Service/web: spec.ports[0].nodePort: invalid value 1: provided port is not in the valid range. "
            "The range of valid ports is 30000-32767",
        ],
    ),
]


@pytest.mark.parametrize(("manifest", "expected"), [(m, e) for _, m, e in CASES], ids=[c[0] for c in CASES])
def test_invalid_manifest_is_refused_with_one_line_per_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest: str, expected: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    suffix = ".json" if manifest.startswith("{") else ".yaml"
    name = f"bad{suffix}"
    Path(name).write_text(textwrap.dedent(manifest))
    with pytest.raises(InvalidInput) as caught:
        load_objects([name])
    assert caught.value.problems == [line.replace("FILE", name) for line in expected]


def test_problems_of_all_files_are_reported_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("a.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n")
    Path("b.yaml").write_text("key: [unclosed\n")
    with pytest.raises(InvalidInput) as caught:
        load_objects(["a.yaml", "b.yaml", "missing.yaml"])
    assert caught.value.problems == [
        "b.yaml: line 2, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 1)",
        "missing.yaml: no such file or directory",
        "a.yaml: Pod/a: spec: required value",
    ]


def test_namespace_flag_conflicting_with_manifest_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("pod.yaml").write_text(POD.replace("name: web\nspec", "name: web\n  namespace: prod\nspec"))
    with pytest.raises(InvalidInput) as caught:
        load_objects(["pod.yaml"], namespace="dev")
    assert caught.value.problems == [
        'pod.yaml: Pod/web: the namespace from the provided object "prod" does not match the namespace "dev". '
        "You must pass '--namespace=prod' to perform this operation."
    ]
