"""Policy in the datapath, without a kernel: the ruleset's policy section (golden text), the agent's
policy compiler and renderer, status write-back, and the ``membrane policy`` CLI computations.

Regenerate the golden file after an intended change with
``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_policy_datapath.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from membrane.agent.policy import PolicyStatusOperations
from membrane.api import k8s
from membrane.api.cilium import CiliumNetworkPolicy, CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.api.meta import ApiObject
from membrane.cli.policy_cmd import (
    enforcement_columns,
    format_selectors,
    imported_rules,
    load_policy_view,
    trace_text,
)
from membrane.core.reconciler import Reconciler
from membrane.datapath.nft import full_sync, plan_sync, render_transaction
from membrane.datapath.policy import EGRESS_VERDICTS, INGRESS_VERDICTS, PolicyRenderer, render_policy, rendered_probe
from membrane.datapath.ruleset import (
    AUDITED_IN,
    ENFORCED_IN,
    ENFORCED_OUT,
    FILTER_FORWARD,
    FILTER_INPUT,
    FILTER_OUTPUT,
    IPCACHE,
    POL_IN,
    POL_IN_ADDR,
    POL_OUT_ADDR,
    DesiredDatapath,
    EndpointAddress,
    FlowLog,
    PolicyDatapath,
    build_ruleset,
)
from membrane.identity.labels import canonical, identity_labels_for_pod, parse_labels
from membrane.policy import EnforcementConfig
from membrane.policy.compiler import IpcacheBuilder, PolicyCompiler, import_policy, ipcache_entries, policy_endpoint
from membrane.policy.reachability import default_model, engine_probe, probe_matrix
from membrane.policy.status import desired_status
from membrane.store import keys
from membrane.store.memory import MemoryStore
from membrane.store.objects import ObjectClient, decode, encode
from membrane.testing.agentkit import PolicyHarness

GOLDEN = Path(__file__).parent / "golden" / "nft"

NAMESPACES = {"x": {"ns": "x"}, "y": {"ns": "y"}}
PODS = {("x", "a"): {"pod": "a"}, ("x", "b"): {"pod": "b"}, ("y", "a"): {"pod": "a"}}
NODE = {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node1"},
        "spec": {"addresses": [{"type": "InternalIP", "ip": "172.31.0.11"}], "ipam": {"podCIDRs": ["10.244.1.0/24"]}}}
NODE2 = {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node2"},
         "spec": {"addresses": [{"type": "InternalIP", "ip": "172.31.0.12"}], "ipam": {"podCIDRs": ["10.244.2.0/24"]}}}

NAMESPACE_OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
"""

POLICIES = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-80-tcp}]
  - from: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ping, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - icmps: [{fields: [{type: EchoRequest}]}]
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "81", protocol: TCP}]}]
  egress:
  - toEndpoints: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: audited, namespace: y}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: nobody}}]
"""


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def pod(namespace: str, name: str) -> dict[str, Any]:
    ports = [{"name": f"serve-{p}-tcp", "containerPort": p, "protocol": "TCP"} for p in (80, 81)]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": PODS[(namespace, name)]},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "i", "ports": ports}]}}


def labels(namespace: str, name: str) -> tuple[str, ...]:
    return tuple(canonical(identity_labels_for_pod(namespace, PODS[(namespace, name)], NAMESPACES[namespace])))


def record(namespace: str, name: str, identity: int, index: int, node: str = "node1") -> EndpointRecord:
    subnet = 1 if node == "node1" else 2
    return EndpointRecord(f"c-{namespace}-{name}", index, node, namespace, name, "eth0", f"/run/netns/{name}",
                          IPv4Address(f"10.244.{subnet}.{10 + index}"), identity, labels(namespace, name), "runner",
                          "ready", f"lxc{index:011x}", 100 + index, "")


RECORDS = [record("x", "a", 256, 1), record("x", "b", 257, 2), record("y", "a", 258, 3)]
IDENTITIES = {r.identity: parse_labels(r.labels) for r in RECORDS}


def policy_objects(text: str = POLICIES) -> dict[str, dict[str, Any]]:
    objects = {}
    for obj in parse_manifest_text(text):
        key = keys.object_key({"NetworkPolicy": "networkpolicies", "CiliumNetworkPolicy": "ciliumnetworkpolicies"}[
            obj.kind], obj.namespace, obj.name)
        data = json.loads(encode(obj))
        data["metadata"].update(uid=f"uid-{obj.name}", generation=1)
        objects[key] = data
    return objects


def typed_policies(text: str = POLICIES) -> dict[str, ApiObject]:
    """The policies as the agent's tables hold them: decoded once, frozen."""
    models = {"NetworkPolicy": k8s.NetworkPolicy, "CiliumNetworkPolicy": CiliumNetworkPolicy}
    return {key: models[data["kind"]].model_validate(data) for key, data in policy_objects(text).items()}


