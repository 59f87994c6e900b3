"""The endpoint manager on fakes: CNI semantics, address safety, and recovery after a crash."""

import ipaddress
import json

import pytest

from membrane.agent.contract import CniFailure, CniRequest
from membrane.agent.datapath import NodeDatapath
from membrane.agent.endpoints import EndpointManager, NodeContext
from membrane.agent.intent import Intent
from membrane.api.endpoint import EndpointRecord
from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.nft.fake import FakeNftRunner
from membrane.store import keys
from membrane.store.identities import IdentityAllocator
from membrane.store.memory import MemoryStore

NODE = NodeContext(
    name="node1",
    node_ip=ipaddress.IPv4Address("172.31.0.11"),
    pod_cidr=ipaddress.IPv4Network("10.244.0.0/29"),  # room for 5 pods
    router_ip=ipaddress.IPv4Address("10.244.0.1"),
    mtu=1450,
)


class Harness:
    def __init__(self, store: MemoryStore | None = None, netlink: FakeNetlink | None = None,
                 nft: FakeNftRunner | None = None) -> None:
        self.store = store or MemoryStore()
        self.netlink = netlink or FakeNetlink()
        self.nft = nft or FakeNftRunner()
        self.intent = Intent()
        self.datapath = NodeDatapath(NODE, self.netlink, self.nft)
        self.manager = EndpointManager(
            self.store, NODE, self.datapath.wiring, IdentityAllocator(self.store), self.intent,
            lambda: self.datapath.sync(self.manager.ready_records()),
            netns_present=lambda path: path in self.netlink.namespaces,
        )

    def request(self, cid: str, pod: str = "", command: str = "ADD") -> CniRequest:
        netns = f"/run/netns/{cid}"
        return CniRequest(command, cid, netns, "eth0", {"K8S_POD_NAMESPACE": "x", "K8S_POD_NAME": pod or cid})

    async def add(self, cid: str, pod: str = "") -> dict:
        self.netlink.add_netns(f"/run/netns/{cid}")
        return await self.manager.cni_add(self.request(cid, pod))

    def spoof_set(self) -> set:
        table = self.nft.ruleset
        assert table is not None
        return {e for s in table.sets if s.name == "endpoint_sources" for e in s.elements}


async def test_add_returns_cni_result_and_programs_anti_spoofing():
    h = Harness()
    result = await h.add("c1", "web")
    assert result["cniVersion"] == "1.0.0"
    assert result["ips"] == [{"address": "10.244.0.2/32", "gateway": "10.244.0.1", "interface": 1}]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}]
    assert result["interfaces"][1]["sandbox"] == "/run/netns/c1"
    record = h.manager.get("c1")
    assert record is not None and record.state == "ready"
    assert len(h.spoof_set()) == 1
    stored = EndpointRecord.from_json((await h.store.get(keys.endpoint_key("node1", "c1"))).value)
    assert stored.state == "ready" and stored.pod == "web" and stored.identity >= 256
    assert (await h.store.get(keys.pod_ip_key(ipaddress.IPv4Address("10.244.0.2")))).value.decode() == stored.key


async def test_retried_add_is_idempotent():
    h = Harness()
    first = await h.add("c1")
    again = await h.manager.cni_add(h.request("c1"))
    assert again["ips"] == first["ips"]
    assert len(h.manager.records()) == 1


async def test_pods_with_equal_labels_share_an_identity():
    h = Harness()
    h.intent.pods[("x", "a")] = {"metadata": {"name": "a", "labels": {"app": "web"}}}
    h.intent.pods[("x", "b")] = {"metadata": {"name": "b", "labels": {"app": "web"}}}
    h.intent.pods[("x", "c")] = {"metadata": {"name": "c", "labels": {"app": "db"}}}
    await h.add("c1", "a")
    await h.add("c2", "b")
    await h.add("c3", "c")
    ids = {r.pod: r.identity for r in h.manager.records()}
    assert ids["a"] == ids["b"] != ids["c"]


async def test_del_releases_everything_and_is_idempotent():
    h = Harness()
    await h.add("c1")
    await h.manager.cni_del(h.request("c1", command="DEL"))
    await h.manager.cni_del(h.request("c1", command="DEL"))
    assert h.manager.records() == []
    assert (await h.store.list(keys.ENDPOINTS))[0] == []
    assert (await h.store.list(keys.POD_IPS))[0] == []
    assert h.spoof_set() == set()
    assert (await h.netlink.list_owned()).links == ()


async def test_addresses_are_never_handed_out_twice_and_exhaustion_is_a_cni_error():
    h = Harness()
    ips = [(await h.add(f"c{i}"))["ips"][0]["address"] for i in range(5)]
    assert len(set(ips)) == 5
    with pytest.raises(CniFailure) as info:
        await h.add("c9")
    assert info.value.code == 100 and "no free address left in 10.244.0.0/29" in info.value.msg


async def test_add_into_missing_namespace_is_refused():
    h = Harness()
    with pytest.raises(CniFailure) as info:
        await h.manager.cni_add(h.request("ghost"))
    assert info.value.code == 4


async def test_failed_wiring_leaves_nothing_behind():
    h = Harness()
    h.netlink.fail["attach_configure"] = __import__("membrane.core.errors", fromlist=["x"]).DatapathError("boom")
    with pytest.raises(CniFailure):
        await h.add("c1")
    assert h.manager.records() == []
    assert (await h.store.list(keys.POD_IPS))[0] == []
    assert (await h.netlink.list_owned()).links == ()


async def test_restore_after_crash_undoes_interrupted_add_and_prunes_orphans():
    store, netlink, nft = MemoryStore(), FakeNetlink(), FakeNftRunner()
    h = Harness(store, netlink, nft)
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

    restarted = Harness(store, netlink, FakeNftRunner())
    await restarted.manager.restore()
    assert [r.container_id for r in restarted.manager.records()] == ["keep"]
    owned = {link.ifname for link in (await netlink.list_owned()).links}
    assert owned == {restarted.manager.get("keep").host_ifname}
    held = {kv.key for kv in (await store.list(keys.POD_IPS))[0]}
    assert held == {keys.pod_ip_key(restarted.manager.get("keep").ipv4)}
    # A new ADD after restore never reuses the kept address.
    result = await restarted.add("new")
    assert result["ips"][0]["address"] != f"{restarted.manager.get('keep').ipv4}/32"


async def test_label_change_moves_endpoint_to_new_identity():
    h = Harness()
    h.intent.pods[("x", "a")] = {"metadata": {"name": "a", "labels": {"app": "web"}}}
    await h.add("c1", "a")
    before = h.manager.get("c1").identity
    h.intent.pods[("x", "a")] = {"metadata": {"name": "a", "labels": {"app": "api"}}}
    assert await h.manager.refresh_identities()
    after = h.manager.get("c1")
    assert after.identity != before and "k8s:app=api" in after.labels
    stored = json.loads((await h.store.get(after.key)).value)
    assert stored["identity"] == after.identity


def test_an_endpoint_record_is_stored_under_the_stores_endpoint_key():
    record = EndpointRecord("c1", 1, "node1", "x", "web", "eth0", "/run/netns/web", ipaddress.IPv4Address("10.0.0.2"),
                            300, (), "runner")
    assert record.key == keys.endpoint_key("node1", "c1")
    assert record.key.startswith(keys.endpoints_prefix("node1"))
