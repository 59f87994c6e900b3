"""LB-IPAM allocation rules, as Cilium's operator applies them to pools and LoadBalancer Services."""

from __future__ import annotations

from typing import Any

from membrane.api import k8s
from membrane.api.cilium import CiliumLoadBalancerIPPool
from membrane.api.meta import condition
from membrane.loadbalancer.lbipam import (
    IPS_AVAILABLE_CONDITION,
    IPS_TOTAL_CONDITION,
    IPS_USED_CONDITION,
    POOL_CONFLICT_CONDITION,
    SATISFIED_CONDITION,
    Allocation,
    allocate,
    pool_status,
    requested_families,
    service_status,
)

NOW = "2024-05-01T12:00:00Z"
LATER = "2024-05-01T13:00:00Z"


def pool(
    name: str, *blocks: dict[str, str], created: str = "2024-05-01T10:00:00Z", **spec: Any
) -> CiliumLoadBalancerIPPool:
    return CiliumLoadBalancerIPPool.model_validate(
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumLoadBalancerIPPool",
            "metadata": {"name": name, "creationTimestamp": created, "generation": 1},
            "spec": {"blocks": list(blocks), **spec},
        }
    )


def svc(
    name: str,
    *,
    namespace: str = "default",
    ports: tuple[int, ...] = (80,),
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ingress: tuple[str, ...] = (),
    created: str = "2024-05-01T11:00:00Z",
    **spec: Any,
) -> k8s.Service:
    body: dict[str, Any] = {"type": "LoadBalancer", "ports": [{"name": f"p{p}", "port": p} for p in ports], **spec}
    data: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": created,
            "generation": 1,
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "spec": body,
    }
    if ingress:
        data["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}}
    return k8s.Service.model_validate(data)


def ips(result: Allocation, name: str, namespace: str = "default") -> tuple[str, ...]:
    return result.services[(namespace, name)].ips


def reason(result: Allocation, name: str, namespace: str = "default") -> tuple[bool, str, str]:
    found = result.services[(namespace, name)]
    return found.satisfied, found.reason, found.message


def apply(services: list[k8s.Service], result: Allocation) -> list[k8s.Service]:
    """The Services as the operator leaves them: each with its status written back."""
    out = []
    for service in services:
        found = result.services.get((service.namespace or "default", service.name))
        if found is not None:
            status = service_status(service, found, NOW)
            service = service.model_copy(update={"status": status})
        out.append(service)
    return out


# --- blocks ---------------------------------------------------------------------------------------------


def test_services_get_the_first_free_ip_of_the_blocks_in_order():
    pools = [pool("blue", {"start": "20.0.0.5", "stop": "20.0.0.6"}, {"cidr": "10.0.10.0/24"})]
    result = allocate(pools, [svc("a", created="1"), svc("b", created="2"), svc("c", created="3")])
    assert [ips(result, n) for n in "abc"] == [("20.0.0.5",), ("20.0.0.6",), ("10.0.10.0",)]
    assert reason(result, "a") == (True, "satisfied", "")


def test_a_start_without_stop_is_one_ip_and_then_the_pool_is_out_of_ips():
    result = allocate([pool("one", {"start": "20.0.0.9"})], [svc("a", created="1"), svc("b", created="2")])
    assert ips(result, "a") == ("20.0.0.9",)
    assert ips(result, "b") == ()
    assert reason(result, "b") == (
        False,
        "out_of_ips",
        "All enabled CiliumLoadBalancerIPPools that match this service ran out of allocatable IPs",
    )


def test_without_any_pool_a_service_is_told_no_pool_matches():
    result = allocate([], [svc("a")])
    assert reason(result, "a") == (
        False,
        "no_pool",
        "There are no enabled CiliumLoadBalancerIPPools that match this service",
    )


def test_allow_first_last_no_reserves_network_and_broadcast_of_cidrs_only():
    pools = [pool("p", {"cidr": "10.0.10.0/30"}, {"start": "20.0.0.0", "stop": "20.0.0.3"}, allowFirstLastIPs="No")]
    services = [svc(f"s{i}", created=str(i)) for i in range(4)]
    result = allocate(pools, services)
    assert [ips(result, f"s{i}")[0] for i in range(4)] == ["10.0.10.1", "10.0.10.2", "20.0.0.0", "20.0.0.1"]
    state = result.pools["p"]
    assert (state.total, state.used, state.available) == (8, 6, 2)


def test_allow_first_last_is_ignored_for_a_slash_31_and_unset_means_yes():
    tiny = pool("tiny", {"cidr": "10.0.10.0/31"}, allowFirstLastIPs="No")
    result = allocate([tiny], [svc("a", created="1"), svc("b", created="2")])
    assert (ips(result, "a"), ips(result, "b")) == (("10.0.10.0",), ("10.0.10.1",))
    result = allocate([pool("p", {"cidr": "10.0.10.0/24"})], [svc("a")])
    assert ips(result, "a") == ("10.0.10.0",)


# --- responsibility -------------------------------------------------------------------------------------


def test_only_load_balancers_of_cilium_classes_or_no_class_are_served():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    services = [
        svc("plain", created="1"),
        svc("bgp", created="2", loadBalancerClass="io.cilium/bgp-control-plane"),
        svc("l2", created="3", loadBalancerClass="io.cilium/l2-announcer"),
        svc("other", created="4", loadBalancerClass="example.com/metal"),
        svc("nodeport", created="5", type="NodePort"),
    ]
    result = allocate(pools, services)
    assert sorted(name for _, name in result.services) == ["bgp", "l2", "plain"]
    assert [ips(result, n) for n in ("plain", "bgp", "l2")] == [("10.0.10.0",), ("10.0.10.1",), ("10.0.10.2",)]


def test_a_service_that_stops_being_eligible_loses_its_ip_and_condition():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    [served] = apply([svc("a")], allocate(pools, [svc("a")]))
    assert served.ingress_ips == ["10.0.10.0"]
    moved = served.model_copy(update={"spec": served.spec.model_copy(update={"loadBalancerClass": "example.com/x"})})
    result = allocate(pools, [moved])
    [stripped] = apply([moved], result)
    assert stripped.ingress_ips == []
    assert condition(stripped.status.conditions if stripped.status else None, SATISFIED_CONDITION) is None
    # Its IP is free again for the next Service.
    assert result.pools["p"].used == 0


def test_another_controllers_service_is_left_alone():
    foreign = svc("x", loadBalancerClass="example.com/metal", ingress=("10.0.10.7",))
    assert allocate([pool("p", {"cidr": "10.0.10.0/24"})], [foreign]).services == {}


# --- selectors ------------------------------------------------------------------------------------------


def test_service_selector_matches_labels_and_the_virtual_namespace_and_name_labels():
    pools = [
        pool("by-label", {"cidr": "10.0.1.0/24"}, serviceSelector={"matchLabels": {"color": "blue"}}),
        pool(
            "by-ns",
            {"cidr": "10.0.2.0/24"},
            serviceSelector={"matchLabels": {"io.kubernetes.service.namespace": "team"}},
        ),
        pool(
            "by-name",
            {"cidr": "10.0.3.0/24"},
            serviceSelector={
                "matchExpressions": [{"key": "io.kubernetes.service.name", "operator": "In", "values": ["c"]}]
            },
        ),
    ]
    services = [svc("a", labels={"color": "blue"}), svc("b", namespace="team"), svc("c"), svc("d")]
    result = allocate(pools, services)
    assert ips(result, "a") == ("10.0.1.0",)
    assert ips(result, "b", "team") == ("10.0.2.0",)
    assert ips(result, "c") == ("10.0.3.0",)
    assert reason(result, "d")[:2] == (False, "no_pool")


def test_a_service_leaving_the_selector_loses_the_ip_from_that_pool():
    blue = pool("blue", {"cidr": "10.0.1.0/24"}, serviceSelector={"matchLabels": {"color": "blue"}})
    red = pool("red", {"cidr": "10.0.2.0/24"}, serviceSelector={"matchLabels": {"color": "red"}})
    [a] = apply([svc("a", labels={"color": "blue"})], allocate([blue, red], [svc("a", labels={"color": "blue"})]))
    recolored = a.model_copy(update={"metadata": a.metadata.model_copy(update={"labels": {"color": "red"}})})
    assert ips(allocate([blue, red], [recolored]), "a") == ("10.0.2.0",)


# --- disabled and conflicting pools ---------------------------------------------------------------------


def test_a_disabled_pool_gives_nothing_new_but_keeps_what_it_gave():
    enabled = pool("p", {"cidr": "10.0.10.0/24"})
    [a] = apply([svc("a")], allocate([enabled], [svc("a")]))
    disabled = pool("p", {"cidr": "10.0.10.0/24"}, disabled=True)
    result = allocate([disabled], [a, svc("b", created="2024-05-01T11:30:00Z")])
    assert ips(result, "a") == ("10.0.10.0",)
    assert reason(result, "a")[0] is True
    assert reason(result, "b")[:2] == (False, "no_pool")


def test_the_later_of_two_overlapping_pools_is_conflicting_and_unused():
    old = pool("old", {"cidr": "10.0.10.0/24"}, created="2024-05-01T09:00:00Z")
    new = pool("new", {"cidr": "10.0.10.64/28"}, {"cidr": "10.0.20.0/24"}, created="2024-05-01T10:00:00Z")
    result = allocate([new, old], [svc("a")])
    assert result.pools["old"].conflict is None
    assert result.pools["new"].conflict == (
        "Pool conflicts since CIDR '10.0.10.64/28' overlaps CIDR '10.0.10.0/24' from IP Pool 'old'"
    )
    assert ips(result, "a") == ("10.0.10.0",)

    status = pool_status(new, result.pools["new"], NOW)
    found = condition(status.conditions, POOL_CONFLICT_CONDITION)
    assert found is not None and (found.status, found.reason) == ("True", "cidr_overlap")
    # The older one is explicitly not conflicting.
    found = condition(pool_status(old, result.pools["old"], NOW).conditions, POOL_CONFLICT_CONDITION)
    assert found is not None and (found.status, found.reason, found.message) == ("False", "resolved", "")


def test_equal_creation_times_make_the_later_name_the_conflicting_pool():
    a = pool("a", {"cidr": "10.0.10.0/24"})
    b = pool("b", {"cidr": "10.0.10.0/25"})
    assert allocate([b, a], []).pools["b"].conflict is not None
    assert allocate([b, a], []).pools["a"].conflict is None


def test_a_pool_whose_own_blocks_overlap_conflicts_with_itself():
    result = allocate([pool("self", {"cidr": "10.0.10.0/24"}, {"start": "10.0.10.5"})], [svc("a")])
    assert result.pools["self"].conflict == (
        "Pool conflicts since CIDR '10.0.10.0/24' overlaps CIDR '10.0.10.5 - 10.0.10.5' from IP Pool 'self'"
    )
    assert reason(result, "a")[:2] == (False, "no_pool")


# --- requested IPs --------------------------------------------------------------------------------------


def test_requested_ips_from_the_spec_and_both_annotation_names():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    services = [
        svc("spec", loadBalancerIP="10.0.10.50"),
        svc("anno", annotations={"lbipam.cilium.io/ips": "10.0.10.60, 10.0.10.61"}),
        svc("alias", annotations={"io.cilium/lb-ipam-ips": "10.0.10.70"}),
    ]
    result = allocate(pools, services)
    assert ips(result, "spec") == ("10.0.10.50",)
    assert ips(result, "anno") == ("10.0.10.60", "10.0.10.61")
    assert ips(result, "alias") == ("10.0.10.70",)


def test_requested_ip_failures_name_their_reason():
    pools = [
        pool("p", {"cidr": "10.0.10.0/24"}, allowFirstLastIPs="No"),
        pool("sel", {"cidr": "10.0.20.0/24"}, serviceSelector={"matchLabels": {"color": "red"}}),
    ]
    services = [
        svc("holder", created="1", loadBalancerIP="10.0.10.5"),
        svc("taken", created="2", loadBalancerIP="10.0.10.5"),
        svc("nowhere", created="3", loadBalancerIP="172.16.0.1"),
        svc("mismatch", created="4", loadBalancerIP="10.0.20.1"),
        svc("reserved", created="5", loadBalancerIP="10.0.10.255"),
    ]
    result = allocate(pools, services)
    assert ips(result, "holder") == ("10.0.10.5",)
    assert reason(result, "taken") == (
        False,
        "already_allocated",
        "The IP '10.0.10.5' is already allocated to another service",
    )
    assert reason(result, "nowhere") == (False, "no_pool", "No pool exists with a CIDR containing '172.16.0.1'")
    assert reason(result, "mismatch") == (
        False,
        "pool_selector_mismatch",
        "The pool with the CIDR containing '10.0.20.1', doesn't select this service",
    )
    assert reason(result, "reserved")[:2] == (False, "already_allocated")


def test_a_kept_ip_that_is_no_longer_requested_is_replaced():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    moved = svc("a", ingress=("10.0.10.0",), loadBalancerIP="10.0.10.9")
    assert ips(allocate(pools, [moved]), "a") == ("10.0.10.9",)


# --- sharing --------------------------------------------------------------------------------------------

SHARE = {"lbipam.cilium.io/sharing-key": "k"}


def test_compatible_services_with_one_sharing_key_share_one_ip():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    result = allocate(
        pools,
        [svc("a", created="1", annotations=SHARE), svc("b", created="2", ports=(443,), annotations=SHARE)],
    )
    assert ips(result, "a") == ips(result, "b") == ("10.0.10.0",)
    assert result.pools["p"].used == 1


def test_the_alias_sharing_key_and_requested_shared_ip():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    alias = {"io.cilium/lb-ipam-sharing-key": "k"}
    result = allocate(
        pools,
        [
            svc("a", created="1", annotations=alias, loadBalancerIP="10.0.10.9"),
            svc("b", created="2", ports=(443,), annotations=alias, loadBalancerIP="10.0.10.9"),
            svc("c", created="3", ports=(80,), annotations=alias, loadBalancerIP="10.0.10.9"),
        ],
    )
    assert ips(result, "b") == ("10.0.10.9",)
    assert reason(result, "c") == (
        False,
        "already_allocated_incompatible_service",
        "The IP '10.0.10.9' is already allocated to an incompatible service. Reason: same port",
    )


def test_incompatible_sharers_get_another_ip():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    local = {"externalTrafficPolicy": "Local"}
    cases = {
        "same port (protocol ignored)": [svc("b", created="2", annotations=SHARE)],
        "other traffic policy": [svc("b", created="2", ports=(443,), annotations=SHARE, **local)],
        "other namespace": [svc("b", namespace="x", created="2", ports=(443,), annotations=SHARE)],
    }
    for case, others in cases.items():
        result = allocate(pools, [svc("a", created="1", annotations=SHARE), *others])
        b = others[0]
        assert ips(result, "b", b.namespace or "default") == ("10.0.10.1",), case


def test_local_traffic_policy_sharers_need_identical_non_empty_selectors():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]

    def local(name: str, port: int, selector: dict[str, str] | None) -> k8s.Service:
        return svc(
            name, created=name, ports=(port,), annotations=SHARE, externalTrafficPolicy="Local", selector=selector
        )

    same = allocate(pools, [local("1", 80, {"app": "web"}), local("2", 443, {"app": "web"})])
    assert ips(same, "1") == ips(same, "2")
    differ = allocate(pools, [local("1", 80, {"app": "web"}), local("2", 443, {"app": "db"})])
    assert ips(differ, "1") != ips(differ, "2")
    empty = allocate(pools, [local("1", 80, None), local("2", 443, None)])
    assert ips(empty, "1") != ips(empty, "2")