def typed_pods() -> dict[tuple[str, str], k8s.Pod]:
    return {key: k8s.Pod.model_validate(pod(*key)) for key in PODS}


def with_changes(obj: ApiObject, change: Any) -> ApiObject:
    """A new object, the way a store write replaces one: ``change`` edits its JSON form."""
    data = obj.to_dict()
    change(data)
    return type(obj).model_validate(data)


class Controller:
    """The agent's policy controller over this file's cluster (policies, pods, nodes, identities)."""

    def __init__(self, text: str, config: EnforcementConfig | None, *, records: list[EndpointRecord] = RECORDS,
                 identities: dict[int, frozenset[Any]] = IDENTITIES) -> None:
        self.harness = PolicyHarness("node1", config=config).load(
            policies=typed_policies(text).values(), records=records, pods=typed_pods().values(),
            identities=identities, nodes=[CiliumNode.model_validate(n) for n in (NODE, NODE2)])
        self.compiler = self.harness.controller.compiler

    def policy_datapath(self, local: list[EndpointRecord]) -> PolicyDatapath:
        """The policy elements for ``local`` as this node's endpoints."""
        self.harness.local_writer.replace_all(local)
        self.harness.compute()
        return self.harness.policy_datapath()


def controller(text: str = POLICIES, config: EnforcementConfig | None = None) -> Controller:
    return Controller(text, config)


# --- the ruleset ------------------------------------------------------------------------------------------


def test_policy_section_golden() -> None:
    ctl = controller(config=EnforcementConfig(audit_namespaces=frozenset({"y"})))
    policy = ctl.policy_datapath(RECORDS)
    desired = DesiredDatapath.from_endpoints((EndpointAddress(r.host_ifindex, r.ipv4) for r in RECORDS),
                                             flow_log=FlowLog(), policy=policy)
    assert_golden("policy.nft", render_transaction(full_sync(build_ruleset(desired))))


def test_enforced_and_audited_endpoints_and_what_the_maps_hold() -> None:
    ctl = controller(config=EnforcementConfig(audit_namespaces=frozenset({"y"})))
    ruleset = build_ruleset(DesiredDatapath(policy=ctl.policy_datapath(RECORDS)))
    xa, _, ya = (str(r.host_ifindex) for r in RECORDS)
    assert ruleset.get_set(ENFORCED_IN).elements == {(xa,)}  # x/b is selected by nothing
    assert ruleset.get_set(ENFORCED_OUT).elements == {(xa,)}
    assert ruleset.get_set(AUDITED_IN).elements == {(ya,)}  # y/a would drop, but y is audited
    pol_in = ruleset.get_map(POL_IN).mapping()
    # x/b (257) to x/a on the named port 80 only; single ports are written as ranges.
    assert pol_in[(xa, "257", "tcp", "80-80")] == "return"
    assert not any(k[0] == xa and k[1] == "257" and k[2] == "tcp" and k[3] == "81-81" for k in pol_in)
    # ICMP echo request (type 8): type and code, the first 16 bits of the header.
    assert pol_in[(xa, "257", "icmp", "2048-2303")] == "return"
    # The deny from the world on TCP 81 goes to the drop chain, and beats the ipBlock allow of the
    # same addresses: the address map is only read after a miss in the identity map.
    assert pol_in[(xa, "2", "tcp", "81-81")] == "goto pol_denied_in"
    # The NetworkPolicy ipBlock is an address range (its except cut out), not a CIDR identity.
    assert ruleset.get_map(POL_IN_ADDR).mapping() == {(xa, "198.51.100.0-198.51.100.127", "0-255", "0-65535"): "return"}
    assert not ruleset.get_map(POL_OUT_ADDR).elements
    ipcache = dict(ruleset.get_map(IPCACHE).elements)
    assert ipcache[("10.244.1.11",)] == "256" and ipcache[("172.31.0.11",)] == "1"
    assert ipcache[("172.31.0.12",)] == "6"
    assert not any(int(v) > 0xFFFFFF for v in ipcache.values())  # no CIDR identities for ipBlocks
    assert {k for k, v in ipcache.items() if v == "2"}  # the world covers the rest


