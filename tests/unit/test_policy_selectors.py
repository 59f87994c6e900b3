"""Selectors over identities and the incremental selector cache."""

from __future__ import annotations

import random
from ipaddress import IPv4Network

from membrane.identity.labels import Label, identity_labels_for_pod
from membrane.identity.reserved import HOST, MIN_LOCAL_IDENTITY, WORLD
from membrane.policy.selectors import (
    WILDCARD,
    CIDRSelector,
    Requirement,
    Selector,
    SelectorCache,
    allocate_cidr_identities,
    cidr_identity_labels,
    match_label,
    reserved_identity_labels,
)

WEB = identity_labels_for_pod("shop", {"app": "web"}, {})
DB = identity_labels_for_pod("shop", {"app": "db", "tier": "data"}, {})
OTHER = identity_labels_for_pod("lab", {"app": "web"}, {"team": "red"})
CONTAINER = frozenset({Label("container", "app", "web")})


def table() -> dict[int, frozenset[Label]]:
    return {**reserved_identity_labels(), 300: WEB, 301: DB, 302: OTHER, 303: CONTAINER}


def select(selector: Selector | CIDRSelector, identities: dict[int, frozenset[Label]] | None = None) -> set[int]:
    return set(SelectorCache(identities or table()).select(selector))


def test_source_qualified_keys() -> None:
    assert select(Selector((match_label("k8s", "app", "web"),))) == {300, 302}
    assert select(Selector((match_label("any", "app", "web"),))) == {300, 302, 303}
    assert select(Selector((match_label("container", "app", "web"),))) == {303}
    assert select(Selector((Requirement("reserved", "host", "Exists"),))) == {HOST.id}


def test_operators_follow_kubernetes_semantics() -> None:
    namespace_shop = match_label("k8s", "io.kubernetes.pod.namespace", "shop")
    assert select(Selector((namespace_shop, Requirement("k8s", "app", "NotIn", ("db",))))) == {300}
    assert select(Selector((namespace_shop, Requirement("k8s", "tier", "DoesNotExist")))) == {300}
    assert select(Selector((Requirement("k8s", "app", "In", ("web", "db")),))) == {300, 301, 302}
    assert select(Selector((Requirement("k8s", "io.cilium.k8s.namespace.labels.team", "Exists"),))) == {302}
    # NotIn/DoesNotExist alone also select identities without the label (reserved ones too).
    assert WORLD.id in select(Selector((Requirement("k8s", "app", "NotIn", ("web",)),)))


def test_the_empty_selector_selects_every_identity() -> None:
    assert select(WILDCARD) == set(table())


def test_cache_agrees_with_direct_matching_on_random_tables() -> None:
    rng = random.Random(7)
    keys, values, sources = ["app", "tier", "env"], ["a", "b", "c"], ["k8s", "container"]
    identities = {
        256 + n: frozenset(Label(rng.choice(sources), key, rng.choice(values)) for key in keys if rng.random() < 0.7)
        for n in range(300)
    }
    operators = ["In", "NotIn", "Exists", "DoesNotExist"]
    cache = SelectorCache(identities)
    for _ in range(300):
        requirements = []
        for _ in range(rng.randint(0, 3)):
            op = rng.choice(operators)
            values_ = tuple(rng.sample(values, rng.randint(1, 2))) if op in ("In", "NotIn") else ()
            requirements.append(Requirement(rng.choice(["k8s", "container", "any"]), rng.choice(keys), op, values_))
        selector = Selector(tuple(requirements))
        expected = {i for i, labels in identities.items() if selector.matches(labels)}
        assert cache.select(selector) == expected, selector


def test_updates_report_what_changed_for_each_selector() -> None:
    cache = SelectorCache(table())
    web = Selector((match_label("any", "app", "web"),))
    data = Selector((match_label("k8s", "tier", "data"),))
    assert cache.select(web) == {300, 302, 303}
    revision = cache.revision

    new = identity_labels_for_pod("shop", {"app": "web", "tier": "data"}, {})
    changes = cache.update({400: new}, removed=[302])
    assert cache.revision == revision + 1 and changes.revision == cache.revision
    assert changes.selectors[web].added == {400} and changes.selectors[web].removed == {302}
    assert data not in changes.selectors  # not registered yet
    assert cache.select(web) == {300, 303, 400}
    assert cache.select(data) == {301, 400}

    # Relabelling is remove + add; a no-op update changes nothing and keeps the revision.
    changes = cache.update({400: DB})
    assert changes.selectors[web].removed == {400} and data not in changes.selectors
    assert not cache.update({400: DB}) and cache.revision == changes.revision
    assert cache.labels_of(302) is None and cache.labels_of(400) == DB


def test_retain_forgets_selectors_no_longer_used() -> None:
    cache = SelectorCache(table())
    keep, drop = Selector((match_label("any", "app", "web"),)), Selector((match_label("any", "app", "db"),))
    cache.select(keep)
    cache.select(drop)
    cache.retain([keep])
    assert set(cache.selections()) == {keep}


def test_cidr_selectors_select_world_and_cidr_identities_by_containment() -> None:
    prefixes = [IPv4Network(p) for p in ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.168.0.0/16")]
    cidr = allocate_cidr_identities(prefixes)
    identities = {**table(), **{identity: cidr_identity_labels(p) for p, identity in cidr.items()}}
    ids = {str(p): i for p, i in cidr.items()}
    ten = CIDRSelector(IPv4Network("10.0.0.0/8"), (IPv4Network("10.1.0.0/16"),))
    assert select(ten, identities) == {ids["10.0.0.0/8"]}  # 10.1.2.0/24 lies in the exception
    everything = select(CIDRSelector(IPv4Network("0.0.0.0/0")), identities)
    assert everything == {WORLD.id, *cidr.values()}  # never a pod identity
    # World is a CIDR identity too: every CIDR identity carries reserved:world.
    assert select(Selector((Requirement("reserved", "world", "Exists"),)), identities) == everything


def test_cidr_selections_follow_new_prefixes() -> None:
    cache = SelectorCache(table())
    selector = CIDRSelector(IPv4Network("10.0.0.0/8"))
    assert cache.select(selector) == frozenset()
    changes = cache.update({MIN_LOCAL_IDENTITY: cidr_identity_labels(IPv4Network("10.9.0.0/16"))})
    assert changes.selectors[selector].added == {MIN_LOCAL_IDENTITY}


def test_cidr_identity_allocation_is_stable_and_deterministic() -> None:
    a, b, c = (IPv4Network(p) for p in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
    first = allocate_cidr_identities([c, a, IPv4Network("0.0.0.0/0")])
    assert first == {a: MIN_LOCAL_IDENTITY, c: MIN_LOCAL_IDENTITY + 1}  # 0.0.0.0/0 is the world identity
    second = allocate_cidr_identities([b, c], previous=first)
    assert second == {b: MIN_LOCAL_IDENTITY, c: MIN_LOCAL_IDENTITY + 1}  # c keeps its number, b reuses a's


def test_selector_text() -> None:
    selector = Selector(
        (
            match_label("k8s", "app", "web"),
            Requirement("any", "tier", "In", ("b", "a")),
            Requirement("k8s", "x", "DoesNotExist"),
        )
    )
    assert str(selector) == "any:tier in (a,b),k8s:app=web,!k8s:x"
    assert str(WILDCARD) == "{}"
    assert str(CIDRSelector(IPv4Network("10.0.0.0/8"), (IPv4Network("10.1.0.0/16"),))) == (
        "cidr:10.0.0.0/8 except 10.1.0.0/16"
    )