def test_cross_namespace_sharing_needs_both_sides_to_allow_it():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]

    def shared(name: str, namespace: str, port: int, allow: str) -> k8s.Service:
        annotations = {**SHARE, "lbipam.cilium.io/sharing-cross-namespace": allow}
        return svc(name, namespace=namespace, created=name, ports=(port,), annotations=annotations)

    both = allocate(pools, [shared("a", "one", 80, "two"), shared("b", "two", 443, "*")])
    assert ips(both, "a", "one") == ips(both, "b", "two")
    one_side = allocate(pools, [shared("a", "one", 80, "two"), shared("b", "two", 443, "three")])
    assert ips(one_side, "a", "one") != ips(one_side, "b", "two")


def test_a_shared_ip_is_freed_only_when_the_last_sharer_leaves():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    services = [svc("a", created="1", annotations=SHARE), svc("b", created="2", ports=(443,), annotations=SHARE)]
    a, b = apply(services, allocate(pools, services))
    assert a.ingress_ips == b.ingress_ips == ["10.0.10.0"]
    only_b = allocate(pools, [b, svc("c", created="3")])
    assert ips(only_b, "b") == ("10.0.10.0",)
    assert ips(only_b, "c") == ("10.0.10.1",)
    none_left = allocate(pools, [svc("c", created="3")])
    assert ips(none_left, "c") == ("10.0.10.0",)


