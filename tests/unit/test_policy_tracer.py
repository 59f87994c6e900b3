"""Policy verdicts of the rendered ruleset, traced packet by packet (no kernel).

Policies are compiled for the upstream e2e model (namespaces x, y, z; pods a, b, c; see
:mod:`membrane.policy.reachability`), rendered into the agent's ruleset and traced with
:mod:`membrane.testing.tracer`: the answers come from the nft rules and elements themselves, so a
rule in the wrong chain, a wrong verdict text or a log statement that never fires shows up here.
The last tests run every conformance table through the tracer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from membrane.api.manifest import parse_manifest_text
from membrane.datapath.flowcodes import (
    DROP_IPV6,
    DROP_SPOOFED_SOURCE,
    TRACE_FIRST_REPLY,
    TRACE_NEW,
    TRACE_TCP_ORIGINAL,
    TRACE_TCP_REPLY,
    CodeVerdict,
    DropReason,
    EventKind,
    parse_prefix,
)
from membrane.datapath.nft import full_sync
from membrane.datapath.nft.fake import FakeNftRunner
from membrane.datapath.nft.objects import Chain, Map, Rule, Ruleset, key
from membrane.datapath.ruleset import (
    AUDIT_POLICY_INGRESS,
    DROP_POLICY_DENIED_EGRESS,
    DROP_POLICY_DENIED_INGRESS,
    DROP_POLICY_DENY_INGRESS,
    POL_DENIED_IN,
    POL_EGRESS_CHECK,
    POL_INGRESS_CHECK,
    DesiredDatapath,
    EndpointAddress,
    FlowLog,
    Masquerade,
    build_ruleset,
)
from membrane.policy.ipcache import flatten_ipcache
from membrane.policy.mapstate import EnforcementConfig
from membrane.policy.reachability import NetpolModel, Reachability, default_model, probe_matrix
from membrane.testing.tracer import Interface, Trace, TracePacket, Tracer, TracerError

OUTSIDE = {"ext": "198.51.100.10"}
MODEL = default_model(outside=OUTSIDE)
UPLINK = Interface("eth0", 2)
TUNNEL = Interface("membrane_vxlan", 3)
POOL = IPv4Network("10.244.0.0/16")
FLOW_LOG = FlowLog()


def _veth(model: NetpolModel, pod: str) -> Interface:
    index = 100 + model.pod_keys.index(pod)
    return Interface(f"lxc{index:011x}", index)


def _render(model: NetpolModel, policies: str, config: EnforcementConfig | None = None, *,
            flow_log: FlowLog | None = FLOW_LOG, masquerade: bool = True) -> Ruleset:
    """Compile ``policies`` for the model's pods, render them as the agent does and build the table.

    The one place that names the policy renderer, so moving it touches only this function."""
    from membrane.datapath.policy import PolicyRenderer, render_policy

    compiled = model.compile(parse_manifest_text(policies), config)
    by_ifindex = {_veth(model, key).index: policy for key, policy in compiled.endpoints.items()}
    policy = render_policy(by_ifindex, flatten_ipcache(model.ipcache(compiled)), PolicyRenderer())
    endpoints = [EndpointAddress(_veth(model, p.key).index, p.ip) for p in model.pods]
    masq = Masquerade.of(POOL, [POOL]) if masquerade else None
    return build_ruleset(DesiredDatapath.from_endpoints(endpoints, masq, flow_log, policy))


def _address(model: NetpolModel, name: str) -> IPv4Address:
    return model.outside[name] if name in model.outside else next(p.ip for p in model.pods if p.key == name)


def _packet(model: NetpolModel, source: str, destination: str, proto: str = "tcp", port: int = 80,
            **fields: Any) -> TracePacket:
    """Pods send and receive through their host veths, outside addresses through the uplink."""
    iif = UPLINK if source in model.outside else _veth(model, source)
    oif = UPLINK if destination in model.outside else _veth(model, destination)
    return TracePacket(saddr=_address(model, source), daddr=_address(model, destination), proto=proto, dport=port,
                       iif=iif, oif=oif, **fields)


def _trace(ruleset: Ruleset, source: str, destination: str, port: int = 80, **fields: Any) -> Trace:
    return Tracer(ruleset).trace(_packet(MODEL, source, destination, port=port, **fields))


WEB = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-80-tcp}]
  egress:
  - to: [{podSelector: {}}]
  - to: [{ipBlock: {cidr: 198.51.100.0/24}}]
"""