def test_rule_count_does_not_grow_with_endpoints_policies_or_identities() -> None:
    small = build_ruleset(DesiredDatapath(policy=controller(POLICIES.split("---")[0]).policy_datapath(RECORDS[:1])))
    ctl = controller()
    many = [dataclasses.replace(RECORDS[i % 3], container_id=f"c{i}", pod=RECORDS[i % 3].pod,
                                host_ifindex=200 + i, ipv4=IPv4Address(f"10.244.1.{50 + i}")) for i in range(40)]
    large = build_ruleset(DesiredDatapath(policy=ctl.policy_datapath(many)))
    assert small.structure() == large.structure()  # same chains, rules and declarations
    assert len(large.get_map(POL_IN).elements) > len(small.get_map(POL_IN).elements)


def test_policy_dispatch_order_and_hooks() -> None:
    ruleset = build_ruleset(DesiredDatapath(policy=PolicyDatapath()))
    chains = {c.name: [r.text for r in c.rules] for c in ruleset.chains}
    assert chains[FILTER_FORWARD] == ["ct state established,related accept", 'iifname "lxc*" jump pol_egress',
                                      'oifname "lxc*" jump pol_ingress']
    assert chains[FILTER_INPUT][0] == chains[FILTER_OUTPUT][0] == "ct state established,related accept"
    assert build_ruleset(DesiredDatapath()).chains == build_ruleset(DesiredDatapath(policy=None)).chains
    assert FILTER_FORWARD not in {c.name for c in build_ruleset(DesiredDatapath()).chains}


def test_a_policy_change_is_an_element_sync_of_the_maps_only() -> None:
    before = build_ruleset(DesiredDatapath(policy=controller().policy_datapath(RECORDS)))
    changed = POLICIES.replace("serve-80-tcp", "serve-81-tcp")
    after = build_ruleset(DesiredDatapath(policy=controller(changed).policy_datapath(RECORDS)))
    tx = plan_sync(before, after)
    assert tx is not None and not tx.full
    assert {op.name for op in tx.ops} == {POL_IN}  # type: ignore[union-attr]


def test_verdict_texts_keep_the_engines_truth_table() -> None:
    # The map verdicts as the agent renders them, looked up the way the kernel does.
    model = default_model(protocols=("TCP",))
    compiled = model.compile(parse_manifest_text(POLICIES.split("---")[0]))
    for verdicts in (INGRESS_VERDICTS, EGRESS_VERDICTS):
        table = probe_matrix(rendered_probe(model, compiled, verdicts), model.pod_keys, model.pod_keys, "TCP", 80)
        assert {s for (s, d), ok in table.cells.items() if d == "x/a" and ok} == {"x/b"}


# --- the compiler -----------------------------------------------------------------------------------------


def test_status_writes_and_unrelated_changes_do_not_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = PolicyCompiler()
    policies, pods = typed_policies(), typed_pods()
    assert compiler.update(policies, IDENTITIES, RECORDS, pods)
    compiled, revision, imported_at = compiler.compiled, compiler.revision, dict(compiler.imported_at)

    def status_write(data: dict[str, Any]) -> None:
        data["metadata"].update(resourceVersion="99", labels={"touched": "yes"})
        if data["kind"] == "CiliumNetworkPolicy":
            data["status"] = {"conditions": [{"type": "Valid", "status": "True"}]}

    # Neither an unchanged object nor a status write serializes a policy.
    dumps: list[ApiObject] = []
    monkeypatch.setattr(ApiObject, "body", lambda self: dumps.append(self) or {})
    assert not compiler.update(policies, IDENTITIES, RECORDS, pods)
    written = {key: with_changes(obj, status_write) for key, obj in policies.items()}
    pods[("x", "a")] = with_changes(pods[("x", "a")], lambda d: d.update(status={"phase": "Running"}))
    assert not compiler.update(written, IDENTITIES, RECORDS, pods)
    assert compiler.compiled is compiled and compiler.revision == revision and compiler.imported_at == imported_at
    assert all(compiler.imported[key].obj is obj for key, obj in written.items())  # the newest object is kept
    assert dumps == []


