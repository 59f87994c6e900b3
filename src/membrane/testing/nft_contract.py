"""The behaviour every :class:`~membrane.datapath.nft.runner.NftRunner` must show, as a pytest suite.

A test module provides an ``nft`` fixture yielding an :class:`NftRunner` whose namespace holds no
``inet membrane`` table yet, and subclasses :class:`NftContract`::

    @pytest.fixture
    def nft() -> NftRunner:
        return FakeNftRunner()

    class TestNftContract(NftContract):
        pass

The same suite runs against :class:`~membrane.datapath.nft.fake.FakeNftRunner` and against
:class:`~membrane.datapath.nft.runner.NftCommand` in a fresh network namespace, so the fake keeps
meaning what the kernel means: what a transaction leaves in the table (chains, hooks, rule counts,
set declarations, elements), that a transaction with one refused operation changes nothing, and that
a missing table reads back as None.

Primitives: :func:`sample_ruleset`, :func:`assert_holds`, :func:`rule_counts` and
:class:`NftContract`.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from membrane.core.errors import DatapathError
from membrane.datapath.nft import (
    PRIORITY_FILTER,
    AddChain,
    AddElements,
    AddRules,
    AddSet,
    BaseChain,
    Chain,
    DeleteChain,
    DeleteElements,
    DeleteSet,
    Element,
    FlushChain,
    Map,
    NftRunner,
    Rule,
    Ruleset,
    Set,
    TableContents,
    Transaction,
    full_sync,
    key,
    plan_sync,
)
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import TABLE_FAMILY, TABLE_NAME

ALLOWED = "allowed"
PORTS = "ports"
INPUT, ADMIT, SSH = "filter_input", "admit", "ssh"


def sample_ruleset() -> Ruleset:
    """A small table using every kind of object the agent uses: a base chain dispatching to regular
    chains, an interval set, a concatenated set, a verdict map jumping to a chain, a value map."""
    return Ruleset(
        TABLE_FAMILY,
        TABLE_NAME,
        chains=(
            Chain(
                INPUT,
                rules=(
                    Rule(f"ip saddr @{ALLOWED} jump {ADMIT}", comment="allowed sources"),
                    Rule("iif . ip saddr @pairs accept"),
                    Rule(f"tcp dport vmap @{PORTS}"),
                    Rule("ct mark set ip daddr map @marks"),
                ),
                base=BaseChain("filter", "input", PRIORITY_FILTER, "accept"),
            ),
            Chain(ADMIT, rules=(Rule("counter accept"),)),
            Chain(SSH, rules=(Rule("ct state new counter"), Rule("meta mark 0x1 accept"))),
        ),
        sets=(
            Set(ALLOWED, ("ipv4_addr",), ("interval",), frozenset({key(IPv4Network("10.1.0.0/16"))})),
            Set("pairs", ("iface_index", "ipv4_addr"), elements=frozenset({key(9001, IPv4Address("10.1.0.1"))})),
        ),
        maps=(
            Map(PORTS, ("inet_service",), "verdict", elements=((key(22), f"jump {SSH}"), (key(80), "accept"))),
            Map(
                "marks",
                ("ipv4_addr",),
                "mark",
                ("interval",),
                elements=((key(IPv4Network("10.1.0.0/16")), "300"), (key(IPv4Address("10.2.0.1")), "301")),
            ),
        ),
    )


def rule_counts(contents: TableContents) -> dict[str, int]:
    return {name: len(rules) for name, rules in contents.rules.items()}


def assert_holds(contents: TableContents | None, ruleset: Ruleset) -> None:
    """The table read back holds ``ruleset``: chains, hooks, rule counts, declarations, elements."""
    assert contents is not None, "the table is missing"
    expected = ruleset.contents()
    assert contents == expected
    assert dict(contents.bases) == dict(expected.bases)
    assert dict(contents.declarations) == dict(expected.declarations)
    assert rule_counts(contents) == rule_counts(expected)


def _tx(*ops: object) -> Transaction:
    return Transaction(TABLE_FAMILY, TABLE_NAME, ops)  # type: ignore[arg-type]


def _with_chain(ruleset: Ruleset, chain: Chain) -> Ruleset:
    chains = tuple(chain if c.name == chain.name else c for c in ruleset.chains)
    return replace(ruleset, chains=chains if chain.name in {c.name for c in chains} else (*chains, chain))


async def _read(nft: NftRunner) -> TableContents | None:
    return await nft.read_table(TABLE_FAMILY, TABLE_NAME)


class NftContract:
    """Subclass in a test module that provides the ``nft`` fixture."""

    # -- reading ---------------------------------------------------------------------------------

    async def test_a_missing_table_reads_as_none(self, nft: NftRunner) -> None:
        assert await _read(nft) is None
        assert await nft.read_table(TABLE_FAMILY, "mbcontractother") is None

    async def test_a_full_table_reads_back_as_applied(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        contents = await _read(nft)
        assert_holds(contents, sample_ruleset())
        # Reading twice gives the same fingerprints: repair compares them across reads.
        again = await _read(nft)
        assert again is not None and contents is not None and dict(again.rules) == dict(contents.rules)

    async def test_a_full_replace_leaves_nothing_of_the_old_table(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        smaller = Ruleset(TABLE_FAMILY, TABLE_NAME, chains=(Chain("only", rules=(Rule("accept"),)),))
        await nft.apply(full_sync(smaller))
        assert_holds(await _read(nft), smaller)

    # -- chain-granular operations ---------------------------------------------------------------

    async def test_add_chain_then_rules(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        extra = Chain("extra", rules=(Rule("meta l4proto udp accept"), Rule("drop")))
        await nft.apply(_tx(AddChain(extra), AddRules("extra", extra.rules)))
        assert_holds(await _read(nft), _with_chain(sample_ruleset(), extra))

    async def test_adding_an_existing_chain_keeps_its_rules(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        await nft.apply(_tx(AddChain(Chain(SSH))))
        assert_holds(await _read(nft), sample_ruleset())

    async def test_flush_and_refill_a_chain_keeps_its_fingerprints(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        before = await _read(nft)
        await nft.apply(_tx(FlushChain(SSH)))
        flushed = await _read(nft)
        assert flushed is not None and flushed.rules[SSH] == ()
        assert_holds(flushed, _with_chain(sample_ruleset(), Chain(SSH)))
        await nft.apply(_tx(AddRules(SSH, sample_ruleset().get_chain(SSH).rules)))
        refilled = await _read(nft)
        assert before is not None and refilled is not None and dict(refilled.rules) == dict(before.rules)

    async def test_delete_an_unreferenced_chain_with_rules(self, nft: NftRunner) -> None:
        extra = Chain("extra", rules=(Rule("accept"),))
        await nft.apply(full_sync(_with_chain(sample_ruleset(), extra)))
        await nft.apply(_tx(DeleteChain("extra")))
        assert_holds(await _read(nft), sample_ruleset())

    async def test_a_base_chain_policy_changes_in_place(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        dropping = replace(
            sample_ruleset().get_chain(INPUT), base=BaseChain("filter", "input", PRIORITY_FILTER, "drop")
        )
        await nft.apply(_tx(AddChain(dropping)))
        assert_holds(await _read(nft), _with_chain(sample_ruleset(), dropping))

    async def test_add_and_delete_sets_and_maps(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        extra_set = Set("extra_set", ("inet_service",), ("interval",), frozenset({key((1000, 2000)), key(53)}))
        extra_map = Map("extra_map", ("mark",), "verdict", elements=((key(7), f"goto {ADMIT}"),))
        await nft.apply(_tx(AddSet(extra_set), AddSet(extra_map)))
        grown = replace(
            sample_ruleset(), sets=(*sample_ruleset().sets, extra_set), maps=(*sample_ruleset().maps, extra_map)
        )
        assert_holds(await _read(nft), grown)
        await nft.apply(_tx(DeleteSet("extra_set"), DeleteSet("extra_map", is_map=True)))
        assert_holds(await _read(nft), sample_ruleset())

    async def test_element_adds_and_deletes(self, nft: NftRunner) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        await nft.apply(
            _tx(
                DeleteElements(ALLOWED, (key(IPv4Network("10.1.0.0/16")),)),
                AddElements(ALLOWED, (Element(key(IPv4Network("10.3.0.0/16"))),)),
                DeleteElements(PORTS, (key(80),)),
                AddElements(PORTS, (Element(key(80), "drop"), Element(key(443), f"jump {ADMIT}"))),
            )
        )
        ruleset = sample_ruleset()
        expected = replace(
            ruleset,
            sets=(replace(ruleset.get_set(ALLOWED), elements=frozenset({key(IPv4Network("10.3.0.0/16"))})),
                  ruleset.get_set("pairs")),
            maps=(
                replace(ruleset.get_map(PORTS),
                        elements=((key(22), f"jump {SSH}"), (key(80), "drop"), (key(443), f"jump {ADMIT}"))),
                ruleset.get_map("marks"),
            ),
        )
        assert_holds(await _read(nft), expected)

    async def test_every_planned_transaction_is_accepted(self, nft: NftRunner) -> None:
        """What the planner emits for typical changes applies in one batch and ends where it should."""
        base = sample_ruleset()
        ssh = base.get_chain(SSH)
        steps = [
            _with_chain(base, Chain("log_new", rules=(Rule("log group 1"),))),  # a new chain
            _with_chain(base, replace(ssh, rules=(Rule("ct state new limit rate 5/second accept"),))),  # one chain
            replace(base, chains=(base.get_chain(INPUT), base.get_chain(ADMIT)),  # a chain and its vmap entry go
                    maps=(replace(base.get_map(PORTS), elements=((key(80), "accept"),)), base.get_map("marks"))),
            replace(base, sets=(Set(ALLOWED, ("ipv4_addr",), elements=frozenset({key(IPv4Address("10.1.0.1"))})),
                                base.get_set("pairs"))),  # a set's flags change
            _with_chain(base, replace(ssh, comment="secure shell")),  # re-created, a vmap entry jumps to it
            _with_chain(base, replace(base.get_chain(INPUT),
                                      base=BaseChain("filter", "input", PRIORITY_FILTER, "drop"))),
        ]
        for step in steps:
            await nft.apply(full_sync(base))
            tx = plan_sync(base, step)
            assert tx is not None and not tx.full
            await nft.apply(tx)
            assert_holds(await _read(nft), step)

    # -- refusals: one bad operation, nothing changes --------------------------------------------

    async def _refused(self, nft: NftRunner, *ops: object) -> None:
        await nft.apply(full_sync(sample_ruleset()))
        before = await _read(nft)
        with pytest.raises(DatapathError):
            await nft.apply(_tx(*ops))
        after = await _read(nft)
        assert after == before and after is not None and before is not None
        assert rule_counts(after) == rule_counts(before)
        assert dict(after.declarations) == dict(before.declarations)

    async def test_deleting_a_missing_element_changes_nothing(self, nft: NftRunner) -> None:
        await self._refused(
            nft,
            AddElements("pairs", (Element(key(9002, IPv4Address("10.1.0.2"))),)),
            FlushChain(SSH),
            DeleteElements("pairs", (key(9003, IPv4Address("10.1.0.3")),)),
        )

    async def test_adding_to_a_missing_set_changes_nothing(self, nft: NftRunner) -> None:
        await self._refused(
            nft,
            AddElements("pairs", (Element(key(9002, IPv4Address("10.1.0.2"))),)),
            AddElements("nosuchset", (Element(key(IPv4Address("10.1.0.2"))),)),
        )

    async def test_deleting_a_chain_still_jumped_to_changes_nothing(self, nft: NftRunner) -> None:
        await self._refused(nft, FlushChain(ADMIT), DeleteChain(ADMIT))  # filter_input jumps to it

    async def test_deleting_a_chain_a_verdict_map_jumps_to_changes_nothing(self, nft: NftRunner) -> None:
        await self._refused(nft, FlushChain(SSH), DeleteChain(SSH))  # ports: 22 jumps to it

    async def test_deleting_a_set_still_referred_to_changes_nothing(self, nft: NftRunner) -> None:
        await self._refused(nft, FlushChain(SSH), DeleteSet(ALLOWED))

    async def test_missing_chains_change_nothing(self, nft: NftRunner) -> None:
        await self._refused(nft, FlushChain(SSH), FlushChain("nosuchchain"))
        await self._refused(nft, FlushChain(SSH), DeleteChain("nosuchchain"))
        await self._refused(nft, FlushChain(SSH), AddRules("nosuchchain", (Rule("accept"),)))
        await self._refused(nft, FlushChain(SSH), AddRules(SSH, (Rule("jump nosuchchain"),)))
        await self._refused(nft, FlushChain(SSH), AddRules(SSH, (Rule("ip saddr @nosuchset accept"),)))

    async def test_redeclaring_a_set_differently_changes_nothing(self, nft: NftRunner) -> None:
        await self._refused(nft, FlushChain(SSH), AddSet(Set(ALLOWED, ("ipv4_addr",))))

    async def test_moving_a_chain_to_another_hook_in_place_changes_nothing(self, nft: NftRunner) -> None:
        moved = replace(sample_ruleset().get_chain(INPUT), base=BaseChain("filter", "forward", PRIORITY_FILTER))
        await self._refused(nft, FlushChain(SSH), AddChain(moved))

    async def test_operations_on_a_missing_table_fail(self, nft: NftRunner) -> None:
        for op in (AddElements(ALLOWED, (Element(key(IPv4Address("10.1.0.1"))),)), FlushChain(SSH)):
            with pytest.raises(DatapathError):
                await nft.apply(_tx(op))
        assert await _read(nft) is None

    # -- ownership -------------------------------------------------------------------------------

    async def test_the_reconciler_programs_no_table_but_its_own(self, nft: NftRunner) -> None:
        reconciler = NftReconciler(nft)
        for other in (replace(sample_ruleset(), table="filter"), replace(sample_ruleset(), family="ip")):
            with pytest.raises(ValueError, match="not owned"):
                await reconciler.sync(other)
            with pytest.raises(ValueError, match="not owned"):
                await reconciler.repair(other)
        assert await _read(nft) is None
        assert await nft.read_table(TABLE_FAMILY, "filter") is None
