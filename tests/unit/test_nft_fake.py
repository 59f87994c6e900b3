"""The fake runner keeps the table as nf_tables would, and refuses what nf_tables refuses."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from membrane.core.errors import DatapathError
from membrane.datapath.nft import (
    AddElements,
    DeleteElements,
    Element,
    FakeNftRunner,
    Map,
    Ruleset,
    Set,
    Transaction,
    full_sync,
    key,
)
from membrane.datapath.ruleset import ENDPOINT_SOURCES, DesiredDatapath, EndpointAddress, build_ruleset


def desired(*endpoints: tuple[int, str]) -> Ruleset:
    return build_ruleset(DesiredDatapath.from_endpoints(EndpointAddress(i, IPv4Address(a)) for i, a in endpoints))


def elements(*ops: AddElements | DeleteElements) -> Transaction:
    return Transaction("inet", "membrane", ops)


async def test_records_transactions_and_keeps_the_current_table() -> None:
    fake = FakeNftRunner()
    assert await fake.read_table("inet", "membrane") is None
    await fake.apply(full_sync(desired((5, "10.244.1.10"))))
    await fake.apply(elements(AddElements(ENDPOINT_SOURCES, (Element(key(6, "10.244.1.11")),))))
    contents = await fake.read_table("inet", "membrane")
    assert contents is not None
    assert contents.sets[ENDPOINT_SOURCES] == {("5", "10.244.1.10"), ("6", "10.244.1.11")}
    assert fake.texts[-1] == "add element inet membrane endpoint_sources { 6 . 10.244.1.11 }\n"
    assert await fake.read_table("inet", "other") is None


async def test_a_refused_transaction_changes_nothing() -> None:
    fake = FakeNftRunner()
    await fake.apply(full_sync(desired((5, "10.244.1.10"))))
    before = fake.ruleset
    tx = elements(
        AddElements(ENDPOINT_SOURCES, (Element(key(6, "10.244.1.11")),)),
        DeleteElements(ENDPOINT_SOURCES, (key(7, "10.244.1.12"),)),  # not there: ENOENT
    )
    with pytest.raises(DatapathError, match="No such file or directory"):
        await fake.apply(tx)
    assert fake.ruleset == before
    assert fake.attempts[-1] == tx and fake.applied[-1] != tx


async def test_element_changes_without_a_table_are_refused() -> None:
    fake = FakeNftRunner()
    with pytest.raises(DatapathError):
        await fake.apply(elements(AddElements(ENDPOINT_SOURCES, (Element(key(6, "10.244.1.11")),))))


async def test_map_keys_cannot_be_overwritten_by_add() -> None:
    fake = FakeNftRunner()
    table = Ruleset(
        "inet",
        "membrane",
        maps=(Map("m", ("inet_service",), "verdict", elements=((key(80), "accept"),)),),
        sets=(Set("s", ("mark",)),),
    )
    await fake.apply(full_sync(table))
    await fake.apply(elements(AddElements("m", (Element(key(80), "accept"),))))  # same value: fine
    with pytest.raises(DatapathError, match="File exists"):
        await fake.apply(elements(AddElements("m", (Element(key(80), "drop"),))))
    await fake.apply(elements(DeleteElements("m", (key(80),)), AddElements("m", (Element(key(80), "drop"),))))
    assert fake.ruleset is not None and fake.ruleset.get_map("m").mapping() == {("80",): "drop"}


async def test_injected_failures_are_raised_in_order() -> None:
    fake = FakeNftRunner()
    fake.fail_next("nft: Error: busy", times=2)
    for _ in range(2):
        with pytest.raises(DatapathError, match="busy"):
            await fake.apply(full_sync(desired()))
    await fake.apply(full_sync(desired()))
    assert len(fake.attempts) == 3 and len(fake.applied) == 1