def test_a_policy_body_is_canonical_json_computed_from_the_object() -> None:
    key = keys.object_key("networkpolicies", "x", "web")
    stored = policy_objects()[key]
    imported = import_policy(key, typed_policies()[key])
    body = json.loads(imported.body)
    assert body["@"] == ["x", "web", "uid-web"] and body["spec"] == stored["spec"]
    assert "status" not in body and "metadata" not in body
    assert (imported.kind, imported.namespace, imported.name, imported.generation) == ("NetworkPolicy", "x", "web", 1)
    # From the stored mapping: validated first, then the same import.
    assert import_policy(key, stored).rules == imported.rules


def test_new_identity_updates_the_cache_without_recompiling() -> None:
    compiler = PolicyCompiler()
    policies, pods = typed_policies(), typed_pods()
    compiler.update(policies, IDENTITIES, RECORDS, pods)
    compiled = compiler.compiled
    xb = policy_endpoint(RECORDS[0], pods)
    assert xb.named_ports == {"serve-80-tcp": frozenset({(6, 80)}), "serve-81-tcp": frozenset({(6, 81)})}
    before = compiler.endpoint_policies([(xb, parse_labels(RECORDS[0].labels))])["x/a"]
    # A second pod=b identity in x (another label): it is allowed in as well.
    other = parse_labels(labels("x", "b")) | parse_labels(["k8s:tier=2"])
    assert compiler.update(policies, {**IDENTITIES, 300: other}, RECORDS, pods)
    assert compiler.compiled is compiled
    after = compiler.endpoint_policies([(xb, parse_labels(RECORDS[0].labels))])["x/a"]
    assert before.ingress.lookup(300, 6, 80).verdict is None
    assert after.ingress.lookup(300, 6, 80).verdict is not None


def test_a_changed_policy_recompiles_and_keeps_cidr_identity_numbers() -> None:
    compiler = PolicyCompiler()
    policies, pods = typed_policies(), typed_pods()
    compiler.update(policies, IDENTITIES, RECORDS, pods)
    numbers = dict(compiler.compiled.cidr_identities)
    revision = compiler.revision
    key = keys.object_key("networkpolicies", "x", "web")
    policies[key] = with_changes(policies[key], lambda d: d["spec"]["ingress"][0].update(
        ports=[{"port": 8080, "protocol": "TCP"}]))
    assert compiler.update(policies, IDENTITIES, RECORDS, pods)
    assert dict(compiler.compiled.cidr_identities) == numbers
    assert compiler.imported_at[key] == compiler.revision > revision
    assert compiler.imported[key].obj is policies[key]
    xa = policy_endpoint(RECORDS[0], pods)
    ingress = compiler.endpoint_policies([(xa, parse_labels(RECORDS[0].labels))])["x/a"].ingress
    assert ingress.lookup(257, 6, 8080).verdict is not None and ingress.lookup(257, 6, 80).verdict is None


def test_a_recreated_policy_with_the_same_spec_is_imported_again() -> None:
    compiler = PolicyCompiler()
    policies, pods = typed_policies(), typed_pods()
    compiler.update(policies, IDENTITIES, RECORDS, pods)
    key = keys.object_key("networkpolicies", "x", "web")
    policies[key] = with_changes(policies[key], lambda d: d["metadata"].update(uid="uid-web-2"))
    assert compiler.update(policies, IDENTITIES, RECORDS, pods)
    assert compiler.imported_at[key] == compiler.revision
    del policies[key]
    assert compiler.update(policies, IDENTITIES, RECORDS, pods) and key not in compiler.imported


