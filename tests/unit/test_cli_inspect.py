"""Inspection output (status, node/endpoint/identity/ip list) from a fixed cluster view."""

import ipaddress
import json

from membrane.api.endpoint import EndpointRecord
from membrane.cli.inspect import (
    ClusterView,
    NodeView,
    format_endpoint_list,
    format_identity_list,
    format_ip_list,
    format_node_list,
    format_status,
    load_cluster_view,
)
from membrane.identity.labels import parse_labels
from membrane.store import keys
from membrane.store.memory import MemoryStore

WEB = ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=x")
VIEW = ClusterView(
    nodes=[NodeView("node1", "172.31.0.11", ["10.244.0.0/24"], "vxlan", True, 1000.0, 1450),
           NodeView("node2", "172.31.0.12", ["10.244.1.0/24"], "vxlan", False, 900.0, 1450)],
    endpoints=[EndpointRecord("c1", 1, "node1", "x", "web", "eth0", "/run/netns/a",
                              ipaddress.IPv4Address("10.244.0.2"), 256, WEB, "runner", "ready")],
    identities={256: parse_labels(WEB)},
    revision=42,
)


def test_node_list_shows_health_and_heartbeat_age():
    assert format_node_list(VIEW, now=1005.0) == (
        "NAME    IPv4 ADDRESS   POD CIDR        ROUTING   HEALTH     LAST HEARTBEAT\n"
        "node1   172.31.0.11    10.244.0.0/24   vxlan     Ready      5s ago\n"
        "node2   172.31.0.12    10.244.1.0/24   vxlan     NotReady   105s ago"
    )


def test_endpoint_list_prints_one_label_per_line():
    lines = format_endpoint_list(VIEW, None).splitlines()
    assert lines[0].split() == ["ENDPOINT", "POLICY", "(ingress)", "POLICY", "(egress)", "IDENTITY",
                                "LABELS", "(source:key[=value])", "IPv6", "IPv4", "STATUS", "NODE", "POD"]
    assert lines[1].split() == ["1", "Disabled", "Disabled", "256", "k8s:app=web", "10.244.0.2", "ready", "node1",
                                "x/web"]
    assert lines[2].strip() == "k8s:io.kubernetes.pod.namespace=x"
    assert format_endpoint_list(VIEW, "node2").splitlines()[1:] == []


def test_identity_list_starts_with_reserved_identities():
    lines = format_identity_list(VIEW).splitlines()
    assert lines[1].split() == ["1", "reserved:host"]
    assert lines[2].split() == ["2", "reserved:world"]
    assert lines[-2].split() == ["256", "k8s:app=web"]


def test_ip_list_view_of_a_node_and_numeric_identities():
    rows = {line.split()[0]: line.split()[1:] for line in format_ip_list(VIEW, "node1", numeric=False).splitlines()}
    assert rows["0.0.0.0/0"] == ["reserved:world", "reserved"]
    assert rows["172.31.0.11/32"] == ["reserved:host", "node"]
    assert rows["172.31.0.12/32"] == ["reserved:remote-node", "node"]
    assert rows["10.244.1.1/32"] == ["reserved:remote-node", "node"]  # node2's router IP
    assert rows["10.244.0.2/32"] == ["k8s:app=web", "custom-resource"]
    numeric = {line.split()[0]: line.split()[1] for line in format_ip_list(VIEW, "node1", numeric=True).splitlines()}
    assert numeric["10.244.0.2/32"] == "256"


def test_status_without_agent_says_why():
    text = format_status(VIEW, "sqlite:///s.db", None, "agent not running (socket /run/membrane/agent.sock)", False)
    assert "KVStore:               Ok   sqlite:///s.db (revision 42)" in text
    assert "Membrane:              Unavailable   agent not running" in text
    assert "Cluster health:        1/2 nodes ready" in text


