"""Which policy allowed or denied a flow: ``*_allowed_by`` / ``*_denied_by`` from the agent's compiled
policy, as ``membrane observe`` shows them (compact and JSON), with the enrichment's lookup faked
and with the agent's real :class:`PolicyAttribution` over a real :class:`PolicyController`.
"""

from __future__ import annotations

import io
import json
from ipaddress import IPv4Address
from typing import Any

from membrane.agent.observer import PolicyAttribution
from membrane.agent.policy import PolicyController
from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.api.meta import ApiObject
from membrane.datapath.flowcodes import DROP_SPOOFED_SOURCE, TRACE_NEW, TRACE_TCP_REPLY, Direction
from membrane.datapath.ruleset import (
    DROP_POLICY_DENIED_EGRESS,
    DROP_POLICY_DENIED_INGRESS,
    DROP_POLICY_DENY_INGRESS,
    DROP_POLICY_L7_INGRESS,
)
from membrane.identity.labels import canonical, identity_labels_for_pod
from membrane.observe.enrich import EndpointInfo, EnrichmentState, PolicyDecision, PolicyRef, enrich
from membrane.observe.jsonpb import to_json
from membrane.observe.model import DROPPED, FORWARDED, Flow, flow_response
from membrane.observe.nflog import HOOK_FORWARD, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, NflogRecord, Packet
from membrane.observe.printer import Printer, PrinterOptions
from membrane.testing.agentkit import PolicyHarness, policy_object
from membrane.testing.agentkit import pod as pod_object

NODE = "node1"
PORT = 7000
L7_PORT = 7001
POD_LABELS = {"client": {"app": "client"}, "server": {"app": "server"}, "intruder": {"app": "intruder"}}
IDS = {"client": 300, "server": 301, "intruder": 302}
IFINDEX = {"client": 101, "server": 102, "intruder": 103}

POLICIES = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: server-in, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "{L7_PORT}", protocol: TCP}}], rules: {{http: [{{method: GET}}]}}}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: no-intruders, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingressDeny:
  - fromEndpoints: [{{matchLabels: {{app: intruder}}}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: client-out, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: server}}}}]
