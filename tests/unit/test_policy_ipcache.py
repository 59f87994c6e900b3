"""The ipcache flattened into non-overlapping intervals (most specific prefix wins)."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Address, IPv4Network

from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.datapath.policy import ipcache_elements
from membrane.identity.ipcache import IpcacheEntry
from membrane.identity.reserved import HOST, REMOTE_NODE, WORLD
from membrane.policy.compiler import IpcacheBuilder, ipcache_entries
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


def test_the_incremental_ipcache_equals_a_full_flattening_after_every_change() -> None:
    # Endpoints, nodes and policy prefixes change at random; after every step the builder (told only
    # the keys that changed) holds exactly what flattening the whole table gives.
    rng = random.Random(7)

    def record(key: int) -> EndpointRecord:
        state = rng.choice(("ready", "ready", "creating", "disconnecting"))
        return EndpointRecord(f"c{key}", key, f"n{key % 3}", "x", f"p{key}", "eth0", "/ns", A("10.1.0.0") + key,
                              rng.choice((300, 301, 302)), (), "cni", state)

    def node(name: str, ip: str, cidr: str) -> CiliumNode:
        spec = {"addresses": [{"type": "InternalIP", "ip": ip}], "ipam": {"podCIDRs": [cidr]}}
        return CiliumNode.model_validate({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                                          "metadata": {"name": name}, "spec": spec})

    records: dict[str, EndpointRecord] = {}
    nodes = {"n0": node("n0", "10.1.0.40", "10.1.0.32/28")}
    prefixes: dict[IPv4Network, int] = {}
    builder = IpcacheBuilder("n0")
    got = builder.intervals(records, nodes, prefixes)
    for step in range(300):
        changed_records: set[str] = set()
        changed_nodes: set[str] = set()
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.6:
                new = record(rng.randrange(48))  # addresses 10.1.0.0-47: some are node addresses
                if rng.random() < 0.3:
                    records.pop(new.key, None)
                else:
                    records[new.key] = new
                changed_records.add(new.key)
            elif roll < 0.9:
                index = rng.randrange(1, 4)
                name = f"n{index}"
                if rng.random() < 0.3:
                    nodes.pop(name, None)
                else:
                    nodes[name] = node(name, f"10.1.0.{40 + index * 4 + rng.randrange(2)}",
                                       f"10.1.0.{rng.choice((0, 16, 48))}/28")
                changed_nodes.add(name)
            else:
                choices = ("10.1.0.0/27", "10.1.0.8/29", "10.1.0.32/27", "10.1.0.5/32", "10.1.0.50/32")
                prefixes = {N(p): 16777217 + i for i, p in enumerate(rng.sample(choices, rng.randint(0, 3)))}
        got = builder.intervals(records, nodes, prefixes, changed_records=changed_records, changed_nodes=changed_nodes)
        assert got == flatten_ipcache(ipcache_entries(records.values(), nodes.values(), "n0", prefixes)), step
    assert builder.intervals(records, nodes, prefixes, changed_records=set(), changed_nodes=set()) is got
