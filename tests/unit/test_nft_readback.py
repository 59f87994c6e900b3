"""Reading the table back: ``nft -j`` output (captured from nft 1.0.6) → canonical elements that
compare equal to the desired ruleset's."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from membrane.datapath.nft import Map, Ruleset, Set, TableContents, key, parse_table_json

CAPTURED = json.loads((Path(__file__).parent / "golden" / "nft" / "readback.json").read_text())
# In the captured namespace these interfaces had these indexes; nft printed their names.
IFINDEX = {"lxc00000000001": 3, "lxc00000000002": 5}


def resolve(names: list[str]) -> dict[str, int]:
    calls.append(names)
    return {n: IFINDEX[n] for n in names if n in IFINDEX}


calls: list[list[str]] = []


def test_elements_read_back_equal_the_desired_ones() -> None:
    calls.clear()
    contents = parse_table_json(CAPTURED, "inet", "membrane", resolve)
    expected = Ruleset(
        "inet",
        "membrane",
        sets=(
            Set(
                "endpoint_sources",
                ("iface_index", "ipv4_addr"),
                elements=frozenset(
                    {key(3, IPv4Address("10.244.1.10")), key(5, IPv4Address("10.244.1.11")), key(9001, "10.244.1.12")}
                ),
            ),
        ),
        maps=(
            Map(
                "ipcache",
                ("ipv4_addr",),
                "mark",
                ("interval",),
                (
                    (key(IPv4Address("10.244.1.10")), "300"),
                    (key(IPv4Network("10.244.2.0/24")), "301"),
                    (key((IPv4Address("10.0.0.1"), IPv4Address("10.0.0.6"))), "2"),
                ),
            ),
            Map(
                "pol_in",
                ("iface_index", "mark", "inet_proto", "inet_service"),
                "verdict",
                ("interval",),
                (
                    (key(3, (0, 4294967295), "tcp", (8080, 8090)), "accept"),
                    (key(5, 300, "udp", 53), "jump l7_dns"),
                    (key(9001, (256, 511), "sctp", (0, 65535)), "drop"),
                ),
            ),
        ),
    ).contents()
    assert contents.sets == expected.sets
    assert contents.maps == expected.maps
    assert contents.chains == {"l7_dns", "raw_prerouting"}
    assert calls == [["lxc00000000001", "lxc00000000002"]]  # one batched lookup


def test_other_tables_are_ignored_and_an_unknown_name_stays_visible() -> None:
    contents = parse_table_json(CAPTURED, "inet", "mbdpother", lambda names: {})
    assert contents == TableContents(chains=frozenset(), sets={"endpoint_sources": frozenset({("10.9.9.9",)})})
    unresolved = parse_table_json(CAPTURED, "inet", "membrane", lambda names: {})
    # An interface that vanished meanwhile keeps its name, so it cannot silently match anything.
    assert ("lxc00000000001", "10.244.1.10") in unresolved.sets["endpoint_sources"]
