"""One node's agent modules on fakes: the endpoint, policy and datapath modules exactly as the agent
wires them, over :class:`~membrane.datapath.netlink.fake.FakeNetlink`,
:class:`~membrane.datapath.nft.fake.FakeNftRunner` and an in-memory store, with intent tables a
test writes directly (no reflectors)::

    async with FakeNode() as node:
        node.pods.upsert(pod("x", "web", {"app": "web"}))
        result = await node.add("c1", "web")          # a CNI ADD through the endpoint manager
        node.nft.ruleset                               # what the nft reconciler programmed

:class:`PolicyHarness` is the policy module alone: intent tables a test fills, the controller's
``compute``, and the policy tables rendered as the datapath renders them.

Primitives: :data:`NODE`, :func:`pod`, :func:`namespace`, :class:`FakeNode`, :class:`PolicyHarness`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from membrane.agent.contract import CniRequest
from membrane.agent.datapath import DatapathModule, policy_datapath
from membrane.agent.endpoints import EndpointManager, NodeContext, endpoints_module
from membrane.agent.intent import IdentityRow, IntentTables, PodWriter, PolicyObject, endpoint_labels
from membrane.agent.policy import PolicyController, PolicyTables, policy_module
from membrane.api import k8s
from membrane.api.cilium import CiliumNode
from membrane.api.endpoint import EndpointRecord
from membrane.api.meta import ApiObject
from membrane.api.registry import kind_info
from membrane.core.lifecycle import Lifecycle
from membrane.core.modules import Module, ModuleRunner
from membrane.core.statedb import StateDB, Table
from membrane.datapath.netlink.fake import FakeNetlink
from membrane.datapath.nft.fake import FakeNftRunner
from membrane.datapath.policy import PolicyRenderer
from membrane.datapath.ruleset import FlowLog, Masquerade, PolicyDatapath
from membrane.identity.labels import Label, parse_labels
from membrane.policy.mapstate import EnforcementConfig
from membrane.store.identities import IdentityAllocator
from membrane.store.keys import object_key
from membrane.store.memory import MemoryStore
from membrane.store.objects import ObjectClient

NODE = NodeContext(
    name="node1",
    node_ip=ipaddress.IPv4Address("172.31.0.11"),
    pod_cidr=ipaddress.IPv4Network("10.244.0.0/29"),  # room for 5 pods
    router_ip=ipaddress.IPv4Address("10.244.0.1"),
    mtu=1450,
)


def pod(namespace: str, name: str, labels: dict[str, str] | None = None, node: str | None = "node1",
        **spec: Any) -> k8s.Pod:
    return k8s.Pod.model_validate({"apiVersion": "v1", "kind": "Pod",
                                   "metadata": {"namespace": namespace, "name": name, "labels": labels or {}},
                                   "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}], **spec}})


def namespace(name: str, labels: dict[str, str] | None = None) -> k8s.Namespace:
    return k8s.Namespace.model_validate({"apiVersion": "v1", "kind": "Namespace",
                                         "metadata": {"name": name, "labels": labels or {}}})


class FakeNode:
    """The endpoint, policy and datapath modules of one node on fakes."""

    def __init__(self, store: MemoryStore | None = None, netlink: FakeNetlink | None = None,
                 nft: FakeNftRunner | None = None, *, node: NodeContext = NODE, policy: bool = True,
                 masquerade: Masquerade | None = None, flow_log: FlowLog | None = None,
                 config: EnforcementConfig | None = None, cluster_name: str = "default",
                 write_status: bool = False, resync_interval: float = 60.0) -> None:
        self.store = store or MemoryStore()
        self.netlink = netlink or FakeNetlink()
        self.nft = nft or FakeNftRunner()
        self.node = node
        self.cluster_name = cluster_name
        self.db = StateDB()
        self.intent = IntentTables.create(self.db)
        self.pods = PodWriter(self.intent.pods.writer("test"))
        self.namespaces = self.intent.namespaces.writer("test")
        self.nodes = self.intent.nodes.writer("test")
        self.policies = self.intent.policies.writer("test")
        self.identities = self.intent.identities.writer("test")
        self.endpoints = self.intent.endpoints.writer("test")
        self.cluster = self.intent.cluster.writer("test")
        self.manager = EndpointManager(self.store, node, self.db, self.netlink, IdentityAllocator(self.store),
                                       self, self._wait_programmed,
                                       netns_present=lambda path: path in self.netlink.namespaces,
                                       resync_interval=resync_interval)
        self.policy: PolicyController | None = None
        modules: list[Module] = [endpoints_module(self.manager)]
        tables = None
        if policy:
            self.policy = PolicyController(self.intent, self.manager.local, PolicyTables.create(self.db), node.name,
                                           cluster_name=cluster_name, config=config)
            tables = self.policy.tables
            modules.append(policy_module(self.db, self.intent, self.manager.local, self.policy,
                                         ObjectClient(self.store).modify_status if write_status else None,
                                         resync_interval=resync_interval, debounce=0.0))
        self.datapath = DatapathModule(self.db, self.manager.local, tables, self.nft, masquerade, flow_log,
                                       cluster=self.intent.cluster, resync_interval=resync_interval)
        modules.append(self.datapath.module)
        self.lifecycle = Lifecycle()
        self.runner = ModuleRunner(self.lifecycle, modules)

    def endpoint_labels(self, namespace: str, pod: str) -> frozenset[Label]:
        return endpoint_labels(self.intent, namespace, pod, self.cluster_name)

    async def _wait_programmed(self, revision: int) -> None:
        await self.datapath.wait_programmed(revision, timeout=10)

    async def __aenter__(self) -> FakeNode:
        await self.runner.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.runner.stop()
        await self.lifecycle.stop()

    # -- CNI ---------------------------------------------------------------------------------------------

    def request(self, cid: str, pod: str = "", command: str = "ADD", namespace: str = "x") -> CniRequest:
        return CniRequest(command, cid, f"/run/netns/{cid}", "eth0",
                          {"K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": pod or cid})

    async def add(self, cid: str, pod: str = "", namespace: str = "x") -> dict[str, Any]:
        self.netlink.add_netns(f"/run/netns/{cid}")
        return await self.manager.cni_add(self.request(cid, pod, namespace=namespace))

    async def delete(self, cid: str) -> None:
        await self.manager.cni_del(self.request(cid, command="DEL"))

    async def settled(self) -> None:
        """Make the kernel (the fakes) hold what the tables say now: run every controller once, in
        table order, then one nft pass."""
        for module in self.runner.modules:
            for controller in module.controllers:
                controller.run_once()
        await self.datapath.reconciler.reconcile_once()

    def set_elements(self, name: str) -> set[Any]:
        table = self.nft.ruleset
        assert table is not None
        for item in table.sets:
            if item.name == name:
                return set(item.elements)
        for data in table.maps:
            if data.name == name:
                return set(data.elements)
        return set()


def policy_object(obj: ApiObject) -> PolicyObject:
    """A policy as the reflector puts it in the policies table (keyed by its store key)."""
    return PolicyObject(object_key(kind_info(obj.kind).plural, obj.namespace, obj.name), obj)


class PolicyHarness:
    """The policy controller of ``node_name`` over intent tables the test fills."""

    def __init__(self, node_name: str = "node1", *, config: EnforcementConfig | None = None,
                 cluster_name: str = "default") -> None:
        self.db = StateDB()
        self.intent = IntentTables.create(self.db)
        self.policies = self.intent.policies.writer("test")
        self.identities = self.intent.identities.writer("test")
        self.endpoints = self.intent.endpoints.writer("test")
        self.pods = PodWriter(self.intent.pods.writer("test"))
        self.namespaces = self.intent.namespaces.writer("test")
        self.nodes = self.intent.nodes.writer("test")
        self.cluster = self.intent.cluster.writer("test")
        self.local: Table[EndpointRecord] = self.db.table("local_endpoints", primary=lambda r: r.container_id)
        self.local_writer = self.local.writer("test")
        self.controller = PolicyController(self.intent, self.local, PolicyTables.create(self.db), node_name,
                                           cluster_name=cluster_name, config=config)
        self.node_name = node_name
        self._renderer = PolicyRenderer()

    def load(self, *, policies: Iterable[ApiObject] = (), records: Iterable[EndpointRecord] = (),
             pods: Iterable[k8s.Pod] = (), identities: Mapping[int, frozenset[Label]] | None = None,
             nodes: Iterable[CiliumNode] = (), local: Iterable[EndpointRecord] | None = None) -> PolicyHarness:
        """Policies, every node's endpoint records, pods, nodes and identities (default: those of the
        records); ``local`` (default: the records of this node) are the endpoint manager's. Then one
        computation."""
        record_list = list(records)
        self.policies.upsert(*(policy_object(p) for p in policies))
        self.endpoints.upsert(*record_list)
        self.local_writer.upsert(*(r for r in record_list if r.node == self.node_name) if local is None else local)
        self.pods.upsert(*pods)
        self.nodes.upsert(*nodes)
        if identities is None:
            identities = {r.identity: parse_labels(r.labels) for r in record_list}
        self.identities.upsert(*(IdentityRow(i, labels) for i, labels in identities.items()))
        self.compute()
        return self

    def compute(self) -> None:
        self.controller.compute()
        for table in (self.controller.tables.endpoint_policies, self.controller.tables.ipcache,
                      self.controller.tables.status):
            table.initialized.set()

    def policy_datapath(self) -> PolicyDatapath:
        """The policy tables as the datapath renders them."""
        return policy_datapath(self.controller.tables, self._renderer)[0]