# --- re-import and determinism --------------------------------------------------------------------------


def test_ips_services_already_show_are_kept_and_never_given_to_a_newer_service():
    pools = [pool("p", {"cidr": "10.0.10.0/24"})]
    old = svc("old", created="2", ingress=("10.0.10.7",))
    result = allocate(pools, [svc("new", created="1", loadBalancerIP="10.0.10.7"), old])
    assert ips(result, "old") == ("10.0.10.7",)
    assert reason(result, "new")[:2] == (False, "already_allocated")


def test_an_ingress_ip_outside_every_pool_is_stripped_and_replaced():
    result = allocate([pool("p", {"cidr": "10.0.10.0/24"})], [svc("a", ingress=("172.16.0.1",))])
    assert ips(result, "a") == ("10.0.10.0",)


def test_running_again_on_the_written_status_changes_nothing():
    pools = [
        pool("p", {"cidr": "10.0.10.0/30"}, allowFirstLastIPs="No"),
        pool("q", {"cidr": "10.0.10.0/24"}, created="2024-05-01T10:30:00Z"),
    ]
    services = [svc(f"s{i}", created=str(i), annotations=SHARE if i % 2 else {}, ports=(80 + i,)) for i in range(5)]
    first = allocate(pools, services)
    written = apply(services, first)
    second = allocate(pools, written)
    assert second == first
    assert apply(written, second) == written
    statuses = [pool_status(p, first.pools[p.name], NOW) for p in pools]
    again = [
        pool_status(p.model_copy(update={"status": s}), second.pools[p.name], LATER)
        for p, s in zip(pools, statuses, strict=True)
    ]
    assert again == statuses


