"""The agent's flow observability, wired on one screen.

    kernel: log group N ──NflogReader──► records ──enrich(state)──► FlowPublisher ──► Ring
                                                                         │              │
                                                 NamespaceTracker, FlowMetrics    ObserverServer
                                                          │                     TCP 127.0.0.1:4244
                                                 MetricsServer 127.0.0.1:9965   <run-dir>/observer.sock
    intent tables: endpoints, nodes ──► EnrichmentState (updated from the rows that changed)
    PolicyController ──PolicyAttribution──► enrich(policy=…): *_allowed_by / *_denied_by
    frontends table ──FrontendIndex──► ServiceFlows: source_service / destination_service
    FlowPublisher ──► FlowExporter (hubble.exportFilePath, rotated JSON lines) when configured

The reader binds its NFLOG group before the datapath installs the log rules, so the first
connections are not missed. Events the kernel could not deliver (reader too slow) are counted
from NFLOG sequence gaps and written into the ring as a LostEvent (PERF_EVENT_RING_BUFFER), which
``hubble_lost_events_total`` and every GetFlows reader see. The observer's socket path is published
in this node's CiliumNode ``status.observer`` so a relay can find it.

A failure to listen or to bind the group degrades observability, never the node: it is logged,
shown in the agent status, and the reader is retried by the lifecycle.

Primitives: :class:`ObserverSettings`, :class:`ExportSettings`, :class:`AgentObserver`,
:class:`PolicyAttribution`, :func:`enrichment_state`, :class:`EnrichmentIndex`, :func:`observer_module`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Protocol

from membrane.agent.config import AgentConfig
from membrane.agent.intent import ClusterSettings
from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.api.podrow import PodRow
from membrane.core.errors import MembraneError
from membrane.core.lifecycle import Lifecycle
from membrane.core.statedb import Snapshot, Table, wait_any
from membrane.datapath.flowcodes import Direction, FlowCodeError
from membrane.datapath.netlink.model import TUNNEL_DEVICE
from membrane.datapath.ruleset import FlowLog
from membrane.identity.labels import parse_labels
from membrane.identity.reserved import WORLD
from membrane.ipam.pool import router_ip
from membrane.loadbalancer.model import Frontend
from membrane.observe.config import export_filters
from membrane.observe.enrich import (
    EndpointInfo,
    EnrichmentState,
    FlowIds,
    NodeAddress,
    PolicyDecision,
    PolicyLookup,
    PolicyRef,
    enrich,
)
from membrane.observe.exporter import FlowExporter
from membrane.observe.metrics import FlowMetrics, MetricsServer
from membrane.observe.model import PERF_EVENT_RING_BUFFER, FlowFilter
from membrane.observe.nflog import FlowEventSource, NflogReader, NflogRecord
from membrane.observe.observer import FlowPublisher, NamespaceTracker
from membrane.observe.ring import DEFAULT_CAPACITY, Ring
from membrane.observe.server import ObserverServer
from membrane.observe.services import FrontendIndex, ServiceFlows
from membrane.policy import EndpointPolicy
from membrane.policy.compiler import policy_endpoint
from membrane.policy.mapstate import Verdict
from membrane.policy.rules import IMPLICIT_KIND, RuleOrigin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSettings:
    """Flow export to a file (Hubble's ``hubble.export.static``): rotated JSON lines."""

    path: Path
    max_size_mb: int = 10
    max_backups: int = 5
    allow: tuple[FlowFilter, ...] = ()
    deny: tuple[FlowFilter, ...] = ()
    field_mask: tuple[str, ...] = ()

    def exporter(self) -> FlowExporter:
        return FlowExporter(self.path, max_size=self.max_size_mb * 1024 * 1024, max_backups=self.max_backups,
                            allow=self.allow, deny=self.deny, field_mask=self.field_mask)


@dataclass(frozen=True)
class ObserverSettings:
    """Where the observer listens and what the datapath logs. ``enabled`` False: no log rules,
    no reader, no listeners (what the flow benchmark compares against)."""

    enabled: bool = True
    listen: str | None = "127.0.0.1:4244"
    unix_socket: Path | None = None
    metrics_listen: str | None = "127.0.0.1:9965"
    capacity: int = DEFAULT_CAPACITY
    flow_log: FlowLog = field(default_factory=FlowLog)
    export: ExportSettings | None = None

    @classmethod
    def for_agent(cls, config: AgentConfig) -> ObserverSettings:
        hubble = config.hubble
        export = None
        if hubble.exportFilePath:
            export = ExportSettings(Path(hubble.exportFilePath), hubble.exportFileMaxSizeMb,
                                    hubble.exportFileMaxBackups, tuple(export_filters(hubble.exportAllowlist)),
                                    tuple(export_filters(hubble.exportDenylist)), hubble.exportFieldMask)
        return cls(enabled=hubble.enabled, listen=hubble.listenAddress or None,
                   unix_socket=config.runDir / "observer.sock", metrics_listen=hubble.metricsServer or None,
                   capacity=hubble.eventBufferCapacity, export=export)


def _node_address(node: CiliumNode) -> NodeAddress | None:
    node_ip = node.internal_ip()
    if not node.name or node_ip is None:
        return None
    cidr = node.pod_cidr()
    return NodeAddress(name=node.name, node_ip=str(node_ip), router_ip=str(router_ip(cidr)) if cidr else "")


def _endpoint_info(record: EndpointRecord, node_name: str) -> EndpointInfo:
    local = record.node == node_name
    return EndpointInfo(
        ip=str(record.ipv4), identity=record.identity, namespace=record.namespace, pod_name=record.pod,
        labels=record.labels, endpoint_id=record.endpoint_id if local else 0, node=record.node,
        ifindex=record.host_ifindex if local else 0, ifname=record.host_ifname if local else "")


class EndpointInfoCache:
    """Endpoint infos by record: a change rebuilds only the records that changed (rows are replaced
    on every change, so an unchanged record is the same object)."""

    def __init__(self, node_name: str) -> None:
        self._node_name = node_name
        self._built: dict[str, tuple[EndpointRecord, EndpointInfo]] = {}

    def infos(self, records: Iterable[EndpointRecord]) -> list[EndpointInfo]:
        built: dict[str, tuple[EndpointRecord, EndpointInfo]] = {}
        for record in records:
            cached = self._built.get(record.key)
            if cached is None or cached[0] is not record:
                cached = (record, _endpoint_info(record, self._node_name))
            built[record.key] = cached
        self._built = built
        return [info for _, info in built.values()]


def enrichment_state(node_name: str, records: Iterable[EndpointRecord], nodes: Iterable[CiliumNode], *,
                     cluster_name: str = "default", tunnel_ifindex: int = 0,
                     cache: EndpointInfoCache | None = None) -> EnrichmentState:
    """The enrichment state from every node's endpoint records and the CiliumNodes."""
    infos = (cache or EndpointInfoCache(node_name)).infos(records)
    addresses = [address for node in nodes if (address := _node_address(node)) is not None]
    return EnrichmentState.build(node_name, infos, addresses, cluster_name=cluster_name,
                                 tunnel_ifindex=tunnel_ifindex)


class EnrichmentIndex:
    """The enrichment state kept up to date from the keys that changed (:meth:`Snapshot.changed_keys`):
    a change of a few endpoint records or nodes rebuilds their entries only, then the address map
    is assembled in one dict merge. The result equals :func:`enrichment_state` (where two records
    claim one address, the one written last wins)."""

    def __init__(self, node_name: str, cluster_name: str = "default") -> None:
        self.node_name = node_name
        self.cluster_name = cluster_name
        self._seen = -1  # endpoints revision
        self._infos: dict[str, EndpointInfo] = {}  # record key -> info
        self._claims: dict[str, dict[str, EndpointInfo]] = {}  # address -> record key -> info
        self._by_ip: dict[str, EndpointInfo] = {}  # address -> the winning endpoint info
        self._local: dict[str, EndpointInfo] = {}  # record key -> info of this node's attached endpoints
        self._nodes: dict[str, tuple[CiliumNode, dict[str, EndpointInfo]]] = {}

    def state(self, endpoints: Snapshot[EndpointRecord], nodes: Iterable[CiliumNode],
              tunnel_ifindex: int) -> EnrichmentState:
        changed = endpoints.changed_keys(self._seen)
        if changed is None:
            for table in (self._infos, self._claims, self._by_ip, self._local):
                table.clear()
            changed = set(endpoints.primary_keys())
        self._seen = endpoints.revision
        for key in changed:
            self._update(str(key), endpoints.get(key))
        node_infos: dict[str, EndpointInfo] = {}
        known: dict[str, tuple[CiliumNode, dict[str, EndpointInfo]]] = {}
        for node in nodes:
            cached = self._nodes.get(node.name)
            if cached is None or cached[0] is not node:
                cached = (node, self._node_infos(node))
            known[node.name] = cached
            node_infos.update(cached[1])
        self._nodes = known
        local = {info.ifindex: info for info in self._local.values()}
        return EnrichmentState(self.node_name, self.cluster_name, local, {**node_infos, **self._by_ip},
                               tunnel_ifindex)

    def _update(self, key: str, record: EndpointRecord | None) -> None:
        old = self._infos.pop(key, None)
        self._local.pop(key, None)
        if old is not None:
            claims = self._claims.get(old.ip, {})
            claims.pop(key, None)
            if claims:
                self._by_ip[old.ip] = next(reversed(claims.values()))
            else:
                self._claims.pop(old.ip, None)
                self._by_ip.pop(old.ip, None)
        if record is None:
            return
        info = _endpoint_info(record, self.node_name)
        self._infos[key] = info
        if info.node == self.node_name and info.ifindex:
            self._local[key] = info
        self._claims.setdefault(info.ip, {})[key] = info
        self._by_ip[info.ip] = info

    def _node_infos(self, node: CiliumNode) -> dict[str, EndpointInfo]:
        address = _node_address(node)
        if address is None:
            return {}
        state = EnrichmentState.build(self.node_name, (), (address,), cluster_name=self.cluster_name)
        return dict(state.by_ip)


class PolicySource(Protocol):
    """What attribution reads of the agent's :class:`~membrane.agent.policy.PolicyController`."""

    compiler: Any

    def pods(self) -> Mapping[tuple[str, str], PodRow]: ...

    def local_record(self, ifindex: int) -> EndpointRecord | None: ...


AnswerKey = tuple[Direction, int, int, int, str]


class PolicyAttribution:
    """The agent's :class:`~membrane.observe.enrich.PolicyLookup`: the compiled policy of this
    node's endpoints, asked ``DirectionPolicy.lookup(remote identity, protocol, port)``.

    Answers are memoized per endpoint until the policy revision changes or the endpoint's record
    does, so a busy connection costs a dict lookup, not a policy walk. A remote the ipcache calls
    ``world`` is looked up under the CIDR identity a policy gave its prefix (toCIDR rules). The
    remote address takes part too when the endpoint has NetworkPolicy ipBlock entries (which match
    addresses, pods included), so those flows name the NetworkPolicy that allowed them.
    """

    def __init__(self, source: PolicySource, max_answers: int = 4096) -> None:
        self._source = source
        self._max_answers = max_answers
        self._revision = -1
        self._endpoints: dict[int, tuple[Any, EndpointPolicy, dict[AnswerKey, PolicyDecision | None]]] = {}
        self._uids: dict[tuple[str, str, str], str] = {}
        self._cidrs: list[tuple[IPv4Network, int]] = []

    def __call__(self, endpoint: EndpointInfo, direction: Direction, remote_identity: int, remote_ip: str,
                 proto: int, port: int) -> PolicyDecision | None:
        compiler = self._source.compiler
        if compiler.revision != self._revision:
            self._new_revision(compiler)
        found = self._endpoint(endpoint)
        if found is None:
            return None
        policy, answers = found
        if remote_identity == WORLD.id and self._cidrs:
            remote_identity = self._cidr_identity(remote_ip)
        side = policy.egress if direction is Direction.EGRESS else policy.ingress
        address = self._address(remote_ip) if side.addresses else None
        key = (direction, remote_identity, proto, port, str(address) if address is not None else "")
        try:
            return answers[key]
        except KeyError:
            pass
        match = side.lookup(remote_identity, proto, port, address)
        answer = None if match.verdict is None else PolicyDecision(
            # An L7 rule's traffic is dropped (no proxy yet): its rules are what denied it.
            "allow" if match.verdict is Verdict.ALLOW else "deny", self._refs(match.rules))
        if len(answers) >= self._max_answers:
            answers.clear()
        answers[key] = answer
        return answer

    def _new_revision(self, compiler: Any) -> None:
        self._revision = compiler.revision
        self._endpoints.clear()
        self._uids = {}
        for imported in compiler.imported.values():
            uid = getattr(getattr(imported.obj, "metadata", None), "uid", None)
            if uid:
                self._uids[(imported.kind, imported.namespace, imported.name)] = str(uid)
        cidrs = compiler.compiled.cidr_identities.items()
        self._cidrs = sorted(cidrs, key=lambda item: -item[0].prefixlen)

    def _endpoint(self, info: EndpointInfo) -> tuple[EndpointPolicy, dict[AnswerKey, PolicyDecision | None]] | None:
        record = self._source.local_record(info.ifindex)
        cached = self._endpoints.get(info.ifindex)
        if cached is not None and record is cached[0]:
            return cached[1], cached[2]
        if record is None:
            return None
        endpoint = policy_endpoint(record, self._source.pods())
        policy = self._source.compiler.endpoint_policies([(endpoint, parse_labels(record.labels))])[endpoint.key]
        self._endpoints[info.ifindex] = (record, policy, {})
        return policy, self._endpoints[info.ifindex][2]

    @staticmethod
    def _address(ip: str) -> IPv4Address | None:
        try:
            return IPv4Address(ip)
        except ValueError:
            return None

    def _cidr_identity(self, ip: str) -> int:
        try:
            address = IPv4Address(ip)
        except ValueError:
            return WORLD.id
        return next((identity for prefix, identity in self._cidrs if address in prefix), WORLD.id)

    def _refs(self, origins: Sequence[RuleOrigin]) -> tuple[PolicyRef, ...]:
        found: dict[tuple[str, str, str], PolicyRef] = {}
        for origin in origins:
            key = (origin.kind, origin.namespace, origin.name)
            if origin.kind == IMPLICIT_KIND or key in found:
                continue  # the implicit host allow is no policy; a policy is named once per flow
            labels = origin.labels()
            uid = self._uids.get(key)
            if uid:
                labels += (f"k8s:io.cilium.k8s.policy.uid={uid}",)
            found[key] = PolicyRef(name=origin.name, namespace=origin.namespace, kind=origin.kind, labels=labels,
                                   revision=self._revision)
        return tuple(found.values())


class _ExportSink:
    """The exporter as a publisher sink: a write that fails (disk full, directory gone) is reported
    once and skipped; it must not stop the flows reaching the ring and the other sinks."""

    def __init__(self, exporter: FlowExporter | None, report: Callable[[str], None]) -> None:
        self.exporter = exporter  # None: export off (replaced live by the cluster settings)
        self.failed = 0
        self._report = report

    def observe(self, flow: Any) -> None:
        if self.exporter is None:
            return
        try:
            self.exporter.export(flow)
        except OSError as exc:
            self.failed += 1
            if self.failed == 1:
                self._report(f"flow export to {self.exporter.path}: {exc}")
            self.exporter.close()  # reopened (and retried) with the next flow


def _export_key(export: ExportSettings | None) -> tuple[Any, ...]:
    """What decides whether the exporter must be replaced (filters compared as their wire bytes)."""
    if export is None:
        return ()
    return (str(export.path), tuple(f.SerializeToString() for f in export.allow),
            tuple(f.SerializeToString() for f in export.deny))


def _tunnel_ifindex() -> int:
    try:
        return socket.if_nametoindex(TUNNEL_DEVICE)
    except OSError:
        return 0


class AgentObserver:
    """Reads flow events, turns them into flows and serves them. ``source`` defaults to an
    :class:`NflogReader` on the settings' group in the agent's network namespace."""

    def __init__(self, settings: ObserverSettings, *, node_name: str, endpoints: Table[EndpointRecord],
                 nodes: Table[CiliumNode], cluster_name: str = "default", source: FlowEventSource | None = None,
                 tunnel_ifindex: Callable[[], int] = _tunnel_ifindex, policy: PolicyLookup | None = None,
                 cluster: Table[ClusterSettings] | None = None, frontends: Table[Frontend] | None = None) -> None:
        self.settings = settings
        self._frontend_table = frontends
        self._frontends_revision = -1
        #: Which connections went through a service frontend (names flows' services).
        self.services = ServiceFlows()
        self._cluster_table = cluster
        #: The store revision of the cluster settings this observer applied (0: none yet).
        self.applied_revision = 0
        self.node_name = node_name
        self.cluster_name = cluster_name
        self._endpoint_table = endpoints
        self._node_table = nodes
        self._index = EnrichmentIndex(node_name, cluster_name)
        self._source = source or NflogReader(settings.flow_log.group)
        self._tunnel_ifindex = tunnel_ifindex
        self.ring = Ring(settings.capacity)
        self.metrics = FlowMetrics()
        self.namespaces = NamespaceTracker(cluster_name)
        #: Who decided a flow (``*_allowed_by`` / ``*_denied_by``); None: not attributed.
        self.policy = policy
        self._export_key: tuple[Any, ...] = _export_key(settings.export)
        self._export = _ExportSink(
            settings.export.exporter() if settings.enabled and settings.export is not None else None, self._error)
        sinks: tuple[Any, ...] = (self.namespaces, self.metrics, self._export)
        self.publisher = FlowPublisher(self.ring, node_name=node_name, sinks=sinks, on_lost=self.metrics.lost)
        self.state = EnrichmentState(node_name, cluster_name)
        self.server: ObserverServer | None = None
        self.metrics_server: MetricsServer | None = None
        self._ids = FlowIds()
        self._lost_reported = 0
        self.malformed = 0
        self.errors: list[str] = []

    @property
    def exporter(self) -> FlowExporter | None:
        return self._export.exporter

    def apply_settings(self, cluster: ClusterSettings) -> None:
        """Apply the live cluster settings: ring size, metric families, flow export (a bad export
        filter is reported and the previous export kept)."""
        config, own = cluster.config, self.settings
        self.ring.resize(config.hubbleEventBufferCapacity or own.capacity)
        self.metrics.enable(config.hubbleMetrics)
        path = config.hubbleExportFilePath if config.hubbleExportFilePath is not None else (
            str(own.export.path) if own.export is not None else "")
        try:
            allow = tuple(export_filters(config.hubbleExportAllowlist)) \
                if config.hubbleExportAllowlist is not None else (own.export.allow if own.export else ())
            deny = tuple(export_filters(config.hubbleExportDenylist)) \
                if config.hubbleExportDenylist is not None else (own.export.deny if own.export else ())
        except ValueError as exc:
            self._error(f"cluster setting hubbleExport*: {exc}")
        else:
            base = own.export or ExportSettings(Path(path or "."))
            export = replace(base, path=Path(path), allow=allow, deny=deny) if path else None
            key = _export_key(export)
            if key != self._export_key and own.enabled:
                if self._export.exporter is not None:
                    self._export.exporter.close()
                self._export.exporter = export.exporter() if export is not None else None
                self._export_key = key
        self.applied_revision = cluster.revision

    @property
    def flow_log(self) -> FlowLog | None:
        """What the datapath should log (None: observability off)."""
        return self.settings.flow_log if self.settings.enabled else None

    @property
    def source(self) -> FlowEventSource:
        return self._source

    def advertised(self) -> dict[str, str]:
        """This observer as ``status.observer`` of the node's CiliumNode tells relays about it."""
        if not self.settings.enabled:
            return {}
        found: dict[str, str] = {}
        if self.server is not None and self.server.unix_socket is not None:
            found["socket"] = str(self.server.unix_socket)
        if self.server is not None and self.server.listen and self.server.port:
            found["address"] = self.server.address
        return found

    async def start(self, lifecycle: Lifecycle) -> None:
        if not self.settings.enabled:
            return
        self.rebuild_state()
        if self._cluster_table is not None:
            current = self._cluster_table.snapshot().get("cluster")
            if current is not None:
                self.apply_settings(current)
            lifecycle.start("observer settings", self._follow_settings)
        lifecycle.start("observer state", self._follow_state)
        lifecycle.start("flow events", self._read_events)
        # The group is ours before the log rules exist; a bind that fails is retried by the
        # lifecycle, and the node comes up regardless.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._source.bound.wait(), 5)
        s = self.settings
        self.server = ObserverServer(self.ring, self.node_name, namespaces=self.namespaces.namespaces,
                                     listen=s.listen, unix_socket=s.unix_socket, cluster_name=self.cluster_name)
        try:
            await self.server.start()
        except MembraneError as exc:
            self._error(f"observer API: {exc}")
            self.server = None
        if s.metrics_listen:
            self.metrics_server = MetricsServer(self.metrics, s.metrics_listen)
            try:
                await self.metrics_server.start()
            except MembraneError as exc:
                self._error(f"metrics: {exc}")
                self.metrics_server = None

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        if self.exporter is not None:
            self.exporter.close()

    def _error(self, message: str) -> None:
        log.error("%s", message)
        self.errors.append(message)

    # -- the pipeline -----------------------------------------------------------------------------

    async def _read_events(self) -> None:
        await self._source.run(self.ingest)

    def ingest(self, records: Sequence[NflogRecord]) -> None:
        """One batch from the reader (on the event loop): losses first, then the flows in order."""
        lost = self._source.stats.lost
        if lost > self._lost_reported:
            self.publisher.publish_lost(PERF_EVENT_RING_BUFFER, lost - self._lost_reported)
            self._lost_reported = lost
        state, publish, ids, policy = self.state, self.publisher.publish, self._ids, self.policy
        services = self.services if self.services.index or len(self.services) else None
        for record in records:
            try:
                flow = enrich(record, state, flow_id=ids.next(), policy=policy)
            except FlowCodeError as exc:
                self.malformed += 1
                if self.malformed == 1:
                    log.warning("flow event not understood (is the datapath newer than this agent?): %s", exc)
                continue
            if flow is not None:
                if services is not None:
                    services.annotate(record, flow)
                publish(flow)

    async def _follow_state(self) -> None:
        took = 0.0
        while True:
            watches = [self._endpoint_table.snapshot().changed, self._node_table.snapshot().changed]
            if self._frontend_table is not None:
                watches.append(self._frontend_table.snapshot().changed)
            await wait_any(watches)
            # Rebuilding costs time proportional to the cluster: changes arriving meanwhile are
            # taken together, so it never takes more than half of the event loop.
            await asyncio.sleep(took)
            started = time.perf_counter()
            self.rebuild_state()
            took = time.perf_counter() - started

    async def _follow_settings(self) -> None:
        assert self._cluster_table is not None
        while True:
            snapshot = self._cluster_table.snapshot()
            await wait_any([snapshot.changed])
            current = self._cluster_table.snapshot().get("cluster")
            if current is not None:
                self.apply_settings(current)

    def rebuild_state(self) -> None:
        """A new enrichment state from the intent (only the records and nodes that changed are
        looked at again), and the frontends index when the frontends changed."""
        self.state = self._index.state(self._endpoint_table.snapshot(), self._node_table.snapshot(),
                                       self._tunnel_ifindex())
        if self._frontend_table is not None:
            frontends = self._frontend_table.snapshot()
            if frontends.revision != self._frontends_revision:
                self.services.index = FrontendIndex.build(frontends)
                self._frontends_revision = frontends.revision

    def status(self) -> dict[str, Any]:
        """The ``Hubble:`` part of the agent status."""
        if not self.settings.enabled:
            return {"summary": "Disabled"}
        stats = self._source.stats
        state = "Ok" if self.server is not None and not self.errors else "Warning"
        summary = f"{state}   Current/Max Flows: {len(self.ring):,}/{self.ring.capacity:,}"
        return {
            "summary": summary, "flows": len(self.ring), "maxFlows": self.ring.capacity,
            "seenFlows": self.ring.seen_flows, "events": stats.received, "lostEvents": stats.lost,
            "malformedEvents": self.malformed + stats.malformed, "group": self.settings.flow_log.group,
            "listen": self.server.address if self.server else "", "errors": list(self.errors),
            "metrics": (f"{self.metrics_server.listen.rpartition(':')[0]}:{self.metrics_server.port}"
                        if self.metrics_server else ""),
            "export": ({"path": str(self.exporter.path), "exported": self.exporter.exported}
                       if self.exporter is not None else {}),
            "metricFamilies": sorted(self.metrics.enabled),
            "clusterConfigRevision": self.applied_revision,
        }
