"""The masquerade section of the ruleset: golden text, what is exempt, and that it stays constant-size.

Regenerate the golden file after an intended change with
``MEMBRANE_UPDATE_GOLDEN=1 pytest tests/unit/test_routing_masquerade.py`` and review the diff.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from membrane.agent.routing import masquerade_for
from membrane.core.config import ClusterConfig
from membrane.datapath.nft import full_sync, plan_sync, render_transaction
from membrane.datapath.ruleset import (
    MASQUERADE_PODS,
    NAT_POSTROUTING,
    NO_MASQUERADE,
    DesiredDatapath,
    EndpointAddress,
    Masquerade,
    build_ruleset,
)

GOLDEN = Path(__file__).parent / "golden" / "nft"
POD_CIDR = IPv4Network("10.244.1.0/24")


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MEMBRANE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def desired(cluster: ClusterConfig) -> DesiredDatapath:
    return DesiredDatapath.from_endpoints([EndpointAddress(5, IPv4Address("10.244.1.10"))],
                                          masquerade_for(cluster, POD_CIDR))


def test_full_table_with_masquerade() -> None:
    cluster = ClusterConfig(clusterPoolIPv4PodCIDRList=("10.244.0.0/16",),
                            nonMasqueradeCIDRs=("192.168.0.0/16", "10.96.0.0/12", "172.31.5.0/24"))
    assert_golden("masquerade.nft", render_transaction(full_sync(build_ruleset(desired(cluster)))))


def test_exempt_destinations_are_merged_into_non_overlapping_prefixes() -> None:
    cluster = ClusterConfig(clusterPoolIPv4PodCIDRList=("10.244.0.0/16", "10.245.0.0/16"),
                            nonMasqueradeCIDRs=("10.0.0.0/8", "192.168.1.0/24", "192.168.0.0/24"))
    settings = masquerade_for(cluster, POD_CIDR)
    assert settings is not None
    # nf_tables refuses overlapping intervals in one set: 10.0.0.0/8 covers both pools.
    assert settings.exempt == (IPv4Network("10.0.0.0/8"), IPv4Network("192.168.0.0/23"))
    ruleset = build_ruleset(DesiredDatapath(masquerade=settings))
    assert ruleset.get_set(NO_MASQUERADE).elements == {("10.0.0.0/8",), ("192.168.0.0/23",)}
    assert ruleset.get_set(NO_MASQUERADE).flags == ("interval",)


def test_only_this_nodes_pods_are_masqueraded_and_never_into_the_tunnel() -> None:
    ruleset = build_ruleset(desired(ClusterConfig()))
    chains = {c.name: c for c in ruleset.chains}
    base = chains[NAT_POSTROUTING].base
    assert base is not None and (base.type, base.hook, base.priority) == ("nat", "postrouting", 100)
    assert [r.text for r in chains[NAT_POSTROUTING].rules] == [f"ip saddr 10.244.1.0/24 jump {MASQUERADE_PODS}"]
    assert [r.text for r in chains[MASQUERADE_PODS].rules] == [
        f"ip daddr @{NO_MASQUERADE} return",
        'oifname "membrane_vxlan" return',
        "counter masquerade",
    ]
    assert ruleset.get_set(NO_MASQUERADE).elements == {("10.244.0.0/16",)}


def test_masquerade_off_leaves_no_nat_chain() -> None:
    assert masquerade_for(ClusterConfig(enableIPv4Masquerade=False), POD_CIDR) is None
    ruleset = build_ruleset(desired(ClusterConfig(enableIPv4Masquerade=False)))
    names = {c.name for c in ruleset.chains}
    assert NAT_POSTROUTING not in names and MASQUERADE_PODS not in names
    assert NO_MASQUERADE not in {s.name for s in ruleset.sets}


def test_more_exempt_cidrs_change_set_elements_only() -> None:
    few = build_ruleset(DesiredDatapath(masquerade=Masquerade.of(POD_CIDR, [IPv4Network("10.244.0.0/16")])))
    many_cidrs = [IPv4Network(f"100.{i}.0.0/16") for i in range(0, 200, 2)]
    many = build_ruleset(DesiredDatapath(masquerade=Masquerade.of(POD_CIDR, [IPv4Network("10.244.0.0/16")],
                                                                  many_cidrs)))
    assert few.structure() == many.structure()  # the same rules, whatever the list's length
    assert len(many.get_set(NO_MASQUERADE).elements) == 101
    tx = plan_sync(few, many)
    assert tx is not None and not tx.full  # a changed list is a partial (element) sync
