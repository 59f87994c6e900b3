import asyncio

from membrane.identity.labels import Label, canonical, identity_labels_for_pod, is_identity_relevant
from membrane.identity.reserved import identity_name, next_free_identity
from membrane.store import keys
from membrane.store.base import Put
from membrane.store.identities import IdentityAllocator
from membrane.store.memory import MemoryStore


def test_label_parsing_and_printing():
    assert str(Label.parse("k8s:app=web")) == "k8s:app=web"
    assert Label.parse("app=web") == Label("k8s", "app", "web")
    assert str(Label.parse("reserved:host")) == "reserved:host"
    # A key with a DNS prefix is not mistaken for a source.
    assert Label.parse("app.kubernetes.io/name=db") == Label("k8s", "app.kubernetes.io/name", "db")


def test_identity_filter_follows_cilium_defaults():
    assert is_identity_relevant("app")
    assert is_identity_relevant("io.kubernetes.pod.namespace")
    assert is_identity_relevant("app.kubernetes.io/name")
    assert not is_identity_relevant("pod-template-hash")
    assert not is_identity_relevant("controller-revision-hash")
    assert not is_identity_relevant("statefulset.kubernetes.io/pod-name")
    assert not is_identity_relevant("io.kubernetes.container.name")


def test_pod_label_set_has_namespace_service_account_and_cluster():
    labels = identity_labels_for_pod("x", {"app": "a", "pod-template-hash": "abc"}, {"team": "red"})
    assert canonical(labels) == [
        "k8s:app=a",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=x",
        "k8s:io.cilium.k8s.namespace.labels.team=red",
        "k8s:io.cilium.k8s.policy.cluster=default",
        "k8s:io.cilium.k8s.policy.serviceaccount=default",
        "k8s:io.kubernetes.pod.namespace=x",
    ]


def test_reserved_names():
    assert identity_name(1) == "host"
    assert identity_name(2) == "world"
    assert identity_name(6) == "remote-node"
    assert identity_name(300) == "300"


def test_next_free_identity_wraps():
    assert next_free_identity(set(), 255) == 256
    assert next_free_identity({256, 257}, 257) == 258
    assert next_free_identity({65535, 256}, 65534) == 257


async def test_same_labels_same_identity_across_allocators():
    store = MemoryStore()
    web = identity_labels_for_pod("x", {"app": "web"}, {})
    db = identity_labels_for_pod("x", {"app": "db"}, {})
    a, b = IdentityAllocator(store), IdentityAllocator(store)
    results = await asyncio.gather(*(alloc.allocate(web) for alloc in (a, b, a, b)))
    assert len({r.id for r in results}) == 1
    assert results[0].id >= 256
    other = await b.allocate(db)
    assert other.id != results[0].id


async def test_gc_removes_only_unreferenced_identities():
    store = MemoryStore()
    alloc = IdentityAllocator(store)
    used = await alloc.allocate(identity_labels_for_pod("x", {"app": "used"}, {}))
    unused = await alloc.allocate(identity_labels_for_pod("x", {"app": "unused"}, {}))
    await store.put(keys.endpoint_key("n1", "c1"), b'{"identity": %d}' % used.id)
    assert await alloc.collect_unreferenced() == [unused.id]
    assert await alloc.lookup(unused.labels) is None
    assert (await alloc.lookup(used.labels)) is not None


async def test_gc_loses_against_a_concurrent_new_reference():
    store = MemoryStore()
    alloc = IdentityAllocator(store)
    ident = await alloc.allocate(identity_labels_for_pod("x", {"app": "new"}, {}))
    original_list = store.list

    async def list_then_reference(prefix: str):  # an endpoint appears right after GC listed identities
        result = await original_list(prefix)
        if prefix == keys.IDENTITY_BY_ID:
            compare, touch = ident.touch_ops()
            ok = await store.txn([compare], [touch, Put(keys.endpoint_key("n1", "c9"), b'{"identity": 1}')])
            assert ok.succeeded
        return result

    store.list = list_then_reference  # type: ignore[method-assign]
    assert await alloc.collect_unreferenced() == []
    store.list = original_list  # type: ignore[method-assign]
    assert await alloc.lookup(ident.labels) is not None
