"""EndpointSlices derived from a Service and its pods, and read back as backends; the model's validation."""

from __future__ import annotations

from typing import Any

import pytest

from membrane.api import k8s
from membrane.api.registry import ObjectInvalid, lookup_kind, validate_object
from membrane.loadbalancer.endpointslices import (
    MAX_ENDPOINTS_PER_SLICE,
    SliceBackend,
    derive_endpoint_slices,
    slice_backends,
)


def service(ports: list[dict[str, Any]], selector: dict[str, str] | None = None, namespace: str = "default",
            **spec: Any) -> k8s.Service:
    return k8s.Service.model_validate({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace, "uid": "svc-uid"},
        "spec": {**({"selector": selector} if selector is not None else {}), "ports": ports, **spec},
    })


def pod(name: str, labels: dict[str, str] | None = None, *, namespace: str = "default", node: str | None = "n1",
        ports: list[dict[str, Any]] | None = None, ready: bool | None = True, terminating: bool = False,
        phase: str = "Running", **spec: Any) -> k8s.Pod:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                            "labels": {"app": "web"} if labels is None else labels}
    if terminating:
        meta |= {"deletionTimestamp": "2026-01-01T00:00:30Z", "deletionGracePeriodSeconds": 30}
    status: dict[str, Any] = {"phase": phase}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return k8s.Pod.model_validate({
        "apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status,
        "spec": {**({"nodeName": node} if node else {}),
                 "containers": [{"name": "c", "image": "i", **({"ports": ports} if ports else {})}], **spec},
    })


ADDRESSES = {f"p{i}": f"10.244.{i // 250}.{i % 250 + 2}" for i in range(300)}


def address_of(p: k8s.Pod) -> str | None:
    return ADDRESSES.get(p.name)


def endpoints_by_pod(slices: list[k8s.EndpointSlice]) -> dict[str, k8s.EndpointConditions]:
    return {e.targetRef.name or "": e.conditions for s in slices for e in s.endpoints if e.targetRef}


