"""The Kubernetes core kinds membrane accepts: Namespace, Pod, Service, NetworkPolicy.

Field names, defaults and the validation rules follow the Kubernetes API (``core/v1``,
``networking/v1`` and their ``validation.go``); fields that are legal Kubernetes but do nothing
here (resources, env, probes, affinity, ...) are accepted and kept, unknown ones are refused.

Primitives: :class:`Namespace`, :class:`Pod` (:class:`PodSpec`, :class:`Container`,
:class:`ContainerPort`, :class:`PodStatus`), :class:`Service` (:class:`ServiceSpec`,
:class:`ServicePort`, :class:`ServiceStatus`), :class:`NetworkPolicy`
(:class:`NetworkPolicySpec`, :class:`NetworkPolicyPeer`, :class:`NetworkPolicyPort`, :class:`IPBlock`),
and :data:`IntOrString`; ``discovery.k8s.io/v1`` :class:`EndpointSlice` (:class:`Endpoint`,
:class:`EndpointConditions`, :class:`EndpointPort`, :class:`ObjectReference`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, JsonValue, PlainValidator, model_validator

from membrane.api.meta import (
    ApiObject,
    Bool,
    CIDRString,
    Condition,
    Int,
    Issue,
    LabelMap,
    LabelSelector,
    Model,
    NameSyntax,
    StatusModel,
    Str,
    cidr_error,
    dns1123_label_error,
    dns1123_subdomain_error,
    invalid,
    ip_error,
    label_key_error,
    network,
    port_name_error,
    quote,
    unique_problems,
)

#: The default NodePort range of the Kubernetes API server (``--service-node-port-range``).
NODE_PORT_RANGE = (30000, 32767)

#: Kubernetes sets this label on every Namespace, so policies can select namespaces by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _int_or_string(value: object) -> int | str:
    # bool is an int subclass in Python; Kubernetes' IntOrString refuses it.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be an integer or a string")
    return value


#: Kubernetes' ``IntOrString`` (targetPort, NetworkPolicy port): a number or a named port.
IntOrString = Annotated[int | str, PlainValidator(_int_or_string)]

Protocol = Literal["TCP", "UDP", "SCTP"]


def port_number_problems(value: int, path: str, low: int = 1) -> Iterator[Issue]:
    if not low <= value <= 65535:
        yield path, invalid(value, f"must be between {low} and 65535, inclusive")


def int_or_name_problems(value: int | str, path: str) -> Iterator[Issue]:
    """A port given as a number (1-65535) or as an IANA service name."""
    if isinstance(value, int):
        yield from port_number_problems(value, path)
    elif (reason := port_name_error(value)) is not None:
        yield path, invalid(value, reason)


# --- Namespace -------------------------------------------------------------------------------------


class NamespaceSpec(Model):
    finalizers: tuple[Str, ...] | None = None


class NamespaceStatus(StatusModel):
    phase: Literal["Active", "Terminating"] | None = None
    conditions: tuple[JsonValue, ...] | None = None


class Namespace(ApiObject):
    name_syntax: ClassVar[NameSyntax] = "dns1123-label"
    api_versions: ClassVar[tuple[str, ...]] = ("v1",)

    kind: Literal["Namespace"] = "Namespace"
    spec: NamespaceSpec | None = None
    status: NamespaceStatus | None = None


# --- Pod -------------------------------------------------------------------------------------------


class ContainerPort(Model):
    name: Str | None = None
    containerPort: Int
    protocol: Protocol = "TCP"
    hostPort: Int | None = None
    hostIP: Str | None = None

    def check(self) -> Iterator[Issue]:
        if self.name is not None and (reason := port_name_error(self.name)) is not None:
            yield "name", invalid(self.name, reason)
        yield from port_number_problems(self.containerPort, "containerPort")
        if self.hostPort is not None:
            yield from port_number_problems(self.hostPort, "hostPort")
        if self.hostIP is not None and (reason := ip_error(self.hostIP)) is not None:
            yield "hostIP", invalid(self.hostIP, reason)


class Container(Model):
    """A container. membrane runs ``command``/``args`` in the pod's network namespace; ``image``
    is kept for the record (Kubernetes requires it, membrane pulls nothing)."""

    name: Str
    image: Str | None = None
    command: tuple[Str, ...] | None = None
    args: tuple[Str, ...] | None = None
    workingDir: Str | None = None
    ports: tuple[ContainerPort, ...] | None = None
    # Accepted and kept, without effect here.
    env: tuple[JsonValue, ...] | None = None
    envFrom: tuple[JsonValue, ...] | None = None
    resources: JsonValue = None
    resizePolicy: tuple[JsonValue, ...] | None = None
    restartPolicy: Literal["Always"] | None = None
    volumeMounts: tuple[JsonValue, ...] | None = None
    volumeDevices: tuple[JsonValue, ...] | None = None
    livenessProbe: JsonValue = None
    readinessProbe: JsonValue = None
    startupProbe: JsonValue = None
    lifecycle: JsonValue = None
    terminationMessagePath: Str | None = None
    terminationMessagePolicy: Literal["File", "FallbackToLogsOnError"] | None = None
    imagePullPolicy: Literal["Always", "Never", "IfNotPresent"] | None = None
    securityContext: JsonValue = None
    stdin: Bool | None = None
    stdinOnce: Bool | None = None
    tty: Bool | None = None

    def check(self) -> Iterator[Issue]:
        if (reason := dns1123_label_error(self.name)) is not None:
            yield "name", invalid(self.name, reason)
        ports = self.ports or ()
        yield from unique_problems(((p.containerPort, p.protocol) for p in ports), "ports")


class PodSpec(Model):
    containers: tuple[Container, ...]
    initContainers: tuple[Container, ...] | None = None
    ephemeralContainers: tuple[JsonValue, ...] | None = None
    nodeName: Str | None = None
    nodeSelector: dict[Str, Str] | None = None
    restartPolicy: Literal["Always", "OnFailure", "Never"] = "Always"
    serviceAccountName: Str | None = None
    serviceAccount: Str | None = None
    automountServiceAccountToken: Bool | None = None
    terminationGracePeriodSeconds: Int | None = None
    activeDeadlineSeconds: Int | None = None
    dnsPolicy: Literal["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"] | None = None
    dnsConfig: JsonValue = None
    hostNetwork: Bool | None = None
    hostPID: Bool | None = None
    hostIPC: Bool | None = None
    hostUsers: Bool | None = None
    shareProcessNamespace: Bool | None = None
    hostname: Str | None = None
    subdomain: Str | None = None
    setHostnameAsFQDN: Bool | None = None
    hostAliases: tuple[JsonValue, ...] | None = None
    securityContext: JsonValue = None
    imagePullSecrets: tuple[JsonValue, ...] | None = None
    affinity: JsonValue = None
    tolerations: tuple[JsonValue, ...] | None = None
    topologySpreadConstraints: tuple[JsonValue, ...] | None = None
    schedulerName: Str | None = None
    schedulingGates: tuple[JsonValue, ...] | None = None
    priorityClassName: Str | None = None
    priority: Int | None = None
    preemptionPolicy: Str | None = None
    runtimeClassName: Str | None = None
    overhead: JsonValue = None
    enableServiceLinks: Bool | None = None
    readinessGates: tuple[JsonValue, ...] | None = None
    os: JsonValue = None
    volumes: tuple[JsonValue, ...] | None = None
    resourceClaims: tuple[JsonValue, ...] | None = None
    resources: JsonValue = None

    def check(self) -> Iterator[Issue]:
        if not self.containers:
            yield "containers", "required value"
        names: set[str] = set()
        for field, items in (("initContainers", self.initContainers or ()), ("containers", self.containers)):
            for index, container in enumerate(items):
                if container.name in names:
                    yield f"{field}[{index}].name", f"duplicate value {quote(container.name)}"
                names.add(container.name)
        port_names: set[str] = set()
        for cindex, container in enumerate(self.containers):
            for pindex, port in enumerate(container.ports or ()):
                if port.name is None:
                    continue
                if port.name in port_names:
                    yield f"containers[{cindex}].ports[{pindex}].name", f"duplicate value {quote(port.name)}"
                port_names.add(port.name)
        if self.nodeName is not None and (reason := dns1123_subdomain_error(self.nodeName)) is not None:
            yield "nodeName", invalid(self.nodeName, reason)
        if self.terminationGracePeriodSeconds is not None and self.terminationGracePeriodSeconds < 0:
            yield "terminationGracePeriodSeconds", invalid(self.terminationGracePeriodSeconds, "must be >= 0")

    def named_port(self, name: str) -> ContainerPort | None:
        """The container port called ``name`` (named ports in Services and policies resolve here)."""
        for container in self.containers:
            for port in container.ports or ():
                if port.name == name:
                    return port
        return None


class PodIP(Model):
    ip: Str


class ContainerStatus(StatusModel):
    name: Str
    ready: Bool = False
    restartCount: Int = 0
    started: Bool | None = None
    state: JsonValue = None
    lastState: JsonValue = None
    image: Str | None = None
    imageID: Str | None = None
    containerID: Str | None = None


class PodCondition(StatusModel):
    type: Str
    status: Literal["True", "False", "Unknown"]
    lastProbeTime: Str | None = None
    lastTransitionTime: Str | None = None
    reason: Str | None = None
    message: Str | None = None


class PodStatus(StatusModel):
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"] | None = None
    conditions: tuple[PodCondition, ...] | None = None
    message: Str | None = None
    reason: Str | None = None
    nominatedNodeName: Str | None = None
    hostIP: Str | None = None
    hostIPs: tuple[PodIP, ...] | None = None
    podIP: Str | None = None
    podIPs: tuple[PodIP, ...] | None = None
    startTime: Str | None = None
    initContainerStatuses: tuple[ContainerStatus, ...] | None = None
    containerStatuses: tuple[ContainerStatus, ...] | None = None
    qosClass: Str | None = None


class Pod(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("v1",)

    kind: Literal["Pod"] = "Pod"
    spec: PodSpec
    status: PodStatus | None = None


# --- Service ---------------------------------------------------------------------------------------

ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]
TrafficPolicy = Literal["Cluster", "Local"]


class ServicePort(Model):
    name: Str | None = None
    protocol: Protocol = "TCP"
    appProtocol: Str | None = None
    port: Int
    targetPort: IntOrString | None = None
    nodePort: Int | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_target_port(cls, data: Any) -> Any:
        # The API server defaults targetPort to port.
        if isinstance(data, dict) and data.get("targetPort") is None and "port" in data:
            return {**data, "targetPort": data["port"]}
        return data

    def check(self) -> Iterator[Issue]:
        if self.name is not None and (reason := dns1123_label_error(self.name)) is not None:
            yield "name", invalid(self.name, reason)
        yield from port_number_problems(self.port, "port")
        if self.targetPort is not None:
            yield from int_or_name_problems(self.targetPort, "targetPort")
        if self.nodePort is not None and self.nodePort != 0:
            low, high = NODE_PORT_RANGE
            if not low <= self.nodePort <= high:
                yield (
                    "nodePort",
                    invalid(
                        self.nodePort,
                        f"provided port is not in the valid range. The range of valid ports is {low}-{high}",
                    ),
                )


class ClientIPConfig(Model):
    timeoutSeconds: Int = 10800

    def check(self) -> Iterator[Issue]:
        if not 0 < self.timeoutSeconds <= 86400:
            yield "timeoutSeconds", invalid(self.timeoutSeconds, "must be greater than 0 and less than 86400")


class SessionAffinityConfig(Model):
    clientIP: ClientIPConfig | None = None


class ServiceSpec(Model):
    type: ServiceType = "ClusterIP"
    selector: LabelMap | None = None
    ports: tuple[ServicePort, ...] | None = None
    clusterIP: Str | None = None
    clusterIPs: tuple[Str, ...] | None = None
    externalIPs: tuple[Str, ...] | None = None
    externalName: Str | None = None
    sessionAffinity: Literal["None", "ClientIP"] = "None"
    sessionAffinityConfig: SessionAffinityConfig | None = None
    externalTrafficPolicy: TrafficPolicy | None = None
    internalTrafficPolicy: TrafficPolicy | None = None
    loadBalancerIP: Str | None = None
    loadBalancerClass: Str | None = None
    loadBalancerSourceRanges: tuple[Str, ...] | None = None
    allocateLoadBalancerNodePorts: Bool | None = None
    healthCheckNodePort: Int | None = None
    ipFamilies: tuple[Literal["IPv4", "IPv6"], ...] | None = None
    ipFamilyPolicy: Literal["SingleStack", "PreferDualStack", "RequireDualStack"] | None = None
    publishNotReadyAddresses: Bool | None = None
    trafficDistribution: Str | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        # The API server's defaults (pkg/apis/core/v1/defaults.go) that depend on the type.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        kind = data.get("type") or "ClusterIP"
        if kind != "ExternalName" and data.get("internalTrafficPolicy") is None:
            data["internalTrafficPolicy"] = "Cluster"
        externally_reachable = kind in ("NodePort", "LoadBalancer") or (kind == "ClusterIP" and data.get("externalIPs"))
        if externally_reachable and data.get("externalTrafficPolicy") is None:
            data["externalTrafficPolicy"] = "Cluster"
        if kind == "LoadBalancer" and data.get("allocateLoadBalancerNodePorts") is None:
            data["allocateLoadBalancerNodePorts"] = True
        if data.get("sessionAffinity") == "ClientIP" and data.get("sessionAffinityConfig") is None:
            data["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
        return data

    @property
    def is_headless(self) -> bool:
        return self.clusterIP == "None"

    @property
    def externally_reachable(self) -> bool:
        return self.type in ("NodePort", "LoadBalancer") or (self.type == "ClusterIP" and bool(self.externalIPs))

    def check(self) -> Iterator[Issue]:
        ports = self.ports or ()
        if not ports and self.type != "ExternalName" and not self.is_headless:
            yield "ports", "required value"
        if len(ports) > 1:
            for index, port in enumerate(ports):
                if not port.name:
                    yield (
                        f"ports[{index}].name",
                        "required value: a service with more than one port must name every port",
                    )
        yield from unique_problems((p.name for p in ports if p.name), "ports")
        seen: set[tuple[int, str]] = set()
        node_ports: set[tuple[int, str]] = set()
        for index, port in enumerate(ports):
            if (port.port, port.protocol) in seen:
                yield f"ports[{index}]", f"duplicate value: port {port.port}/{port.protocol} is listed twice"
            seen.add((port.port, port.protocol))
            if port.nodePort:
                if self.type not in ("NodePort", "LoadBalancer"):
                    yield f"ports[{index}].nodePort", f"may not be used when `type` is {quote(self.type)}"
                if (port.nodePort, port.protocol) in node_ports:
                    yield f"ports[{index}].nodePort", f"duplicate value {port.nodePort}"
                node_ports.add((port.nodePort, port.protocol))

        if self.type == "ExternalName":
            if not self.externalName:
                yield "externalName", "required value"
            elif (reason := dns1123_subdomain_error(self.externalName.rstrip("."))) is not None:
                yield "externalName", invalid(self.externalName, reason)
            if self.clusterIP or self.clusterIPs:
                yield "clusterIP", "may not be set for ExternalName services"
        elif self.externalName:
            yield "externalName", "may only be used when `type` is 'ExternalName'"

        if self.clusterIP and self.clusterIP != "None" and (reason := ip_error(self.clusterIP)) is not None:
            yield "clusterIP", invalid(self.clusterIP, reason + ", or 'None'")
        if self.is_headless and self.type in ("NodePort", "LoadBalancer"):
            yield "clusterIP", f"may not be set to 'None' for {self.type} services"
        for index, ip in enumerate(self.clusterIPs or ()):
            if ip != "None" and (reason := ip_error(ip)) is not None:
                yield f"clusterIPs[{index}]", invalid(ip, reason)
        if self.clusterIP and self.clusterIPs and self.clusterIPs[0] != self.clusterIP:
            yield "clusterIPs[0]", invalid(self.clusterIPs[0], "must match `clusterIP` when both are specified")
        for index, ip in enumerate(self.externalIPs or ()):
            if (reason := ip_error(ip)) is not None:
                yield f"externalIPs[{index}]", invalid(ip, reason)

        if self.sessionAffinity == "None" and self.sessionAffinityConfig is not None:
            yield "sessionAffinityConfig", "must not be set when `sessionAffinity` is 'None'"
        if self.externalTrafficPolicy is not None and not self.externally_reachable:
            yield "externalTrafficPolicy", "may only be set for externally-accessible services"

        lb_only = {
            "loadBalancerClass": self.loadBalancerClass,
            "loadBalancerSourceRanges": self.loadBalancerSourceRanges,
            "allocateLoadBalancerNodePorts": self.allocateLoadBalancerNodePorts,
        }
        for field, value in lb_only.items():
            if value is not None and self.type != "LoadBalancer":
                yield field, "may only be used when `type` is 'LoadBalancer'"
        if self.loadBalancerIP and (reason := ip_error(self.loadBalancerIP)) is not None:
            yield "loadBalancerIP", invalid(self.loadBalancerIP, reason)
        if self.loadBalancerClass is not None and (reason := label_key_error(self.loadBalancerClass)) is not None:
            yield "loadBalancerClass", invalid(self.loadBalancerClass, reason)
        for index, cidr in enumerate(self.loadBalancerSourceRanges or ()):
            if (reason := cidr_error(cidr.strip())) is not None:
                yield f"loadBalancerSourceRanges[{index}]", invalid(cidr, reason)
        if self.healthCheckNodePort and not (self.type == "LoadBalancer" and self.externalTrafficPolicy == "Local"):
            yield (
                "healthCheckNodePort",
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
            )

        families = self.ipFamilies or ()
        yield from unique_problems(families, "ipFamilies")
        if len(families) > 2:
            yield "ipFamilies", "may specify no more than two IP families"
        if len(families) == 2 and self.ipFamilyPolicy in (None, "SingleStack"):
            yield "ipFamilies", "when `ipFamilyPolicy` is 'SingleStack', only one IP family may be specified"
        for index, ip in enumerate(self.clusterIPs or ()):
            if index < len(families) and ip != "None" and ip_error(ip) is None:
                version = "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"
                if version != families[index]:
                    yield f"clusterIPs[{index}]", invalid(ip, f"expected an {families[index]} address")


class PortStatus(StatusModel):
    port: Int
    protocol: Protocol
    error: Str | None = None


class LoadBalancerIngress(StatusModel):
    ip: Str | None = None
    hostname: Str | None = None
    ipMode: Literal["VIP", "Proxy"] | None = None
    ports: tuple[PortStatus, ...] | None = None


class LoadBalancerStatus(StatusModel):
    ingress: tuple[LoadBalancerIngress, ...] | None = None


class ServiceStatus(StatusModel):
    loadBalancer: LoadBalancerStatus | None = None
    conditions: tuple[Condition, ...] | None = None


class Service(ApiObject):
    name_syntax: ClassVar[NameSyntax] = "dns1035-label"
    api_versions: ClassVar[tuple[str, ...]] = ("v1",)

    kind: Literal["Service"] = "Service"
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: ServiceStatus | None = None

    @property
    def ingress_ips(self) -> list[str]:
        """``status.loadBalancer.ingress[].ip``: the LoadBalancer IPs given to this service."""
        lb = self.status.loadBalancer if self.status else None
        return [item.ip for item in (lb.ingress or ()) if item.ip] if lb else []


# --- NetworkPolicy ---------------------------------------------------------------------------------


class IPBlock(Model):
    cidr: CIDRString
    except_: tuple[Str, ...] | None = Field(default=None, alias="except")

    def check(self) -> Iterator[Issue]:
        outer = network(self.cidr)
        for index, item in enumerate(self.except_ or ()):
            if (reason := cidr_error(item)) is not None:
                yield f"except[{index}]", invalid(item, reason)
                continue
            inner = network(item)
            if inner.version != outer.version or not inner.subnet_of(outer) or inner == outer:  # type: ignore[arg-type]
                yield f"except[{index}]", invalid(item, "must be a strict subset of `cidr`")


class NetworkPolicyPeer(Model):
    podSelector: LabelSelector | None = None
    namespaceSelector: LabelSelector | None = None
    ipBlock: IPBlock | None = None

    def check(self) -> Iterator[Issue]:
        peers = [p for p in (self.podSelector, self.namespaceSelector, self.ipBlock) if p is not None]
        if not peers:
            yield "", "must specify a peer"
        elif self.ipBlock is not None and len(peers) > 1:
            yield "", "may not specify both ipBlock and another peer"


class NetworkPolicyPort(Model):
    protocol: Protocol = "TCP"
    port: IntOrString | None = None
    endPort: Int | None = None

    def check(self) -> Iterator[Issue]:
        if self.port is not None:
            yield from int_or_name_problems(self.port, "port")
        if self.endPort is None:
            return
        if self.port is None:
            yield "port", "must be specified when `endPort` is specified"
        elif isinstance(self.port, str):
            yield "endPort", "may not be specified when `port` is non-numeric"
        elif self.endPort < self.port:
            yield "endPort", invalid(self.endPort, "must be greater than or equal to `port`")
        else:
            yield from port_number_problems(self.endPort, "endPort")


class NetworkPolicyIngressRule(Model):
    ports: tuple[NetworkPolicyPort, ...] | None = None
    from_: tuple[NetworkPolicyPeer, ...] | None = Field(default=None, alias="from")


class NetworkPolicyEgressRule(Model):
    ports: tuple[NetworkPolicyPort, ...] | None = None
    to: tuple[NetworkPolicyPeer, ...] | None = None


PolicyType = Literal["Ingress", "Egress"]


class NetworkPolicySpec(Model):
    podSelector: LabelSelector = Field(default_factory=LabelSelector)
    policyTypes: tuple[PolicyType, ...] = ()
    ingress: tuple[NetworkPolicyIngressRule, ...] | None = None
    egress: tuple[NetworkPolicyEgressRule, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_policy_types(cls, data: Any) -> Any:
        # The API server's default: Ingress always, Egress when egress rules are given.
        if isinstance(data, dict) and not data.get("policyTypes"):
            types = ["Ingress"] + (["Egress"] if data.get("egress") else [])
            return {**data, "policyTypes": types}
        return data

    def check(self) -> Iterator[Issue]:
        yield from unique_problems(self.policyTypes, "policyTypes")


class NetworkPolicy(ApiObject):
    api_versions: ClassVar[tuple[str, ...]] = ("networking.k8s.io/v1",)

    kind: Literal["NetworkPolicy"] = "NetworkPolicy"
    spec: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)


# --- EndpointSlice (discovery.k8s.io/v1) ----------------------------------------------------------

#: Ties an EndpointSlice to the Service it holds endpoints for (the Service's name).
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Names the controller that manages an EndpointSlice; controllers leave other managers' slices alone.
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
#: Kubernetes' EndpointSlice controller's value of :data:`MANAGED_BY_LABEL`; membrane's operator
#: plays that controller's part and marks its slices the same way.
ENDPOINTSLICE_CONTROLLER = "endpointslice-controller.k8s.io"
#: The API's limits (pkg/apis/discovery/validation).
MAX_SLICE_ENDPOINTS = 1000
MAX_ENDPOINT_ADDRESSES = 100
MAX_SLICE_PORTS = 100

AddressType = Literal["IPv4", "IPv6", "FQDN"]


def _non_special_ip_error(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    # apivalidation.ValidateNonSpecialIP: an endpoint address must be one a client can reach.
    if ip.is_unspecified:
        return f"may not be unspecified ({ip})"
    if ip.is_loopback:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if ip.is_link_local:
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if ip in ipaddress.ip_network("224.0.0.0/24") or ip in ipaddress.ip_network("ff02::/16"):
        return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"
    return None


def endpoint_address_error(address: str, address_type: str) -> str | None:
    """Why ``address`` cannot be an endpoint address of a slice of ``address_type`` (None if it can)."""
    if address_type == "FQDN":
        name = address.removesuffix(".")
        if (reason := dns1123_subdomain_error(name)) is not None:
            return reason
        if name.count(".") < 1:
            return "should be a domain with at least two segments separated by dots"
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if ip is None or ip.version != (4 if address_type == "IPv4" else 6):
        return f"must be a valid {address_type} address"
    return _non_special_ip_error(ip)


class EndpointConditions(Model):
    """Unset means unknown; consumers read an unset ``ready``/``serving`` as true."""

    ready: Bool | None = None
    serving: Bool | None = None
    terminating: Bool | None = None


class ObjectReference(Model):
    kind: Str | None = None
    namespace: Str | None = None
    name: Str | None = None
    uid: Str | None = None
    apiVersion: Str | None = None
    resourceVersion: Str | None = None
    fieldPath: Str | None = None


class Endpoint(Model):
    addresses: tuple[Str, ...]
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    hostname: Str | None = None
    targetRef: ObjectReference | None = None
    deprecatedTopology: dict[Str, Str] | None = None
    nodeName: Str | None = None
    zone: Str | None = None
    hints: JsonValue = None

    def check(self) -> Iterator[Issue]:
        # The addresses' syntax depends on the slice's addressType: EndpointSlice.check has it.
        if not self.addresses:
            yield "addresses", "required value: must contain at least 1 address"
        elif len(self.addresses) > MAX_ENDPOINT_ADDRESSES:
            yield "addresses", f"too many: {len(self.addresses)}: must have at most {MAX_ENDPOINT_ADDRESSES} items"
        if self.hostname is not None and (reason := dns1123_label_error(self.hostname)) is not None:
            yield "hostname", invalid(self.hostname, reason)
        if self.nodeName is not None and (reason := dns1123_subdomain_error(self.nodeName)) is not None:
            yield "nodeName", invalid(self.nodeName, reason)


class EndpointPort(Model):
    # The API server defaults an unset name to "" and an unset protocol to TCP.
    name: Str = ""
    protocol: Protocol = "TCP"
    port: Int | None = None
    appProtocol: Str | None = None

    def check(self) -> Iterator[Issue]:
        if self.name and (reason := dns1123_label_error(self.name)) is not None:
            yield "name", invalid(self.name, reason)
        if self.port is not None:
            yield from port_number_problems(self.port, "port")
        if self.appProtocol is not None and (reason := label_key_error(self.appProtocol)) is not None:
            yield "appProtocol", invalid(self.appProtocol, reason)


class EndpointSlice(ApiObject):
    """A set of endpoints of one Service (label :data:`SERVICE_NAME_LABEL`) for one set of ports."""

    api_versions: ClassVar[tuple[str, ...]] = ("discovery.k8s.io/v1",)

    kind: Literal["EndpointSlice"] = "EndpointSlice"
    addressType: AddressType
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] | None = None

    @property
    def service_name(self) -> str | None:
        return self.labels.get(SERVICE_NAME_LABEL)

    def check(self) -> Iterator[Issue]:
        yield from super().check()
        if len(self.endpoints) > MAX_SLICE_ENDPOINTS:
            yield "endpoints", f"too many: {len(self.endpoints)}: must have at most {MAX_SLICE_ENDPOINTS} items"
        for index, endpoint in enumerate(self.endpoints):
            for aindex, address in enumerate(endpoint.addresses[:MAX_ENDPOINT_ADDRESSES]):
                if (reason := endpoint_address_error(address, self.addressType)) is not None:
                    yield f"endpoints[{index}].addresses[{aindex}]", invalid(address, reason)
        ports = self.ports or ()
        if len(ports) > MAX_SLICE_PORTS:
            yield "ports", f"too many: {len(ports)}: must have at most {MAX_SLICE_PORTS} items"
        seen: set[str] = set()
        for index, port in enumerate(ports):
            if port.name in seen:
                yield f"ports[{index}].name", f"duplicate value {quote(port.name)}"
            seen.add(port.name)


__all__ = [
    "ENDPOINTSLICE_CONTROLLER",
    "MANAGED_BY_LABEL",
    "NAMESPACE_NAME_LABEL",
    "NODE_PORT_RANGE",
    "SERVICE_NAME_LABEL",
    "AddressType",
    "Container",
    "ContainerPort",
    "ContainerStatus",
    "Endpoint",
    "EndpointConditions",
    "EndpointPort",
    "EndpointSlice",
    "IPBlock",
    "IntOrString",
    "Namespace",
    "NamespaceSpec",
    "NamespaceStatus",
    "NetworkPolicy",
    "NetworkPolicyEgressRule",
    "NetworkPolicyIngressRule",
    "NetworkPolicyPeer",
    "NetworkPolicyPort",
    "NetworkPolicySpec",
    "ObjectReference",
    "Pod",
    "PodCondition",
    "PodIP",
    "PodSpec",
    "PodStatus",
    "Service",
    "ServicePort",
    "ServiceSpec",
    "ServiceStatus",
]
