"""``membrane tunnel list``: pod CIDR → node IP, as a node programs it or for the whole cluster."""

from __future__ import annotations

import pytest

from membrane.cli.inspect import ClusterView, NodeView, format_tunnel_list
from membrane.core.errors import InvalidInput

VIEW = ClusterView(
    nodes=[NodeView("node1", "172.31.0.11", ["10.244.0.0/24"], "vxlan", True, 1000.0, 1450),
           NodeView("node2", "172.31.0.12", ["10.244.10.0/24"], "vxlan", False, 900.0, 1450),
           NodeView("node3", "172.31.0.13", ["10.244.2.0/24"], "vxlan", True, 1000.0, 1450),
           NodeView("node4", "172.31.0.14", [], "vxlan", True, 1000.0, 1450)],  # no CIDR yet: no tunnel
    endpoints=[], identities={}, revision=7,
)


def test_a_nodes_tunnels_are_every_other_nodes_pod_cidr() -> None:
    assert format_tunnel_list(VIEW, "node1") == (
        "TUNNEL           VALUE\n"
        "10.244.2.0/24    172.31.0.13\n"
        "10.244.10.0/24   172.31.0.12"
    )


def test_without_a_node_every_node_is_listed() -> None:
    rows = [line.split() for line in format_tunnel_list(VIEW, None).splitlines()]
    assert rows == [["TUNNEL", "VALUE"], ["10.244.0.0/24", "172.31.0.11"], ["10.244.2.0/24", "172.31.0.13"],
                    ["10.244.10.0/24", "172.31.0.12"]]


def test_an_unknown_node_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="node node9 is not in the cluster"):
        format_tunnel_list(VIEW, "node9")
