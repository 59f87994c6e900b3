"""Golden text of rendered nft transactions: the exact input ``nft -f -`` receives.

Regenerate after an intended change with ``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_nft_render.py``
and review the diff.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from membrane.datapath.nft import (
    PRIORITY_FILTER,
    BaseChain,
    Chain,
    Map,
    Rule,
    Ruleset,
    Set,
    full_sync,
    key,
    plan_sync,
    render_table,
    render_transaction,
)
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, build_ruleset

GOLDEN = Path(__file__).parent / "golden" / "nft"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def desired(*endpoints: tuple[int, str]) -> Ruleset:
    return build_ruleset(DesiredDatapath.from_endpoints(EndpointAddress(i, IPv4Address(a)) for i, a in endpoints))


def test_full_sync_replaces_the_table_in_one_transaction() -> None:
    ruleset = desired((12, "10.244.1.9"), (5, "10.244.1.10"), (7, "10.244.1.11"))
    assert_golden("full_sync.nft", render_transaction(full_sync(ruleset)))


def test_full_sync_of_an_empty_node() -> None:
    assert_golden("full_sync_empty.nft", render_transaction(full_sync(desired())))


def test_partial_sync_deletes_then_adds_elements() -> None:
    before = desired((5, "10.244.1.10"), (7, "10.244.1.11"), (9, "10.244.1.12"))
    after = desired((5, "10.244.1.10"), (11, "10.244.1.13"), (10, "10.244.1.14"))
    tx = plan_sync(before, after)
    assert tx is not None and not tx.full
    assert_golden("partial_sync.nft", render_transaction(tx))


def test_maps_flags_and_changed_values_render_as_nft_expects() -> None:
    ipcache = Map(
        name="ipcache",
        type=("ipv4_addr",),
        value_type="mark",
        flags=("interval",),
        elements=(
            (key(IPv4Network("10.244.2.0/24")), "301"),
            (key(IPv4Address("10.244.1.10")), "300"),
            (key((IPv4Address("10.0.0.1"), IPv4Address("10.0.0.6"))), "2"),
        ),
    )
    pol_in = Map(
        name="pol_in",
        type=("iface_index", "mark", "inet_proto", "inet_service"),
        value_type="verdict",
        flags=("interval",),
        elements=(
            (key(5, 300, "udp", 53), "jump l7_dns"),
            (key(3, (0, 4294967295), "tcp", (8080, 8090)), "accept"),
        ),
    )
    enforced = Set(name="enforced_in", type=("iface_index",), elements=frozenset({key(3), key(5)}))
    chains = (
        Chain(name="l7_dns", rules=(Rule("counter accept"),)),
        Chain(
            name="filter_forward",
            base=BaseChain(type="filter", hook="forward", priority=PRIORITY_FILTER + 10, policy="drop"),
            rules=(
                Rule("ct state established,related accept"),
                Rule("meta mark set ip saddr map @ipcache"),
                Rule("meta oif . meta mark . meta l4proto . th dport vmap @pol_in"),
                Rule("meta oif @enforced_in counter drop", comment="default deny"),
            ),
        ),
    )
    before = Ruleset(family="inet", table="membrane", chains=chains, sets=(enforced,), maps=(ipcache, pol_in))
    assert_golden("maps_table.nft", render_table(before))

    # A changed map value is a delete and an add in the same transaction.
    changed = {**pol_in.mapping(), key(5, 300, "udp", 53): "drop"}
    after = Ruleset(
        family="inet",
        table="membrane",
        chains=chains,
        sets=(enforced,),
        maps=(ipcache, Map("pol_in", pol_in.type, "verdict", ("interval",), tuple(changed.items()))),
    )
    tx = plan_sync(before, after)
    assert tx is not None
    assert render_transaction(tx) == (
        "delete element inet membrane pol_in { 5 . 300 . udp . 53 }\n"
        "add element inet membrane pol_in { 5 . 300 . udp . 53 : drop }\n"
    )
