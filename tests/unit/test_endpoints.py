"""The endpoint manager on fakes: CNI semantics, address safety, and recovery after a crash.

Each test runs the endpoint, policy and datapath modules as the agent wires them
(:class:`~membrane.testing.agentkit.FakeNode`): the wiring and nft reconcilers are real, the kernel
is the fakes'.
"""

import ipaddress
import json

import pytest

from membrane.agent.contract import CniFailure
from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.core.errors import DatapathError
from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.nft.fake import FakeNftRunner
from membrane.store import keys
from membrane.store.memory import MemoryStore
from membrane.testing.agentkit import FakeNode, pod, policy_object


async def test_add_returns_cni_result_and_programs_anti_spoofing():
    async with FakeNode() as h:
        result = await h.add("c1", "web")
        assert result["cniVersion"] == "1.0.0"
        assert result["ips"] == [{"address": "10.244.0.2/32", "gateway": "10.244.0.1", "interface": 1}]
        assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}]
        assert result["interfaces"][1]["sandbox"] == "/run/netns/c1"
        record = h.manager.get("c1")
        assert record is not None and record.state == "ready"
        # Answered only once the kernel holds the pod's anti-spoofing entry.
        assert len(h.set_elements("endpoint_sources")) == 1
        stored = EndpointRecord.from_json((await h.store.get(keys.endpoint_key("node1", "c1"))).value)
        assert stored.state == "ready" and stored.pod == "web" and stored.identity >= 256
        assert (await h.store.get(keys.pod_ip_key(ipaddress.IPv4Address("10.244.0.2")))).value.decode() == stored.key
        assert [r.container_id for r in h.manager.local.snapshot()] == ["c1"]


async def test_retried_add_is_idempotent():
    async with FakeNode() as h:
        first = await h.add("c1")
        again = await h.manager.cni_add(h.request("c1"))
        assert again["ips"] == first["ips"]
        assert len(h.manager.records()) == 1


async def test_pods_with_equal_labels_share_an_identity():
    async with FakeNode() as h:
        h.pods.upsert(pod("x", "a", {"app": "web"}), pod("x", "b", {"app": "web"}), pod("x", "c", {"app": "db"}))
        await h.add("c1", "a")
        await h.add("c2", "b")
        await h.add("c3", "c")
        ids = {r.pod: r.identity for r in h.manager.records()}
        assert ids["a"] == ids["b"] != ids["c"]


async def test_del_releases_everything_and_is_idempotent():
    async with FakeNode() as h:
        await h.add("c1")
        await h.delete("c1")
        await h.delete("c1")
        assert h.manager.records() == []
        assert (await h.store.list(keys.ENDPOINTS))[0] == []
        assert (await h.store.list(keys.POD_IPS))[0] == []
        assert h.set_elements("endpoint_sources") == set()
        assert (await h.netlink.list_owned()).links == ()
        assert len(h.manager.wiring_table.snapshot()) == 0


async def test_addresses_are_never_handed_out_twice_and_exhaustion_is_a_cni_error():
    async with FakeNode() as h:
        ips = [(await h.add(f"c{i}"))["ips"][0]["address"] for i in range(5)]
        assert len(set(ips)) == 5
        with pytest.raises(CniFailure) as info:
            await h.add("c9")
        assert info.value.code == 100 and "no free address left in 10.244.0.0/29" in info.value.msg


async def test_add_into_missing_namespace_is_refused():
    async with FakeNode() as h:
        with pytest.raises(CniFailure) as info:
            await h.manager.cni_add(h.request("ghost"))
        assert info.value.code == 4


async def test_failed_wiring_leaves_nothing_behind():
    async with FakeNode() as h:
        h.netlink.fail["attach_configure"] = DatapathError("boom")
        with pytest.raises(CniFailure) as info:
            await h.add("c1")
        assert "boom" in info.value.details
        assert h.manager.records() == []
        assert (await h.store.list(keys.POD_IPS))[0] == []
        assert (await h.netlink.list_owned()).links == ()


