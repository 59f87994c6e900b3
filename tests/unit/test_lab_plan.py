"""The lab's address plan: names, addresses, subnets per lab, and the ip batches that build it."""

from __future__ import annotations

import ipaddress

import pytest

from membrane.core.errors import InvalidInput
from membrane.lab.plan import LabPlan, choose_subnet_index, validate_lab_name


def render(plan: LabPlan) -> str:
    out = []
    for step in plan.build_steps():
        out.append(f"# {step.label}")
        for batch in step.batches:
            out += [f"ip{f' -n {batch.netns}' if batch.netns else ''} {line}" for line in batch.lines]
    return "\n".join(out)


GOLDEN_TWO_NODES_AND_CLIENT = """\
# underlay
ip netns add demo-underlay
ip -n demo-underlay link set lo up
ip -n demo-underlay link add br0 type bridge
ip -n demo-underlay addr add 172.31.3.1/24 dev br0
ip -n demo-underlay link set br0 up
# node1
ip netns add demo-node1
ip link add eth0 netns demo-node1 type veth peer name node1 netns demo-underlay
ip -n demo-underlay link set node1 master br0
ip -n demo-underlay link set node1 up
ip -n demo-node1 link set lo up
ip -n demo-node1 addr add 172.31.3.11/24 dev eth0
ip -n demo-node1 link set eth0 up
ip -n demo-node1 route add default via 172.31.3.1 dev eth0
# node2
ip netns add demo-node2
ip link add eth0 netns demo-node2 type veth peer name node2 netns demo-underlay
ip -n demo-underlay link set node2 master br0
ip -n demo-underlay link set node2 up
ip -n demo-node2 link set lo up
ip -n demo-node2 addr add 172.31.3.12/24 dev eth0
ip -n demo-node2 link set eth0 up
ip -n demo-node2 route add default via 172.31.3.1 dev eth0
# client
ip netns add demo-client
ip link add eth0 netns demo-client type veth peer name client netns demo-underlay
ip -n demo-underlay link set client master br0
ip -n demo-underlay link set client up
ip -n demo-client link set lo up
ip -n demo-client addr add 172.31.3.100/24 dev eth0
ip -n demo-client link set eth0 up
ip -n demo-client route add default via 172.31.3.1 dev eth0"""


def test_build_steps_of_two_nodes_and_a_client() -> None:
    assert render(LabPlan("demo", 2, subnet_index=3, client=True)) == GOLDEN_TWO_NODES_AND_CLIENT


def test_without_client_there_is_no_client_namespace() -> None:
    plan = LabPlan("demo", 1, subnet_index=0)
    assert plan.namespaces() == ("demo-underlay", "demo-node1")
    assert [s.label for s in plan.build_steps()] == ["underlay", "node1"]


def test_addresses_of_eight_nodes() -> None:
    plan = LabPlan("big", 8, subnet_index=0, client=True)
    assert [str(plan.node_ip(k)) for k in plan.node_numbers] == [f"172.31.0.1{k}" for k in range(1, 9)]
    assert str(plan.client_ip) == "172.31.0.100"
    assert str(plan.gateway) == "172.31.0.1"
    addresses = {plan.node_ip(k) for k in plan.node_numbers} | {plan.client_ip, plan.gateway}
    assert len(addresses) == 10
    assert all(a in plan.subnet for a in addresses)


def test_no_subnet_overlaps_the_documentation_range() -> None:
    forbidden = ipaddress.IPv4Network("192.0.2.0/24")
    assert not any(LabPlan("a", 1, subnet_index=i).subnet.overlaps(forbidden) for i in range(256))


def test_a_new_lab_gets_the_lowest_subnet_no_other_lab_uses() -> None:
    assert choose_subnet_index([]) == 0
    assert choose_subnet_index([0, 1, 3]) == 2
    first = LabPlan("a", 2, subnet_index=choose_subnet_index([]))
    second = LabPlan("b", 2, subnet_index=choose_subnet_index([first.subnet_index]))
    assert not first.subnet.overlaps(second.subnet)


def test_running_out_of_subnets_is_refused() -> None:
    with pytest.raises(InvalidInput, match="all 256 lab underlay subnets are in use"):
        choose_subnet_index(range(256))


@pytest.mark.parametrize("name", ["membrane", "t1", "lab2", "a"])
def test_valid_lab_names(name: str) -> None:
    assert validate_lab_name(name) == name


@pytest.mark.parametrize("name", ["", "my-lab", "Lab", "1lab", "a/b", "x" * 25, "lab_1"])
def test_invalid_lab_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid lab name"):
        validate_lab_name(name)


@pytest.mark.parametrize("nodes", [0, 9])
def test_node_count_out_of_range_is_refused(nodes: int) -> None:
    with pytest.raises(InvalidInput, match="--nodes must be between 1 and 8"):
        LabPlan("a", nodes, subnet_index=0)
