"""Planning syncs: full when nothing is known or the chains changed, elements only otherwise."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from membrane.datapath.nft import (
    AddElements,
    AddRules,
    DeleteElements,
    Element,
    FlushChain,
    ReplaceTable,
    Rule,
    Ruleset,
    element_sync,
    plan_sync,
)
from membrane.datapath.ruleset import ENDPOINT_SOURCES, FROM_ENDPOINT, DesiredDatapath, EndpointAddress, build_ruleset


def desired(*endpoints: tuple[int, str]) -> Ruleset:
    return build_ruleset(DesiredDatapath.from_endpoints(EndpointAddress(i, IPv4Address(a)) for i, a in endpoints))


def test_nothing_applied_yet_means_a_full_sync() -> None:
    tx = plan_sync(None, desired((5, "10.244.1.10")))
    assert tx is not None and tx.full
    assert tx.ops == (ReplaceTable(desired((5, "10.244.1.10"))),)


def test_the_same_ruleset_needs_no_transaction() -> None:
    assert plan_sync(desired((5, "10.244.1.10")), desired((5, "10.244.1.10"))) is None


def test_element_changes_are_exactly_the_difference() -> None:
    tx = plan_sync(desired((5, "10.244.1.10"), (6, "10.244.1.11")), desired((5, "10.244.1.10"), (7, "10.244.1.12")))
    assert tx is not None and not tx.full
    assert tx.ops == (
        DeleteElements(ENDPOINT_SOURCES, (("6", "10.244.1.11"),)),
        AddElements(ENDPOINT_SOURCES, (Element(("7", "10.244.1.12")),)),
    )
    assert (tx.added, tx.deleted) == (1, 1)


def test_an_endpoint_moving_to_a_new_veth_is_a_delete_and_an_add() -> None:
    tx = plan_sync(desired((5, "10.244.1.10")), desired((9, "10.244.1.10")))
    assert tx is not None
    assert [type(op) for op in tx.ops] == [DeleteElements, AddElements]


def test_a_changed_chain_is_flushed_and_refilled_without_replacing_the_table() -> None:
    before = desired((5, "10.244.1.10"))
    chains = tuple(
        replace(c, rules=(*c.rules, Rule("counter"))) if c.name == FROM_ENDPOINT else c for c in before.chains
    )
    after = replace(before, chains=chains)
    tx = plan_sync(before, after)
    assert tx is not None and not tx.full and tx.structural
    assert tx.ops == (FlushChain(FROM_ENDPOINT), AddRules(FROM_ENDPOINT, after.get_chain(FROM_ENDPOINT).rules))
    assert tx.changed == (FROM_ENDPOINT,)
    with pytest.raises(ValueError):
        element_sync(before, after)


def test_another_table_comment_means_a_full_sync() -> None:
    before = desired((5, "10.244.1.10"))
    tx = plan_sync(before, replace(before, comment="another"))
    assert tx is not None and tx.full