DENY_B = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: open-but-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


# --- verdicts -----------------------------------------------------------------------------------------------


def test_allowed_port_is_accepted_and_reported_as_a_new_connection() -> None:
    trace = _trace(_render(MODEL, WEB), "x/b", "x/a", 80)
    assert trace.verdict == "accept", trace.explain()
    assert trace.codes == [TRACE_NEW]
    # Egress at x/b (not selected: a miss), then ingress at x/a (an allow returns).
    assert POL_EGRESS_CHECK in trace.chains and POL_INGRESS_CHECK in trace.chains
    assert trace.ct_mark == 257  # the source identity, for the ingress lookup
    assert trace.nat == []  # pod to pod keeps its source


def test_another_port_is_dropped_with_a_policy_denied_event() -> None:
    trace = _trace(_render(MODEL, WEB), "x/b", "x/a", 81)
    assert trace.verdict == "drop"
    assert trace.dropped_in == POL_INGRESS_CHECK
    assert [e.prefix for e in trace.logs] == [DROP_POLICY_DENIED_INGRESS.prefix()]
    code = parse_prefix(trace.logs[0].prefix)
    assert code is not None and code.kind is EventKind.DROP and code.reason is DropReason.POLICY_DENIED
    assert trace.logs[0].group == FlowLog().group
    assert "flow_forward" not in trace.chains  # a dropped packet never reaches the trace chains


def test_a_peer_the_policy_does_not_name_is_dropped_and_egress_is_checked_at_the_source() -> None:
    ruleset = _render(MODEL, WEB)
    assert _trace(ruleset, "x/c", "x/a", 80).drop_codes == [DROP_POLICY_DENIED_INGRESS]
    # x/a may only send to pods and to 198.51.100.0/24: a world address is an egress drop.
    world = Tracer(ruleset).trace(TracePacket(saddr=_address(MODEL, "x/a"), daddr="203.0.113.9", dport=443,
                                              iif=_veth(MODEL, "x/a"), oif=UPLINK))
    assert world.verdict == "drop" and world.drop_codes == [DROP_POLICY_DENIED_EGRESS]
    assert world.dropped_in == POL_EGRESS_CHECK


def test_a_deny_rule_beats_an_allow() -> None:
    ruleset = _render(MODEL, DENY_B)
    denied = _trace(ruleset, "x/b", "x/a", 80)
    assert denied.verdict == "drop" and denied.dropped_in == POL_DENIED_IN
    assert denied.drop_codes == [DROP_POLICY_DENY_INGRESS]
    assert denied.drop_codes[0].reason is DropReason.POLICY_DENY
    assert _trace(ruleset, "x/b", "x/a", 81).accepted  # the deny names port 80 only
    assert _trace(ruleset, "x/c", "x/a", 80).accepted


def test_audit_mode_lets_the_packet_through_and_reports_it() -> None:
    ruleset = _render(MODEL, WEB, EnforcementConfig(audit_namespaces=frozenset({"x"})))
    trace = _trace(ruleset, "x/b", "x/a", 81)
    assert trace.verdict == "accept", trace.explain()
    assert trace.drop_codes == []
    assert trace.codes == [AUDIT_POLICY_INGRESS, TRACE_NEW]
    assert trace.codes[0].verdict is CodeVerdict.AUDIT
    # Allowed traffic of an audited endpoint is not reported as audit.
    assert _trace(ruleset, "x/b", "x/a", 80).codes == [TRACE_NEW]


def test_an_endpoint_no_policy_selects_accepts_everything() -> None:
    ruleset = _render(MODEL, WEB)
    for source in ("y/a", "x/c", "ext"):
        trace = _trace(ruleset, source, "x/b", 8080)
        assert trace.accepted and trace.drop_codes == [], trace.explain()
        assert any(s.chain == POL_INGRESS_CHECK and s.outcome == "no match" for s in trace.steps)


