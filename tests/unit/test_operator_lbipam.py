"""LB-IPAM in the operator role: pools and Services applied through the API, status written back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import yaml

from membrane.agent.intent import IntentTables
from membrane.agent.operator import Operator
from membrane.api import k8s
from membrane.api.meta import condition
from membrane.api.registry import lookup_kind, validate_object
from membrane.cli.printers import object_table
from membrane.core.config import ClusterConfig
from membrane.core.statedb import StateDB
from membrane.store.identities import IdentityAllocator
from membrane.store.memory import MemoryStore
from membrane.store.objects import ObjectClient

POOL = """
apiVersion: cilium.io/v2
kind: CiliumLoadBalancerIPPool
metadata: {name: small}
spec:
  blocks: [{start: 20.0.0.5}]
"""


def service(name: str) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: LoadBalancer
  selector: {{app: {name}}}
  ports: [{{port: 80}}]
"""


def objects(text: str) -> list[Any]:
    return [validate_object(doc, lookup_kind(doc["kind"])) for doc in yaml.safe_load_all(text)]


async def get_service(client: ObjectClient, name: str) -> k8s.Service:
    found = await client.get("svc", "default", name)
    assert isinstance(found, k8s.Service)
    return found


def satisfied(svc: k8s.Service) -> tuple[str, str, str]:
    found = condition(svc.status.conditions if svc.status else None, "cilium.io/IPAMRequestSatisfied")
    assert found is not None
    return found.status, found.reason or "", found.message or ""


async def test_services_get_ips_from_the_pool_and_wait_for_a_freed_one():
    store = MemoryStore()
    client = ObjectClient(store)
    cluster = ClusterConfig(clusterPoolIPv4PodCIDRList=("10.244.0.0/22",), clusterPoolIPv4MaskSize=24)
    lease = await store.grant_lease(10)
    op = Operator(store, "n1", lambda: lease, IntentTables.create(StateDB()), IdentityAllocator(store), cluster)
    assert await op.try_acquire()

    await client.apply(objects(service("first")))
    await op.assign_load_balancer_ips()
    assert not op.lbipam.active  # dormant: no pool yet, the Service is left as it is
    assert (await get_service(client, "first")).status is None

    await client.apply(objects(POOL))
    await op.assign_load_balancer_ips()
    first = await get_service(client, "first")
    assert first.ingress_ips == ["20.0.0.5"]
    assert satisfied(first) == ("True", "satisfied", "")

    await client.apply(objects(service("second")))
    await op.assign_load_balancer_ips()
    second = await get_service(client, "second")
    assert second.ingress_ips == []
    assert satisfied(second) == (
        "False",
        "out_of_ips",
        "All enabled CiliumLoadBalancerIPPools that match this service ran out of allocatable IPs",
    )
    now = datetime.now(UTC)
    table = object_table("Service", [first, second], now=now)
    assert [line.split()[3] for line in table.splitlines()[1:]] == ["20.0.0.5", "<pending>"]
    pools = await client.list("ippools")
    assert object_table("CiliumLoadBalancerIPPool", pools, now=now).splitlines()[1].split()[:4] == [
        "small",
        "false",
        "False",
        "0",
    ]

    # Nothing changed: another pass writes nothing (watchers of Services would otherwise loop).
    revision = await store.revision()
    await op.assign_load_balancer_ips()
    await op.assign_load_balancer_ips()
    assert await store.revision() == revision

    await client.delete("svc", "default", "first")
    await op.assign_load_balancer_ips()
    second = await get_service(client, "second")
    assert second.ingress_ips == ["20.0.0.5"]
    assert satisfied(second) == ("True", "satisfied", "")

    # The last pool gone: the IP it gave is taken back, then LB-IPAM is dormant again.
    await client.delete("ippools", None, "small")
    await op.assign_load_balancer_ips()
    second = await get_service(client, "second")
    assert second.ingress_ips == []
    assert satisfied(second)[:2] == ("False", "no_pool")
    assert not op.lbipam.active
