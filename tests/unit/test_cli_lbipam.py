"""`membrane get svc` and `membrane get ippools` as kubectl prints them for LB-IPAM's objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from membrane.api import k8s
from membrane.api.cilium import CiliumLoadBalancerIPPool
from membrane.api.registry import lookup_kind
from membrane.cli.printers import object_table

CREATED = "2024-05-01T10:00:00Z"
NOW = datetime(2024, 5, 1, 10, 5, 0, tzinfo=UTC)


def svc(name: str, spec: dict[str, Any], ingress: tuple[str, ...] = ()) -> k8s.Service:
    data: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": CREATED},
        "spec": {"ports": [{"port": 80}], **spec},
    }
    if ingress:
        data["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}}
    return k8s.Service.model_validate(data)


def external_ips(services: list[k8s.Service], *, wide: bool = False) -> dict[str, str]:
    lines = object_table("Service", services, now=NOW, wide=wide).splitlines()
    column = lines[0].index("EXTERNAL-IP")
    return {line.split()[0]: line[column:].split()[0] for line in lines[1:]}


def test_external_ip_column_follows_kubectl():
    services = [
        svc("pending", {"type": "LoadBalancer"}),
        svc("given", {"type": "LoadBalancer"}, ingress=("20.0.0.5",)),
        svc("both", {"type": "LoadBalancer", "externalIPs": ["198.51.100.7"]}, ingress=("20.0.0.6",)),
        svc("external-only", {"type": "LoadBalancer", "externalIPs": ["198.51.100.8"]}),
        svc("cluster", {"type": "ClusterIP"}),
        svc("cluster-external", {"type": "ClusterIP", "externalIPs": ["198.51.100.9"]}),
    ]
    assert external_ips(services) == {
        "pending": "<pending>",
        "given": "20.0.0.5",
        "both": "20.0.0.6,198.51.100.7",
        "external-only": "198.51.100.8",
        "cluster": "<none>",
        "cluster-external": "198.51.100.9",
    }


def test_a_long_ingress_list_is_shortened_except_with_wide():
    many = svc("many", {"type": "LoadBalancer"}, ingress=("20.0.0.5", "2001:db8::1"))
    assert external_ips([many]) == {"many": "20.0.0.5,2001..."}
    assert external_ips([many], wide=True) == {"many": "20.0.0.5,2001:db8::1"}


def pool(name: str, disabled: bool, conditions: list[dict[str, str]]) -> CiliumLoadBalancerIPPool:
    return CiliumLoadBalancerIPPool.model_validate(
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumLoadBalancerIPPool",
            "metadata": {"name": name, "creationTimestamp": CREATED},
            "spec": {"blocks": [{"cidr": "10.0.10.0/24"}], "disabled": disabled},
            "status": {"conditions": conditions} if conditions else None,
        }
    )


def test_ippools_show_disabled_conflicting_and_available_ips():
    conflict = {"type": "cilium.io/PoolConflict", "status": "True", "reason": "cidr_overlap", "message": "…"}
    available = {"type": "cilium.io/IPsAvailable", "status": "Unknown", "reason": "noreason", "message": "254"}
    pools = [pool("blue", False, [conflict, available]), pool("new", True, [])]
    assert object_table("CiliumLoadBalancerIPPool", pools, now=NOW) == (
        "NAME   DISABLED   CONFLICTING   IPS AVAILABLE   AGE\n"
        "blue   false      True          254             5m\n"
        "new    true       <none>        <none>          5m\n"
    )


@pytest.mark.parametrize("name", ["ippools", "ippool", "lbippool", "lbippools", "CiliumLoadBalancerIPPool"])
def test_pool_kind_short_names(name: str):
    assert lookup_kind(name).kind == "CiliumLoadBalancerIPPool"