"""


def endpoint_record(pod: str) -> EndpointRecord:
    labels = tuple(canonical(identity_labels_for_pod("default", POD_LABELS[pod], {})))
    index = IFINDEX[pod] - 100
    return EndpointRecord(f"c-{pod}", index, NODE, "default", pod, "eth0", f"/run/netns/{pod}",
                          IPv4Address(f"10.244.1.{10 + index}"), IDS[pod], labels, "runner", "ready",
                          f"lxc{index:011x}", IFINDEX[pod], "")


RECORDS = {pod: endpoint_record(pod) for pod in IDS}


def stored(obj: ApiObject, name: str | None = None) -> ApiObject:
    """A policy as the store holds it: uid and generation set."""
    meta = obj.metadata.model_copy(update={"uid": f"uid-{obj.name}", "generation": 1, "name": name or obj.name})
    return obj.model_copy(update={"metadata": meta})


def harness() -> PolicyHarness:
    return PolicyHarness(NODE).load(
        policies=[stored(obj) for obj in parse_manifest_text(POLICIES)], records=RECORDS.values(),
        pods=[pod_object("default", pod, POD_LABELS[pod], node=NODE) for pod in IDS])


def controller() -> PolicyController:
    return harness().controller


def info(pod: str) -> EndpointInfo:
    r = RECORDS[pod]
    return EndpointInfo(ip=str(r.ipv4), identity=r.identity, namespace="default", pod_name=pod, labels=r.labels,
                        endpoint_id=r.endpoint_id, node=NODE, ifindex=r.host_ifindex, ifname=r.host_ifname)


STATE = EnrichmentState.build(NODE, [info(pod) for pod in IDS])


def packet_record(prefix: str, src: str, dst: str, *, dport: int = PORT, proto: int = IPPROTO_TCP,
                  flags: int = TCP_SYN, sport: int = 40000) -> NflogRecord:
    packet = Packet(4, str(RECORDS[src].ipv4), str(RECORDS[dst].ipv4), proto, 60, sport, dport, tcp_flags=flags)
    return NflogRecord(prefix, 1_700_000_000_000_000_000, HOOK_FORWARD, IFINDEX[src], IFINDEX[dst], 0, 0, packet)


def observed(prefix: str, src: str, dst: str, **kwargs: Any) -> Flow:
    flow = enrich(packet_record(prefix, src, dst, **kwargs), STATE, policy=PolicyAttribution(controller()))
    assert flow is not None
    return flow


def compact(flow: Flow, **options: Any) -> str:
    out = io.StringIO()
    printer = Printer(PrinterOptions(**options), out, io.StringIO())
    printer.write(flow_response(flow))
    printer.close()
    return out.getvalue()


def names(policies: Any) -> list[str]:
    return [f"{p.kind} {p.namespace}/{p.name}" for p in policies]


# -- the agent's compiled policy ----------------------------------------------------------------------------


def test_an_allowed_connection_names_the_policies_of_both_sides() -> None:
    flow = observed(TRACE_NEW.prefix(), "client", "server")
    assert flow.verdict == FORWARDED
    assert names(flow.ingress_allowed_by) == ["CiliumNetworkPolicy default/server-in"]
    assert names(flow.egress_allowed_by) == ["CiliumNetworkPolicy default/client-out"]
    assert not flow.ingress_denied_by and not flow.egress_denied_by
    policy = flow.ingress_allowed_by[0]
    assert list(policy.labels) == [
        "k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
        "k8s:io.cilium.k8s.policy.name=server-in",
        "k8s:io.cilium.k8s.policy.namespace=default",
        "k8s:io.cilium.k8s.policy.uid=uid-server-in",
    ]
    assert policy.revision >= 1


def test_a_drop_by_an_ingress_deny_names_the_deny_policy_in_json() -> None:
    flow = observed(DROP_POLICY_DENY_INGRESS.prefix(), "intruder", "server")
    assert flow.verdict == DROPPED
    assert names(flow.ingress_denied_by) == ["CiliumNetworkPolicy default/no-intruders"]
    assert not flow.ingress_allowed_by and not flow.egress_denied_by
    assert "Policy denied by denylist DROPPED" in compact(flow)
    data = json.loads(to_json(flow_response(flow)))["flow"]
    assert data["ingress_denied_by"] == [{
        "name": "no-intruders", "namespace": "default",
        "labels": ["k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
                   "k8s:io.cilium.k8s.policy.name=no-intruders",
                   "k8s:io.cilium.k8s.policy.namespace=default",
                   "k8s:io.cilium.k8s.policy.uid=uid-no-intruders"],
        "revision": str(flow.ingress_denied_by[0].revision), "kind": "CiliumNetworkPolicy"}]


def test_a_default_deny_drop_names_no_rule_but_says_policy_denied() -> None:
    flow = observed(DROP_POLICY_DENIED_INGRESS.prefix(), "client", "server", dport=8080)
    assert flow.verdict == DROPPED
    assert not flow.ingress_denied_by and not flow.egress_denied_by
    assert not flow.ingress_allowed_by and not flow.egress_allowed_by
    line = compact(flow, policy_names=True)
    assert "default/client:40000 (ID:300) <> default/server:8080 (ID:301) Policy denied DROPPED" in line


def test_a_drop_of_l7_traffic_names_the_l7_rule_and_says_policy_denied() -> None:
    # No L7 proxy yet: the port an HTTP rule selects is closed, and the flow says which policy did it.
    flow = observed(DROP_POLICY_L7_INGRESS.prefix(), "client", "server", dport=L7_PORT)
    assert flow.verdict == DROPPED and flow.drop_reason_desc == DROP_POLICY_L7_INGRESS.drop_reason
    assert names(flow.ingress_denied_by) == ["CiliumNetworkPolicy default/server-in"]
    assert not flow.ingress_allowed_by
    assert "Policy denied DROPPED" in compact(flow)


def test_an_egress_default_deny_is_decided_at_the_source() -> None:
    flow = observed(DROP_POLICY_DENIED_EGRESS.prefix(), "client", "intruder")
    assert flow.verdict == DROPPED and not flow.egress_denied_by
    assert "Policy denied DROPPED" in compact(flow)


def test_replies_and_non_policy_drops_are_not_attributed() -> None:
    reply = observed(TRACE_TCP_REPLY.prefix(), "server", "client", sport=PORT, dport=40000,
                     flags=TCP_SYN | TCP_ACK)
    assert not reply.ingress_allowed_by and not reply.egress_allowed_by
    spoofed = observed(DROP_SPOOFED_SOURCE.prefix(), "intruder", "server")
    assert not spoofed.ingress_denied_by and not spoofed.egress_denied_by


def test_a_policy_change_is_seen_by_the_next_flow() -> None:
    h = harness()
    attribution = PolicyAttribution(h.controller)
    record = packet_record(TRACE_NEW.prefix(), "client", "server")
    first = enrich(record, STATE, policy=attribution)
    assert first is not None and names(first.ingress_allowed_by) == ["CiliumNetworkPolicy default/server-in"]
    server_in = next(p for p in parse_manifest_text(POLICIES) if p.name == "server-in")
    h.policies.delete(policy_object(server_in).key)
    h.policies.upsert(policy_object(stored(server_in, "server-in-v2")))
    h.compute()
    second = enrich(record, STATE, policy=attribution)
    assert second is not None and names(second.ingress_allowed_by) == ["CiliumNetworkPolicy default/server-in-v2"]
    assert second.ingress_allowed_by[0].revision > first.ingress_allowed_by[0].revision


# -- the enrichment's side of the lookup (pure) -------------------------------------------------------------


def test_enrichment_asks_each_local_side_with_the_remote_identity_protocol_and_port() -> None:
    asked: list[tuple[str, Direction, int, str, int, int]] = []
    ref = PolicyRef(name="p", namespace="default", kind="CiliumNetworkPolicy", labels=("k8s:x=y",), revision=7)

    def lookup(endpoint: EndpointInfo, direction: Direction, remote_identity: int, remote_ip: str, proto: int,
               port: int) -> PolicyDecision | None:
        asked.append((endpoint.pod_name, direction, remote_identity, remote_ip, proto, port))
        return PolicyDecision("allow", (ref,))

    flow = enrich(packet_record(TRACE_NEW.prefix(), "client", "server", proto=IPPROTO_UDP, dport=53), STATE,
                  policy=lookup)
    assert flow is not None
    assert asked == [("client", Direction.EGRESS, IDS["server"], "10.244.1.12", IPPROTO_UDP, 53),
                     ("server", Direction.INGRESS, IDS["client"], "10.244.1.11", IPPROTO_UDP, 53)]
    assert [(p.name, list(p.labels), p.revision) for p in flow.egress_allowed_by] == [("p", ["k8s:x=y"], 7)]
    # An "allow" answer never lands on a drop, a "deny" never on a forwarded flow.
    drop = enrich(packet_record(DROP_POLICY_DENIED_INGRESS.prefix(), "client", "server"), STATE, policy=lookup)
    assert drop is not None and not drop.ingress_allowed_by and not drop.ingress_denied_by


IP_BLOCK = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-intruder-address, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.12/32]}}]
"""


