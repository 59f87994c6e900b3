"""Drift repair against the kernel: in a fresh node namespace, a realistic table (endpoints,
masquerade, flow logging, policy elements) is applied, then changed by hand with ``nft`` the way an
operator or another program would, and ``NftReconciler.repair`` must put back exactly the desired
table with the smallest transaction. Also: changing one chain's rules leaves the table and every
other chain's rules in place (same kernel handles)."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from membrane.datapath.nft import NftCommand, Rule, Ruleset, Transaction, key
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import (
    EGRESS_DENY,
    ENDPOINT_SOURCES,
    FROM_ENDPOINT,
    MASQUERADE_PODS,
    NAT_POSTROUTING,
    NO_MASQUERADE,
    POL_IN,
    TABLE_FAMILY,
    TABLE_NAME,
    VERDICT_RETURN,
    DesiredDatapath,
    EndpointAddress,
    FlowLog,
    Masquerade,
    PolicyDatapath,
    build_ruleset,
)
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries
from membrane.testing.nft_contract import assert_holds

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(missing_binaries("nft")), reason="needs nft"),
]


class Recording(NftCommand):
    """The real runner, keeping every transaction that took effect."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.applied: list[Transaction] = []

    async def apply(self, transaction: Transaction) -> None:
        await super().apply(transaction)
        self.applied.append(transaction)


def realistic(a: int, b: int) -> Ruleset:
    world, pod_a, pod_b = "2", "300", "301"
    policy = PolicyDatapath(
        ipcache=(
            (key((IPv4Address("0.0.0.0"), IPv4Address("10.244.1.9"))), world),
            (key(IPv4Address("10.244.1.10")), pod_a),
            (key(IPv4Address("10.244.1.11")), pod_b),
            (key((IPv4Address("10.244.1.12"), IPv4Address("255.255.255.255"))), world),
        ),
        ingress=((key(a, pod_b, "tcp", "8080-8080"), VERDICT_RETURN),),
        egress=((key(b, pod_a, "tcp", "8080-8080"), VERDICT_RETURN), (key(b, world, "udp", "53-53"), EGRESS_DENY)),
        enforced_ingress=frozenset({key(a)}),
        enforced_egress=frozenset({key(b)}),
    )
    return build_ruleset(
        DesiredDatapath.from_endpoints(
            [EndpointAddress(a, IPv4Address("10.244.1.10")), EndpointAddress(b, IPv4Address("10.244.1.11"))],
            masquerade=Masquerade.of(IPv4Network("10.244.1.0/24"), [IPv4Network("10.244.0.0/16")]),
            flow_log=FlowLog(),
            policy=policy,
        )
    )


@pytest.fixture
def node(netns_factory: NetnsFactory) -> Netns:
    ns = netns_factory("mbnft-node-", lo_up=True)
    for name in ("lxc00000000001", "lxc00000000002"):
        ns.run("ip", "link", "add", name, "type", "veth", "peer", "name", name.replace("lxc", "pee"))
    return ns


@pytest.fixture
def desired(node: Netns) -> Ruleset:
    a, b = (node.call(lambda n=n: socket.if_nametoindex(n)) for n in ("lxc00000000001", "lxc00000000002"))
    return realistic(a, b)


async def synced(node: Netns, desired: Ruleset) -> tuple[Recording, NftReconciler]:
    runner = Recording(node.path)
    reconciler = NftReconciler(runner)
    assert (await reconciler.sync(desired)).kind == "full"
    # The first repair finds nothing to do and learns every chain's fingerprints.
    assert (await reconciler.repair(desired)).kind == "unchanged"
    return runner, reconciler


def nft(node: Netns, *args: str) -> str:
    return node.run("nft", *args).stdout


def handles(node: Netns) -> tuple[int, dict[str, list[int]]]:
    """The table's handle and every chain's rule handles, as the kernel numbers them."""
    data = json.loads(nft(node, "-a", "-j", "list", "table", TABLE_FAMILY, TABLE_NAME))
    table, rules = 0, {}
    for item in data["nftables"]:
        ((kind, obj),) = item.items()
        if kind == "table":
            table = obj["handle"]
        elif kind == "chain":
            rules[obj["name"]] = []
        elif kind == "rule":
            rules[obj["chain"]].append(obj["handle"])
    return table, rules


async def test_a_deleted_table_comes_back(node: Netns, desired: Ruleset) -> None:
    runner, reconciler = await synced(node, desired)
    nft(node, "delete", "table", TABLE_FAMILY, TABLE_NAME)
    assert await reconciler.drifted()
    assert (await reconciler.repair(desired)).kind == "full"
    assert_holds(await runner.read_table(TABLE_FAMILY, TABLE_NAME), desired)
    assert (await reconciler.repair(desired)).kind == "unchanged"


async def test_a_deleted_element_comes_back_without_touching_chains(node: Netns, desired: Ruleset) -> None:
    runner, reconciler = await synced(node, desired)
    source = next(iter(desired.get_set(ENDPOINT_SOURCES).elements))
    verdict = desired.get_map(POL_IN).elements[0][0]
    nft(node, "delete", "element", TABLE_FAMILY, TABLE_NAME, ENDPOINT_SOURCES, "{ " + " . ".join(source) + " }")
    nft(node, "delete", "element", TABLE_FAMILY, TABLE_NAME, POL_IN, "{ " + " . ".join(verdict) + " }")
    before = handles(node)
    result = await reconciler.repair(desired)
    assert (result.kind, result.added, result.deleted, result.changed) == ("partial", 2, 0, ())
    assert not runner.applied[-1].full and not runner.applied[-1].structural
    assert handles(node) == before
    assert_holds(await runner.read_table(TABLE_FAMILY, TABLE_NAME), desired)


