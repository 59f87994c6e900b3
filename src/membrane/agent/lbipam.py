"""The operator's LB-IPAM step: pools and Services in, Service and pool status out.

Each :meth:`LoadBalancerIPAM.sync` reads the ``CiliumLoadBalancerIPPool`` and ``Service`` objects,
lets :func:`membrane.loadbalancer.lbipam.allocate` compute every Service's ingress IPs and
condition and every pool's conditions, and writes only the statuses that differ from what is
stored — so a sync over its own output writes nothing, and watchers of Services do not loop.

Dormant until a pool exists: with no pool nothing is read but the (empty) pool list. When the last
pool is deleted, one more pass takes the IPs it gave back (the Services are then told ``no_pool``),
as Cilium's operator does before going dormant again.

Nothing is computed twice for the same store state: a sync that finds the store at the revision
it last worked from returns at once. Status writes compare the object's revision, so a Service
edited meanwhile is not overwritten; the next sync computes from the edit.

Primitives: :class:`LoadBalancerIPAM`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from membrane.api import k8s
from membrane.api.cilium import CiliumLoadBalancerIPPool
from membrane.core.errors import CompareFailed, MembraneError, NotFound
from membrane.loadbalancer.lbipam import allocate, pool_status, service_status
from membrane.store import keys
from membrane.store.objects import ObjectClient, decode, now_rfc3339

log = logging.getLogger(__name__)

POOLS = "ciliumloadbalancerippools"
SERVICES = "services"


def _dump(status: Any) -> Any:
    return status.model_dump(mode="json", exclude_none=True) if status is not None else None


class LoadBalancerIPAM:
    """Recomputes LB-IPAM when pools or Services changed and writes the statuses that differ.

    ``ipv6`` says whether the cluster runs IPv6 (Cilium's ``enable-ipv6``): it decides what
    ``PreferDualStack`` and an unset family ask for; IPv6 pools serve Services asking for IPv6
    either way. ``clock`` stamps the conditions that change.
    """

    def __init__(self, objects: ObjectClient, *, ipv6: bool = False, clock: Callable[[], str] | None = None) -> None:
        self._objects = objects
        self._ipv6 = ipv6
        self._clock = clock or now_rfc3339
        self._active = False
        self._revision = -1

    @property
    def active(self) -> bool:
        """Whether a pool existed at the last sync."""
        return self._active

    async def sync(self) -> int:
        """One pass; returns how many statuses were written."""
        store = self._objects.store
        pool_kvs, revision = await store.list(keys.objects_prefix(POOLS))
        if not pool_kvs and not self._active:
            return 0
        if revision == self._revision:
            return 0
        service_kvs, revision = await store.list(keys.objects_prefix(SERVICES))
        pools = [obj for obj in map(_decoded, pool_kvs) if isinstance(obj, CiliumLoadBalancerIPPool)]
        services = [obj for obj in map(_decoded, service_kvs) if isinstance(obj, k8s.Service)]
        result = allocate(pools, services, ipv6=self._ipv6)
        now = self._clock()
        written = 0
        for service in services:
            found = result.services.get((service.namespace or "default", service.name))
            if found is None:
                continue
            status = service_status(service, found, now)
            if _dump(status) != _dump(service.status):
                written += await self._write("Service", service.namespace, service.name, status, service)
        for pool in pools:
            conditions = pool_status(pool, result.pools[pool.name], now)
            if _dump(conditions) != _dump(pool.status):
                written += await self._write("CiliumLoadBalancerIPPool", None, pool.name, conditions, pool)
        if bool(pools) != self._active:
            log.info("LB-IPAM %s", "active: a pool exists" if pools else "dormant: the last pool is gone")
        self._active = bool(pools)
        # Our own writes move the store on: the next sync recomputes once and finds nothing to write.
        self._revision = revision
        return written

    async def _write(self, kind: str, namespace: str | None, name: str, status: Any, obj: Any) -> int:
        try:
            await self._objects.update_status(
                kind, namespace, name, status, resource_version=obj.metadata.resourceVersion
            )
        except (CompareFailed, NotFound):
            self._revision = -1  # changed or gone since it was read: the next sync looks again
            return 0
        except MembraneError as exc:
            log.error("LB-IPAM cannot write the status of %s %s: %s", kind, name, exc)
            self._revision = -1
            return 0
        log.debug("LB-IPAM wrote the status of %s %s", kind, name)
        return 1


def _decoded(kv: Any) -> Any:
    try:
        return decode(kv)
    except (MembraneError, ValueError):
        log.warning("LB-IPAM ignores %s: cannot be decoded", kv.key)
        return None