def test_flows_name_the_network_policy_whose_ip_block_matched_the_remote_address() -> None:
    # The intruder (10.244.1.13) reaches the client through an ipBlock naming its address; the
    # server (10.244.1.12) is the except: the flow is dropped, with no allowing policy named.
    policies = [stored(obj) for obj in parse_manifest_text(POLICIES + "---" + IP_BLOCK)]
    h = PolicyHarness(NODE).load(policies=policies, records=RECORDS.values(),
                                 pods=[pod_object("default", pod, POD_LABELS[pod], node=NODE) for pod in IDS])
    attribution = PolicyAttribution(h.controller)
    allowed = enrich(packet_record(TRACE_NEW.prefix(), "intruder", "client"), STATE, policy=attribution)
    assert allowed is not None and allowed.verdict == FORWARDED
    assert names(allowed.ingress_allowed_by) == ["NetworkPolicy default/from-intruder-address"]
    dropped = enrich(packet_record(DROP_POLICY_DENIED_INGRESS.prefix(), "server", "client"), STATE, policy=attribution)
    assert dropped is not None and dropped.verdict == DROPPED and not dropped.ingress_allowed_by
    # Same identity and port, another address: answered on its own, not from the first answer's memo.
    again = enrich(packet_record(TRACE_NEW.prefix(), "intruder", "client"), STATE, policy=attribution)
    assert again is not None and names(again.ingress_allowed_by) == names(allowed.ingress_allowed_by)
