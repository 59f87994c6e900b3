"""The ipcache flattened into non-overlapping intervals (most specific prefix wins)."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Address, IPv4Network

from membrane.datapath.policy import ipcache_elements
from membrane.identity.ipcache import IpcacheEntry
from membrane.identity.reserved import HOST, REMOTE_NODE, WORLD
from membrane.policy.ipcache import IpcacheInterval, flatten_ipcache, lookup_identity, with_cidr_identities

N = IPv4Network
A = IPv4Address


def test_most_specific_prefix_wins_and_neighbours_merge() -> None:
    intervals = flatten_ipcache(
        [
            (N("0.0.0.0/0"), WORLD.id),
            (N("10.0.0.0/8"), 16777217),
            (N("10.244.1.10/32"), 300),
            (N("10.244.1.11/32"), 300),  # same identity, adjacent: one element
            (N("10.244.1.12/32"), 301),
            (N("10.0.0.0/30"), 16777218),  # starts where its parent starts
        ]
    )
    assert [(str(i.first), str(i.last), i.identity) for i in intervals] == [
        ("0.0.0.0", "9.255.255.255", WORLD.id),
        ("10.0.0.0", "10.0.0.3", 16777218),
        ("10.0.0.4", "10.244.1.9", 16777217),
        ("10.244.1.10", "10.244.1.11", 300),
        ("10.244.1.12", "10.244.1.12", 301),
        ("10.244.1.13", "10.255.255.255", 16777217),
        ("11.0.0.0", "255.255.255.255", WORLD.id),
    ]


def test_elements_use_prefixes_when_aligned_and_ranges_otherwise() -> None:
    elements = ipcache_elements(
        [
            IpcacheInterval(A("10.0.0.0"), A("10.0.0.255"), 5),
            IpcacheInterval(A("10.0.1.0"), A("10.0.1.0"), 6),
            IpcacheInterval(A("10.0.1.1"), A("10.0.1.6"), 2),
        ]
    )
    assert elements == ((("10.0.0.0/24",), "5"), (("10.0.1.0",), "6"), (("10.0.1.1-10.0.1.6",), "2"))


def test_pods_and_nodes_keep_their_identity_when_a_policy_names_their_prefix() -> None:
    base = [
        IpcacheEntry(N("0.0.0.0/0"), WORLD.id, "reserved"),
        IpcacheEntry(N("10.244.1.10/32"), 300, "custom-resource", "192.168.1.1"),
        IpcacheEntry(N("192.168.1.2/32"), REMOTE_NODE.id, "node", "192.168.1.2"),
    ]
    merged = with_cidr_identities(base, {N("10.244.1.10/32"): 16777217, N("10.244.0.0/16"): 16777218})
    assert [(str(e.prefix), e.identity, e.source) for e in merged] == [
        ("0.0.0.0/0", WORLD.id, "reserved"),
        ("10.244.0.0/16", 16777218, "generated"),
        ("10.244.1.10/32", 300, "custom-resource"),
        ("192.168.1.2/32", REMOTE_NODE.id, "node"),
    ]
    intervals = flatten_ipcache(merged)
    assert lookup_identity(intervals, A("10.244.1.10")) == 300  # the pod, not the CIDR
    assert lookup_identity(intervals, A("10.244.1.11")) == 16777218
    assert lookup_identity(intervals, A("8.8.8.8")) == WORLD.id
    assert lookup_identity(flatten_ipcache([(N("10.0.0.0/8"), HOST.id)]), A("11.0.0.1")) is None


def test_random_tables_match_longest_prefix_lookup() -> None:
    rng = random.Random(3)
    for _ in range(40):
        table: dict[IPv4Network, int] = {N("0.0.0.0/0"): WORLD.id}
        for _ in range(rng.randint(1, 25)):
            length = rng.choice([8, 12, 16, 20, 24, 28, 30, 31, 32])
            address = rng.choice([0x0A000000, 0x0AF40100, 0xC0A80000]) + rng.randrange(1 << 12)
            table[N((address, length), strict=False)] = rng.choice([300, 301, 16777217, 16777218, 16777219])
        intervals = flatten_ipcache(table.items())
        for previous, current in itertools.pairwise(intervals):
            assert previous.last < current.first  # disjoint and sorted
            assert not (int(previous.last) + 1 == int(current.first) and previous.identity == current.identity)
        probes = [int(p.network_address) + d for p in table for d in (-1, 0, 1, p.num_addresses - 1, p.num_addresses)]
        for value in probes:
            if not 0 <= value < 1 << 32:
                continue
            address = A(value)
            best = max((p for p in table if address in p), key=lambda p: p.prefixlen)
            assert lookup_identity(intervals, address) == table[best], address
