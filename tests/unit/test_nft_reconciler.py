"""NftReconciler against the fake runner: full sync on start, element syncs after, self-repair,
backoff, and no table but its own."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from membrane.core.errors import DatapathError
from membrane.datapath.nft import FakeNftRunner, Rule, Ruleset
from membrane.datapath.reconcilers import Backoff, NftReconciler
from membrane.datapath.ruleset import ENDPOINT_SOURCES, FROM_ENDPOINT, DesiredDatapath, EndpointAddress, build_ruleset


def desired(*endpoints: tuple[int, str]) -> Ruleset:
    return build_ruleset(DesiredDatapath.from_endpoints(EndpointAddress(i, IPv4Address(a)) for i, a in endpoints))


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_first_sync_is_full_then_only_element_changes() -> None:
    fake = FakeNftRunner()
    reconciler = NftReconciler(fake)
    first = await reconciler.sync(desired((5, "10.244.1.10")))
    second = await reconciler.sync(desired((5, "10.244.1.10"), (6, "10.244.1.11")))
    third = await reconciler.sync(desired((5, "10.244.1.10"), (6, "10.244.1.11")))
    assert (first.kind, second.kind, third.kind) == ("full", "partial", "unchanged")
    assert (second.added, second.deleted) == (1, 0)
    assert fake.texts[1] == "add element inet membrane endpoint_sources { 6 . 10.244.1.11 }\n"
    assert len(fake.attempts) == 2  # "unchanged" sent nothing
    assert await fake.read_table("inet", "membrane") == desired((5, "10.244.1.10"), (6, "10.244.1.11")).contents()


async def test_a_changed_chain_is_refilled_in_place() -> None:
    fake = FakeNftRunner()
    reconciler = NftReconciler(fake)
    base = desired((5, "10.244.1.10"))
    await reconciler.sync(base)
    changed = replace(
        base, chains=tuple(replace(c, rules=(*c.rules, Rule("counter"))) if c.name == FROM_ENDPOINT else c
                           for c in base.chains))
    result = await reconciler.sync(changed)
    assert (result.kind, result.changed) == ("chains", (FROM_ENDPOINT,))
    assert fake.texts[-1].startswith(f"flush chain inet membrane {FROM_ENDPOINT}\n")
    assert fake.ruleset == changed


async def test_a_table_edited_behind_its_back_is_replaced() -> None:
    fake = FakeNftRunner()
    reconciler = NftReconciler(fake)
    await reconciler.sync(desired((5, "10.244.1.10"), (6, "10.244.1.11")))
    fake.delete_table()  # e.g. "nft flush ruleset" by an operator
    assert await reconciler.drifted()
    result = await reconciler.sync(desired((5, "10.244.1.10")))
    # The element delete failed (no table), so the reconciler fell back to a full sync at once.
    assert (result.kind, result.attempts) == ("full", 2)
    assert fake.ruleset == desired((5, "10.244.1.10"))
    assert not await reconciler.drifted()


async def test_full_sync_failures_are_retried_with_backoff() -> None:
    fake = FakeNftRunner()
    sleeps = Sleeps()
    reconciler = NftReconciler(fake, backoff=Backoff(initial=0.1, factor=2, maximum=0.3, attempts=5), sleep=sleeps)
    fake.fail_next("nft: Error: Could not process rule: Device or resource busy", times=3)
    result = await reconciler.sync(desired((5, "10.244.1.10")))
    assert (result.kind, result.attempts) == ("full", 4)
    assert sleeps.delays == [0.1, 0.2, 0.3]
    assert fake.ruleset == desired((5, "10.244.1.10"))


async def test_gives_up_with_nfts_message_and_forgets_the_cache() -> None:
    fake = FakeNftRunner()
    reconciler = NftReconciler(fake, backoff=Backoff(attempts=2), sleep=Sleeps())
    await reconciler.sync(desired((5, "10.244.1.10")))
    fake.fail_next("nft: Error: Could not process rule: Operation not permitted", times=3)
    with pytest.raises(DatapathError, match="after 2 attempts: nft: Error: Could not process rule: Operation not"):
        await reconciler.sync(desired((6, "10.244.1.11")))
    assert reconciler.applied is None
    # Next time round it starts over with a full sync.
    assert (await reconciler.sync(desired((6, "10.244.1.11")))).kind == "full"


async def test_refuses_tables_it_does_not_own() -> None:
    fake = FakeNftRunner()
    with pytest.raises(ValueError, match="not owned"):
        await NftReconciler(fake).sync(replace(desired(), table="filter"))
    with pytest.raises(ValueError, match="not owned"):
        await NftReconciler(fake).sync(replace(desired(), family="ip"))
    assert fake.attempts == []


async def test_invalidate_forces_a_full_sync() -> None:
    fake = FakeNftRunner()
    reconciler = NftReconciler(fake)
    await reconciler.sync(desired((5, "10.244.1.10")))
    reconciler.invalidate()
    assert (await reconciler.sync(desired((5, "10.244.1.10")))).kind == "full"
    assert fake.ruleset is not None and fake.ruleset.get_set(ENDPOINT_SOURCES).elements == {("5", "10.244.1.10")}


def test_backoff_delays_grow_and_are_capped() -> None:
    backoff = Backoff(initial=0.05, factor=2, maximum=0.3, attempts=6)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    with pytest.raises(ValueError):
        Backoff(attempts=0)
