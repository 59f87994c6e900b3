"""The service section of the ruleset: golden text, one chain per frontend, refusal, Maglev maps,
session affinity sets the kernel fills, source ranges, and changes that touch one chain only.

Regenerate the golden file after an intended change with
``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_service_datapath.py`` and review the diff.
"""

from __future__ import annotations

import os
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from membrane.core.config import ClusterConfig
from membrane.datapath.nft.objects import Map, Ruleset, Set
from membrane.datapath.nft.render import render_table
from membrane.datapath.nft.transaction import AddElements, DeleteElements, SetState, TableState, plan_changes, plan_sync
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, FlowLog, build_ruleset
from membrane.datapath.services import ServiceDatapath, maglev_settings
from membrane.loadbalancer.jhash import maglev_slot
from membrane.loadbalancer.model import ANY_ADDRESS, Backend, Frontend, L4Addr

GOLDEN = Path(__file__).parent / "golden" / "nft"
A = IPv4Address
B1 = Backend(A("10.244.0.5"), 8080, "node1")
B2 = Backend(A("10.244.1.5"), 8080, "node2")
B3 = Backend(A("10.244.2.5"), 8080, "node3", "terminating")
MAGLEV = maglev_settings(ClusterConfig(maglevTableSize=251))


def frontend(number: int, ip: str, port: int = 80, **changes: object) -> Frontend:
    base = Frontend(number, ("default", f"svc{number}"), "", "ClusterIP", L4Addr(A(ip), "TCP", port),
                    (B1, B2, B3), (B1, B2))
    return replace(base, **changes)  # type: ignore[arg-type]


FRONTENDS = (
    frontend(1, "10.96.0.10"),
    frontend(2, "0.0.0.0", 30080, type="NodePort", address=L4Addr(ANY_ADDRESS, "TCP", 30080), selected=(B1,),
             internal=(B1, B2), external_local=True),
    frontend(3, "10.96.0.11", affinity_timeout=600),
    frontend(4, "10.96.0.12", backends=(), selected=()),
    frontend(5, "10.96.0.13", algorithm="maglev"),
    frontend(6, "10.250.0.1", type="LoadBalancer", source_ranges=(IPv4Network("192.168.0.0/24"),)),
    frontend(7, "10.96.0.14", 53, address=L4Addr(A("10.96.0.14"), "UDP", 53), selected=()),
)


def ruleset(*frontends: Frontend) -> Ruleset:
    services = ServiceDatapath(tuple(frontends), A("172.18.0.2"), A("10.244.0.1"), frozenset({A("10.244.0.5")}),
                               MAGLEV)
    endpoints = frozenset({EndpointAddress(5, A("10.244.0.5"))})
    return build_ruleset(DesiredDatapath(endpoints, flow_log=FlowLog(), services=services))


def texts(rules: Ruleset, chain: str) -> list[str]:
    """A chain's rules without the translation event (logged first, for the flows)."""
    return [r.text for r in rules.get_chain(chain).rules if not r.text.startswith("log prefix")]


def test_the_service_section_renders_as_the_golden_file() -> None:
    text = render_table(ruleset(*(f for f in FRONTENDS if f.algorithm != "maglev")))
    path = GOLDEN / "services.nft"
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def test_frontends_lead_to_their_chain_and_frontends_without_backends_are_refused() -> None:
    rules = ruleset(*FRONTENDS)
    services = rules.get_map("services").mapping()
    assert services[("10.96.0.10", "tcp", "80")] == "goto svc_1"
    assert ("10.96.0.12", "tcp", "80") not in services  # no backend: no chain, refused instead
    assert rules.get_map("nodeports").mapping() == {("tcp", "30080"): "goto svc_2"}
    refused = rules.get_set("svc_refuse").elements
    assert refused == {("10.96.0.12", "tcp", "80"), ("10.96.0.14", "udp", "53")}
    no_backend = [r.text for r in rules.get_chain("svc_no_backend").rules]
    assert no_backend[1:] == ["meta l4proto tcp reject with tcp reset", "reject with icmp type port-unreachable"]
    assert "log prefix" in no_backend[0]  # the flow says why: SERVICE_BACKEND_NOT_FOUND


def test_random_selection_picks_among_the_selected_backends_only() -> None:
    rules = texts(ruleset(*FRONTENDS), "svc_1")
    # The terminating backend B3 is listed by the frontend but takes no new connection; the first
    # rule takes half the connections, the second the rest.
    assert rules == ["numgen random mod 2 0 meta l4proto tcp dnat ip to 10.244.0.5:8080",
                     "meta l4proto tcp dnat ip to 10.244.1.5:8080"]


def test_a_random_choice_among_many_backends_is_one_map_lookup() -> None:
    many = tuple(Backend(A(f"10.244.9.{i}"), 80, "node2") for i in range(1, 41))
    rules = ruleset(frontend(1, "10.96.0.10", backends=many, selected=many))
    assert texts(rules, "svc_1") == ["meta l4proto tcp dnat ip to numgen random mod 40 map @svc_1_be"]
    assert len(rules.get_map("svc_1_be").elements) == 40


def test_external_traffic_policy_local_sends_this_nodes_pods_to_every_backend() -> None:
    rules = ruleset(*FRONTENDS)
    outer = texts(rules, "svc_2")
    assert outer == ['iifname "lxc*" goto svc_2_in', "meta l4proto tcp dnat ip to 10.244.0.5:8080"]
    assert rules.get_chain("svc_2_in").rules[0].text.startswith("numgen random mod 2 0 ")