def test_a_selector_service_gets_one_slice_with_its_ready_pods() -> None:
    svc = service([{"name": "http", "port": 80, "targetPort": 8080}], {"app": "web"})
    pods = [pod("p0"), pod("p1"), pod("p2", {"app": "db"}), pod("p3", node=None)]
    [eps] = derive_endpoint_slices(svc, pods, address_of)
    assert eps.name.startswith("web-") and len(eps.name) == len("web-") + 5
    assert eps.namespace == "default" and eps.addressType == "IPv4"
    assert eps.labels == {"kubernetes.io/service-name": "web",
                          "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    assert eps.ports == (k8s.EndpointPort(name="http", protocol="TCP", port=8080),)
    assert [(e.addresses, e.nodeName, e.targetRef.name if e.targetRef else None) for e in eps.endpoints] == [
        (("10.244.0.2",), "n1", "p0"), (("10.244.0.3",), "n1", "p1")]
    assert eps.endpoints[0].conditions == k8s.EndpointConditions(ready=True, serving=True, terminating=False)
    # The derived object is valid as the API checks it, and derivation is deterministic.
    validate_object(eps.to_dict(), lookup_kind("endpointslices"))
    assert derive_endpoint_slices(svc, list(reversed(pods)), address_of) == [eps]


def test_pods_without_an_address_or_finished_are_left_out() -> None:
    svc = service([{"port": 80}], {"app": "web"})
    pods = [pod("p0"), pod("nope"), pod("p1", phase="Succeeded"), pod("p2", phase="Failed")]
    [eps] = derive_endpoint_slices(svc, pods, address_of)
    assert [e.targetRef.name for e in eps.endpoints if e.targetRef] == ["p0"]
    assert derive_endpoint_slices(svc, [pod("nope")], address_of) == []


def test_terminating_and_not_ready_pods_carry_their_conditions() -> None:
    svc = service([{"port": 80}], {"app": "web"})
    pods = [pod("p0"), pod("p1", terminating=True), pod("p2", ready=False, terminating=True), pod("p3", ready=False)]
    conditions = endpoints_by_pod(derive_endpoint_slices(svc, pods, address_of))
    assert conditions == {
        "p0": k8s.EndpointConditions(ready=True, serving=True, terminating=False),
        "p1": k8s.EndpointConditions(ready=False, serving=True, terminating=True),
        "p2": k8s.EndpointConditions(ready=False, serving=False, terminating=True),
        "p3": k8s.EndpointConditions(ready=False, serving=False, terminating=False),
    }


def test_a_pod_without_a_ready_condition_counts_as_ready() -> None:
    # A pod whose status nobody writes (its containers were started by a CNI runtime).
    svc = service([{"port": 80}], {"app": "web"})
    conditions = endpoints_by_pod(derive_endpoint_slices(svc, [pod("p0", ready=None)], address_of))
    assert conditions["p0"].ready is True


def test_publish_not_ready_addresses_makes_every_endpoint_ready() -> None:
    svc = service([{"port": 80}], {"app": "web"}, publishNotReadyAddresses=True)
    conditions = endpoints_by_pod(derive_endpoint_slices(svc, [pod("p0", ready=False), pod("p1", terminating=True)],
                                                         address_of))
    assert conditions["p0"] == k8s.EndpointConditions(ready=True, serving=False, terminating=False)
    assert conditions["p1"] == k8s.EndpointConditions(ready=True, serving=True, terminating=True)


def test_a_named_target_port_resolves_per_pod_into_one_slice_per_port_set() -> None:
    svc = service([{"name": "http", "port": 80, "targetPort": "web"}, {"name": "metrics", "port": 9090}],
                  {"app": "web"})
    pods = [
        pod("p0", ports=[{"name": "web", "containerPort": 8080}]),
        pod("p1", ports=[{"name": "web", "containerPort": 8080}]),
        pod("p2", ports=[{"name": "web", "containerPort": 8081}]),
        pod("p3", ports=[{"name": "web", "containerPort": 8082, "protocol": "UDP"}]),  # protocol must match
    ]
    slices = derive_endpoint_slices(svc, pods, address_of)
    by_ports = {tuple((p.name, p.port) for p in s.ports or ()): [e.targetRef.name for e in s.endpoints if e.targetRef]
                for s in slices}
    assert by_ports == {
        (("http", 8080), ("metrics", 9090)): ["p0", "p1"],
        (("http", 8081), ("metrics", 9090)): ["p2"],
        (("metrics", 9090),): ["p3"],  # its http port is left out: it declares no TCP port "web"
    }
    assert len({s.name for s in slices}) == 3
    assert {b.port for b in slice_backends(slices, "http")} == {8080, 8081}
    assert [(b.address, b.port) for b in slice_backends(slices, "http") if b.port == 8081] == [("10.244.0.4", 8081)]
    assert len(slice_backends(slices, "metrics")) == 4


def test_more_than_100_endpoints_are_split_and_names_stay_stable() -> None:
    svc = service([{"port": 80}], {"app": "web"})
    pods = [pod(f"p{i}") for i in range(250)]
    slices = derive_endpoint_slices(svc, pods, address_of)
    assert sorted(len(s.endpoints) for s in slices) == [50, MAX_ENDPOINTS_PER_SLICE, MAX_ENDPOINTS_PER_SLICE]
    assert len(slice_backends(slices, None)) == 250
    # Fewer pods: the slices keep their names (updated in place, not replaced).
    fewer = derive_endpoint_slices(svc, pods[:180], address_of)
    assert {s.name for s in fewer} < {s.name for s in slices}


def test_only_pods_of_the_services_namespace_are_selected() -> None:
    svc = service([{"port": 80}], {"app": "web"}, namespace="prod")
    pods = [pod("p0", namespace="prod"), pod("p1", namespace="default")]
    [eps] = derive_endpoint_slices(svc, pods, address_of)
    assert eps.namespace == "prod"
    assert [e.targetRef.name for e in eps.endpoints if e.targetRef] == ["p0"]


def test_a_selectorless_service_gets_no_slices() -> None:
    assert derive_endpoint_slices(service([{"port": 80}]), [pod("p0")], address_of) == []
    assert derive_endpoint_slices(service([{"port": 80}], {}), [pod("p0")], address_of) == []


def test_hostname_is_set_for_pods_naming_the_service_as_subdomain() -> None:
    svc = service([{"port": 80}], {"app": "web"})
    [eps] = derive_endpoint_slices(svc, [pod("p0", hostname="a", subdomain="web"), pod("p1", hostname="b")],
                                   address_of)
    assert [e.hostname for e in eps.endpoints] == ["a", None]


def user_slice(name: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]],
               address_type: str = "IPv4") -> k8s.EndpointSlice:
    obj = validate_object({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                           "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "ext"}},
                           "addressType": address_type, "endpoints": endpoints, "ports": ports},
                          lookup_kind("EndpointSlice"))
    assert isinstance(obj, k8s.EndpointSlice)
    return obj


