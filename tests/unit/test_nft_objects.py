"""nft objects refuse what nft would refuse, before anything reaches the kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from membrane.datapath.nft import Chain, Map, Rule, Ruleset, Set, key, token


def test_tokens_are_canonical_nft_text() -> None:
    assert key(5, IPv4Address("10.0.0.1")) == ("5", "10.0.0.1")
    assert token(IPv4Network("10.0.0.0/8")) == "10.0.0.0/8"
    assert token(IPv4Network("10.0.0.7/32")) == "10.0.0.7"  # nft prints a /32 as the address
    assert token((8080, 8090)) == "8080-8090"
    assert token((53, 53)) == "53"
    assert token((IPv4Address("10.0.0.1"), IPv4Address("10.0.0.6"))) == "10.0.0.1-10.0.0.6"
    with pytest.raises(TypeError):
        token(True)


@pytest.mark.parametrize("name", ["policy", "fwd", "1abc", "a-b", "", "x" * 64])
def test_names_nft_rejects_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not usable"):
        Set(name=name, type=("ipv4_addr",))


def test_elements_must_match_the_key_type() -> None:
    with pytest.raises(ValueError, match="does not match"):
        Set(name="s", type=("iface_index", "ipv4_addr"), elements=frozenset({key(5)}))
    with pytest.raises(ValueError, match="duplicate key"):
        Map(name="m", type=("ipv4_addr",), value_type="mark", elements=((key("10.0.0.1"), "1"), (key("10.0.0.1"), "2")))
    with pytest.raises(ValueError, match="unsupported"):
        Set(name="s", type=("ether_addr",))


def test_rules_may_only_refer_to_declared_sets_and_chains() -> None:
    with pytest.raises(ValueError, match="undeclared set/map @missing"):
        Ruleset("inet", "t", chains=(Chain("c", rules=(Rule("ip saddr @missing drop"),)),))
    with pytest.raises(ValueError, match="undeclared chain nowhere"):
        Ruleset("inet", "t", chains=(Chain("c", rules=(Rule("jump nowhere"),)),))
    with pytest.raises(ValueError, match="duplicate set/map"):
        Ruleset("inet", "t", sets=(Set("x", ("mark",)),), maps=(Map("x", ("mark",), "verdict"),))


def test_map_elements_are_ordered_so_equal_maps_compare_equal() -> None:
    one = Map("m", ("inet_service",), "verdict", elements=((key(80), "accept"), (key(443), "drop")))
    two = Map("m", ("inet_service",), "verdict", elements=((key(443), "drop"), (key(80), "accept")))
    assert one == two
    assert one.mapping() == {("80",): "accept", ("443",): "drop"}


def test_structure_drops_elements_only() -> None:
    ruleset = Ruleset(
        "inet",
        "t",
        chains=(Chain("c", rules=(Rule("ip saddr @s drop"),)),),
        sets=(Set("s", ("ipv4_addr",), elements=frozenset({key("10.0.0.1")})),),
    )
    assert ruleset.structure().get_set("s").elements == frozenset()
    assert ruleset.structure().chains == ruleset.chains
    assert ruleset.contents().sets == {"s": frozenset({("10.0.0.1",)})}