def test_a_spoofed_source_is_dropped_before_conntrack() -> None:
    ruleset = _render(MODEL, "")
    spoofed = TracePacket(saddr=_address(MODEL, "x/a"), daddr=_address(MODEL, "y/a"), iif=_veth(MODEL, "x/b"),
                          oif=_veth(MODEL, "y/a"))
    trace = Tracer(ruleset).trace(spoofed)
    assert trace.verdict == "drop" and trace.dropped_in == "from_endpoint"
    assert {s.hook for s in trace.steps} == {"prerouting"}
    assert trace.drop_codes == [DROP_SPOOFED_SOURCE]
    ipv6 = Tracer(ruleset).trace(TracePacket(saddr="0.0.0.0", daddr="0.0.0.0", nfproto="ipv6",
                                             iif=_veth(MODEL, "x/b"), oif=UPLINK))
    assert ipv6.drop_codes == [DROP_IPV6]
    # A veth the ruleset does not know yet cannot send at all (fail closed).
    unknown = Tracer(ruleset).trace(TracePacket(saddr="10.244.1.99", daddr="10.244.1.10",
                                                iif=Interface("lxc0000000fff", 4095), oif=_veth(MODEL, "x/a")))
    assert unknown.drop_codes == [DROP_SPOOFED_SOURCE]


def test_established_traffic_is_accepted_before_any_policy_lookup() -> None:
    ruleset = _render(MODEL, WEB)
    for state in ("established", "related"):
        trace = _trace(ruleset, "x/c", "x/a", 81, ct_state=state)
        assert trace.accepted
        first = next(s for s in trace.steps if s.chain == "filter_forward")
        assert (first.index, first.outcome) == (0, "accept")
        assert not any(c.startswith("pol_") for c in trace.chains)
    assert not _trace(ruleset, "x/c", "x/a", 81).accepted  # the same packet, new, is dropped


def test_masquerade_applies_to_the_outside_only() -> None:
    ruleset = _render(MODEL, "")
    out = Tracer(ruleset).trace(TracePacket(saddr=_address(MODEL, "y/a"), daddr="203.0.113.9", dport=443,
                                            iif=_veth(MODEL, "y/a"), oif=UPLINK))
    assert out.accepted and [n.kind for n in out.nat] == ["masquerade"]
    assert _trace(ruleset, "y/a", "x/a").nat == []  # pod to pod: both in the pool
    tunnel = Tracer(ruleset).trace(TracePacket(saddr=_address(MODEL, "y/a"), daddr="10.245.0.7",
                                               iif=_veth(MODEL, "y/a"), oif=TUNNEL))
    assert tunnel.nat == []  # into the tunnel keeps the pod address
    reply = Tracer(ruleset).trace(TracePacket(saddr=_address(MODEL, "y/a"), daddr="203.0.113.9", dport=443,
                                              iif=_veth(MODEL, "y/a"), oif=UPLINK, ct_state="established"))
    assert reply.nat == []  # NAT rules see the first packet only; conntrack does the rest
    assert Tracer(_render(MODEL, "", masquerade=False)).trace(out.packet).nat == []


def test_without_flow_logging_nothing_is_logged_but_verdicts_stay() -> None:
    ruleset = _render(MODEL, WEB, flow_log=None)
    assert _trace(ruleset, "x/b", "x/a", 81).verdict == "drop"
    assert _trace(ruleset, "x/b", "x/a", 81).logs == []
    assert _trace(ruleset, "x/b", "x/a", 80).accepted


def test_icmp_is_looked_up_by_type_and_code() -> None:
    ping = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ping, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - icmps: [{fields: [{type: EchoRequest}]}]
