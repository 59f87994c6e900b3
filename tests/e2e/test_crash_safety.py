"""200 pod create/delete cycles while the agent is killed at random moments.

After it all: no leaked address, veth, route, namespace, process or identity reference, and at
no moment was one address held by two endpoints.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter

import pytest

from membrane.api.endpoint import EndpointRecord
from membrane.api.registry import kind_info, validate_object
from membrane.store import keys, open_store
from membrane.store.base import Store
from membrane.store.identities import IdentityAllocator
from membrane.store.objects import ObjectClient
from membrane.testing.agentnode import AgentNode

pytestmark = pytest.mark.e2e

CYCLES = 200
LIVE_PODS = 4


def pod(name: str, app: str) -> object:
    return validate_object({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "x", "command": ["sleep", "3600"]}]},
    }, kind_info("Pod"))


async def endpoint_records(store: Store) -> list[EndpointRecord]:
    return [EndpointRecord.from_json(kv.value) for kv in (await store.list(keys.ENDPOINTS))[0]]


async def assert_no_address_twice(store: Store) -> None:
    # One list of the whole store: records and reservations from the same revision.
    everything, _ = await store.list(keys.ROOT)
    records = [EndpointRecord.from_json(kv.value) for kv in everything if kv.key.startswith(keys.ENDPOINTS)]
    counts = Counter(r.ipv4 for r in records)
    assert [ip for ip, n in counts.items() if n > 1] == [], "an address is held by two endpoints"
    owners = {kv.key.removeprefix(keys.POD_IPS): kv.value.decode() for kv in everything
              if kv.key.startswith(keys.POD_IPS)}
    for record in records:
        assert owners.get(str(record.ipv4)) == record.key, f"{record.ipv4} is not reserved for {record.key}"


def processes_under(directory: str) -> list[int]:
    """Pod processes run with their cwd in the agent's state dir: any still there leaked."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(directory):
                    found.append(int(entry))
            except OSError:
                continue
    return found


async def test_pod_churn_with_agent_killed_at_random(agent_node: AgentNode) -> None:
    seed = int(os.environ.get("MEMBRANE_CRASH_SEED", "20261126"))
    rng = random.Random(seed)
    store = await open_store(agent_node.store_url)
    client = ObjectClient(store)
    live: list[str] = []
    kills = 0
    try:
        for cycle in range(CYCLES):
            name = f"p{cycle}"
            await client.apply([pod(name, rng.choice(["a", "b", "c"]))])  # type: ignore[list-item]
            live.append(name)
            if len(live) > LIVE_PODS:
                await client.delete("Pod", "default", live.pop(rng.randrange(len(live))))
            await asyncio.sleep(rng.uniform(0, 0.08))
            if rng.random() < 0.12:
                # Kill mid-flight: the agent is somewhere between store, netlink, nft and processes.
                await asyncio.sleep(rng.uniform(0, 0.15))
                agent_node.kill()
                kills += 1
                agent_node.start(wait=rng.random() < 0.5)
            await assert_no_address_twice(store)
        assert kills >= 10, f"seed {seed} killed the agent only {kills} times"

        if agent_node.agent is None:
            agent_node.start()
        agent_node.wait_ready()
        # Everything still alive converges to Running with distinct addresses.
        deadline = time.monotonic() + 60
        while True:
            pods = [json.loads(kv.value) for kv in (await store.list(keys.objects_prefix("pods", "default")))[0]]
            if all((p.get("status") or {}).get("phase") == "Running" for p in pods) and len(pods) == len(live):
                break
            assert time.monotonic() < deadline, f"pods did not all run: {[p.get('status') for p in pods]}"
            await asyncio.sleep(0.1)
        assert len({p["status"]["podIP"] for p in pods}) == len(live)
        await assert_no_address_twice(store)
        assert len(agent_node.pod_namespaces()) == len(live)

        for name in live:
            await client.delete("Pod", "default", name)
        deadline = time.monotonic() + 60
        while await endpoint_records(store) or agent_node.pod_namespaces():
            assert time.monotonic() < deadline, f"not cleaned up:\n{agent_node.log_tail()}"
            await asyncio.sleep(0.1)
        assert (await store.list(keys.POD_IPS))[0] == [], "leaked address reservations"
        links = agent_node.node.run("ip", "-o", "link").stdout
        assert "lxc" not in links, f"leaked veths:\n{links}"
        assert agent_node.node.run("ip", "route", "show", "proto", "177").stdout.strip() == "", "leaked routes"
        assert processes_under(str(agent_node.state_dir)) == [], "leaked pod processes"
        # Every identity is unreferenced now, so the collector removes all of them.
        await IdentityAllocator(store).collect_unreferenced()
        assert (await store.list(keys.IDENTITY_BY_ID))[0] == [], "leaked identity references"
    finally:
        await store.close()