def test_named_ports_follow_a_replaced_pod() -> None:
    compiler = PolicyCompiler()
    policies, pods = typed_policies(), typed_pods()
    compiler.update(policies, IDENTITIES, RECORDS, pods)
    # x/b's pod comes back with port 80 renamed: its egress named ports change, so policies recompile.
    pods[("x", "b")] = with_changes(pods[("x", "b")], lambda d: d["spec"]["containers"][0]["ports"][0].update(
        name="Other-80"))
    assert compiler.update(policies, IDENTITIES, RECORDS, pods)
    assert policy_endpoint(RECORDS[1], pods).named_ports["other-80"] == frozenset({(6, 80)})


def test_ipcache_from_typed_nodes() -> None:
    nodes = {n["metadata"]["name"]: CiliumNode.model_validate(n) for n in (NODE, NODE2)}
    entries = {str(e.prefix): (e.identity, e.source) for e in ipcache_entries(RECORDS, nodes.values(), "node1", {})}
    assert entries["172.31.0.11/32"][0] == 1 and entries["172.31.0.12/32"][0] == 6  # host here, remote-node there
    assert entries["10.244.1.1/32"][0] == 1 and entries["10.244.2.1/32"][0] == 6  # the nodes' router IPs
    builder = IpcacheBuilder("node1")
    records = {r.key: r for r in RECORDS}
    first = builder.intervals(records, nodes, {})
    assert builder.intervals(records, dict(nodes), {}) is first  # the same node objects: nothing to do
    nodes["node2"] = with_changes(nodes["node2"], lambda d: d["spec"].update(
        addresses=[{"type": "InternalIP", "ip": "172.31.0.13"}]))
    moved = builder.intervals(records, nodes, {})
    assert moved is not first and moved != first


def test_an_endpoint_unknown_to_the_intent_gets_its_policy_at_once() -> None:
    # x/b: neither its identity nor its record has reached the intent yet, only the local table.
    ctl = Controller(POLICIES, None, records=[RECORDS[0], RECORDS[2]],
                     identities={i: labels for i, labels in IDENTITIES.items() if i != 257})
    policy = ctl.policy_datapath(RECORDS)
    assert ((str(RECORDS[0].host_ifindex), "257", "tcp", "80"), "return") in policy.ingress
    assert (("10.244.1.12",), "257") in policy.ipcache


def test_an_invalid_policy_is_reported_and_not_enforced() -> None:
    data = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "bad", "namespace": "x", "generation": 3}, "spec": {"ingress": "nope"}}
    imported = import_policy("k", data)
    assert not imported.ok and imported.rules == () and "ingress" in imported.error
    status = desired_status(None, imported, "node1", True, 4, "T1")
    assert status["conditions"][0]["status"] == "False" and status["conditions"][0]["reason"] == "Invalid"
    assert status["nodes"]["node1"] == {"ok": False, "enforcing": False, "localPolicyRevision": 4,
                                        "error": imported.error, "lastUpdated": "T1"}


def test_status_keeps_other_nodes_and_times_when_nothing_changed() -> None:
    imported = import_policy("k", policy_objects()[keys.object_key("ciliumnetworkpolicies", "x", "ping")])
    first = desired_status({"nodes": {"node2": {"ok": True}}}, imported, "node1", True, 2, "T1")
    again = desired_status(first, imported, "node1", True, 2, "T2")
    assert again == first and again["nodes"]["node2"] == {"ok": True}
    assert first["conditions"][0] == {"type": "Valid", "status": "True", "reason": "Valid",
                                      "message": "Policy validation succeeded", "observedGeneration": 1,
                                      "lastTransitionTime": "T1"}
    moved = desired_status(first, imported, "node1", False, 2, "T3")
    assert moved["nodes"]["node1"]["lastUpdated"] == "T3" and moved["conditions"] == first["conditions"]


def test_unsupported_parts_are_named_in_the_valid_condition() -> None:
    text = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: x}
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [{matchName: example.com}]
"""
    imported = import_policy("k", next(iter(policy_objects(text).values())))
    condition = desired_status(None, imported, "n", False, 1, "T")["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("True", "Unsupported")
    assert "spec.egress[0]: toFQDNs" in condition["message"]


L7_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    toPorts:
    - ports: [{port: "81", protocol: TCP}]
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
"""


