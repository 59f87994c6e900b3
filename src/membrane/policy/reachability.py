"""Reachability matrices in the style of the Kubernetes network policy e2e suite (pure).

The upstream suite (``test/e2e/network/netpol``) runs three namespaces ``x``, ``y``, ``z`` with
pods ``a``, ``b``, ``c`` (labels ``pod=<name>``, namespace labels ``ns=<name>`` and
``kubernetes.io/metadata.name``), each serving ports 80 and 81 over TCP, UDP and SCTP on named
container ports ``serve-80-tcp`` ..., and compares a 9x9 truth table of who can connect to whom
with the expected one. This module is that machinery, with the probe pluggable:

- :class:`NetpolModel` / :func:`default_model` -- the pods, their labels, addresses, container
  ports and identities (plus optional outside addresses such as ``ext=198.51.100.10``);
- :data:`Probe` -- ``(source, destination, protocol, port) → allowed?``; :func:`engine_probe`
  answers from compiled policy (the datapath's ``rendered_probe`` from the nft
  elements the datapath would load, looked up the way the kernel does; a kernel probe sends real
  traffic);
- :class:`Reachability` -- a truth table, parsed from and printed as ASCII (rows are sources,
  columns destinations; ``.`` connects, ``X`` does not), with a readable comparison;
- :func:`probe_matrix` -- fills a table by probing every pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from membrane.api import k8s
from membrane.api.meta import ApiObject, ObjectMeta
from membrane.identity.ipcache import IpcacheEntry
from membrane.identity.labels import Label, identity_labels_for_pod
from membrane.identity.reserved import MIN_CLUSTER_IDENTITY, WORLD
from membrane.policy.engine import CompiledPolicy, compile_policies
from membrane.policy.ipcache import flatten_ipcache, with_cidr_identities
from membrane.policy.mapstate import EnforcementConfig, NamedPorts, PolicyEndpoint, named_ports_of
from membrane.policy.trace import TracePeer, resolve_peer, trace

#: ``(source, destination, protocol, port) → allowed?`` -- sources and destinations are model
#: names (``x/a``, or an outside address name such as ``ext``).
Probe = Callable[[str, str, str, int], bool]

ALLOWED, DENIED = ".", "X"


@dataclass(frozen=True)
class ModelPod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    ip: IPv4Address
    pod: k8s.Pod = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NetpolModel:
    """Namespaces and pods (with identities and addresses) the matrices are computed over."""

    namespaces: Mapping[str, Mapping[str, str]]  # name → labels
    pods: tuple[ModelPod, ...]
    outside: Mapping[str, IPv4Address] = field(default_factory=dict)  # name → address outside the cluster
    cluster_name: str = "default"

    @property
    def pod_keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.pods)

    def identity_labels(self, pod: ModelPod) -> frozenset[Label]:
        return identity_labels_for_pod(
            pod.namespace, pod.labels, self.namespaces[pod.namespace], cluster=self.cluster_name
        )

    def identities(self) -> dict[frozenset[Label], int]:
        """A cluster identity per distinct label set, numbered from 256 in pod order."""
        numbers: dict[frozenset[Label], int] = {}
        for pod in self.pods:
            numbers.setdefault(self.identity_labels(pod), MIN_CLUSTER_IDENTITY + len(numbers))
        return numbers

    def compile(self, policies: Iterable[ApiObject], config: EnforcementConfig | None = None) -> CompiledPolicy:
        numbers = self.identities()
        endpoints = []
        named: dict[int, dict[str, set[tuple[int, int]]]] = {}
        for pod in self.pods:
            identity = numbers[self.identity_labels(pod)]
            ports = named_ports_of(pod.pod.spec)
            endpoints.append(PolicyEndpoint(pod.key, identity, pod.namespace, ports))
            for name, values in ports.items():
                named.setdefault(identity, {}).setdefault(name, set()).update(values)
        named_ports: dict[int, NamedPorts] = {i: {n: frozenset(v) for n, v in m.items()} for i, m in named.items()}
        return compile_policies(
            policies,
            {number: labels for labels, number in numbers.items()},
            endpoints,
            config=config,
            named_ports_by_identity=named_ports,
            cluster_name=self.cluster_name,
        )

    def ipcache(self, compiled: CompiledPolicy) -> list[IpcacheEntry]:
        numbers = self.identities()
        entries = [IpcacheEntry(IPv4Network("0.0.0.0/0"), WORLD.id, "reserved")]
        entries += [
            IpcacheEntry(IPv4Network(pod.ip), numbers[self.identity_labels(pod)], "custom-resource")
            for pod in self.pods
        ]
        return with_cidr_identities(entries, compiled.cidr_identities)


def _pod(namespace: str, name: str, ports: Sequence[int], protocols: Sequence[str]) -> k8s.Pod:
    container_ports = tuple(
        k8s.ContainerPort(name=f"serve-{port}-{proto.lower()}", containerPort=port, protocol=proto)
        for port in ports
        for proto in protocols
    )
    return k8s.Pod(
        apiVersion="v1",
        metadata=ObjectMeta(name=name, namespace=namespace, labels={"pod": name}),
        spec=k8s.PodSpec(containers=(k8s.Container(name="server", ports=container_ports),)),
    )


def default_model(
    namespaces: Sequence[str] = ("x", "y", "z"),
    pods: Sequence[str] = ("a", "b", "c"),
    ports: Sequence[int] = (80, 81),
    protocols: Sequence[str] = ("TCP", "UDP", "SCTP"),
    outside: Mapping[str, str] | None = None,
    pod_labels: Mapping[str, Mapping[str, str]] | None = None,
    namespace_labels: Mapping[str, Mapping[str, str]] | None = None,
) -> NetpolModel:
    """The upstream e2e model: pod ``n/p`` gets 10.244.<n index + 1>.<p index + 10>.

    ``pod_labels`` (by ``ns/pod``) and ``namespace_labels`` add labels, as the e2e cases that
    relabel a pod or namespace do."""
    extra_pod = pod_labels or {}
    extra_ns = namespace_labels or {}
    model_pods = []
    for ns_index, namespace in enumerate(namespaces):
        for pod_index, name in enumerate(pods):
            ip = IPv4Address(f"10.244.{ns_index + 1}.{pod_index + 10}")
            labels = {"pod": name, **extra_pod.get(f"{namespace}/{name}", {})}
            model_pods.append(ModelPod(namespace, name, labels, ip, _pod(namespace, name, ports, protocols)))
    ns_labels = {ns: {"ns": ns, k8s.NAMESPACE_NAME_LABEL: ns, **extra_ns.get(ns, {})} for ns in namespaces}
    addresses = {name: IPv4Address(address) for name, address in (outside or {}).items()}
    return NetpolModel(ns_labels, tuple(model_pods), addresses)


def engine_probe(model: NetpolModel, compiled: CompiledPolicy) -> Probe:
    """A probe answered by the compiled policy: egress at the source, ingress at the destination."""
    intervals = flatten_ipcache(model.ipcache(compiled))
    addresses = {pod.ip: pod.key for pod in model.pods}

    def probe(source: str, destination: str, protocol: str, port: int) -> bool:
        def peer(name: str) -> TracePeer:
            text = str(model.outside[name]) if name in model.outside else name
            return resolve_peer(text, compiled.endpoints, intervals, addresses)

        return trace(peer(source), peer(destination), protocol, port).allowed

    return probe


# --- truth tables -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reachability:
    """A truth table: ``cells[(source, destination)]`` is True when the connection works."""

    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    cells: Mapping[tuple[str, str], bool]

    @classmethod
    def parse(cls, text: str) -> Reachability:
        """Read the ASCII form: a header of destinations (an optional ``-`` first), then one row
        per source with ``.`` (connects) or ``X`` (does not) per destination."""
        lines = [line.split() for line in text.strip().splitlines() if line.strip()]
        header = lines[0][1:] if lines[0][0] == "-" else lines[0]
        cells: dict[tuple[str, str], bool] = {}
        sources = []
        for row in lines[1:]:
            source, marks = row[0], row[1:]
            if len(marks) != len(header) or any(m not in (ALLOWED, DENIED) for m in marks):
                raise ValueError(f"row {source!r}: expected {len(header)} cells of '.' or 'X', got {marks}")
            sources.append(source)
            cells.update({(source, dest): mark == ALLOWED for dest, mark in zip(header, marks, strict=True)})
        return cls(tuple(sources), tuple(header), cells)

    @classmethod
    def everything(cls, sources: Sequence[str], destinations: Sequence[str], allowed: bool = True) -> Reachability:
        return cls(tuple(sources), tuple(destinations), {(s, d): allowed for s in sources for d in destinations})

    def format(self, marks: Mapping[tuple[str, str], str] | None = None) -> str:
        width = max(len(name) for name in (*self.sources, *self.destinations, "-")) + 1

        def mark(source: str, dest: str) -> str:
            if marks is not None:
                return marks[(source, dest)]
            return ALLOWED if self.cells[(source, dest)] else DENIED

        lines = ["-".ljust(width) + " ".join(d.ljust(width) for d in self.destinations).rstrip()]
        for source in self.sources:
            row = " ".join(mark(source, d).ljust(width) for d in self.destinations)
            lines.append((source.ljust(width) + row).rstrip())
        return "\n".join(lines) + "\n"

    def mismatches(self, observed: Reachability) -> list[tuple[str, str]]:
        return [key for key, value in self.cells.items() if observed.cells.get(key) != value]

    def comparison(self, observed: Reachability) -> str:
        """Expected, observed, and the pairs that differ (``X``), as the upstream suite prints them."""
        wrong = set(self.mismatches(observed))
        marks = {key: DENIED if key in wrong else ALLOWED for key in self.cells}
        return (
            f"expected:\n{self.format()}\nobserved:\n{observed.format()}\n"
            f"comparison (X = differs):\n{self.format(marks)}"
        )


def probe_matrix(
    probe: Probe, sources: Sequence[str], destinations: Sequence[str], protocol: str, port: int
) -> Reachability:
    return Reachability(
        tuple(sources),
        tuple(destinations),
        {(s, d): probe(s, d, protocol, port) for s in sources for d in destinations},
    )
