"""This node's datapath as the agent drives it: netlink wiring per endpoint and the nft table.

:class:`NodeDatapath` owns the two kernel boundaries (a :class:`Netlink` and an
:class:`NftRunner`, real or fake) and turns the endpoint manager's records (and the node's
masquerade settings) into the desired ruleset, which :class:`NftReconciler` applies as one transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from membrane.agent.endpoints import NodeContext, Wired
from membrane.api.endpoint import EndpointRecord
from membrane.datapath.netlink.model import EndpointSpec
from membrane.datapath.netlink.protocol import Netlink
from membrane.datapath.nft.runner import NftRunner
from membrane.datapath.reconcilers import NftReconciler, SyncResult
from membrane.datapath.ruleset import (
    DesiredDatapath,
    EndpointAddress,
    FlowLog,
    Masquerade,
    PolicyDatapath,
    build_ruleset,
)

#: The policy controller's share of a sync: the ready records in, the policy elements out.
PolicySource = Callable[[list[EndpointRecord]], PolicyDatapath]


def _spec(record: EndpointRecord, node: NodeContext) -> EndpointSpec:
    return EndpointSpec(
        container_id=record.container_id, netns=record.netns, ifname=record.ifname,
        pod_ip=record.ipv4, router_ip=node.router_ip, mtu=node.mtu,
    )


class NetlinkWiring:
    """The endpoint manager's view of the netlink boundary."""

    def __init__(self, netlink: Netlink) -> None:
        self._netlink = netlink

    async def attach(self, record: EndpointRecord, node: NodeContext) -> Wired:
        attached = await self._netlink.attach_endpoint(_spec(record, node))
        return Wired(attached.host_ifname, attached.host_ifindex, attached.container_mac)

    async def detach(self, record: EndpointRecord) -> None:
        await self._netlink.detach_endpoint(record.container_id, record.host_ifname or None)

    async def check(self, record: EndpointRecord, node: NodeContext) -> None:
        await self._netlink.check_endpoint(_spec(record, node))

    async def prune(self, keep_host_ifnames: set[str]) -> list[str]:
        # Routes go with their veth, so keeping the veths keeps exactly the kept endpoints' routes.
        return list(await self._netlink.prune(keep_host_ifnames))


class NodeDatapath:
    """``masquerade``: this node's masquerade inputs (see :func:`membrane.agent.routing.masquerade_for`);
    None leaves pods' traffic with their own addresses."""

    def __init__(
        self,
        node: NodeContext,
        netlink: Netlink | None = None,
        nft: NftRunner | None = None,
        masquerade: Masquerade | None = None,
        flow_log: FlowLog | None = None,  # flow observability: the log rules (None: off)
        policy: PolicySource | None = None,  # policy enforcement (None: no policy section)
    ) -> None:
        if netlink is None:
            from membrane.datapath.netlink.pyroute import PyrouteNetlink

            netlink = PyrouteNetlink()
        if nft is None:
            from membrane.datapath.nft.runner import NftCommand

            nft = NftCommand()
        self._node = node
        self._netlink = netlink
        self._masquerade = masquerade
        self._flow_log = flow_log
        self.policy = policy  # set after construction when the controller needs the datapath first
        self.wiring = NetlinkWiring(netlink)
        self._reconciler = NftReconciler(nft)
        self._last: SyncResult | None = None
        self._last_time = 0.0
        self._syncs = 0
        self._lock = asyncio.Lock()

    @property
    def netlink(self) -> Netlink:
        """The node's netlink boundary (shared with the routing reconciler)."""
        return self._netlink

    async def start(self) -> None:
        await self._netlink.ensure_host_device(self._node.router_ip, self._node.mtu)

    async def sync(self, records: list[EndpointRecord]) -> None:
        async with self._lock:
            # Rendered under the lock: concurrent syncs apply in the order their state was computed.
            desired = DesiredDatapath.from_endpoints(
                (EndpointAddress(r.host_ifindex, r.ipv4) for r in records if r.host_ifindex), self._masquerade,
                self._flow_log, self.policy(records) if self.policy is not None else None,
            )
            self._last = await self._reconciler.sync(build_ruleset(desired))
            self._last_time = time.time()
            self._syncs += 1

    def status(self) -> dict[str, Any]:
        last = self._last
        summary = "not synced yet" if last is None else (
            f"Ok   {self._syncs} syncs, last {last.kind} ({last.added} added, {last.deleted} deleted)")
        return {"summary": summary, "syncs": self._syncs, "lastSync": self._last_time}