def test_l7_rules_are_valid_but_unsupported_and_their_traffic_is_denied() -> None:
    imported = import_policy("k", next(iter(policy_objects(L7_POLICY).values())))
    condition = desired_status(None, imported, "n", True, 1, "T")["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("True", "Unsupported")
    assert condition["message"] == ("spec.ingress[0].toPorts[1].rules.http: L7 rules are not enforced yet; "
                                    "the traffic they select is denied")
    model = default_model(protocols=("TCP",))
    compiled = model.compile(parse_manifest_text(L7_POLICY))
    for probe in (engine_probe(model, compiled), rendered_probe(model, compiled, INGRESS_VERDICTS)):
        assert probe("x/b", "x/a", "TCP", 81) and not probe("x/b", "x/a", "TCP", 80)
    ruleset = build_ruleset(DesiredDatapath(policy=controller(L7_POLICY).policy_datapath(RECORDS)))
    pol_in = ruleset.get_map(POL_IN).mapping()
    xa = str(RECORDS[0].host_ifindex)
    assert pol_in[(xa, "257", "tcp", "81-81")] == "return"  # the plain L4 allow
    assert pol_in[(xa, "257", "tcp", "80-80")] == "goto pol_l7_in"  # the L7 port: dropped, reported
    chains = {c.name: [r.text for r in c.rules] for c in ruleset.chains}
    # An ipBlock allow of the address still wins over the L7 rule (a plain allow beats it); the rest drops.
    assert chains["pol_l7_in"][-1] == "counter drop"
    assert all("vmap @pol_in_addr" in rule for rule in chains["pol_l7_in"][:-1])


async def test_the_status_reconciler_writes_each_policys_status_once() -> None:
    store = MemoryStore()
    client = ObjectClient(store)
    await client.apply(parse_manifest_text(NAMESPACE_OBJECTS + "---" + POLICIES))
    stored = [decode(kv) for kv in (await store.list(keys.objects_prefix("ciliumnetworkpolicies")))[0]]
    h = PolicyHarness("node1").load(policies=stored, records=RECORDS, pods=typed_pods().values(),
                                    nodes=[CiliumNode.model_validate(n) for n in (NODE, NODE2)])
    statuses = Reconciler("policy-status", h.db, h.controller.tables.status,
                          PolicyStatusOperations("node1", client.modify_status))
    await statuses.reconcile_once()
    ping = await client.get("cnp", "x", "ping")
    status = ping.status  # type: ignore[attr-defined]
    assert status.nodes["node1"].enforcing and status.nodes["node1"].ok
    audited = await client.get("cnp", "y", "audited")
    assert audited.status.nodes["node1"].enforcing  # type: ignore[attr-defined]
    assert statuses.health()["done"] == 2
    # A full resync updates every row again; nothing changed, so nothing is written.
    revision = (await store.list(keys.OBJECTS))[1]
    statuses.request_full_sync()
    await statuses.reconcile_once()
    assert (await store.list(keys.OBJECTS))[1] == revision
    assert h.controller.status()["policies"] == 2


# --- the CLI ------------------------------------------------------------------------------------------------


async def _store_with_cluster() -> MemoryStore:
    store = MemoryStore()
    await ObjectClient(store).apply(parse_manifest_text(NAMESPACE_OBJECTS + "---" + POLICIES))
    remote = record("x", "b", 257, 4, node="node2")
    for rec in [*RECORDS[:1], remote, RECORDS[2]]:
        await store.put(rec.key, rec.to_json())
    for identity, label_set in IDENTITIES.items():
        await store.put(keys.identity_id_key(identity), json.dumps(canonical(label_set)).encode())
    for (namespace, name) in PODS:
        await store.put(keys.object_key("pods", namespace, name), json.dumps(pod(namespace, name)).encode())
    for node in (NODE, NODE2):
        await store.put(keys.object_key("ciliumnodes", None, node["metadata"]["name"]), json.dumps(node).encode())
    await store.put(keys.object_key("ciliumnetworkpolicies", "x", "broken"), b"{")  # left out, as by the agents
    return store


async def test_trace_names_the_deciding_rules() -> None:
    view = await load_policy_view(await _store_with_cluster())
    assert sorted(view.nodes) == ["node1", "node2"] and sorted(view.pods) == sorted(PODS)
    text = trace_text(view, "x/b", "x/a", "80/TCP")
    assert text.splitlines()[-1] == "Final verdict: ALLOWED"
    assert "NetworkPolicy x/web rule 0 (spec.ingress[0])" in text
    denied = trace_text(view, "y/a", "x/a", "80/TCP")
    assert denied.splitlines()[-1] == "Final verdict: DENIED" and "default deny" in denied
    world = trace_text(view, "198.51.100.7", "x/a", "81/TCP")
    assert "denied by" in world and "CiliumNetworkPolicy x/ping rule 0 (spec.ingressDeny[0])" in world
    # The remote pod's address resolves to its identity through the cluster-wide ipcache.
    assert trace_text(view, "10.244.2.14", "x/a", "80/TCP").splitlines()[-1] == "Final verdict: ALLOWED"


async def test_policy_get_selectors_and_endpoint_enforcement() -> None:
    view = await load_policy_view(await _store_with_cluster())
    rules = imported_rules(view.compiler.rules, "x")
    web = next(r for r in rules if {"key": "io.cilium.k8s.policy.name", "value": "web", "source": "k8s"}
               in r["labels"])
    assert web["endpointSelector"] == {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "x", "k8s:pod": "a"}}
    assert web["ingress"][0]["toPorts"] == [{"ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}]
    assert web["ingress"][1]["ipBlocks"] == [
        {"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"], "path": "from[0].ipBlock"}
    ]
    assert "fromCIDRSet" not in web["ingress"][1]
    assert all(r["labels"][-1]["value"] == "x" for r in rules)
    table = format_selectors(view).splitlines()
    assert table[0].split() == ["SELECTOR", "LABELS", "USERS", "IDENTITIES"]
    assert any(line.startswith("k8s:io.kubernetes.pod.namespace=x,k8s:pod=b ") and line.split()[-1] == "257"
               for line in table)
    assert enforcement_columns(view) == {"x/a": ("Enabled", "Enabled"), "x/b": ("Disabled", "Disabled"),
                                         "y/a": ("Enabled", "Disabled")}


def test_renderer_reuses_unchanged_endpoints() -> None:
    ctl = controller()
    renderer = PolicyRenderer()
    policies = ctl.compiler.endpoint_policies(
        [(policy_endpoint(r, typed_pods()), parse_labels(r.labels)) for r in RECORDS])
    first = render_policy({r.host_ifindex: policies[f"{r.namespace}/{r.pod}"] for r in RECORDS}, (), renderer)
    cached = renderer.direction(101, policies["x/a"].ingress)
    assert renderer.direction(101, policies["x/a"].ingress) is cached
    assert first.ingress == render_policy(
        {r.host_ifindex: policies[f"{r.namespace}/{r.pod}"] for r in RECORDS}, (), renderer).ingress


def test_policy_get_says_an_ipv6_ip_block_matches_nothing() -> None:
    policy = parse_manifest_text("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: v6, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: "2001:db8::/32", except: ["2001:db8::/48"]}
    - ipBlock: {cidr: 198.51.100.0/24}
""")[0]
    imported = import_policy("k", policy)
    (entry,) = imported_rules(imported.rules)[0]["ingress"]
    assert entry["ipBlocks"] == [{"cidr": "198.51.100.0/24", "path": "from[1].ipBlock"}]
    assert entry["unsupported"] == [
        "from[0].ipBlock 2001:db8::/32: IPv6, matches nothing (the cluster is IPv4-only)"
    ]
    assert imported.unsupported == (
        "spec.ingress[0]: from[0].ipBlock 2001:db8::/32: IPv6, matches nothing (the cluster is IPv4-only)",
    )
    # Accepted, and matches nothing: the IPv4 block still allows its addresses, the rest stays isolated.
    model = default_model(outside={"ext": "198.51.100.10"})
    probe = engine_probe(model, model.compile([policy]))
    assert probe("ext", "x/a", "TCP", 80) and not probe("y/a", "x/a", "TCP", 80)
