"""Every store backend against the one contract of membrane.store.base.Store.

The etcd backend runs against one real etcd (started once per session; skipped without the
binary). Each test starts from an empty keyspace: the backend deletes every key and revokes
every lease first. etcd's lease clock is real time, so its ``advance`` sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from etcd3gw.client import Etcd3Client

from membrane.store.base import Store
from membrane.store.etcd import EtcdStore
from membrane.testing.etcd import EtcdCluster, etcd_skip_reason, running_etcd
from membrane.testing.store_contract import MemoryBackend, SqliteBackend, StoreBackend, StoreContract


class EtcdBackend(StoreBackend):
    """Clients of one shared etcd; :meth:`reset` empties it for the next test.

    Lease TTLs are whole seconds and etcd's lessor sweeps every 500 ms, so ``ttl`` is 2 s: a
    keepalive every 0.6 ttl keeps a lease with more than a second to spare on a busy machine.
    """

    name = "etcd"
    ttl = 2.0

    def __init__(self, cluster: EtcdCluster) -> None:
        super().__init__()
        self.cluster = cluster

    def reset(self) -> None:
        member = self.cluster.spec.members[0]
        client = Etcd3Client(member.host, member.client_port, api_path="/v3/", timeout=10)
        leases = client.post(client.get_url("/lease/leases"), json={}).get("leases", [])
        for lease in leases:
            client.post(client.get_url("/kv/lease/revoke"), json={"ID": lease["ID"]})
        client.delete("\0", range_end="\0")
        client.session.close()

    async def open(self) -> Store:
        return self._track(EtcdStore(self.cluster.url))

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def compact(self, store: Store, revision: int) -> None:
        assert isinstance(store, EtcdStore)
        await store.compact(revision)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if (reason := etcd_skip_reason()) is not None:
        pytest.skip(reason)
    with running_etcd(base_dir=tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(params=["memory", "sqlite", "etcd"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreBackend]:
    chosen: StoreBackend
    if request.param == "memory":
        chosen = MemoryBackend()
    elif request.param == "sqlite":
        chosen = SqliteBackend(tmp_path / "s.db")
    else:
        etcd = EtcdBackend(request.getfixturevalue("etcd_cluster"))
        etcd.reset()
        chosen = etcd
    try:
        yield chosen
    finally:
        await chosen.close()


class TestStoreContract(StoreContract):
    pass
