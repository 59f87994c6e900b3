"""Chain-granular transactions: only what changed is touched, in an order nf_tables accepts in one
batch. Golden text is the exact ``nft -f -`` input; regenerate after an intended change with
``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_nft_chain_sync.py`` and review the diff."""

from __future__ import annotations

import os
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from membrane.datapath.nft import (
    PRIORITY_FILTER,
    BaseChain,
    Chain,
    FakeNftRunner,
    Map,
    ReplaceTable,
    Rule,
    Ruleset,
    Set,
    Transaction,
    full_sync,
    key,
    plan_sync,
    render_transaction,
)

GOLDEN = Path(__file__).parent / "golden" / "nft"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


ALLOWED = Set("allowed", ("ipv4_addr",), ("interval",), frozenset({key(IPv4Network("10.1.0.0/16"))}))
PORTS = Map("ports", ("inet_service",), "verdict", elements=((key(22), "jump ssh"), (key(80), "accept")))
INPUT = Chain(
    "filter_input",
    rules=(Rule("ip saddr @allowed jump admit", comment="allowed sources"), Rule("tcp dport vmap @ports")),
    base=BaseChain("filter", "input", PRIORITY_FILTER, "accept"),
)
ADMIT = Chain("admit", rules=(Rule("counter accept"),))
SSH = Chain("ssh", rules=(Rule("ct state new counter"), Rule("accept")))
BEFORE = Ruleset("inet", "membrane", chains=(INPUT, ADMIT, SSH), sets=(ALLOWED,), maps=(PORTS,))


async def apply_both(before: Ruleset, after: Ruleset) -> Transaction:
    """Plan, check the fake (which refuses what nf_tables refuses) accepts it and ends at ``after``."""
    tx = plan_sync(before, after)
    assert tx is not None and not tx.full
    fake = FakeNftRunner()
    await fake.apply(full_sync(before))
    await fake.apply(tx)
    assert await fake.read_table("inet", "membrane") == after.contents()
    assert fake.ruleset is not None and fake.ruleset.contents().rules == after.contents().rules
    return tx


async def test_a_new_chain_is_declared_then_filled_and_jumped_to() -> None:
    log = Chain("log_new", rules=(Rule("log group 1"),))
    after = replace(
        BEFORE,
        chains=(replace(INPUT, rules=(Rule("ct state new jump log_new"), *INPUT.rules)), ADMIT, SSH, log),
    )
    tx = await apply_both(BEFORE, after)
    assert tx.changed == ("filter_input", "log_new")
    assert_golden("chain_add.nft", render_transaction(tx))


async def test_changing_one_chain_touches_that_chain_only() -> None:
    ssh = replace(SSH, rules=(Rule("ct state new limit rate 5/second accept"),))
    after = replace(BEFORE, chains=(INPUT, ADMIT, ssh))
    tx = await apply_both(BEFORE, after)
    assert tx.changed == ("ssh",)
    assert_golden("chain_change.nft", render_transaction(tx))


async def test_a_removed_chain_goes_last_after_every_reference_to_it() -> None:
    # "ssh" is the target of a verdict map element: the element goes first, the chain last.
    after = replace(BEFORE, chains=(INPUT, ADMIT), maps=(replace(PORTS, elements=((key(80), "accept"),)),))
    tx = await apply_both(BEFORE, after)
    text = render_transaction(tx)
    assert text.index("delete element") < text.index("delete chain inet membrane ssh")
    assert_golden("chain_delete.nft", text)


async def test_changed_set_flags_recreate_the_set_and_refill_its_users() -> None:
    after = replace(BEFORE, sets=(Set("allowed", ("ipv4_addr",), (), frozenset({key(IPv4Address("10.1.0.1"))})),))
    tx = await apply_both(BEFORE, after)
    assert tx.changed == ("allowed", "filter_input")
    assert_golden("set_flags.nft", render_transaction(tx))


async def test_an_element_change_is_an_element_only_transaction() -> None:
    after = replace(
        BEFORE,
        sets=(replace(ALLOWED, elements=frozenset({key(IPv4Network("10.2.0.0/16"))})),),
        maps=(replace(PORTS, elements=((key(22), "jump ssh"), (key(80), "drop"))),),
    )
    tx = await apply_both(BEFORE, after)
    assert not tx.structural and tx.changed == ()
    assert_golden("elements_only.nft", render_transaction(tx))


async def test_a_base_chain_policy_change_recreates_that_chain() -> None:
    dropping = replace(INPUT, base=BaseChain("filter", "input", PRIORITY_FILTER, "drop"))
    after = replace(BEFORE, chains=(dropping, ADMIT, SSH))
    tx = await apply_both(BEFORE, after)
    text = render_transaction(tx)
    assert text.splitlines()[:3] == [
        "flush chain inet membrane filter_input",
        "delete chain inet membrane filter_input",
        "add chain inet membrane filter_input { type filter hook input priority filter; policy drop; }",
    ]


async def test_a_recreated_chain_takes_its_jumps_and_verdicts_along() -> None:
    # A new comment re-creates "ssh" (nft keeps the old one otherwise). The verdict map element
    # jumping to it must let go before the delete, and point at the new chain afterwards.
    ssh = replace(SSH, comment="secure shell")
    after = replace(BEFORE, chains=(INPUT, ADMIT, ssh))
    tx = await apply_both(BEFORE, after)
    text = render_transaction(tx)
    assert text.index("delete element inet membrane ports { 22 }") < text.index("delete chain inet membrane ssh")
    assert text.index('add chain inet membrane ssh { comment "secure shell"; }') < text.index(
        "add element inet membrane ports { 22 : jump ssh }"
    )


def test_nothing_known_or_nothing_changed() -> None:
    assert plan_sync(BEFORE, BEFORE) is None
    tx = plan_sync(None, BEFORE)
    assert tx is not None and tx.ops == (ReplaceTable(BEFORE),)


def test_an_empty_new_chain_is_only_declared() -> None:
    tx = plan_sync(BEFORE, replace(BEFORE, chains=(INPUT, ADMIT, SSH, Chain("extra"))))
    assert tx is not None
    assert render_transaction(tx) == "add chain inet membrane extra\n"