"""
    ruleset = _render(MODEL, ping)
    assert _trace(ruleset, "y/b", "x/a", proto="icmp", icmp_type=8).accepted
    assert not _trace(ruleset, "y/b", "x/a", proto="icmp", icmp_type=13).accepted
    assert not _trace(ruleset, "y/b", "x/a", proto="tcp").accepted


def test_trace_events_follow_conntrack_direction_and_tcp_flags() -> None:
    ruleset = _render(MODEL, "")
    tracer = Tracer(ruleset)
    syn_ack = _packet(MODEL, "x/a", "x/b", ct_state="established", ct_direction="reply",
                      tcp_flags=frozenset({"syn", "ack"}))
    assert tracer.trace(syn_ack).codes == [TRACE_TCP_REPLY]
    retransmitted = _packet(MODEL, "x/b", "x/a", ct_confirmed=True)  # new, but the first SYN was seen
    assert tracer.trace(retransmitted).codes == []
    data = _packet(MODEL, "x/b", "x/a", ct_state="established", tcp_flags=frozenset({"ack", "psh"}))
    assert tracer.trace(data).codes == []
    fin = _packet(MODEL, "x/b", "x/a", ct_state="established", tcp_flags=frozenset({"fin", "ack"}))
    assert tracer.trace(fin).codes == [TRACE_TCP_ORIGINAL]
    # The first UDP reply is reported once: the rule marks the connection with a ct label.
    reply = _packet(MODEL, "x/a", "x/b", "udp", ct_state="established", ct_direction="reply")
    first = tracer.trace(reply)
    assert first.codes == [TRACE_FIRST_REPLY] and first.ct_labels == {FLOW_LOG.reply_label}
    assert tracer.trace(dataclasses.replace(reply, ct_labels=first.ct_labels)).codes == []


async def test_the_fake_runners_table_traces_like_the_rendered_one() -> None:
    ruleset = _render(MODEL, WEB)
    runner = FakeNftRunner()
    await runner.apply(full_sync(ruleset))
    trace = Tracer.of_runner(runner).trace(_packet(MODEL, "x/b", "x/a", port=81))
    assert trace.drop_codes == [DROP_POLICY_DENIED_INGRESS]
    with pytest.raises(TracerError, match="no table"):
        Tracer.of_runner(FakeNftRunner())


# --- the tracer refuses what it does not understand --------------------------------------------------------


def _with_rule(text: str) -> Ruleset:
    base = _render(MODEL, "")
    chains = tuple(Chain(c.name, (*c.rules, Rule(text)), c.base) if c.name == "from_endpoint" else c
                   for c in base.chains)
    return Ruleset(base.family, base.table, chains, base.sets, base.maps)


@pytest.mark.parametrize("text", ["meta mark 3 accept", "ip saddr 10.0.0.1 reject", "ip6 saddr ::1 drop",
                                  'iifname "l*x*" drop', "iif . ip saddr @endpoint_sources . ip daddr return",
                                  "ct state bogus drop", "tcp flags & (syn | nope) == syn drop"])
def test_unknown_syntax_is_an_error_not_a_skipped_rule(text: str) -> None:
    with pytest.raises(TracerError):
        Tracer(_with_rule(text))


def test_overlapping_map_elements_are_an_error() -> None:
    base = _render(MODEL, "")
    overlapping = Map("ipcache", ("ipv4_addr",), "mark", ("interval",),
                      ((key(IPv4Network("10.0.0.0/8")), "2"), (key(IPv4Network("10.244.0.0/16")), "3")))
    ruleset = Ruleset(base.family, base.table, base.chains, base.sets,
                      tuple(overlapping if m.name == "ipcache" else m for m in base.maps))
    with pytest.raises(TracerError, match="overlapping"):
        _trace(ruleset, "x/a", "y/a")


# --- conformance tables, traced ----------------------------------------------------------------------------


def _conformance() -> ModuleType:
    """The conformance cases live in their own test module; load it by path (importlib import mode)."""
    path = Path(__file__).with_name("test_policy_conformance.py")
    spec = importlib.util.spec_from_file_location("_policy_conformance_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


CONFORMANCE = _conformance()
# Every case: tracing is cheap (about 30 ms for a case's tables).
CASES = CONFORMANCE.CASES


def _traced_probe(model: NetpolModel, ruleset: Ruleset) -> Any:
    tracer = Tracer(ruleset)

    def probe(source: str, destination: str, protocol: str, port: int) -> bool:
        return tracer.trace(_packet(model, source, destination, protocol.lower(), port)).accepted

    return probe


def _ports(expect: dict[str, str]) -> Iterable[tuple[str, int, str]]:
    for port_spec, table in expect.items():
        protocol, port = port_spec.split("/")
        yield protocol, int(port), table


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_tracer_agrees_with_the_conformance_tables(case: Any) -> None:
    model = CONFORMANCE.model_for(case)
    ruleset = _render(model, case.policies, case.config)
    probe = _traced_probe(model, ruleset)
    for protocol, port, table in _ports(case.expect):
        expected = Reachability.parse(table)
        observed = probe_matrix(probe, expected.sources, expected.destinations, protocol, port)
        assert not expected.mismatches(observed), f"{case.name} {protocol}/{port}\n{expected.comparison(observed)}"


def test_the_traced_cases_cover_denials_audit_and_outside_addresses() -> None:
    assert len(CASES) >= 50
    assert any("ingressDeny" in c.policies or "egressDeny" in c.policies for c in CASES)
    assert any(c.config.audit or c.config.audit_namespaces for c in CASES)
    assert any(any("ext1" in t for t in c.expect.values()) for c in CASES)
