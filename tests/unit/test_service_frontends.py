"""Services and their endpoints → a node's frontends: types, traffic policies, termination, ids."""

from __future__ import annotations

from ipaddress import IPv4Address

from membrane.api import k8s
from membrane.api.manifest import parse_manifest_text
from membrane.loadbalancer.model import ANY_ADDRESS, Backend, BackendCandidate, BackendState, Frontend, L4Addr
from membrane.loadbalancer.services import FrontendIds, LoadBalancerSettings, compute_frontends

NODE = "node1"


def svc(name: str, spec: str, *, ingress: str = "", annotations: str = "") -> k8s.Service:
    meta = f"{{name: {name}, namespace: default{annotations}}}"
    text = f"apiVersion: v1\nkind: Service\nmetadata: {meta}\nspec:\n  {spec}\n"
    (obj,) = parse_manifest_text(text)
    assert isinstance(obj, k8s.Service)
    if ingress:  # what LB-IPAM writes into the status
        status = k8s.ServiceStatus(loadBalancer=k8s.LoadBalancerStatus(ingress=(k8s.LoadBalancerIngress(ip=ingress),)))
        obj = obj.model_copy(update={"status": status})
    return obj


def candidate(ip: str, node: str, state: BackendState = "active", port: int = 8080) -> BackendCandidate:
    return BackendCandidate(IPv4Address(ip), port, "TCP", "", node, state)


def backend(ip: str, node: str, state: BackendState = "active", port: int = 8080) -> Backend:
    return Backend(IPv4Address(ip), port, node, state)


LOCAL = candidate("10.244.0.5", NODE)
REMOTE = candidate("10.244.1.5", "node2")
WEB = "clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]"


def frontends(*services: k8s.Service, backends: tuple[BackendCandidate, ...] = (LOCAL, REMOTE),
              ids: FrontendIds | None = None, algorithm: str = "random") -> dict[tuple[str, L4Addr], Frontend]:
    candidates = {("default", s.name): backends for s in services}
    rows = compute_frontends(services, candidates, LoadBalancerSettings(NODE, algorithm),  # type: ignore[arg-type]
                             ids or FrontendIds())
    return {(f.type, f.address): f for f in rows}


def addr(ip: str, port: int) -> L4Addr:
    return L4Addr(IPv4Address(ip), "TCP", port)


def test_a_cluster_ip_service_balances_over_every_ready_backend() -> None:
    (frontend,) = frontends(svc("web", WEB)).values()
    assert (frontend.type, frontend.address, frontend.name) == ("ClusterIP", addr("10.96.0.10", 80), "default/web")
    assert frontend.selected == (backend("10.244.0.5", NODE), backend("10.244.1.5", "node2"))
    assert frontend.internal is None and frontend.algorithm == "random" and frontend.affinity_timeout == 0


def test_headless_external_name_and_unallocated_services_have_no_frontend() -> None:
    headless = svc("h", "clusterIP: None\n  selector: {app: web}\n  ports: [{port: 80}]")
    external = svc("x", "type: ExternalName\n  externalName: db.example.com")
    pending = svc("p", "selector: {app: web}\n  ports: [{port: 80}]")
    assert frontends(headless, external, pending) == {}


def test_node_port_load_balancer_and_external_ips_each_get_a_frontend() -> None:
    spec = ("type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [192.168.50.1, 'fd00::1']\n"
            "  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]")
    found = frontends(svc("web", spec, ingress="10.250.0.1"))
    assert set(found) == {
        ("ClusterIP", addr("10.96.0.10", 80)), ("NodePort", L4Addr(ANY_ADDRESS, "TCP", 30080)),
        ("LoadBalancer", addr("10.250.0.1", 80)), ("ExternalIP", addr("192.168.50.1", 80)),
    }  # the IPv6 external IP is skipped: the datapath is IPv4


def test_terminating_backends_take_new_connections_only_when_nothing_else_is_left() -> None:
    going = candidate("10.244.0.9", NODE, "terminating")
    (frontend,) = frontends(svc("web", WEB), backends=(LOCAL, going)).values()
    assert frontend.selected == (backend("10.244.0.5", NODE),)
    assert backend("10.244.0.9", NODE, "terminating") in frontend.backends
    (frontend,) = frontends(svc("web", WEB), backends=(going,)).values()
    assert frontend.selected == (backend("10.244.0.9", NODE, "terminating"),)


