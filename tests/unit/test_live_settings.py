"""Cluster settings changed while the agent runs (``membrane config set``): policy modes recompile,
flow events go on and off in the datapath, the observer resizes its ring, serves the metric
families asked for and exports where it is told — no restart."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

from membrane.agent.intent import ClusterSettings, IntentTables
from membrane.agent.observer import AgentObserver, ObserverSettings
from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.core.config import ClusterConfig
from membrane.core.statedb import StateDB
from membrane.datapath.ruleset import FLOW_TRACE, FlowLog
from membrane.identity.labels import canonical, identity_labels_for_pod
from membrane.observe.nflog import FakeFlowEventSource
from membrane.testing.agentkit import FakeNode, PolicyHarness, pod

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""


def record(name: str, identity: int, index: int) -> EndpointRecord:
    labels = tuple(canonical(identity_labels_for_pod("x", {"app": name}, {})))
    return EndpointRecord(f"c-{name}", index, "node1", "x", name, "eth0", f"/run/netns/{name}",
                          IPv4Address(f"10.244.0.{10 + index}"), identity, labels, "runner", "ready",
                          f"lxc{index:011x}", 100 + index)


def settings(revision: int, **changes: object) -> ClusterSettings:
    return ClusterSettings(ClusterConfig.model_validate(changes), revision)


def test_audit_mode_set_live_turns_drops_into_audit_verdicts() -> None:
    records = [record("web", 300, 1), record("client", 301, 2)]
    h = PolicyHarness().load(policies=parse_manifest_text(POLICY), records=records,
                             pods=[pod("x", "web", {"app": "web"}), pod("x", "client", {"app": "client"})])
    h.cluster.upsert(settings(5))
    h.compute()
    enforced = h.policy_datapath()
    assert enforced.enforced_ingress == {("101",)} and not enforced.audited_ingress
    revision = h.controller.compiler.revision
    h.cluster.upsert(settings(6, policyAuditMode=True))
    h.compute()
    audited = h.policy_datapath()
    assert audited.audited_ingress == {("101",)} and not audited.enforced_ingress
    assert h.controller.compiler.revision > revision
    h.cluster.upsert(settings(7, policyAuditMode=True, policyEnforcementMode="never"))
    h.compute()
    assert not h.policy_datapath().audited_ingress and not h.policy_datapath().enforced_ingress


async def test_flow_visibility_goes_off_and_on_in_the_datapath() -> None:
    async with FakeNode(flow_log=FlowLog()) as node:
        chains = lambda: {c.name for c in node.nft.ruleset.chains}  # noqa: E731
        assert FLOW_TRACE in chains()
        node.cluster.upsert(settings(3, hubbleEnabled=False))
        await node.settled()
        assert FLOW_TRACE not in chains()
        node.cluster.upsert(settings(4, hubbleEnabled=True))
        await node.settled()
        assert FLOW_TRACE in chains()


def test_the_observer_applies_ring_size_metrics_and_export_live(tmp_path: Path) -> None:
    intent = IntentTables.create(StateDB())
    observer = AgentObserver(ObserverSettings(listen=None, metrics_listen=None, capacity=63), node_name="node1",
                             endpoints=intent.endpoints, nodes=intent.nodes, source=FakeFlowEventSource(),
                             cluster=intent.cluster)
    assert observer.ring.capacity == 63 and observer.exporter is None
    export = tmp_path / "flows.json"
    observer.apply_settings(settings(9, hubbleEventBufferCapacity=255, hubbleMetrics=["drop"],
                                     hubbleExportFilePath=str(export),
                                     hubbleExportAllowlist=[{"verdict": ["DROPPED"]}]))
    assert observer.ring.capacity == 255
    observer.metrics.drops.inc("POLICY_DENIED", "TCP")
    observer.metrics.flows.inc("TCP", "Drop", "", "DROPPED")
    rendered = observer.metrics.render()
    assert "hubble_drop_total" in rendered and "hubble_flows_processed_total" not in rendered
    assert observer.exporter is not None and observer.exporter.path == export
    assert observer.status()["clusterConfigRevision"] == 9
    # A bad filter (written around the CLI) is reported; the export in place is kept.
    exporter = observer.exporter
    observer.apply_settings(settings(10, hubbleExportFilePath=str(export),
                                     hubbleExportAllowlist=[{"verdict": ["MAYBE"]}]))
    assert observer.exporter is exporter and "hubbleExport" in observer.errors[-1]
    observer.apply_settings(settings(11))  # back to the agent's own: no export
    assert observer.exporter is None and observer.ring.capacity == 63
    assert json.loads(json.dumps(observer.status()["metricFamilies"])) == sorted(ClusterConfig().hubbleMetrics)
