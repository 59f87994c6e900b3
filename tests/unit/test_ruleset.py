"""The anti-spoofing ruleset: what it holds for the node's endpoints, and where it hooks."""

from __future__ import annotations

from ipaddress import IPv4Address

from membrane.datapath.nft import PRIORITY_RAW
from membrane.datapath.ruleset import (
    BASE_CHAINS,
    ENDPOINT_SOURCES,
    FROM_ENDPOINT,
    RAW_PREROUTING,
    TABLE_FAMILY,
    TABLE_NAME,
    DesiredDatapath,
    EndpointAddress,
    build_ruleset,
)

CONNTRACK_PRIORITY = -200


def test_each_endpoint_may_send_only_its_own_address_through_its_own_veth() -> None:
    ruleset = build_ruleset(
        DesiredDatapath.from_endpoints(
            [EndpointAddress(5, IPv4Address("10.244.1.10")), EndpointAddress(7, IPv4Address("10.244.1.11"))]
        )
    )
    assert (ruleset.family, ruleset.table) == (TABLE_FAMILY, TABLE_NAME) == ("inet", "membrane")
    assert ruleset.get_set(ENDPOINT_SOURCES).elements == {("5", "10.244.1.10"), ("7", "10.244.1.11")}
    assert ruleset.get_set(ENDPOINT_SOURCES).type == ("iface_index", "ipv4_addr")
    rules = [r.text for r in next(c for c in ruleset.chains if c.name == FROM_ENDPOINT).rules]
    assert rules == [
        f"iif . ip saddr @{ENDPOINT_SOURCES} return",
        "meta nfproto ipv6 counter drop",
        "counter drop",
    ]


def test_anti_spoofing_runs_before_conntrack_for_every_pod_veth() -> None:
    ruleset = build_ruleset(DesiredDatapath())
    base = {c.name: c for c in ruleset.chains if c.base is not None}
    # Only chains with work to do are declared; the others wait for their features.
    assert list(base) == [RAW_PREROUTING]
    spec = base[RAW_PREROUTING].base
    assert spec is not None and spec == BASE_CHAINS[RAW_PREROUTING]
    assert (spec.hook, spec.policy) == ("prerouting", "accept")
    assert spec.priority == PRIORITY_RAW < CONNTRACK_PRIORITY
    assert [r.text for r in base[RAW_PREROUTING].rules] == [f'iifname "lxc*" jump {FROM_ENDPOINT}']


def test_the_ruleset_is_a_pure_function_of_the_desired_state() -> None:
    endpoints = [EndpointAddress(i, IPv4Address(f"10.244.1.{i}")) for i in range(2, 50)]
    assert build_ruleset(DesiredDatapath.from_endpoints(endpoints)) == build_ruleset(
        DesiredDatapath.from_endpoints(reversed(endpoints))
    )
    # Adding pods changes elements only, never the chains: syncs stay element-sized.
    small = build_ruleset(DesiredDatapath.from_endpoints(endpoints[:1]))
    big = build_ruleset(DesiredDatapath.from_endpoints(endpoints))
    assert small.structure() == big.structure()
