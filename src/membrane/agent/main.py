"""The agent: a list of modules, started in the order their tables require.

    store ─reflectors─▶ intent tables ─▶ controllers ─▶ desired tables ─▶ reconcilers ─▶ kernel / store
                        namespaces        policy          endpoint_policies, ipcache
                        pods, nodes       datapath        nft                           nft (one table)
                        policies          routing         peers                         routes, FDB, neighbours
                        identities        endpoints (CNI) endpoint_wiring               veths, /32 routes
                        endpoints         policy          policy_status                 policy objects' status

Two phases, because this node's pod CIDR comes from the operator role (possibly held here):
the cluster modules (intent, operator, heartbeat) run first; once the node object carries its CIDR
the node modules start — observer (its NFLOG group bound before any log rule exists), endpoints
(restored, orphans pruned), policy (compiled before the first sync), datapath (first nft sync),
routing, pods, and last the API socket, so a CNI request never meets a half-started node. They
stop in reverse. Nothing here computes or touches the kernel: see each module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from membrane.agent.config import AgentConfig
from membrane.agent.intent import IntentTables, intent_module
from membrane.agent.node import NodeRegistration, ensure_cluster_config
from membrane.agent.node_modules import NodeModules, cluster_modules
from membrane.agent.operator import Operator
from membrane.core.lifecycle import Lifecycle
from membrane.core.modules import ModuleRunner
from membrane.core.statedb import StateDB
from membrane.store import open_store
from membrane.store.identities import IdentityAllocator

log = logging.getLogger("membrane.agent")


async def run_agent(config: AgentConfig, ready: asyncio.Event | None = None) -> None:
    store = await open_store(config.store)
    lifecycle = Lifecycle()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    runners: list[ModuleRunner] = []
    try:
        cluster = await ensure_cluster_config(store, config.cluster)
        registration = NodeRegistration(store, config, cluster)
        await registration.start()
        db = StateDB()
        intent = IntentTables.create(db)
        intent_mod, reflectors = intent_module(store, intent, local_node=registration.name)
        operator = Operator(store, registration.name, lambda: registration.lease, intent, IdentityAllocator(store),
                            cluster)
        runners.append(ModuleRunner(lifecycle, [intent_mod, *cluster_modules(operator, registration, intent)]))
        await runners[-1].start()

        node = await registration.wait_for_pod_cidr(intent.nodes)
        log.info("node %s: %s on %s, pod CIDR %s, pod MTU %d", node.name, node.uplink.address,
                 node.uplink.device, node.pod_cidr, node.pod_mtu)
        modules = NodeModules(config, cluster, store, db, intent, reflectors, registration, node, operator, lifecycle)
        runners.append(ModuleRunner(lifecycle, modules.build()))
        modules.runners = runners
        await runners[-1].start()

        log.info("agent ready: API on %s", config.api_socket)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("agent stopping (pods, endpoints and datapath stay as they are)")
    finally:
        for runner in reversed(runners):
            await runner.stop()
        await lifecycle.stop()
        with contextlib.suppress(Exception):
            await store.close()
