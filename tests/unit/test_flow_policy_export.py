"""Flow export from the agent: the ``hubble.export*`` settings, parsed and refused as an operator
writes them, and the agent's observer writing the flows they select (with their policy names) to a
file ``membrane observe --input-file`` reads back."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from membrane.agent.config import load_agent_config
from membrane.agent.intent import IntentTables
from membrane.agent.observer import AgentObserver, ObserverSettings
from membrane.api.endpoint import EndpointRecord
from membrane.core.errors import InvalidInput
from membrane.core.statedb import StateDB
from membrane.datapath.flowcodes import TRACE_NEW, Direction
from membrane.datapath.ruleset import DROP_POLICY_DENY_INGRESS
from membrane.observe.enrich import EndpointInfo, PolicyDecision, PolicyRef
from membrane.observe.exporter import read_flows
from membrane.observe.model import DROPPED, GetFlowsRequest
from membrane.observe.nflog import HOOK_FORWARD, IPPROTO_TCP, TCP_SYN, FakeFlowEventSource, NflogRecord, Packet

NODE = "node1"
DENY = PolicyRef(name="no-intruders", namespace="default", kind="CiliumNetworkPolicy",
                 labels=("k8s:io.cilium.k8s.policy.name=no-intruders",), revision=3)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_export_settings_from_the_agent_config(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, f"""
hubble:
  exportFilePath: {tmp_path}/flows.json
  exportAllowlist:
  - {{"verdict": ["DROPPED"]}}
  - {{"source_pod": ["default/"], "destination_port": ["7000"]}}
  exportDenylist:
  - {{"sourcePod": ["kube-system/"]}}
"""))
    export = ObserverSettings.for_agent(config).export
    assert export is not None
    assert export.path == tmp_path / "flows.json"
    assert (export.max_size_mb, export.max_backups) == (10, 5)
    assert [list(f.verdict) for f in export.allow] == [[DROPPED], []]
    assert list(export.allow[1].source_pod) == ["default/"] and list(export.allow[1].destination_port) == ["7000"]
    assert list(export.deny[0].source_pod) == ["kube-system/"]  # camelCase, as Helm values often are


def test_export_is_off_by_default() -> None:
    assert ObserverSettings.for_agent(load_agent_config(None)).export is None


@pytest.mark.parametrize(("text", "where"), [
    ("hubble:\n  exportAllowlist: [{source_pods: [x]}]\n", "hubble.exportAllowlist"),
    ("hubble:\n  exportDenylist: [{verdict: [MAYBE]}]\n", "hubble.exportDenylist"),
    ("hubble:\n  exportFileMaxSizeMb: 0\n", "hubble.exportFileMaxSizeMb"),
    ("hubble:\n  exportFileMaxBackups: -1\n", "hubble.exportFileMaxBackups"),
])
def test_invalid_export_settings_are_refused_naming_the_field(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_agent_config(write_config(tmp_path, text))
    assert where in str(caught.value)


def endpoint(container: str, pod: str, ip: str, identity: int, ifindex: int) -> EndpointRecord:
    return EndpointRecord(container, ifindex, NODE, "default", pod, "eth0", f"/run/netns/{pod}", IPv4Address(ip),
                          identity, (f"k8s:app={pod}",), "runner", "ready", f"lxc{container:0<11}", ifindex)


def syn(prefix: str, src: str, dst: str, indev: int, outdev: int, seq: int) -> NflogRecord:
    return NflogRecord(prefix, 1_700_000_000_000_000_000 + seq, HOOK_FORWARD, indev, outdev, 0, seq,
                       Packet(4, src, dst, IPPROTO_TCP, 60, 40000, 7000, tcp_flags=TCP_SYN))


def test_the_observer_exports_the_selected_flows_with_their_policy(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, f"""
runDir: {tmp_path}/run
hubble:
  exportFilePath: {tmp_path}/flows.json
  exportAllowlist: [{{"verdict": ["DROPPED"]}}]
"""))

    def deny_all(endpoint: EndpointInfo, direction: Direction, remote_identity: int, remote_ip: str, proto: int,
                 port: int) -> PolicyDecision:
        return PolicyDecision("deny", (DENY,))

    intent = IntentTables.create(StateDB())
    observer = AgentObserver(ObserverSettings.for_agent(config), node_name=NODE, endpoints=intent.endpoints,
                             nodes=intent.nodes, source=FakeFlowEventSource(), tunnel_ifindex=lambda: 0,
                             policy=deny_all)
    records = [endpoint("aaa", "intruder", "10.244.1.10", 1001, 7), endpoint("bbb", "server", "10.244.1.11", 1002, 9)]
    intent.endpoints.writer("test").upsert(*records)
    observer.rebuild_state()
    observer.ingest([syn(TRACE_NEW.prefix(), "10.244.1.10", "10.244.1.11", 7, 9, 0),
                     syn(DROP_POLICY_DENY_INGRESS.prefix(), "10.244.1.10", "10.244.1.11", 7, 9, 1)])
    assert observer.exporter is not None
    observer.exporter.close()

    assert len(observer.ring) == 2  # the ring has both; the file only what the allowlist selects
    lines = (tmp_path / "flows.json").read_text().splitlines()
    flows = [r.flow for r in read_flows(lines, GetFlowsRequest())]
    assert [(f.verdict, f.source.pod_name, f.destination.pod_name) for f in flows] == [(DROPPED, "intruder", "server")]
    assert [(p.name, p.kind, p.revision) for p in flows[0].ingress_denied_by] == [
        ("no-intruders", "CiliumNetworkPolicy", 3)]
    assert observer.status()["export"] == {"path": str(tmp_path / "flows.json"), "exported": 1}