async def test_cluster_view_reads_nodes_with_their_model():
    store = MemoryStore()
    node = {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node1"},
            "spec": {"addresses": [{"type": "InternalIP", "ip": "fd00::11"},
                                   {"type": "InternalIP", "ip": "172.31.0.11"}],
                     "ipam": {"podCIDRs": ["10.244.0.0/24"]}},
            "status": {"routing": "native", "mtu": 1500}}
    bare = {"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node2"}}
    for obj in (node, bare):
        await store.put(keys.object_key("ciliumnodes", None, obj["metadata"]["name"]), json.dumps(obj).encode())
    await store.put(keys.HEARTBEATS + "node1", json.dumps({"time": 1000.0}).encode())
    view = await load_cluster_view(store)
    assert view.nodes == [NodeView("node1", "172.31.0.11", ["10.244.0.0/24"], "native", True, 1000.0, 1500),
                          NodeView("node2", "", [], "", False, None, 0)]


def test_status_verbose_lists_every_reconciler_with_its_failures():
    agent = {
        "node": "node1", "nodeIP": "172.31.0.11", "podCIDR": "10.244.0.0/24", "controllers": {},
        "reconcilers": [
            {"module": "datapath", "kind": "reconciler", "name": "nft", "rows": 12, "done": 12, "errors": 0,
             "lastFullSync": 990.0, "lastError": "", "failing": []},
            {"module": "routing", "kind": "reconciler", "name": "routing", "rows": 2, "done": 1, "errors": 1,
             "lastFullSync": 0, "lastError": "route refused",
             "failing": [{"key": "node3", "message": "route 10.244.3.0/24: refused", "retries": 4}]},
            {"module": "policy", "kind": "controller", "name": "policy", "runs": 7, "restarts": 0, "lastError": ""},
        ],
    }
    text = format_status(VIEW, "sqlite:///s.db", agent, "", True, now=1000.0)
    assert "Reconcilers:           1/2 healthy, 1 objects failing" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("datapath/", "routing/",
                                                                                       "policy/"))}
    assert lines["datapath/nft"].split()[1:6] == ["reconciler", "12/12", "10s", "ago", "0"]
    assert "node3: route 10.244.3.0/24: refused" in lines["routing/routing"]
    assert lines["routing/routing"].split()[2:6] == ["1/2", "never", "1", "4"]
    assert "7 runs, no error" in lines["policy/policy"]
    assert "Controllers and reconcilers" not in format_status(VIEW, "sqlite:///s.db", agent, "", False, now=1000.0)


def test_service_list_shows_each_frontend_with_its_backends_and_their_state() -> None:
    from membrane.cli.inspect import format_service_list

    active = {"address": "10.244.0.2:8080", "node": "node1", "state": "active", "selected": True}
    going = {"address": "10.244.1.2:8080", "node": "node2", "state": "terminating", "selected": False}
    remote = {"address": "10.244.1.2:8080", "node": "node2", "state": "active", "selected": False,
              "internalOnly": True}
    text = format_service_list([
        {"id": 1, "frontend": "10.96.0.2:80/TCP", "type": "ClusterIP", "service": "default/web",
         "backends": [active, going]},
        {"id": 2, "frontend": "0.0.0.0:30000/TCP", "type": "NodePort", "service": "default/web",
         "backends": [remote]},
        {"id": 3, "frontend": "10.96.0.3:53/UDP", "type": "ClusterIP", "service": "default/dns", "backends": []},
    ])
    lines = [line.split() for line in text.splitlines()]
    assert lines[0] == ["ID", "FRONTEND", "SERVICE", "TYPE", "SERVICE", "BACKEND"]
    assert lines[1] == ["1", "10.96.0.2:80/TCP", "ClusterIP", "default/web", "1", "=>", "10.244.0.2:8080/TCP",
                        "(active)"]
    assert lines[2] == ["2", "=>", "10.244.1.2:8080/TCP", "(terminating)"]
    assert text.splitlines()[3].endswith("1 => 10.244.1.2:8080/TCP (active, this node's pods only)")
    assert lines[4][-1] == "(none)"