def test_backends_of_applied_slices_follow_the_conditions() -> None:
    slices = [
        user_slice("ext-1", [
            {"addresses": ["10.0.0.2"], "nodeName": "n1"},  # no conditions: ready
            {"addresses": ["10.0.0.3"], "conditions": {"ready": False, "serving": True, "terminating": True}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": False, "serving": False, "terminating": True}},
            {"addresses": ["10.0.0.5"], "conditions": {"ready": False}},
        ], [{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
        user_slice("ext-2", [{"addresses": ["10.0.0.3", "10.0.0.6"], "conditions": {"ready": True}}],
                   [{"name": "http", "port": 8080}]),
        user_slice("ext-3", [{"addresses": ["db.example.com"]}], [{"name": "http", "port": 8080}], "FQDN"),
    ]
    assert slice_backends(slices, "http") == [
        SliceBackend("10.0.0.2", 8080, "n1", "active"),
        SliceBackend("10.0.0.3", 8080, None, "active"),  # listed twice: active wins
        SliceBackend("10.0.0.6", 8080, None, "active"),
    ]
    assert slice_backends(slices[:1], "http")[1] == SliceBackend("10.0.0.3", 8080, None, "terminating")
    assert [(b.address, b.port, b.state) for b in slice_backends(slices, "dns")] == [
        ("10.0.0.2", 53, "active"), ("10.0.0.3", 53, "terminating")]
    assert slice_backends(slices, "missing") == []


@pytest.mark.parametrize(("change", "problem"), [
    ({"addressType": "IP"}, 'addressType: unsupported value "IP": supported values: "IPv4", "IPv6", "FQDN"'),
    ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses: required value: must contain at least 1 address"),
    ({"endpoints": [{"addresses": [f"10.0.0.{i}" for i in range(1, 102)]}]},
     "endpoints[0].addresses: too many: 101: must have at most 100 items"),
    ({"endpoints": [{"addresses": ["fd00::1"]}]},
     'endpoints[0].addresses[0]: invalid value "fd00::1": must be a valid IPv4 address'),
    ({"endpoints": [{"addresses": ["127.0.0.1"]}]},
     'endpoints[0].addresses[0]: invalid value "127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)'),
    ({"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]},
     "endpoints[0].conditions.ready: must be a boolean"),
    ({"endpoints": [{"addresses": ["10.0.0.1"], "hostname": "A_B"}]},
     'endpoints[0].hostname: invalid value "A_B": must be a lowercase RFC 1123 label'),
    ({"endpoints": [{"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "nam": "x"}}]},
     "endpoints[0].targetRef.nam: unknown field"),
    ({"ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]}, 'ports[1].name: duplicate value "http"'),
    ({"ports": [{"port": 80, "protocol": "ICMP"}]}, 'ports[0].protocol: unsupported value "ICMP"'),
    ({"ports": [{"port": 70000}]}, "ports[0].port: invalid value 70000: must be between 1 and 65535, inclusive"),
    ({"ports": [{"port": 80, "appProtocol": "not valid"}]}, 'ports[0].appProtocol: invalid value "not valid"'),
])
def test_invalid_slices_are_refused_with_the_field_path(change: dict[str, Any], problem: str) -> None:
    data = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s"},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}], **change}
    with pytest.raises(ObjectInvalid) as caught:
        validate_object(data, lookup_kind("endpointslices"))
    assert any(f"{path}: {message}".startswith(problem) for path, message in caught.value.issues), caught.value.issues


def test_fqdn_slices_take_domain_names() -> None:
    obj = user_slice("ext", [{"addresses": ["db.example.com"]}], [], "FQDN")
    assert obj.addressType == "FQDN"
    with pytest.raises(ObjectInvalid, match="at least two segments"):
        user_slice("ext", [{"addresses": ["db"]}], [], "FQDN")