def test_pool_counts_are_conditions_with_the_count_as_message():
    result = allocate([pool("p", {"cidr": "10.0.10.0/24"})], [svc("a")])
    status = pool_status(pool("p", {"cidr": "10.0.10.0/24"}), result.pools["p"], NOW)
    found = {c.type: (c.status, c.reason, c.message) for c in status.conditions or ()}
    assert found[IPS_TOTAL_CONDITION] == ("Unknown", "noreason", "256")
    assert found[IPS_AVAILABLE_CONDITION] == ("Unknown", "noreason", "255")
    assert found[IPS_USED_CONDITION] == ("Unknown", "noreason", "1")
    assert [c.type for c in status.conditions or ()] == [
        POOL_CONFLICT_CONDITION,
        IPS_TOTAL_CONDITION,
        IPS_AVAILABLE_CONDITION,
        IPS_USED_CONDITION,
    ]


def test_the_condition_transition_time_moves_only_when_its_status_changes():
    pools = [pool("p", {"start": "10.0.10.1"})]
    [a] = apply([svc("a", created="1")], allocate(pools, [svc("a", created="1")]))
    unsatisfied = svc("b", created="2")
    status = service_status(unsatisfied, allocate(pools, [a, unsatisfied]).services[("default", "b")], NOW)
    later = unsatisfied.model_copy(update={"status": status})
    again = service_status(later, allocate(pools, [a, later]).services[("default", "b")], LATER)
    assert again == status
    found = condition(status.conditions, SATISFIED_CONDITION)
    assert found is not None and (found.status, found.lastTransitionTime) == ("False", NOW)


