"""Cluster IPs and node ports of Services, allocated at apply as the Kubernetes API server does.

A Service without ``spec.clusterIP`` gets the lowest free address of the cluster's
``serviceClusterIPRange`` (the network address and the first host, kept for the cluster's own
API service as in Kubernetes, are skipped); a NodePort or LoadBalancer service port without
``nodePort`` gets the lowest free port of ``nodePortRange`` (a LoadBalancer only when
``allocateLoadBalancerNodePorts`` is true). Requested values are checked: inside the range and not
held by another service, with the API server's messages.

Allocations are serialized through one store key (:data:`ALLOCATIONS_KEY`): every apply that
allocates rewrites it under a compare of its revision, so two concurrent applies never hand out the
same address — one of them loses the compare and recomputes from the winner's services.

Primitives: :class:`ServiceAllocator`, :data:`ALLOCATIONS_KEY`.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, ip_address

from membrane.api import k8s
from membrane.api.meta import quote
from membrane.core.config import ClusterConfig

ALLOCATIONS_KEY = "/membrane/registry/service-allocations"

Ref = tuple[str, str]


def _ref(service: k8s.Service) -> Ref:
    return (service.namespace or "default", service.name)


class ServiceAllocator:
    """What the stored services hold, and the allocation of what a service being applied lacks."""

    def __init__(self, config: ClusterConfig, stored: Iterable[k8s.Service]) -> None:
        self.range: IPv4Network = config.service_range()
        self.ports = config.node_ports()
        self.ips: dict[str, Ref] = {}
        self.node_ports: dict[tuple[int, str], Ref] = {}
        for service in stored:
            self._hold(service)
        self.changed = False

    def _hold(self, service: k8s.Service) -> None:
        ref = _ref(service)
        for ip in {service.spec.clusterIP, *(service.spec.clusterIPs or ())} - {None, "None", ""}:
            assert ip is not None
            self.ips[ip] = ref
        for port in service.spec.ports or ():
            if port.nodePort:
                self.node_ports[(port.nodePort, port.protocol)] = ref

    def release(self, service: k8s.Service) -> None:
        """Forget what ``service`` held (it is being replaced by a new version)."""
        ref = _ref(service)
        self.ips = {ip: owner for ip, owner in self.ips.items() if owner != ref}
        self.node_ports = {p: owner for p, owner in self.node_ports.items() if owner != ref}

    def _free_ip(self) -> str | None:
        network = self.range
        for offset in range(2, network.num_addresses - 1):
            candidate = str(network.network_address + offset)
            if candidate not in self.ips:
                return candidate
        return None

    def _free_port(self, protocol: str) -> int | None:
        low, high = self.ports
        for number in range(low, high + 1):
            if (number, protocol) not in self.node_ports:
                return number
        return None

    def allocate(self, service: k8s.Service) -> tuple[k8s.Service, list[str]]:
        """``service`` with its cluster IP and node ports filled in, or the problems (field: message)."""
        spec = service.spec
        ref = _ref(service)
        problems: list[str] = []
        updates: dict[str, object] = {}
        if spec.type != "ExternalName" and not spec.is_headless:
            requested = spec.clusterIP or (spec.clusterIPs[0] if spec.clusterIPs else None)
            if requested:
                address = ip_address(requested)
                owner = self.ips.get(requested)
                if not isinstance(address, IPv4Address) or address not in self.range:
                    problems.append(
                        f"spec.clusterIPs: Invalid value: [{quote(requested)}]: failed to allocate IP {requested}: "
                        f"the provided IP ({requested}) is not in the valid range. "
                        f"The range of valid IPs is {self.range}")
                elif owner is not None and owner != ref:
                    problems.append(f"spec.clusterIPs: Invalid value: [{quote(requested)}]: failed to allocate IP "
                                    f"{requested}: provided IP is already allocated")
                else:
                    self.ips[requested] = ref
            else:
                free = self._free_ip()
                if free is None:
                    problems.append(f"spec.clusterIP: failed to allocate a service IP: range {self.range} is full")
                else:
                    self.ips[free] = ref
                    updates.update(clusterIP=free, clusterIPs=(free,), ipFamilies=("IPv4",),
                                   ipFamilyPolicy=spec.ipFamilyPolicy or "SingleStack")
                    self.changed = True
        wants_node_ports = spec.type == "NodePort" or (
            spec.type == "LoadBalancer" and spec.allocateLoadBalancerNodePorts is not False)
        ports = list(spec.ports or ())
        low, high = self.ports
        for index, port in enumerate(ports):
            if port.nodePort:
                owner = self.node_ports.get((port.nodePort, port.protocol))
                if not low <= port.nodePort <= high:
                    problems.append(f"spec.ports[{index}].nodePort: Invalid value: {port.nodePort}: provided port "
                                    f"is not in the valid range. The range of valid ports is {low}-{high}")
                elif owner is not None and owner != ref:
                    problems.append(f"spec.ports[{index}].nodePort: Invalid value: {port.nodePort}: "
                                    "provided port is already allocated")
                else:
                    self.node_ports[(port.nodePort, port.protocol)] = ref
            elif wants_node_ports:
                number = self._free_port(port.protocol)
                if number is None:
                    problems.append(f"spec.ports[{index}].nodePort: failed to allocate a node port: "
                                    f"range {low}-{high} is full")
                    continue
                self.node_ports[(number, port.protocol)] = ref
                ports[index] = port.model_copy(update={"nodePort": number})
                self.changed = True
        if tuple(ports) != tuple(spec.ports or ()):
            updates["ports"] = tuple(ports)
        if problems or not updates:
            return service, problems
        return service.model_copy(update={"spec": spec.model_copy(update=updates)}), []
