"""The etcd store against real clusters: losing a member, TLS with client certificates, shutdown.

Each test runs its own etcd on 127.0.0.1 (free ports, a temporary data dir), stopped by PID.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from membrane.core.errors import StoreError
from membrane.store import etcd as etcd_module
from membrane.store.base import EventType
from membrane.store.etcd import EtcdStore
from membrane.testing.etcd import etcd_skip_reason, running_etcd
from membrane.testing.store_contract import summary, watching

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason()))]


async def test_a_cluster_that_loses_a_member_keeps_serving_writes_reads_watches_and_leases(tmp_path: Path) -> None:
    with running_etcd(members=3, base_dir=tmp_path) as etcd:
        store = EtcdStore(etcd.url)  # talks to the first member, which is about to go
        late = EtcdStore(etcd.url)
        try:
            start = await store.put("/f/before", b"0")
            async with watching(store, "/f/", start + 1) as events:
                first = await store.put("/f/a", b"a")
                assert summary(await events.next()) == ("PUT", "/f/a", b"a", first)

                etcd.kill_member(0)

                second = await store.put("/f/b", b"b")
                kv = await store.get("/f/b")
                assert kv is not None and kv.value == b"b"
                # The watch that was connected to the dead member resumes elsewhere, missing nothing.
                assert summary(await events.next()) == ("PUT", "/f/b", b"b", second)
                # A client whose first endpoint is dead from the start works too.
                lease = await late.grant_lease(5)
                third = await late.put("/f/leased", b"l", lease=lease)
                await late.keepalive(lease)
                assert summary(await events.next()) == ("PUT", "/f/leased", b"l", third)
                await late.revoke_lease(lease)
                gone = await events.next()
                assert (gone.type, gone.kv.key) == (EventType.DELETE, "/f/leased")
            kvs, _ = await late.list("/f/")
            assert [kv.key for kv in kvs] == ["/f/a", "/f/b", "/f/before"]
        finally:
            await store.close()
            await late.close()


async def test_tls_with_a_client_certificate_works_and_without_one_is_refused_clearly(tmp_path: Path) -> None:
    with running_etcd(tls=True, base_dir=tmp_path) as etcd:
        endpoint = etcd.spec.members[0].endpoint
        store = EtcdStore(etcd.url)
        try:
            rev = await store.put("/t/k", b"secret")
            async with watching(store, "/t/", rev) as events:
                assert summary(await events.next()) == ("PUT", "/t/k", b"secret", rev)
        finally:
            await store.close()

        no_cert = etcd.spec.store_url(client_cert=False)
        anonymous = EtcdStore(no_cert)
        with pytest.raises(StoreError) as refused:
            await anonymous.get("/t/k")
        await anonymous.close()
        assert str(refused.value) == (
            f"etcd store {no_cert}: TLS with https://{endpoint} failed: the member ended the handshake: "
            "it requires a client certificate (add cert=PATH&key=PATH)"
        )

        plain = EtcdStore(f"etcd://{endpoint}")
        with pytest.raises(StoreError, match=r"if the members use TLS, add cacert=PATH&cert=PATH&key=PATH"):
            await plain.get("/t/k")
        await plain.close()


async def test_closing_the_store_ends_a_watch_at_once_even_while_it_reconnects(tmp_path: Path) -> None:
    with running_etcd(base_dir=tmp_path) as etcd:
        store = EtcdStore(etcd.url)
        rev = await store.put("/c/k", b"v")
        async with watching(store, "/c/", rev) as events:
            await events.next()
            pending = asyncio.create_task(events.next())
            etcd.kill_member(0)  # the watch now retries a member that is gone
            await store.close()
            with pytest.raises(StopAsyncIteration):
                async with asyncio.timeout(2):  # "at once": well before any connect timeout
                    await pending


async def test_list_reads_a_large_prefix_in_pages_at_one_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etcd_module, "LIST_PAGE", 3)
    with running_etcd(base_dir=tmp_path) as etcd:
        store = EtcdStore(etcd.url)
        try:
            keys = [f"/p/{i:02d}" for i in range(10)]
            for key in keys:
                last = await store.put(key, key.encode())
            await store.put("/p0", b"outside the prefix")
            kvs, revision = await store.list("/p/")
            assert [kv.key for kv in kvs] == keys
            assert revision == last + 1
        finally:
            await store.close()