def test_session_affinity_remembers_each_client_in_a_set_the_kernel_fills() -> None:
    rules = ruleset(*FRONTENDS)
    found = texts(rules, "svc_3")
    assert found[0].startswith("ip saddr @svc_3_a") and " goto svc_3_b" in found[0]
    assert found[-2].startswith("numgen random mod 2 0 goto svc_3_b") and found[-1].startswith("goto svc_3_b")
    affinity = [s for s in rules.sets if s.name.startswith("svc_3_a")]
    assert len(affinity) == 2 and all(s.flags == ("dynamic", "timeout") and not s.elements for s in affinity)
    backend_chain = rules.get_chain(found[0].split("goto ")[1])
    assert backend_chain.rules[0].text.endswith("{ ip saddr timeout 600s }")


def test_kernel_filled_affinity_entries_are_never_pruned() -> None:
    desired = ruleset(*FRONTENDS)
    name = next(s.name for s in desired.sets if s.name.startswith("svc_3_a"))
    state = TableState(chains={}, sets={d.name: SetState(_declaration(d), dict.fromkeys(_keys(d)))
                                        for d in desired.data()})
    state.sets[name] = SetState(state.sets[name].declaration, {("192.168.0.7",): None})  # a client the kernel added
    tx = plan_changes(state, desired)
    touched = [op for op in (tx.ops if tx else ()) if isinstance(op, (AddElements, DeleteElements))]
    assert all(op.name != name for op in touched)


def test_maglev_maps_hold_every_slot_and_the_rule_hashes_the_flow() -> None:
    rules = ruleset(*FRONTENDS)
    table = rules.get_map("svc_5_mg")
    assert table.typeof == "numgen random mod 251 : ip daddr . tcp dport"
    mapping = table.mapping()
    assert len(mapping) == 251 and set(mapping.values()) == {"10.244.0.5 . 8080", "10.244.1.5 . 8080"}
    (rule,) = texts(rules, "svc_5")
    seed = MAGLEV.seed.jhash_seed
    assert rule == (f"dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport mod 251 seed {seed:#x} "
                         "map @svc_5_mg")
    # The slot a connection hashes to names its backend, on every node alike.
    slot = maglev_slot("10.244.3.9", 40000, "10.96.0.13", 80, table_size=251, seed=seed)
    assert mapping[(str(slot),)] in {"10.244.0.5 . 8080", "10.244.1.5 . 8080"}


def test_source_ranges_drop_outside_clients_not_listed() -> None:
    rules = ruleset(*FRONTENDS)
    first = rules.get_chain("svc_6").rules[0].text
    assert first.startswith('iifname != "lxc*" ip saddr != @svc_6_src counter log prefix "mb:d:D:177:32"')
    assert rules.get_set("svc_6_src").elements == {("192.168.0.0/24",)}
    deny = ruleset(replace(FRONTENDS[5], source_ranges_deny=True)).get_chain("svc_6").rules[0].text
    assert deny.startswith('iifname != "lxc*" ip saddr @svc_6_src ')
    closed = ruleset(replace(FRONTENDS[5], source_ranges=())).get_chain("svc_6").rules[0].text
    assert closed.startswith('iifname != "lxc*" counter') and closed.endswith("drop")


def test_a_backend_change_rewrites_one_chain_and_nothing_else() -> None:
    before = ruleset(*FRONTENDS)
    after = ruleset(*(replace(f, selected=(B1,)) if f.id == 1 else f for f in FRONTENDS))
    tx = plan_sync(before, after)
    assert tx is not None and tx.changed == ("svc_1",)
    assert not any(isinstance(op, (AddElements, DeleteElements)) for op in tx.ops)


def test_hairpin_and_outside_clients_are_translated_back_through_this_node() -> None:
    rules = ruleset(*FRONTENDS)
    post = [r.text for r in rules.get_chain("nat_postrouting").rules]
    assert post[0] == "ct status dnat ip saddr . ip daddr @svc_hairpin snat ip to 10.244.0.1"
    assert post[1] == 'ct status dnat iifname != "lxc*" oifname != "lxc*" snat ip to 172.18.0.2'
    assert rules.get_set("svc_hairpin").elements == {("10.244.0.5", "10.244.0.5")}


def _declaration(data: Set | Map) -> object:
    from membrane.datapath.nft.objects import declaration_of

    return declaration_of(data)


def _keys(data: Set | Map) -> list[tuple[str, ...]]:
    return [k for k, _ in data.elements] if isinstance(data, Map) else list(data.elements)


def test_hooks_are_entered_only_when_they_have_work() -> None:
    names = {c.name for c in ruleset().chains}
    assert not names & {"nat_prerouting", "nat_output", "refuse_prerouting", "refuse_output", "nat_postrouting"}
    served = {c.name for c in ruleset(FRONTENDS[0]).chains}
    assert {"nat_prerouting", "nat_output", "nat_postrouting"} <= served
    assert not served & {"refuse_prerouting", "refuse_output"}  # every frontend has a backend
    assert {"refuse_prerouting", "refuse_output"} <= {c.name for c in ruleset(*FRONTENDS).chains}
