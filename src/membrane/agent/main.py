"""The agent: the whole wiring of one node on one screen.

    store ──reflectors──► intent ──► endpoint manager / pod runner / operator
                            │           │
                            │           ▼
                            │  node datapath (netlink + one nft table) ◄── API socket (CNI, status)
                            └─(node objects)─► routing to peers (VXLAN or native routes)

Order matters: nothing touches the kernel before the reflectors' initial sync, endpoints are
restored (and orphans pruned) before the API socket accepts a CNI request, and queued DELs
from a time the agent was down are drained before new work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any

from membrane.agent.api import AgentApiServer
from membrane.agent.config import AgentConfig
from membrane.agent.datapath import NodeDatapath
from membrane.agent.endpoints import EndpointManager, NodeContext
from membrane.agent.intent import ENDPOINTS, IDENTITIES, NAMESPACES, NODES, PODS, POLICY_PREFIXES, Intent
from membrane.agent.node import NodeRegistration, ensure_cluster_config
from membrane.agent.observer import AgentObserver, ObserverSettings, PolicyAttribution
from membrane.agent.operator import Operator
from membrane.agent.policy import PolicyController
from membrane.agent.routing import LocalNode, RoutingController, RoutingReconciler, masquerade_for
from membrane.agent.runner import PodRunner
from membrane.cni.queue import drain_del_queue
from membrane.core.lifecycle import Lifecycle
from membrane.ipam.pool import pod_capacity
from membrane.policy.compiler import enforcement_config
from membrane.store import open_store
from membrane.store.identities import IdentityAllocator
from membrane.store.objects import ObjectClient
from membrane.store.reflector import Reflector

log = logging.getLogger("membrane.agent")


async def run_agent(config: AgentConfig, ready: asyncio.Event | None = None) -> None:
    store = await open_store(config.store)
    lifecycle = Lifecycle()
    api: AgentApiServer | None = None
    runner: PodRunner | None = None
    observer: AgentObserver | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        cluster = await ensure_cluster_config(store, config.cluster)
        registration = NodeRegistration(store, config, cluster)
        await registration.start()

        intent = Intent(cluster_name=cluster.clusterName)
        changed = asyncio.Event()
        nodes_changed = asyncio.Event()  # routing: wakes on CiliumNode changes only
        operator_wake = asyncio.Event()  # the operator: wakes on node and pod changes
        policy_wake = asyncio.Event()  # policy enforcement: wakes on any of its inputs
        for prefix in (PODS, NAMESPACES, NODES, *POLICY_PREFIXES, IDENTITIES, ENDPOINTS):
            reflector = Reflector(store, prefix)
            subscription = reflector.subscribe()
            lifecycle.start(f"reflector {prefix}", reflector.run)
            first = await anext(subscription)  # the initial list: intent is synced after it
            intent.apply(prefix, first.events, first.revision)
            wakes: tuple[asyncio.Event, ...] = (
                (nodes_changed, operator_wake) if prefix == NODES
                else (changed, operator_wake) if prefix in (PODS, NAMESPACES) else ())
            wakes += (policy_wake,)  # policy enforcement
            lifecycle.start(f"intent {prefix}", functools.partial(_follow, intent, prefix, subscription, wakes))

        # The operator role may be ours: run it before waiting for the pod CIDR it hands out.
        identities = IdentityAllocator(store)
        operator = Operator(store, registration.name, lambda: registration.lease, intent, identities, cluster,
                            wake=operator_wake)
        lifecycle.start("operator", operator.run)
        lifecycle.start("heartbeat", registration.run_heartbeats)
        node = await registration.wait_for_pod_cidr()
        log.info("node %s: %s on %s, pod CIDR %s, pod MTU %d", node.name, node.uplink.address,
                 node.uplink.device, node.pod_cidr, node.pod_mtu)

        context = NodeContext(node.name, node.uplink.address, node.pod_cidr, node.router_ip, node.pod_mtu)
        # -- flow observability (agent/observer.py): the NFLOG group is bound before log rules exist --
        observer = AgentObserver(ObserverSettings.for_agent(config), node_name=node.name, store=store,
                                 cluster_name=cluster.clusterName)
        await observer.start(lifecycle)
        await registration.update_node_object(observer=observer.advertised())
        # -- end flow observability --
        datapath = NodeDatapath(context, masquerade=masquerade_for(cluster, node.pod_cidr),
                                flow_log=observer.flow_log)
        await datapath.start()
        # -- policy enforcement (agent/policy.py): compiled before the first sync, so restored
        # endpoints are never programmed without their policy --
        policy = PolicyController(intent, node.name, cluster_name=cluster.clusterName,
                                  config=enforcement_config(cluster),
                                  sync_datapath=lambda: datapath.sync(endpoints.ready_records()),
                                  write_status=ObjectClient(store).modify_status, wake=policy_wake)
        policy.refresh()
        datapath.policy = policy.policy_datapath
        observer.policy = PolicyAttribution(policy)  # flow observability: *_allowed_by / *_denied_by
        # -- end policy enforcement --
        # -- routing between nodes (agent/routing.py): peers' pod CIDRs via VXLAN or native routes --
        routing = RoutingController(
            RoutingReconciler(datapath.netlink, LocalNode(node.name, node.uplink.address, node.uplink.device,
                                                          node.uplink.mtu, node.pod_cidr), cluster),
            lambda: intent.nodes, nodes_changed)
        lifecycle.start("routing", routing.run)
        # -- end routing --
        endpoints = EndpointManager(store, context, datapath.wiring, identities, intent,
                                    lambda: datapath.sync(endpoints.ready_records()))
        await endpoints.restore()
        await datapath.sync(endpoints.ready_records())
        lifecycle.start("policy", policy.run)  # policy enforcement

        runner = PodRunner(store, node.name, str(node.uplink.address), intent, endpoints,
                           config.stateDir, config.netnsPrefix)
        runner.load()
        await runner.reconcile()
        pruned = await runner.prune_foreign_netns()
        if pruned:
            log.info("removed orphaned pod namespaces: %s", ", ".join(pruned))
        started = time.time()

        def status() -> dict[str, Any]:
            records = endpoints.records()
            return {
                "node": node.name, "nodeIP": str(node.uplink.address), "store": store.url,
                "podCIDR": str(node.pod_cidr), "routerIP": str(node.router_ip), "mtu": node.pod_mtu,
                "routing": cluster.routingMode, "device": node.uplink.device,
                "ipam": {"allocated": len(records), "capacity": pod_capacity(node.pod_cidr)},
                "endpoints": {"total": len(records), "ready": sum(r.state == "ready" for r in records)},
                "operator": operator.is_leader, "pid": os.getpid(), "uptime": time.time() - started,
                "lastHeartbeat": registration.last_heartbeat,
                "datapath": datapath.status(),
                "peerRouting": routing.status(),
                "hubble": observer.status(),  # flow observability
                "policy": policy.status(),  # policy enforcement
                "controllers": {name: {"healthy": h.healthy, "restarts": h.restarts, "lastError": h.last_error}
                                for name, h in lifecycle.health.items()},
            }

        api = AgentApiServer(config.api_socket, endpoints, status)
        await api.start()
        # Drain after listening: a DEL queued while the agent was starting is then either in the
        # queue now or reaches the socket (the plugin retries the socket once after queueing).
        report = await drain_del_queue(config.cni_queue_dir, endpoints)
        if report.deleted or report.failed or report.invalid:
            log.info("drained queued CNI DELs: %s", report)

        async def reconcile_pods() -> None:
            assert runner is not None
            while True:
                await runner.reconcile()
                if await endpoints.refresh_identities():
                    await datapath.sync(endpoints.ready_records())
                delay = runner.next_wakeup()
                waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(runner.wake.wait())]
                await asyncio.wait(waits, timeout=max(delay, 0.05) if delay is not None else 5.0,
                                   return_when=asyncio.FIRST_COMPLETED)
                for waiter in waits:
                    waiter.cancel()
                changed.clear()
                runner.wake.clear()

        lifecycle.start("pod-runner", reconcile_pods)
        log.info("agent ready: API on %s", config.api_socket)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("agent stopping (pods, endpoints and datapath stay as they are)")
    finally:
        if api is not None:
            await api.close()
        await lifecycle.stop()
        if runner is not None:
            await runner.close()
        if observer is not None:
            await observer.close()
        with contextlib.suppress(Exception):
            await store.close()


async def _follow(intent: Intent, prefix: str, subscription: Any, wakes: tuple[asyncio.Event, ...]) -> None:
    async for batch in subscription:
        intent.apply(prefix, batch.events, batch.revision)
        for wake in wakes:
            wake.set()
