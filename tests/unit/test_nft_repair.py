"""NftReconciler.repair against the fake runner: whatever someone changed in the table comes back
with the smallest transaction, the table is replaced only when it is gone or nothing is known."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from membrane.datapath.nft import Chain, FakeNftRunner, FlushChain, ReplaceTable, Rule, Ruleset, Set
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import (
    ENDPOINT_SOURCES,
    FROM_ENDPOINT,
    MASQUERADE_PODS,
    NO_MASQUERADE,
    DesiredDatapath,
    EndpointAddress,
    Masquerade,
    build_ruleset,
)
from membrane.testing.nft_contract import assert_holds


def desired(*endpoints: tuple[int, str]) -> Ruleset:
    masquerade = Masquerade.of(IPv4Network("10.244.1.0/24"), [IPv4Network("10.244.0.0/16")])
    return build_ruleset(
        DesiredDatapath.from_endpoints(
            (EndpointAddress(i, IPv4Address(a)) for i, a in endpoints), masquerade=masquerade
        )
    )


DESIRED = desired((5, "10.244.1.10"), (6, "10.244.1.11"))


async def synced() -> tuple[FakeNftRunner, NftReconciler]:
    fake = FakeNftRunner()
    reconciler = NftReconciler(fake)
    await reconciler.sync(DESIRED)
    return fake, reconciler


def edit(fake: FakeNftRunner, **changes: object) -> None:
    assert fake.ruleset is not None
    fake.ruleset = replace(fake.ruleset, **changes)  # type: ignore[arg-type]


def with_chain_rules(ruleset: Ruleset, name: str, rules: tuple[Rule, ...]) -> tuple[Chain, ...]:
    return tuple(replace(c, rules=rules) if c.name == name else c for c in ruleset.chains)


async def test_nothing_to_repair_sends_nothing() -> None:
    fake, reconciler = await synced()
    result = await reconciler.repair(DESIRED)
    assert (result.kind, result.attempts) == ("unchanged", 0)
    assert len(fake.attempts) == 1
    assert not await reconciler.drifted()


async def test_repair_before_any_sync_replaces_the_table() -> None:
    fake = FakeNftRunner()
    result = await NftReconciler(fake).repair(DESIRED)
    assert result.kind == "full"
    assert_holds(await fake.read_table("inet", "membrane"), DESIRED)


async def test_a_deleted_table_comes_back_whole() -> None:
    fake, reconciler = await synced()
    fake.delete_table()
    assert await reconciler.drifted()
    assert (await reconciler.repair(DESIRED)).kind == "full"
    assert fake.ruleset == DESIRED


async def test_a_deleted_element_comes_back_with_an_element_transaction() -> None:
    fake, reconciler = await synced()
    assert fake.ruleset is not None
    sources = fake.ruleset.get_set(ENDPOINT_SOURCES)
    edit(fake, sets=tuple(replace(s, elements=s.elements - {("6", "10.244.1.11")}) if s is sources else s
                          for s in fake.ruleset.sets))
    assert await reconciler.drifted()
    result = await reconciler.repair(DESIRED)
    assert (result.kind, result.added, result.deleted, result.changed) == ("partial", 1, 0, ())
    assert fake.texts[-1] == "add element inet membrane endpoint_sources { 6 . 10.244.1.11 }\n"
    assert_holds(await fake.read_table("inet", "membrane"), DESIRED)
    assert not await reconciler.drifted()


async def test_a_flushed_chain_is_refilled_alone() -> None:
    fake, reconciler = await synced()
    assert fake.ruleset is not None
    edit(fake, chains=with_chain_rules(fake.ruleset, FROM_ENDPOINT, ()))
    result = await reconciler.repair(DESIRED)
    assert (result.kind, result.changed) == ("chains", (FROM_ENDPOINT,))
    assert fake.applied[-1].ops[0] == FlushChain(FROM_ENDPOINT)
    assert_holds(await fake.read_table("inet", "membrane"), DESIRED)


async def test_a_foreign_rule_in_our_chain_is_removed() -> None:
    fake, reconciler = await synced()
    assert fake.ruleset is not None
    masq = fake.ruleset.get_chain(MASQUERADE_PODS)
    edit(fake, chains=with_chain_rules(fake.ruleset, MASQUERADE_PODS, (Rule("accept"), *masq.rules)))
    assert (await reconciler.repair(DESIRED)).changed == (MASQUERADE_PODS,)
    assert fake.ruleset is not None and fake.ruleset.get_chain(MASQUERADE_PODS) == DESIRED.get_chain(MASQUERADE_PODS)


async def test_an_edited_rule_is_caught_once_fingerprints_are_known() -> None:
    fake, reconciler = await synced()
    # A chain written since the last read-back is compared by rule count only; this repair learns
    # the fingerprints of every chain it found intact.
    assert (await reconciler.repair(DESIRED)).kind == "unchanged"
    assert fake.ruleset is not None
    masq = fake.ruleset.get_chain(MASQUERADE_PODS)
    edited = (Rule("accept"), *masq.rules[1:])  # same number of rules
    edit(fake, chains=with_chain_rules(fake.ruleset, MASQUERADE_PODS, edited))
    assert (await reconciler.repair(DESIRED)).changed == (MASQUERADE_PODS,)
    assert fake.ruleset is not None and fake.ruleset.get_chain(MASQUERADE_PODS) == DESIRED.get_chain(MASQUERADE_PODS)


async def test_a_deleted_chain_and_set_come_back() -> None:
    fake, reconciler = await synced()
    assert fake.ruleset is not None
    # Someone deleted the masquerade chain and its set (after the jump to it, in nat_postrouting).
    edit(
        fake,
        chains=tuple(
            replace(c, rules=()) if c.name == "nat_postrouting" else c
            for c in fake.ruleset.chains
            if c.name != MASQUERADE_PODS
        ),
        sets=tuple(s for s in fake.ruleset.sets if s.name != NO_MASQUERADE),
    )
    result = await reconciler.repair(DESIRED)
    assert (result.kind, result.changed) == ("chains", (MASQUERADE_PODS, "nat_postrouting", NO_MASQUERADE))
    assert_holds(await fake.read_table("inet", "membrane"), DESIRED)


async def test_a_foreign_chain_and_set_in_our_table_go() -> None:
    fake, reconciler = await synced()
    assert fake.ruleset is not None
    edit(fake, chains=(*fake.ruleset.chains, Chain("stranger", rules=(Rule("accept"),))),
         sets=(*fake.ruleset.sets, Set("strangers", ("ipv4_addr",))))
    result = await reconciler.repair(DESIRED)
    assert result.changed == ("stranger", "strangers")
    assert fake.texts[-1].splitlines()[-2:] == [
        "delete set inet membrane strangers",
        "delete chain inet membrane stranger",
    ]
    assert_holds(await fake.read_table("inet", "membrane"), DESIRED)


async def test_repair_also_moves_to_a_new_desired_state_and_sync_goes_on_from_it() -> None:
    _, reconciler = await synced()
    newer = desired((5, "10.244.1.10"), (7, "10.244.1.12"))
    result = await reconciler.repair(newer)
    assert (result.kind, result.added, result.deleted) == ("partial", 1, 1)
    assert reconciler.applied == newer
    assert (await reconciler.sync(newer)).kind == "unchanged"


async def test_a_failed_repair_falls_back_to_a_full_replace() -> None:
    fake, reconciler = await synced()
    assert fake.ruleset is not None
    edit(fake, chains=with_chain_rules(fake.ruleset, FROM_ENDPOINT, ()))
    fake.fail_next()
    result = await reconciler.repair(DESIRED)
    assert (result.kind, result.attempts) == ("full", 2)
    assert isinstance(fake.applied[-1].ops[0], ReplaceTable)
    assert fake.ruleset == DESIRED


async def test_repair_refuses_tables_it_does_not_own() -> None:
    with pytest.raises(ValueError, match="not owned"):
        await NftReconciler(FakeNftRunner()).repair(replace(DESIRED, table="filter"))
