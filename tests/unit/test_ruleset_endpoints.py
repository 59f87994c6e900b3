"""Endpoints as the datapath wires them, against the in-memory netlink: naming, idempotent attach,
cleanup on failure, and pruning after a crash (only what the agent owns)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from membrane.core.errors import DatapathError, InvalidInput
from membrane.datapath.netlink import (
    HOST_DEVICE,
    EndpointSpec,
    FakeNetlink,
    endpoint_ifname,
    is_endpoint_ifname,
)
from membrane.datapath.ruleset import EndpointAddress

ROUTER = IPv4Address("10.244.1.1")


def spec(container_id: str, ip: str, netns: str | None = None) -> EndpointSpec:
    return EndpointSpec(container_id, netns or f"/run/netns/{container_id}", "eth0", IPv4Address(ip), ROUTER, 1450)


def test_host_veth_names_are_stable_short_and_recognisable() -> None:
    name = endpoint_ifname("4f1c2d9a0b7e")
    assert name == endpoint_ifname("4f1c2d9a0b7e") and len(name) == 14 and name.startswith("lxc")
    assert name != endpoint_ifname("4f1c2d9a0b7f")
    assert is_endpoint_ifname(name)
    assert not is_endpoint_ifname("lxcforeign") and not is_endpoint_ifname(HOST_DEVICE)


def test_specs_are_validated() -> None:
    with pytest.raises(InvalidInput) as err:
        EndpointSpec("", "relative/path", "a-very-long-ifname", ROUTER, ROUTER, 10)
    assert len(err.value.problems) == 5


async def test_attach_wires_both_sides_and_a_retry_returns_the_same_result() -> None:
    netlink = FakeNetlink()
    await netlink.ensure_host_device(ROUTER, 1450)
    netlink.add_netns("/run/netns/c1")
    first = await netlink.attach_endpoint(spec("c1", "10.244.1.10"))
    assert await netlink.attach_endpoint(spec("c1", "10.244.1.10")) == first
    assert first.host_ifname == endpoint_ifname("c1")
    pod = netlink.namespaces["/run/netns/c1"]
    assert pod.links["eth0"].addresses == {(IPv4Address("10.244.1.10"), 32)}
    assert pod.neighbours[(ROUTER, "eth0")] == first.host_mac
    assert netlink.node.links[HOST_DEVICE].addresses == {(ROUTER, 32)}
    assert netlink.node.sysctl["net/ipv4/ip_forward"] == "1"
    await netlink.check_endpoint(spec("c1", "10.244.1.10"))
    assert EndpointAddress.of(first) == EndpointAddress(first.host_ifindex, IPv4Address("10.244.1.10"))


async def test_failures_leave_nothing_behind() -> None:
    netlink = FakeNetlink()
    with pytest.raises(DatapathError, match="No such file"):
        await netlink.attach_endpoint(spec("gone", "10.244.1.10"))
    netlink.add_netns("/run/netns/c2")
    netlink.fail["attach_configure"] = DatapathError("kernel said no")
    with pytest.raises(DatapathError, match="kernel said no"):
        await netlink.attach_endpoint(spec("c2", "10.244.1.11"))
    assert (await netlink.list_owned()).links == ()
    assert "eth0" not in netlink.namespaces["/run/netns/c2"].links


async def test_check_names_what_is_missing() -> None:
    netlink = FakeNetlink()
    netlink.add_netns("/run/netns/c3")
    await netlink.attach_endpoint(spec("c3", "10.244.1.12"))
    netlink.node.routes.clear()
    with pytest.raises(DatapathError, match=r"route 10.244.1.12/32 dev lxc\w+ proto 177 is missing"):
        await netlink.check_endpoint(spec("c3", "10.244.1.12"))


async def test_detach_is_idempotent_and_refuses_foreign_names() -> None:
    netlink = FakeNetlink()
    netlink.add_netns("/run/netns/c4")
    attached = await netlink.attach_endpoint(spec("c4", "10.244.1.13"))
    await netlink.detach_endpoint("c4")
    await netlink.detach_endpoint("c4", attached.host_ifname)
    assert "eth0" not in netlink.namespaces["/run/netns/c4"].links
    with pytest.raises(DatapathError, match="refusing"):
        await netlink.detach_endpoint("c4", "eth0")


async def test_prune_after_a_crash_keeps_known_endpoints_and_everything_foreign() -> None:
    netlink = FakeNetlink()
    await netlink.ensure_host_device(ROUTER, 1450)
    for cid, ip in (("known", "10.244.1.20"), ("orphan1", "10.244.1.21"), ("orphan2", "10.244.1.22")):
        netlink.add_netns(f"/run/netns/{cid}")
        await netlink.attach_endpoint(spec(cid, ip))
    netlink.add_link("lxcforeign")
    netlink.add_link("veth0")

    removed = await netlink.prune({endpoint_ifname("known")})

    assert sorted(removed) == sorted([endpoint_ifname("orphan1"), endpoint_ifname("orphan2")])
    owned = await netlink.list_owned()
    assert owned.ifnames == {endpoint_ifname("known")}
    assert [r.dst for r in owned.routes] == [IPv4Network("10.244.1.20/32")]
    assert {"lxcforeign", "veth0", HOST_DEVICE} <= netlink.node.links.keys()
    assert "eth0" not in netlink.namespaces["/run/netns/orphan1"].links
    assert await netlink.prune({endpoint_ifname("known")}) == ()


async def test_a_vanished_container_takes_its_host_veth_along() -> None:
    netlink = FakeNetlink()
    netlink.add_netns("/run/netns/c5")
    attached = await netlink.attach_endpoint(spec("c5", "10.244.1.30"))
    netlink.delete_netns("/run/netns/c5")
    assert attached.host_ifname not in netlink.node.links