def test_internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() -> None:
    (frontend,) = frontends(svc("web", WEB + "\n  internalTrafficPolicy: Local")).values()
    assert frontend.selected == (backend("10.244.0.5", NODE),) and frontend.internal_local
    (frontend,) = frontends(svc("web", WEB + "\n  internalTrafficPolicy: Local"), backends=(REMOTE,)).values()
    assert frontend.selected == ()


def test_external_traffic_policy_local_limits_outside_clients_but_not_this_nodes_pods() -> None:
    spec = ("type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  selector: {app: web}\n"
            "  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]")
    found = frontends(svc("web", spec))
    node_port = found[("NodePort", L4Addr(ANY_ADDRESS, "TCP", 30080))]
    assert node_port.selected == (backend("10.244.0.5", NODE),) and node_port.external_local
    assert node_port.internal == (backend("10.244.0.5", NODE), backend("10.244.1.5", "node2"))
    cluster_ip = found[("ClusterIP", addr("10.96.0.10", 80))]
    assert len(cluster_ip.selected) == 2 and cluster_ip.internal is None
    # No local backend: outside clients are refused, this node's pods still get through.
    node_port = frontends(svc("web", spec), backends=(REMOTE,))[("NodePort", L4Addr(ANY_ADDRESS, "TCP", 30080))]
    assert node_port.selected == () and node_port.internal == (backend("10.244.1.5", "node2"),)


def test_the_algorithm_annotation_overrides_the_cluster_default() -> None:
    maglev = svc("a", WEB, annotations=", annotations: {service.cilium.io/lb-algorithm: maglev}")
    plain = svc("b", WEB.replace("10.96.0.10", "10.96.0.11"))
    found = {f.name: f.algorithm for f in frontends(maglev, plain).values()}
    assert found == {"default/a": "maglev", "default/b": "random"}
    found = {f.name: f.algorithm for f in frontends(maglev, plain, algorithm="maglev").values()}
    assert found == {"default/a": "maglev", "default/b": "maglev"}


def test_client_ip_affinity_carries_its_timeout() -> None:
    spec = WEB + "\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}"
    (frontend,) = frontends(svc("web", spec)).values()
    assert frontend.affinity_timeout == 600
    (frontend,) = frontends(svc("web", WEB + "\n  sessionAffinity: ClientIP")).values()
    assert frontend.affinity_timeout == 10800  # Kubernetes' default: 3 hours


def test_named_ports_pick_their_own_candidates() -> None:
    spec = ("clusterIP: 10.96.0.10\n  selector: {app: web}\n"
            "  ports: [{name: http, port: 80, targetPort: web}, {name: dns, port: 53, protocol: UDP}]")
    http = BackendCandidate(IPv4Address("10.244.0.5"), 8080, "TCP", "http", NODE, "active")
    dns = BackendCandidate(IPv4Address("10.244.0.5"), 5353, "UDP", "dns", NODE, "active")
    found = frontends(svc("web", spec), backends=(http, dns))
    assert found[("ClusterIP", addr("10.96.0.10", 80))].selected == (backend("10.244.0.5", NODE, port=8080),)
    udp = found[("ClusterIP", L4Addr(IPv4Address("10.96.0.10"), "UDP", 53))]
    assert udp.selected == (backend("10.244.0.5", NODE, port=5353),)


def test_frontend_ids_stay_while_their_frontend_exists_and_are_reused_lowest_first() -> None:
    ids = FrontendIds()
    a, b, c = (svc(n, WEB.replace("10.96.0.10", ip)) for n, ip in (("a", "10.96.0.1"), ("b", "10.96.0.2"),
                                                                  ("c", "10.96.0.3")))
    first = {f.name: f.id for f in frontends(a, b, c, ids=ids).values()}
    assert first == {"default/a": 1, "default/b": 2, "default/c": 3}
    second = {f.name: f.id for f in frontends(a, c, ids=ids).values()}
    assert second == {"default/a": 1, "default/c": 3}
    d = svc("d", WEB.replace("10.96.0.10", "10.96.0.4"))
    third = {f.name: f.id for f in frontends(a, c, d, ids=ids).values()}
    assert third == {"default/a": 1, "default/c": 3, "default/d": 2}


def test_two_services_claiming_one_external_ip_resolve_to_the_first() -> None:
    spec = "clusterIP: {ip}\n  externalIPs: [192.168.50.1]\n  selector: {{app: web}}\n  ports: [{{port: 80}}]"
    found = frontends(svc("b", spec.format(ip="10.96.0.2")), svc("a", spec.format(ip="10.96.0.1")))
    assert found[("ExternalIP", addr("192.168.50.1", 80))].name == "default/a"