# --- families -------------------------------------------------------------------------------------------


def test_families_follow_the_ip_family_policy():
    def families(**spec: Any) -> set[int]:
        return set(requested_families(svc("a", **spec)))

    assert families() == {4}
    assert families(ipFamilies=["IPv6"]) == {6}
    assert families(ipFamilyPolicy="PreferDualStack") == {4, 6}
    assert families(ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv6"]) == {6}
    assert set(requested_families(svc("a", ipFamilyPolicy="PreferDualStack"), ipv6=False)) == {4}
    assert set(requested_families(svc("a", ipFamilyPolicy="RequireDualStack"), ipv6=False)) == {4, 6}


def test_dual_stack_services_get_one_ip_of_each_family():
    pools = [pool("v4", {"cidr": "10.0.10.0/24"}), pool("v6", {"cidr": "2001:db8::/64"})]
    result = allocate(pools, [svc("a", ipFamilyPolicy="RequireDualStack"), svc("b", ipFamilies=["IPv6"])])
    assert ips(result, "a") == ("10.0.10.0", "2001:db8::")
    assert ips(result, "b") == ("2001:db8::1",)
    assert result.pools["v6"].total == 2**64
    only_v4 = allocate(pools[:1], [svc("a", ipFamilyPolicy="RequireDualStack")])
    assert ips(only_v4, "a") == ("10.0.10.0",)
    assert reason(only_v4, "a")[:2] == (False, "no_pool")