async def test_a_flushed_chain_is_refilled(node: Netns, desired: Ruleset) -> None:
    runner, reconciler = await synced(node, desired)
    fingerprints = (await runner.read_table(TABLE_FAMILY, TABLE_NAME)).rules  # type: ignore[union-attr]
    table, before = handles(node)
    nft(node, "flush", "chain", TABLE_FAMILY, TABLE_NAME, FROM_ENDPOINT)
    result = await reconciler.repair(desired)
    assert (result.kind, result.changed) == ("chains", (FROM_ENDPOINT,))
    contents = await runner.read_table(TABLE_FAMILY, TABLE_NAME)
    assert_holds(contents, desired)
    assert contents is not None and dict(contents.rules) == dict(fingerprints)
    after_table, after = handles(node)
    assert after_table == table
    del after[FROM_ENDPOINT], before[FROM_ENDPOINT]
    assert after == before
    assert (await reconciler.repair(desired)).kind == "unchanged"


async def test_a_deleted_chain_comes_back(node: Netns, desired: Ruleset) -> None:
    runner, reconciler = await synced(node, desired)
    # nft refuses to delete a chain something still jumps to: the operator removes the jump first.
    nft(node, "flush", "chain", TABLE_FAMILY, TABLE_NAME, NAT_POSTROUTING)
    nft(node, "delete", "chain", TABLE_FAMILY, TABLE_NAME, MASQUERADE_PODS)
    result = await reconciler.repair(desired)
    assert (result.kind, result.changed) == ("chains", (MASQUERADE_PODS, NAT_POSTROUTING))
    assert_holds(await runner.read_table(TABLE_FAMILY, TABLE_NAME), desired)
    assert (await reconciler.repair(desired)).kind == "unchanged"


async def test_a_deleted_set_comes_back_with_its_elements(node: Netns, desired: Ruleset) -> None:
    runner, reconciler = await synced(node, desired)
    nft(node, "flush", "chain", TABLE_FAMILY, TABLE_NAME, MASQUERADE_PODS)
    nft(node, "delete", "set", TABLE_FAMILY, TABLE_NAME, NO_MASQUERADE)
    result = await reconciler.repair(desired)
    assert (result.kind, result.changed) == ("chains", (MASQUERADE_PODS, NO_MASQUERADE))
    assert_holds(await runner.read_table(TABLE_FAMILY, TABLE_NAME), desired)


async def test_a_foreign_rule_in_our_chain_is_removed(node: Netns, desired: Ruleset) -> None:
    runner, reconciler = await synced(node, desired)
    nft(node, "insert", "rule", TABLE_FAMILY, TABLE_NAME, FROM_ENDPOINT, "accept")
    assert await reconciler.drifted()
    result = await reconciler.repair(desired)
    assert (result.kind, result.changed) == ("chains", (FROM_ENDPOINT,))
    assert "accept" not in nft(node, "list", "chain", TABLE_FAMILY, TABLE_NAME, FROM_ENDPOINT).split()
    assert_holds(await runner.read_table(TABLE_FAMILY, TABLE_NAME), desired)


async def test_an_edited_rule_is_put_back(node: Netns, desired: Ruleset) -> None:
    _, reconciler = await synced(node, desired)
    _, rules = handles(node)
    last = rules[MASQUERADE_PODS][-1]
    # Same number of rules: only the learned fingerprints can tell.
    nft(node, "replace", "rule", TABLE_FAMILY, TABLE_NAME, MASQUERADE_PODS, "handle", str(last), "accept")
    result = await reconciler.repair(desired)
    assert (result.kind, result.changed) == ("chains", (MASQUERADE_PODS,))
    assert "masquerade" in nft(node, "list", "chain", TABLE_FAMILY, TABLE_NAME, MASQUERADE_PODS)


async def test_changing_one_chain_keeps_the_table_and_the_other_chains(node: Netns, desired: Ruleset) -> None:
    runner, reconciler = await synced(node, desired)
    table, before = handles(node)
    changed = replace(
        desired,
        chains=tuple(
            replace(c, rules=(Rule("meta l4proto udp counter"), *c.rules)) if c.name == MASQUERADE_PODS else c
            for c in desired.chains
        ),
    )
    result = await reconciler.sync(changed)
    assert (result.kind, result.changed) == ("chains", (MASQUERADE_PODS,))
    after_table, after = handles(node)
    assert after_table == table
    assert len(after[MASQUERADE_PODS]) == len(before[MASQUERADE_PODS]) + 1
    assert not set(after[MASQUERADE_PODS]) & set(before[MASQUERADE_PODS])  # refilled
    others = {n: h for n, h in after.items() if n != MASQUERADE_PODS}
    assert others == {n: h for n, h in before.items() if n != MASQUERADE_PODS}
    assert_holds(await runner.read_table(TABLE_FAMILY, TABLE_NAME), changed)
    assert (await reconciler.repair(changed)).kind == "unchanged"
