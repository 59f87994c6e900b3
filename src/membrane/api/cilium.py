"""The Cilium kinds membrane accepts, with the validation Cilium applies to them.

Field names and defaults follow the Cilium CRDs (``cilium.io/v2`` and ``v2alpha1``); the
cross-field rules follow ``pkg/policy/api/rule_validation.go`` and the CRDs' CEL rules.

Primitives:

- policy: :class:`CiliumNetworkPolicy`, :class:`CiliumClusterwideNetworkPolicy`, their
  :class:`Rule` (:class:`IngressRule`, :class:`IngressDenyRule`, :class:`EgressRule`,
  :class:`EgressDenyRule`), :class:`EndpointSelector`, :class:`CIDRRule`, :class:`FQDNSelector`,
  :class:`PortRule`, :class:`PortProtocol`, :class:`L7Rules`, :class:`PortRuleHTTP`,
  :class:`PortRuleDNS`, :data:`ENTITIES`;
- LB-IPAM and announcements: :class:`CiliumLoadBalancerIPPool`, :class:`CiliumL2AnnouncementPolicy`;
- BGP: :class:`CiliumBGPPeeringPolicy` (v1), :class:`CiliumBGPClusterConfig`,
  :class:`CiliumBGPPeerConfig`, :class:`CiliumBGPAdvertisement` (v2);
- nodes: :class:`CiliumNode` (written by the agents), with :meth:`CiliumNode.internal_ip` and
  :meth:`CiliumNode.pod_cidr` for the two facts every reader of a node wants.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, JsonValue, PlainValidator, model_validator

from membrane.api.k8s import IntOrString
from membrane.api.meta import (
    ApiObject,
    Bool,
    CIDRString,
    Condition,
    Int,
    IPString,
    Issue,
    LabelSelector,
    LabelSelectorRequirement,
    Model,
    StatusModel,
    Str,
    cidr_error,
    dns1123_subdomain_error,
    invalid,
    ip_error,
    network,
    port_name_error,
    quote,
    unique_problems,
)

# --- selectors -----------------------------------------------------------------------------------------


class EndpointSelectorRequirement(LabelSelectorRequirement):
    cilium_keys: ClassVar[bool] = True


class EndpointSelector(LabelSelector):
    """A label selector over endpoint labels; keys may name a source (``k8s:app``, ``reserved:host``)."""

    cilium_keys: ClassVar[bool] = True
    matchExpressions: tuple[EndpointSelectorRequirement, ...] | None = None


# --- L3 ----------------------------------------------------------------------------------------------------

#: The entity names Cilium accepts in fromEntities/toEntities (``pkg/policy/api/entity.go``).
ENTITIES = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "ingress",
    "init",
    "health",
    "unmanaged",
    "none",
)
Entity = Literal[
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "ingress",
    "init",
    "health",
    "unmanaged",
    "none",
]


def _cidr_or_ip_problems(value: str, path: str) -> Iterator[Issue]:
    # fromCIDR/toCIDR take a prefix or a bare address (api.CIDR.sanitize).
    if "/" in value:
        reason = cidr_error(value)
    else:
        reason = None if ip_error(value) is None else "must be a CIDR or an IP address"
    if reason is not None:
        yield path, invalid(value, reason)


class CIDRRule(Model):
    cidr: Str | None = None
    cidrGroupRef: Str | None = None
    cidrGroupSelector: EndpointSelector | None = None
    except_: tuple[Str, ...] | None = Field(default=None, alias="except")

    def check(self) -> Iterator[Issue]:
        given = [f for f in ("cidr", "cidrGroupRef", "cidrGroupSelector") if getattr(self, f) is not None]
        if len(given) != 1:
            yield "", "exactly one of cidr, cidrGroupRef or cidrGroupSelector is required"
            return
        if self.cidrGroupRef is not None and (reason := dns1123_subdomain_error(self.cidrGroupRef)) is not None:
            yield "cidrGroupRef", invalid(self.cidrGroupRef, reason)
        if self.cidr is None:
            if self.except_:
                yield "except", "may only be used together with `cidr`"
            return
        if (reason := cidr_error(self.cidr)) is not None:
            yield "cidr", invalid(self.cidr, reason)
            return
        outer = network(self.cidr)
        for index, item in enumerate(self.except_ or ()):
            if (reason := cidr_error(item)) is not None:
                yield f"except[{index}]", invalid(item, reason)
            elif network(item).version != outer.version or network(item).network_address not in outer:
                yield f"except[{index}]", invalid(item, f"is not contained in the cidr {self.cidr}")


class K8sServiceNamespace(Model):
    serviceName: Str | None = None
    namespace: Str | None = None


class K8sServiceSelectorNamespace(Model):
    selector: EndpointSelector
    namespace: Str | None = None


class ServiceSelectorRef(Model):
    """An entry of ``toServices``: a Kubernetes service by name, or services by labels."""

    k8sService: K8sServiceNamespace | None = None
    k8sServiceSelector: K8sServiceSelectorNamespace | None = None

    def check(self) -> Iterator[Issue]:
        if (self.k8sService is None) == (self.k8sServiceSelector is None):
            yield "", "exactly one of k8sService or k8sServiceSelector is required"
        elif self.k8sService is not None and not self.k8sService.serviceName:
            yield "k8sService.serviceName", "required value"


class AWSGroup(Model):
    labels: dict[Str, Str] | None = None
    region: Str | None = None
    securityGroupsIds: tuple[Str, ...] | None = None
    securityGroupsNames: tuple[Str, ...] | None = None


class Groups(Model):
    aws: AWSGroup | None = None


_DNS_NAME = re.compile(r"([-a-zA-Z0-9_]+[.]?)+")
_DNS_PATTERN = re.compile(r"([-a-zA-Z0-9_*]+[.]?)+")


def _dns_problems(match_name: str | None, match_pattern: str | None) -> Iterator[Issue]:
    if (match_name is None) == (match_pattern is None):
        yield "", "exactly one of matchName or matchPattern is required"
        return
    for field, value, syntax in (("matchName", match_name, _DNS_NAME), ("matchPattern", match_pattern, _DNS_PATTERN)):
        if value is None:
            continue
        if len(value) > 255:
            yield field, invalid(value, "must be no more than 255 characters")
        elif not syntax.fullmatch(value):
            allowed = "letters, digits, '-', '_'" + (", '*'" if field == "matchPattern" else "")
            yield field, invalid(value, f"must be a DNS name made of {allowed} and '.'")


class FQDNSelector(Model):
    matchName: Str | None = None
    matchPattern: Str | None = None

    def check(self) -> Iterator[Issue]:
        yield from _dns_problems(self.matchName, self.matchPattern)


# --- L4 -----------------------------------------------------------------------------------------------------

L4Protocol = Literal["TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "VRRP", "IGMP", "ANY"]
#: Protocols without ports: a port rule for them needs no ``port``.
_PORTLESS = frozenset({"ICMP", "ICMPv6", "VRRP", "IGMP"})


def _port_string(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str):
        if isinstance(value, int):
            raise ValueError(f'must be a string: write the port in quotes ("{value}")')
        raise ValueError("must be a string")
    return value


#: Cilium's ``port``: a string holding a number or a port name (a bare YAML number is refused, as upstream).
PortString = Annotated[str, PlainValidator(_port_string)]


def parse_port(value: str) -> int | str:
    """``"80"`` -> 80; a name is returned lower-cased (Cilium resolves names case-insensitively)."""
    return int(value) if value.isdigit() else value.lower()


class PortProtocol(Model):
    port: PortString | None = None
    endPort: Int | None = None
    protocol: L4Protocol = "ANY"

    def check(self) -> Iterator[Issue]:
        if self.port is None or self.port == "":
            if self.protocol not in _PORTLESS:
                yield "port", "required value"
            return
        if self.port.isdigit():
            number = int(self.port)
            if number > 65535:
                yield "port", invalid(self.port, "must be between 0 and 65535, inclusive")
            if self.endPort is not None and self.endPort != 0:
                if not 0 <= self.endPort <= 65535:
                    yield "endPort", invalid(self.endPort, "must be between 0 and 65535, inclusive")
                elif self.endPort < number:
                    yield "endPort", invalid(self.endPort, f"must be greater than or equal to port {number}")
        else:
            if (reason := port_name_error(self.port.lower())) is not None:
                yield "port", invalid(self.port, f"must be a port number (0-65535) or a port name; {reason}")
            if self.endPort:
                yield "endPort", "may not be used with a named port"

    @property
    def is_wildcard(self) -> bool:
        return self.port in (None, "", "0")

    @property
    def is_range(self) -> bool:
        return bool(self.endPort) and self.port is not None and self.port.isdigit() and self.endPort != int(self.port)


class SecretRef(Model):
    name: Str
    namespace: Str | None = None


class TLSContext(Model):
    secret: SecretRef
    trustedCA: Str | None = None
    certificate: Str | None = None
    privateKey: Str | None = None


class EnvoyConfigRef(Model):
    kind: Literal["CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig"] | None = None
    name: Str


class Listener(Model):
    envoyConfig: EnvoyConfigRef
    name: Str
    priority: Int | None = None

    def check(self) -> Iterator[Issue]:
        if self.priority is not None and not 1 <= self.priority <= 100:
            yield "priority", invalid(self.priority, "must be between 1 and 100, inclusive")


def _regex_problems(value: str | None, path: str) -> Iterator[Issue]:
    if value:
        try:
            re.compile(value)
        except re.error as exc:
            yield path, invalid(value, f"is not a valid regular expression: {exc}")


class HeaderMatch(Model):
    name: Str
    value: Str | None = None
    secret: SecretRef | None = None
    mismatch: Literal["LOG", "ADD", "DELETE", "REPLACE"] | None = None

    def check(self) -> Iterator[Issue]:
        if not self.name:
            yield "name", "required value"


class PortRuleHTTP(Model):
    """HTTP rule: path, method and host are anchored regular expressions; all fields are ANDed."""

    path: Str | None = None
    method: Str | None = None
    host: Str | None = None
    headers: tuple[Str, ...] | None = None
    headerMatches: tuple[HeaderMatch, ...] | None = None

    def check(self) -> Iterator[Issue]:
        yield from _regex_problems(self.path, "path")
        yield from _regex_problems(self.method, "method")
        yield from _regex_problems(self.host, "host")


class PortRuleDNS(Model):
    matchName: Str | None = None
    matchPattern: Str | None = None

    def check(self) -> Iterator[Issue]:
        yield from _dns_problems(self.matchName, self.matchPattern)


class PortRuleKafka(Model):
    role: Literal["produce", "consume"] | None = None
    apiKey: Str | None = None
    apiVersion: Str | None = None
    clientID: Str | None = None
    topic: Str | None = None

    def check(self) -> Iterator[Issue]:
        if self.role is not None and self.apiKey is not None:
            yield "", "role and apiKey are mutually exclusive"
        if self.topic is not None and len(self.topic) > 249:
            yield "topic", "must be no more than 249 characters"


class L7Rules(Model):
    http: tuple[PortRuleHTTP, ...] | None = None
    kafka: tuple[PortRuleKafka, ...] | None = None
    dns: tuple[PortRuleDNS, ...] | None = None
    l7proto: Str | None = None
    l7: tuple[dict[Str, Str], ...] | None = None

    def check(self) -> Iterator[Issue]:
        kinds = [name for name in ("http", "kafka", "dns") if getattr(self, name) is not None]
        if self.l7proto:
            kinds.append("l7proto")
        elif self.l7 is not None:
            yield "l7", "may only be specified together with `l7proto`"
        if len(kinds) > 1:
            yield "", f"only one L7 rule type may be given per port rule, got {', '.join(kinds)}"

    @property
    def is_empty(self) -> bool:
        return self.http is None and self.kafka is None and self.dns is None and self.l7 is None and not self.l7proto

    @property
    def has_dns(self) -> bool:
        return bool(self.dns)


class PortRule(Model):
    ports: tuple[PortProtocol, ...] | None = None
    rules: L7Rules | None = None
    terminatingTLS: TLSContext | None = None
    originatingTLS: TLSContext | None = None
    serverNames: tuple[Str, ...] | None = None
    listener: Listener | None = None

    @property
    def has_l7(self) -> bool:
        return self.rules is not None and not self.rules.is_empty

    def check(self) -> Iterator[Issue]:
        ports = self.ports or ()
        if len(ports) > 40:
            yield "ports", "too many ports, the max is 40"
        has_dns = self.rules is not None and self.rules.has_dns
        for index, name in enumerate(self.serverNames or ()):
            if not name:
                yield f"serverNames[{index}]", "empty server name is not allowed"
            elif len(name) > 255 or not _DNS_PATTERN.fullmatch(name):
                yield f"serverNames[{index}]", invalid(name, "must be a DNS name, '*' wildcards allowed")
        if self.serverNames and self.has_l7 and self.terminatingTLS is None:
            yield "serverNames", "server names are not allowed with L7 rules without TLS termination"
        if self.listener is not None and self.has_l7:
            yield "listener", "a listener is not allowed together with L7 rules"
        if not self.has_l7:
            return
        for index, port in enumerate(ports):
            if port.is_wildcard:
                yield f"ports[{index}].port", "L7 rules can not be used when a port is 0"
            if has_dns:
                if port.protocol not in ("TCP", "UDP", "ANY"):
                    yield f"ports[{index}].protocol", f"DNS rules apply to TCP, UDP or ANY (not {port.protocol})"
                if port.is_range:
                    yield f"ports[{index}].endPort", "DNS rules do not support port ranges"
            elif port.protocol != "TCP":
                yield (
                    f"ports[{index}].protocol",
                    f"L7 rules can only apply to TCP (not {port.protocol}) except for DNS rules",
                )
        if has_dns and not ports:
            yield "ports", "a port (53) must be specified for DNS rules"


class PortDenyRule(Model):
    ports: tuple[PortProtocol, ...] | None = None

    def check(self) -> Iterator[Issue]:
        if len(self.ports or ()) > 40:
            yield "ports", "too many ports, the max is 40"


_ICMP_TYPES = {
    "IPv4": frozenset(
        {
            "EchoReply",
            "DestinationUnreachable",
            "Redirect",
            "Echo",
            "EchoRequest",
            "RouterAdvertisement",
            "RouterSelection",
            "TimeExceeded",
            "ParameterProblem",
            "Timestamp",
            "TimestampReply",
            "Photuris",
            "ExtendedEchoRequest",
            "ExtendedEchoReply",
        }
    ),
    "IPv6": frozenset(
        {
            "DestinationUnreachable",
            "PacketTooBig",
            "TimeExceeded",
            "ParameterProblem",
            "EchoRequest",
            "EchoReply",
            "MulticastListenerQuery",
            "MulticastListenerReport",
            "MulticastListenerDone",
            "RouterSolicitation",
            "RouterAdvertisement",
            "NeighborSolicitation",
            "NeighborAdvertisement",
            "RedirectMessage",
            "RouterRenumbering",
            "ICMPNodeInformationQuery",
            "ICMPNodeInformationResponse",
            "InverseNeighborDiscoverySolicitation",
            "InverseNeighborDiscoveryAdvertisement",
            "HomeAgentAddressDiscoveryRequest",
            "HomeAgentAddressDiscoveryReply",
            "MobilePrefixSolicitation",
            "MobilePrefixAdvertisement",
            "DuplicateAddressRequestCodeSuffix",
            "DuplicateAddressConfirmationCodeSuffix",
            "ExtendedEchoRequest",
            "ExtendedEchoReply",
        }
    ),
}


class ICMPField(Model):
    family: Literal["IPv4", "IPv6"] = "IPv4"
    type: IntOrString

    def check(self) -> Iterator[Issue]:
        if isinstance(self.type, int):
            if not 0 <= self.type <= 255:
                yield "type", invalid(self.type, "must be between 0 and 255, inclusive")
        elif self.type.isdigit():
            if int(self.type) > 255:
                yield "type", invalid(self.type, "must be between 0 and 255, inclusive")
        elif self.type not in _ICMP_TYPES[self.family]:
            yield "type", invalid(self.type, f"is not an {self.family} ICMP type name (e.g. EchoRequest)")


class ICMPRule(Model):
    fields: tuple[ICMPField, ...] = ()

    def check(self) -> Iterator[Issue]:
        if len(self.fields) > 40:
            yield "fields", "too many types, the max is 40"


class Authentication(Model):
    mode: Literal["disabled", "required", "test-always-fail"]


# --- rules ---------------------------------------------------------------------------------------------


def _exclusive_l3(members: dict[str, int]) -> Iterator[Issue]:
    present = [name for name, count in members.items() if count]
    if len(present) > 1:
        yield "", f"combining {present[0]} and {present[1]} is not supported"


def _cidr_list_problems(field: str, values: Iterable[str] | None) -> Iterator[Issue]:
    for index, value in enumerate(values or ()):
        yield from _cidr_or_ip_problems(value, f"{field}[{index}]")


class _IngressCommon(Model):
    fromEndpoints: tuple[EndpointSelector, ...] | None = None
    fromRequires: tuple[EndpointSelector, ...] | None = None
    fromCIDR: tuple[Str, ...] | None = None
    fromCIDRSet: tuple[CIDRRule, ...] | None = None
    fromEntities: tuple[Entity, ...] | None = None
    fromGroups: tuple[Groups, ...] | None = None
    fromNodes: tuple[EndpointSelector, ...] | None = None
    icmps: tuple[ICMPRule, ...] | None = None

    def _common_problems(self, to_ports: tuple[Any, ...] | None) -> Iterator[Issue]:
        yield from _exclusive_l3(
            {
                "fromEndpoints": len(self.fromEndpoints or ()),
                "fromCIDR": len(self.fromCIDR or ()),
                "fromCIDRSet": len(self.fromCIDRSet or ()),
                "fromEntities": len(self.fromEntities or ()),
                "fromNodes": len(self.fromNodes or ()),
                "fromGroups": len(self.fromGroups or ()),
            }
        )
        yield from _cidr_list_problems("fromCIDR", self.fromCIDR)
        if self.icmps and to_ports:
            yield "icmps", "icmps may not be combined with toPorts in one rule; use a separate rule"


class IngressRule(_IngressCommon):
    toPorts: tuple[PortRule, ...] | None = None
    authentication: Authentication | None = None

    def check(self) -> Iterator[Issue]:
        yield from self._common_problems(self.toPorts)
        for index, rule in enumerate(self.toPorts or ()):
            if rule.rules is not None and rule.rules.has_dns:
                yield f"toPorts[{index}].rules.dns", "DNS rules are not allowed on ingress"
            if rule.listener is not None:
                yield f"toPorts[{index}].listener", "a listener is not allowed on ingress"


class IngressDenyRule(_IngressCommon):
    toPorts: tuple[PortDenyRule, ...] | None = None

    def check(self) -> Iterator[Issue]:
        yield from self._common_problems(self.toPorts)


class _EgressCommon(Model):
    toEndpoints: tuple[EndpointSelector, ...] | None = None
    toRequires: tuple[EndpointSelector, ...] | None = None
    toCIDR: tuple[Str, ...] | None = None
    toCIDRSet: tuple[CIDRRule, ...] | None = None
    toEntities: tuple[Entity, ...] | None = None
    toServices: tuple[ServiceSelectorRef, ...] | None = None
    toGroups: tuple[Groups, ...] | None = None
    toNodes: tuple[EndpointSelector, ...] | None = None
    icmps: tuple[ICMPRule, ...] | None = None

    def _common_problems(self, to_ports: tuple[Any, ...] | None, fqdns: int) -> Iterator[Issue]:
        yield from _exclusive_l3(
            {
                "toEndpoints": len(self.toEndpoints or ()),
                "toCIDR": len(self.toCIDR or ()),
                "toCIDRSet": len(self.toCIDRSet or ()),
                "toEntities": len(self.toEntities or ()),
                "toServices": len(self.toServices or ()),
                "toFQDNs": fqdns,
                "toGroups": len(self.toGroups or ()),
                "toNodes": len(self.toNodes or ()),
            }
        )
        yield from _cidr_list_problems("toCIDR", self.toCIDR)
        if self.toServices and to_ports:
            yield "", "combining toServices and toPorts is not supported"
        if self.icmps and to_ports:
            yield "icmps", "icmps may not be combined with toPorts in one rule; use a separate rule"


class EgressRule(_EgressCommon):
    toPorts: tuple[PortRule, ...] | None = None
    toFQDNs: tuple[FQDNSelector, ...] | None = None
    authentication: Authentication | None = None

    def check(self) -> Iterator[Issue]:
        yield from self._common_problems(self.toPorts, len(self.toFQDNs or ()))


class EgressDenyRule(_EgressCommon):
    toPorts: tuple[PortDenyRule, ...] | None = None

    def check(self) -> Iterator[Issue]:
        yield from self._common_problems(self.toPorts, 0)


class DefaultDenyConfig(Model):
    ingress: Bool | None = None
    egress: Bool | None = None


class LogConfig(Model):
    value: Str | None = None

    def check(self) -> Iterator[Issue]:
        if self.value is not None and (len(self.value) > 32 or not self.value.isprintable()):
            yield "value", invalid(self.value, "must be at most 32 printable characters")


class RuleLabel(Model):
    key: Str
    value: Str | None = None
    source: Str | None = None


class Rule(Model):
    """One Cilium policy rule: the subject (endpoint or node selector) and its allow/deny sections."""

    endpointSelector: EndpointSelector | None = None
    nodeSelector: EndpointSelector | None = None
    ingress: tuple[IngressRule, ...] | None = None
    ingressDeny: tuple[IngressDenyRule, ...] | None = None
    egress: tuple[EgressRule, ...] | None = None
    egressDeny: tuple[EgressDenyRule, ...] | None = None
    labels: tuple[RuleLabel, ...] | None = None
    enableDefaultDeny: DefaultDenyConfig | None = None
    description: Str | None = None
    log: LogConfig | None = None

    def check(self) -> Iterator[Issue]:
        if (self.endpointSelector is None) == (self.nodeSelector is None):
            yield "", "exactly one of endpointSelector or nodeSelector is required"
        if all(section is None for section in (self.ingress, self.ingressDeny, self.egress, self.egressDeny)):
            yield "", "at least one of ingress, ingressDeny, egress or egressDeny is required"
        if self.nodeSelector is not None:
            for field in ("ingress", "egress"):
                for index, rule in enumerate(getattr(self, field) or ()):
                    for pindex, port_rule in enumerate(rule.toPorts or ()):
                        rules = port_rule.rules
                        if rules is not None and not rules.is_empty and not (field == "egress" and rules.has_dns):
                            yield f"{field}[{index}].toPorts[{pindex}].rules", "host policies do not support L7 rules"

    def default_deny(self) -> tuple[bool, bool]:
        """(ingress, egress) default-deny as Cilium derives it: unset means "on if the direction has rules"."""
        config = self.enableDefaultDeny or DefaultDenyConfig()
        ingress = config.ingress if config.ingress is not None else bool(self.ingress or self.ingressDeny)
        egress = config.egress if config.egress is not None else bool(self.egress or self.egressDeny)
        return ingress, egress


class NodeStatus(StatusModel):
    ok: Bool | None = None
    error: Str | None = None
    lastUpdated: Str | None = None
    localPolicyRevision: Int | None = None
    enforcing: Bool | None = None
    annotations: dict[Str, Str] | None = None


class PolicyStatus(StatusModel):
    conditions: tuple[Condition, ...] | None = None
    derivativePolicies: dict[Str, NodeStatus] | None = None
    nodes: dict[Str, NodeStatus] | None = None


class _PolicyObject(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2",)

    spec: Rule | None = None
    specs: tuple[Rule, ...] | None = None
    status: PolicyStatus | None = None

    def rules(self) -> list[Rule]:
        """``spec`` followed by ``specs``: every rule of the policy, in order."""
        return ([self.spec] if self.spec is not None else []) + list(self.specs or ())

    def check(self) -> Iterator[Issue]:
        yield from super().check()
        if self.spec is None and not self.specs:
            yield "spec", "required value: a policy needs `spec` or `specs`"


class CiliumNetworkPolicy(_PolicyObject):
    kind: Literal["CiliumNetworkPolicy"] = "CiliumNetworkPolicy"

    def check(self) -> Iterator[Issue]:
        yield from super().check()
        for path, rule in self._rules_with_paths():
            if rule.nodeSelector is not None:
                yield (
                    f"{path}.nodeSelector",
                    ("not allowed in a CiliumNetworkPolicy (host policies need a CiliumClusterwideNetworkPolicy)"),
                )

    def _rules_with_paths(self) -> Iterator[tuple[str, Rule]]:
        if self.spec is not None:
            yield "spec", self.spec
        for index, rule in enumerate(self.specs or ()):
            yield f"specs[{index}]", rule


class CiliumClusterwideNetworkPolicy(_PolicyObject):
    kind: Literal["CiliumClusterwideNetworkPolicy"] = "CiliumClusterwideNetworkPolicy"


# --- LB-IPAM -------------------------------------------------------------------------------------------


def _yes_no(value: object) -> Literal["Yes", "No"]:
    if isinstance(value, bool):
        raise ValueError('must be "Yes" or "No" in quotes: YAML reads an unquoted Yes or No as a boolean')
    if value == "Yes" or value == "No":
        return value
    raise ValueError(f'unsupported value {quote(value)}: supported values: "Yes", "No"')


YesNo = Annotated[Literal["Yes", "No"], PlainValidator(_yes_no)]


class IPPoolBlock(Model):
    cidr: Str | None = None
    start: Str | None = None
    stop: Str | None = None

    def check(self) -> Iterator[Issue]:
        if self.cidr is not None:
            if self.start is not None or self.stop is not None:
                yield "", "a block is either a `cidr` or a `start`/`stop` range, not both"
            elif (reason := cidr_error(self.cidr)) is not None:
                yield "cidr", invalid(self.cidr, reason)
            return
        if self.start is None:
            yield "", "a block needs `cidr` or `start`"
            return
        bad = False
        for field in ("start", "stop"):
            value = getattr(self, field)
            if value is not None and (reason := ip_error(value)) is not None:
                yield field, invalid(value, reason)
                bad = True
        if bad or self.stop is None:
            return
        start, stop = ipaddress.ip_address(self.start), ipaddress.ip_address(self.stop)
        if start.version != stop.version:
            yield "stop", invalid(self.stop, "must be of the same IP family as `start`")
        elif stop < start:  # type: ignore[operator]
            yield "stop", invalid(self.stop, f"must not be lower than start {self.start}")


class CiliumLoadBalancerIPPoolSpec(Model):
    blocks: tuple[IPPoolBlock, ...] | None = None
    serviceSelector: LabelSelector | None = None
    disabled: Bool = False
    allowFirstLastIPs: YesNo | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_cidrs(cls, data: Any) -> Any:
        # Before Cilium 1.15 blocks were called `cidrs`; they are read into `blocks`.
        if isinstance(data, dict) and "cidrs" in data:
            data = dict(data)
            legacy = data.pop("cidrs")
            if isinstance(legacy, list) and isinstance(data.get("blocks", []), list):
                data["blocks"] = list(data.get("blocks") or []) + legacy
        return data

    def check(self) -> Iterator[Issue]:
        if not self.blocks:
            yield "blocks", "required value: a pool needs at least one block"


class PoolStatus(StatusModel):
    conditions: tuple[Condition, ...] | None = None


class CiliumLoadBalancerIPPool(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2", "cilium.io/v2alpha1")

    kind: Literal["CiliumLoadBalancerIPPool"] = "CiliumLoadBalancerIPPool"
    spec: CiliumLoadBalancerIPPoolSpec
    status: PoolStatus | None = None


class CiliumL2AnnouncementPolicySpec(Model):
    nodeSelector: LabelSelector | None = None
    serviceSelector: LabelSelector | None = None
    loadBalancerIPs: Bool | None = None
    externalIPs: Bool | None = None
    interfaces: tuple[Str, ...] | None = None

    def check(self) -> Iterator[Issue]:
        for index, pattern in enumerate(self.interfaces or ()):
            yield from _regex_problems(pattern, f"interfaces[{index}]")


class CiliumL2AnnouncementPolicy(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2alpha1",)

    kind: Literal["CiliumL2AnnouncementPolicy"] = "CiliumL2AnnouncementPolicy"
    spec: CiliumL2AnnouncementPolicySpec
    status: PoolStatus | None = None


# --- BGP ------------------------------------------------------------------------------------------------

MAX_ASN = 4294967295
Afi = Literal["ipv4", "ipv6", "l2vpn", "ls", "opaque"]
Safi = Literal[
    "unicast", "multicast", "mpls_label", "encapsulation", "vpls", "evpn", "ls", "sr_policy", "mup",
    "mpls_vpn", "mpls_vpn_multicast", "route_target_constraints", "flowspec_unicast", "flowspec_vpn",
    "key_value",
]  # fmt: skip
WellKnownCommunity = Literal[
    "internet", "planned-shut", "accept-own", "route-filter-translated-v4", "route-filter-v4",
    "route-filter-translated-v6", "route-filter-v6", "llgr-stale", "no-llgr", "blackhole", "no-export",
    "no-advertise", "no-export-subconfed", "no-peer",
]  # fmt: skip
_STANDARD_COMMUNITY = re.compile(r"(\d{1,10})|(\d{1,5}):(\d{1,5})")
_LARGE_COMMUNITY = re.compile(r"(\d{1,10}):(\d{1,10}):(\d{1,10})")


def _range_problems(value: int | None, path: str, low: int, high: int) -> Iterator[Issue]:
    if value is not None and not low <= value <= high:
        yield path, invalid(value, f"must be between {low} and {high}, inclusive")


class Communities(Model):
    standard: tuple[Str, ...] | None = None
    wellKnown: tuple[WellKnownCommunity, ...] | None = None
    large: tuple[Str, ...] | None = None

    def check(self) -> Iterator[Issue]:
        for index, value in enumerate(self.standard or ()):
            match = _STANDARD_COMMUNITY.fullmatch(value)
            ok = match is not None and (
                int(match[1]) <= MAX_ASN if match[1] else int(match[2]) <= 65535 and int(match[3]) <= 65535
            )
            if not ok:
                yield f"standard[{index}]", invalid(value, "must be a 32-bit number or two 16-bit numbers as 'a:b'")
        for index, value in enumerate(self.large or ()):
            match = _LARGE_COMMUNITY.fullmatch(value)
            if match is None or any(int(part) > MAX_ASN for part in match.groups()):
                yield f"large[{index}]", invalid(value, "must be three 32-bit numbers as 'a:b:c'")


class Family(Model):
    afi: Afi
    safi: Safi


class GracefulRestart(Model):
    enabled: Bool
    restartTimeSeconds: Int = 120

    def check(self) -> Iterator[Issue]:
        yield from _range_problems(self.restartTimeSeconds, "restartTimeSeconds", 1, 4095)


class PathAttributes(Model):
    selectorType: Literal["PodCIDR", "CiliumLoadBalancerIPPool", "CiliumPodIPPool"]
    selector: LabelSelector | None = None
    communities: Communities | None = None
    localPreference: Int | None = None


def _timer_problems(connect: int | None, hold: int | None, keepalive: int | None) -> Iterator[Issue]:
    yield from _range_problems(connect, "connectRetryTimeSeconds", 1, 2147483647)
    yield from _range_problems(hold, "holdTimeSeconds", 3, 65535)
    yield from _range_problems(keepalive, "keepAliveTimeSeconds", 1, 65535)
    if hold is not None and keepalive is not None and keepalive > hold:
        yield "keepAliveTimeSeconds", invalid(keepalive, f"can not be larger than holdTimeSeconds ({hold})")


class BGPNeighbor(Model):
    peerAddress: CIDRString
    peerPort: Int = 179
    peerASN: Int
    authSecretRef: Str | None = None
    eBGPMultihopTTL: Int = 1
    connectRetryTimeSeconds: Int = 120
    holdTimeSeconds: Int = 90
    keepAliveTimeSeconds: Int = 30
    gracefulRestart: GracefulRestart | None = None
    families: tuple[Family, ...] | None = None
    advertisedPathAttributes: tuple[PathAttributes, ...] | None = None

    def check(self) -> Iterator[Issue]:
        yield from _range_problems(self.peerPort, "peerPort", 1, 65535)
        yield from _range_problems(self.peerASN, "peerASN", 0, MAX_ASN)
        yield from _range_problems(self.eBGPMultihopTTL, "eBGPMultihopTTL", 1, 255)
        yield from _timer_problems(self.connectRetryTimeSeconds, self.holdTimeSeconds, self.keepAliveTimeSeconds)


ServiceAddressType = Literal["LoadBalancerIP", "ClusterIP", "ExternalIP"]


class BGPVirtualRouter(Model):
    localASN: Int
    exportPodCIDR: Bool = False
    podIPPoolSelector: LabelSelector | None = None
    serviceSelector: LabelSelector | None = None
    serviceAdvertisements: tuple[ServiceAddressType, ...] = ("LoadBalancerIP",)
    neighbors: tuple[BGPNeighbor, ...]

    def check(self) -> Iterator[Issue]:
        yield from _range_problems(self.localASN, "localASN", 1, MAX_ASN)
        yield from unique_problems((n.peerAddress for n in self.neighbors), "neighbors")


class CiliumBGPPeeringPolicySpec(Model):
    nodeSelector: LabelSelector | None = None
    virtualRouters: tuple[BGPVirtualRouter, ...]

    def check(self) -> Iterator[Issue]:
        if not self.virtualRouters:
            yield "virtualRouters", "required value: at least one virtual router"
        yield from unique_problems((r.localASN for r in self.virtualRouters), "virtualRouters")


class CiliumBGPPeeringPolicy(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2alpha1",)

    kind: Literal["CiliumBGPPeeringPolicy"] = "CiliumBGPPeeringPolicy"
    spec: CiliumBGPPeeringPolicySpec
    status: PoolStatus | None = None


class DefaultGatewayDiscovery(Model):
    addressFamily: Literal["ipv4", "ipv6"]


class UnnumberedDiscovery(Model):
    interface: Str


class AutoDiscovery(Model):
    mode: Literal["DefaultGateway", "Unnumbered"]
    defaultGateway: DefaultGatewayDiscovery | None = None
    unnumbered: UnnumberedDiscovery | None = None

    def check(self) -> Iterator[Issue]:
        if self.mode == "DefaultGateway" and self.defaultGateway is None:
            yield "defaultGateway", "must be set when mode is DefaultGateway"
        if self.mode == "Unnumbered" and (self.unnumbered is None) == (self.defaultGateway is None):
            yield "", "exactly one of unnumbered or defaultGateway must be set when mode is Unnumbered"


class PeerConfigReference(Model):
    name: Str
    group: Str | None = None
    kind: Str | None = None


class BGPPeer(Model):
    name: Str
    peerAddress: IPString | None = None
    peerASN: Int = 0
    peerInterface: Str | None = None
    autoDiscovery: AutoDiscovery | None = None
    peerConfigRef: PeerConfigReference | None = None

    def check(self) -> Iterator[Issue]:
        if not self.name or len(self.name) > 255:
            yield "name", "must be between 1 and 255 characters"
        yield from _range_problems(self.peerASN, "peerASN", 0, MAX_ASN)
        if self.peerAddress is None and self.autoDiscovery is None:
            yield "", "one of peerAddress or autoDiscovery must be set"
        if (
            self.peerInterface is not None
            and self.peerAddress is not None
            and (":" not in self.peerAddress or not ipaddress.ip_address(self.peerAddress).is_link_local)
        ):
            yield "peerAddress", "must be an IPv6 link-local address (fe80::/10) when peerInterface is set"


class BGPInstance(Model):
    name: Str
    localASN: Int | None = None
    localPort: Int | None = None
    peers: tuple[BGPPeer, ...] | None = None

    def check(self) -> Iterator[Issue]:
        if not self.name or len(self.name) > 255:
            yield "name", "must be between 1 and 255 characters"
        yield from _range_problems(self.localASN, "localASN", 1, MAX_ASN)
        yield from _range_problems(self.localPort, "localPort", 1, 65535)
        yield from unique_problems((p.name for p in self.peers or ()), "peers")


class CiliumBGPClusterConfigSpec(Model):
    nodeSelector: LabelSelector | None = None
    bgpInstances: tuple[BGPInstance, ...]

    def check(self) -> Iterator[Issue]:
        if not 1 <= len(self.bgpInstances) <= 16:
            yield "bgpInstances", "must list between 1 and 16 BGP instances"
        yield from unique_problems((i.name for i in self.bgpInstances), "bgpInstances")


class CiliumBGPClusterConfig(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2", "cilium.io/v2alpha1")

    kind: Literal["CiliumBGPClusterConfig"] = "CiliumBGPClusterConfig"
    spec: CiliumBGPClusterConfigSpec
    status: PoolStatus | None = None


class BGPTransport(Model):
    peerPort: Int = 179
    sourceInterface: Str | None = None
    localPort: Int | None = None  # v2alpha1 only, deprecated

    def check(self) -> Iterator[Issue]:
        yield from _range_problems(self.peerPort, "peerPort", 1, 65535)
        yield from _range_problems(self.localPort, "localPort", 1, 65535)


class BGPTimers(Model):
    connectRetryTimeSeconds: Int = 120
    holdTimeSeconds: Int = 90
    keepAliveTimeSeconds: Int = 30

    def check(self) -> Iterator[Issue]:
        yield from _timer_problems(self.connectRetryTimeSeconds, self.holdTimeSeconds, self.keepAliveTimeSeconds)


class FamilyWithAdverts(Family):
    advertisements: LabelSelector | None = None


class CiliumBGPPeerConfigSpec(Model):
    transport: BGPTransport | None = None
    timers: BGPTimers | None = None
    authSecretRef: Str | None = None
    gracefulRestart: GracefulRestart | None = None
    ebgpMultihop: Int = 1
    families: tuple[FamilyWithAdverts, ...] | None = None

    def check(self) -> Iterator[Issue]:
        yield from _range_problems(self.ebgpMultihop, "ebgpMultihop", 1, 255)


class CiliumBGPPeerConfig(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2", "cilium.io/v2alpha1")

    kind: Literal["CiliumBGPPeerConfig"] = "CiliumBGPPeerConfig"
    spec: CiliumBGPPeerConfigSpec = Field(default_factory=CiliumBGPPeerConfigSpec)
    status: PoolStatus | None = None


class BGPServiceOptions(Model):
    addresses: tuple[ServiceAddressType, ...]
    aggregationLengthIPv4: Int | None = None
    aggregationLengthIPv6: Int | None = None

    def check(self) -> Iterator[Issue]:
        if not self.addresses:
            yield "addresses", "required value"
        yield from _range_problems(self.aggregationLengthIPv4, "aggregationLengthIPv4", 0, 31)
        yield from _range_problems(self.aggregationLengthIPv6, "aggregationLengthIPv6", 0, 127)


class BGPInterfaceOptions(Model):
    name: Str


class BGPAttributes(Model):
    communities: Communities | None = None
    localPreference: Int | None = None


class BGPAdvertisement(Model):
    advertisementType: Literal["PodCIDR", "CiliumPodIPPool", "Service", "Interface"]
    service: BGPServiceOptions | None = None
    interface: BGPInterfaceOptions | None = None
    selector: LabelSelector | None = None
    attributes: BGPAttributes | None = None

    def check(self) -> Iterator[Issue]:
        kind = self.advertisementType
        if kind == "Service" and self.service is None:
            yield "service", "required for the 'Service' advertisementType"
        if kind != "Service" and self.service is not None:
            yield "service", "not allowed for non-'Service' advertisementType"
        if kind == "Interface" and self.interface is None:
            yield "interface", "required for the 'Interface' advertisementType"
        if kind != "Interface" and self.interface is not None:
            yield "interface", "not allowed for non-'Interface' advertisementType"
        if kind == "PodCIDR" and self.selector is not None:
            yield "selector", "not allowed for the 'PodCIDR' advertisementType"


class CiliumBGPAdvertisementSpec(Model):
    advertisements: tuple[BGPAdvertisement, ...]


class CiliumBGPAdvertisement(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2", "cilium.io/v2alpha1")

    kind: Literal["CiliumBGPAdvertisement"] = "CiliumBGPAdvertisement"
    spec: CiliumBGPAdvertisementSpec


# --- CiliumNode ------------------------------------------------------------------------------------------

NodeAddressType = Literal["InternalIP", "ExternalIP", "CiliumInternalIP", "Hostname", "InternalDNS", "ExternalDNS"]


class NodeAddress(Model):
    type: NodeAddressType
    ip: Str


class HealthAddressing(Model):
    ipv4: Str | None = None
    ipv6: Str | None = None


class EncryptionSpec(Model):
    key: Int | None = None


class IPAMSpec(Model):
    podCIDRs: tuple[Str, ...] | None = None
    pool: JsonValue = None
    pools: JsonValue = None
    ipv6_pool: JsonValue = Field(default=None, alias="ipv6-pool")
    min_allocate: Int | None = Field(default=None, alias="min-allocate")
    max_allocate: Int | None = Field(default=None, alias="max-allocate")
    pre_allocate: Int | None = Field(default=None, alias="pre-allocate")
    max_above_watermark: Int | None = Field(default=None, alias="max-above-watermark")
    static_ip_tags: JsonValue = Field(default=None, alias="static-ip-tags")

    def check(self) -> Iterator[Issue]:
        for index, cidr in enumerate(self.podCIDRs or ()):
            if (reason := cidr_error(cidr)) is not None:
                yield f"podCIDRs[{index}]", invalid(cidr, reason)


class CiliumNodeSpec(Model):
    addresses: tuple[NodeAddress, ...] | None = None
    ipam: IPAMSpec | None = None
    health: HealthAddressing | None = None
    ingress: HealthAddressing | None = None
    encryption: EncryptionSpec | None = None
    instance_id: Str | None = Field(default=None, alias="instance-id")
    nodeidentity: Int | None = None
    bootid: Str | None = None
    eni: JsonValue = None
    azure: JsonValue = None
    alibaba_cloud: JsonValue = Field(default=None, alias="alibaba-cloud")


class CiliumNodeStatus(StatusModel):
    ipam: JsonValue = None
    eni: JsonValue = None
    azure: JsonValue = None
    alibaba_cloud: JsonValue = Field(default=None, alias="alibaba-cloud")


class CiliumNode(ApiObject):
    """A node as the agents describe it; users read it, the agent of that node writes it."""

    api_versions: ClassVar[tuple[str, ...]] = ("cilium.io/v2",)

    kind: Literal["CiliumNode"] = "CiliumNode"
    spec: CiliumNodeSpec = Field(default_factory=CiliumNodeSpec)
    status: CiliumNodeStatus | None = None

    def address(self, type_: str) -> str | None:
        """The first ``spec.addresses`` entry of ``type_`` (``InternalIP``, ``CiliumInternalIP``)."""
        for item in self.spec.addresses or ():
            if item.type == type_:
                return item.ip
        return None

    def internal_ip(self) -> ipaddress.IPv4Address | None:
        """The first ``InternalIP`` address that is IPv4 (the node's address for tunnels and the ipcache)."""
        for item in self.spec.addresses or ():
            if item.type == "InternalIP":
                try:
                    return ipaddress.IPv4Address(item.ip)
                except ValueError:
                    continue
        return None

    def pod_cidr(self) -> ipaddress.IPv4Network | None:
        """The first ``spec.ipam.podCIDRs`` entry that is an IPv4 network (the node's pod pool)."""
        for cidr in (self.spec.ipam.podCIDRs or ()) if self.spec.ipam is not None else ():
            try:
                return ipaddress.IPv4Network(cidr)
            except ValueError:
                continue
        return None


__all__ = [
    "ENTITIES",
    "CIDRRule",
    "CiliumBGPAdvertisement",
    "CiliumBGPClusterConfig",
    "CiliumBGPPeerConfig",
    "CiliumBGPPeeringPolicy",
    "CiliumClusterwideNetworkPolicy",
    "CiliumL2AnnouncementPolicy",
    "CiliumLoadBalancerIPPool",
    "CiliumNetworkPolicy",
    "CiliumNode",
    "EgressDenyRule",
    "EgressRule",
    "EndpointSelector",
    "FQDNSelector",
    "IngressDenyRule",
    "IngressRule",
    "L7Rules",
    "PortProtocol",
    "PortRule",
    "PortRuleDNS",
    "PortRuleHTTP",
    "Rule",
    "parse_port",
]
