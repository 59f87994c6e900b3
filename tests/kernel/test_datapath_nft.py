"""The nft reconciler against the real kernel, in a fresh node namespace: what it leaves in the
table (read back with ``nft -j``), what it does not touch, and that replacing the table is atomic."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from membrane.core.errors import DatapathError
from membrane.datapath.netlink import EndpointSpec, PyrouteNetlink
from membrane.datapath.nft import NftCommand, Rule, Ruleset
from membrane.datapath.reconcilers import Backoff, NftReconciler
from membrane.datapath.ruleset import (
    ENDPOINT_SOURCES,
    FROM_ENDPOINT,
    TABLE_FAMILY,
    TABLE_NAME,
    DesiredDatapath,
    EndpointAddress,
    build_ruleset,
)
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(missing_binaries("nft", "busybox")), reason="needs nft and busybox"),
]


async def _no_sleep(_: float) -> None:
    return None


def _ruleset(*endpoints: tuple[int, str]) -> Ruleset:
    return build_ruleset(DesiredDatapath.from_endpoints(EndpointAddress(i, IPv4Address(a)) for i, a in endpoints))


@pytest.fixture
def node(netns_factory: NetnsFactory) -> Netns:
    ns = netns_factory("mbdp-node-", lo_up=True)
    # Real interfaces, so nft prints some keys as names and the reader must map them back.
    for name in ("lxc00000000001", "lxc00000000002"):
        ns.run("ip", "link", "add", name, "type", "veth", "peer", "name", name.replace("lxc", "pee"))
    return ns


def _ifindex(ns: Netns, name: str) -> int:
    return ns.call(lambda: socket.if_nametoindex(name))


async def test_full_then_partial_sync_leaves_exactly_the_expected_elements(node: Netns) -> None:
    runner = NftCommand(node.path)
    reconciler = NftReconciler(runner)
    a, b = _ifindex(node, "lxc00000000001"), _ifindex(node, "lxc00000000002")
    assert await runner.read_table(TABLE_FAMILY, TABLE_NAME) is None

    first = _ruleset((a, "10.244.1.10"), (b, "10.244.1.11"), (9001, "10.244.1.12"))
    assert (await reconciler.sync(first)).kind == "full"
    assert await runner.read_table(TABLE_FAMILY, TABLE_NAME) == first.contents()

    second = _ruleset((a, "10.244.1.10"), (9001, "10.244.1.12"), (9002, "10.244.1.13"))
    result = await reconciler.sync(second)
    assert (result.kind, result.added, result.deleted) == ("partial", 1, 1)
    contents = await runner.read_table(TABLE_FAMILY, TABLE_NAME)
    assert contents is not None
    assert contents.sets[ENDPOINT_SOURCES] == {
        (str(a), "10.244.1.10"),
        ("9001", "10.244.1.12"),
        ("9002", "10.244.1.13"),
    }
    assert contents == second.contents()
    assert not await reconciler.drifted()

    assert (await reconciler.sync(second)).kind == "unchanged"


async def test_a_new_reconciler_replaces_whatever_the_table_held(node: Netns) -> None:
    node.run(
        "nft",
        "-f",
        "-",
        input=(
            "table inet membrane {\n"
            "  set stale { type ipv4_addr; elements = { 10.9.9.9 } }\n"
            "  chain leftover { type filter hook input priority 0; policy drop; }\n"
            "}\n"
        ),
    )
    runner = NftCommand(node.path)
    desired = _ruleset((7, "10.244.1.10"))
    assert (await NftReconciler(runner).sync(desired)).kind == "full"
    assert await runner.read_table(TABLE_FAMILY, TABLE_NAME) == desired.contents()


async def test_tables_it_does_not_own_are_left_alone(node: Netns) -> None:
    node.run("nft", "add", "table", "inet", "mbdpother")
    node.run("nft", "add", "chain", "inet", "mbdpother", "keep")
    node.run("nft", "add", "table", "ip", "membrane")  # same name, other family: not ours either
    reconciler = NftReconciler(NftCommand(node.path))
    await reconciler.sync(_ruleset((7, "10.244.1.10")))
    reconciler.invalidate()
    await reconciler.sync(_ruleset((8, "10.244.1.11")))
    tables = node.run("nft", "list", "tables").stdout.split("\n")
    assert {"table inet mbdpother", "table ip membrane", "table inet membrane"} <= set(tables)
    assert "chain keep" in node.run("nft", "list", "table", "inet", "mbdpother").stdout


async def test_a_refused_transaction_changes_nothing(node: Netns) -> None:
    runner = NftCommand(node.path)
    reconciler = NftReconciler(runner, backoff=Backoff(attempts=2), sleep=_no_sleep)
    good = _ruleset((7, "10.244.1.10"))
    await reconciler.sync(good)

    # A chain jumping to itself parses fine; the kernel refuses the loop (EMLINK) in the batch,
    # after the batch's "delete table" was already queued.
    loop = Rule(f"meta mark 0x1 jump {FROM_ENDPOINT}")
    chains = tuple(
        replace(c, rules=(*c.rules, loop)) if c.name == FROM_ENDPOINT else c
        for c in _ruleset((8, "10.244.1.11")).chains
    )
    broken = replace(_ruleset((8, "10.244.1.11")), chains=chains)
    with pytest.raises(DatapathError, match="Could not process rule: Too many links"):
        await reconciler.sync(broken)
    assert await runner.read_table(TABLE_FAMILY, TABLE_NAME) == good.contents()


async def test_an_edited_table_is_repaired_by_the_next_sync(node: Netns) -> None:
    runner = NftCommand(node.path)
    reconciler = NftReconciler(runner)
    await reconciler.sync(_ruleset((7, "10.244.1.10"), (8, "10.244.1.11")))
    node.run("nft", "delete", "element", "inet", "membrane", ENDPOINT_SOURCES, "{ 8 . 10.244.1.11 }")
    assert await reconciler.drifted()

    # Deleting the element someone else already removed fails; the reconciler replaces the table.
    desired = _ruleset((7, "10.244.1.10"), (9, "10.244.1.12"))
    result = await reconciler.sync(desired)
    assert (result.kind, result.attempts) == ("full", 2)
    assert await runner.read_table(TABLE_FAMILY, TABLE_NAME) == desired.contents()


async def test_replacing_the_table_never_interrupts_traffic(netns_factory: NetnsFactory) -> None:
    """Pods exchange UDP request/response while the table is replaced again and again. A replace
    that exposed an empty endpoint set for a moment would drop an exchange (anti-spoofing fails
    closed)."""
    node = netns_factory("mbdp-node-", lo_up=True)
    pod1, pod2 = netns_factory("mbdp-pod-"), netns_factory("mbdp-pod-")
    router = IPv4Address("10.244.1.1")
    netlink = PyrouteNetlink(node.path)
    await netlink.ensure_host_device(router, 1500)
    ep1 = await netlink.attach_endpoint(EndpointSpec("c1", pod1.path, "eth0", IPv4Address("10.244.1.10"), router))
    ep2 = await netlink.attach_endpoint(EndpointSpec("c2", pod2.path, "eth0", IPv4Address("10.244.1.11"), router))
    desired = build_ruleset(DesiredDatapath.from_endpoints([EndpointAddress.of(ep1), EndpointAddress.of(ep2)]))
    reconciler = NftReconciler(NftCommand(node.path))
    await reconciler.sync(desired)

    server = pod2.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = pod1.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("10.244.1.11", 7000))
    server.settimeout(0.2)
    client.settimeout(1.0)
    stop_client, stop_server = threading.Event(), threading.Event()
    outcome = {"ok": 0, "lost": 0}

    def echo() -> None:
        while not stop_server.is_set():
            try:
                data, peer = server.recvfrom(64)
            except TimeoutError:
                continue
            server.sendto(data, peer)

    def exchange() -> None:
        seq = 0
        while not stop_client.is_set():
            seq += 1
            client.sendto(str(seq).encode(), ("10.244.1.11", 7000))
            try:
                while client.recv(64) != str(seq).encode():
                    pass
                outcome["ok"] += 1
            except TimeoutError:
                outcome["lost"] += 1

    echo_thread, exchange_thread = threading.Thread(target=echo), threading.Thread(target=exchange)
    echo_thread.start()
    exchange_thread.start()
    try:
        for _ in range(25):
            reconciler.invalidate()
            assert (await reconciler.sync(desired)).kind == "full"
            await asyncio.sleep(0)
    finally:
        # The client stops first, so its last request still finds the server answering.
        stop_client.set()
        exchange_thread.join()
        stop_server.set()
        echo_thread.join()
        server.close()
        client.close()
    assert outcome["lost"] == 0
    assert outcome["ok"] > 25