async def test_restore_after_crash_undoes_interrupted_add_and_prunes_orphans():
    store, netlink = MemoryStore(), FakeNetlink()
    async with FakeNode(store, netlink) as h:
        await h.add("keep")
        await h.add("gone")
    # Crash mid-ADD: a record in state "creating" and its address, nothing ready.
    netlink.add_netns("/run/netns/half")
    half = EndpointRecord("half", 9, "node1", "x", "half", "eth0", "/run/netns/half",
                          ipaddress.IPv4Address("10.244.0.6"), 256, (), "cni")
    await store.put(half.key, half.to_json())
    await store.put(keys.pod_ip_key(half.ipv4), half.key.encode())
    # The container of "gone" died while the agent was down; a stray veth exists too.
    netlink.delete_netns("/run/netns/gone")
    netlink.add_link("lxc0123456789a")
    # An address key whose record vanished (killed between two writes of an older version).
    await store.put(keys.pod_ip_key(ipaddress.IPv4Address("10.244.0.5")), keys.endpoint_key("node1", "lost").encode())

    nft = FakeNftRunner()
    async with FakeNode(store, netlink, nft) as restarted:  # starting the modules restores
        assert [r.container_id for r in restarted.manager.records()] == ["keep"]
        keep = restarted.manager.get("keep")
        owned = {link.ifname for link in (await netlink.list_owned()).links}
        assert owned == {keep.host_ifname}
        held = {kv.key for kv in (await store.list(keys.POD_IPS))[0]}
        assert held == {keys.pod_ip_key(keep.ipv4)}
        # The first nft sync (before the API answers) already holds the kept endpoint.
        assert len(restarted.set_elements("endpoint_sources")) == 1
        # A new ADD after restore never reuses the kept address.
        result = await restarted.add("new")
        assert result["ips"][0]["address"] != f"{keep.ipv4}/32"


async def test_a_hand_deleted_endpoint_veth_is_wired_again_on_the_next_resync():
    async with FakeNode() as h:
        await h.add("c1")
        veth = h.manager.get("c1").host_ifname
        h.netlink.delete_link(veth)
        assert veth not in {link.ifname for link in (await h.netlink.list_owned()).links}
        h.manager.reconciler.request_full_sync()
        await h.manager.reconciler.wait_pass()
        assert veth in {link.ifname for link in (await h.netlink.list_owned()).links}
        assert h.manager.reconciler.health()["done"] == 1


async def test_label_change_moves_endpoint_to_new_identity():
    async with FakeNode() as h:
        h.pods.upsert(pod("x", "a", {"app": "web"}))
        await h.add("c1", "a")
        before = h.manager.get("c1").identity
        h.pods.upsert(pod("x", "a", {"app": "api"}))
        assert await h.manager.refresh_identities()
        after = h.manager.get("c1")
        assert after.identity != before and "k8s:app=api" in after.labels
        stored = json.loads((await h.store.get(after.key)).value)
        assert stored["identity"] == after.identity
        assert h.manager.local.snapshot().get("c1").identity == after.identity


def test_an_endpoint_record_is_stored_under_the_stores_endpoint_key():
    record = EndpointRecord("c1", 1, "node1", "x", "web", "eth0", "/run/netns/web", ipaddress.IPv4Address("10.0.0.2"),
                            300, (), "runner")
    assert record.key == keys.endpoint_key("node1", "c1")
    assert record.key.startswith(keys.endpoints_prefix("node1"))


async def test_an_added_endpoint_reaches_the_kernel_with_its_policy() -> None:
    policy = parse_manifest_text("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
""")
    async with FakeNode() as h:
        h.policies.upsert(*(policy_object(p) for p in policy))
        h.pods.upsert(pod("x", "web", {"app": "web"}))
        await h.settled()
        result = await h.add("c1", "web")
        # The CNI ADD answered: the kernel holds the anti-spoofing entry and the policy together.
        ifindex = str(h.manager.get("c1").host_ifindex)
        assert len(h.set_elements("endpoint_sources")) == 1
        assert h.set_elements("enforced_in") == {(ifindex,)}, result
