"""One node, the real agent, pods from the CLI: the foundation as a user meets it."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import Netns, wait_until

pytestmark = pytest.mark.e2e

ECHO_SERVER = textwrap.dedent("""
    import socket, threading
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 7000)); srv.listen(64)
    def serve(conn):
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
""")

ECHO_ONCE = textwrap.dedent("""
    import socket, sys
    sock = socket.create_connection((sys.argv[1], 7000), timeout=3)
    if len(sys.argv) > 2:
        sock.close(); sock = socket.socket(); sock.settimeout(3)
        sock.bind((sys.argv[2], 0)); sock.connect((sys.argv[1], 7000))
    sock.sendall(b"ping"); print(sock.recv(16).decode())
""")


def pod_json(node: AgentNode, ref: str) -> dict:
    namespace, name = ref.split("/")
    return json.loads(node.membrane("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def run_server_and_client(node: AgentNode) -> tuple[str, str]:
    node.membrane("pod", "run", "server", "-n", "default", "-l", "app=echo", "--port", "echo:7000/TCP",
                  "--", sys.executable, "-c", ECHO_SERVER)
    node.membrane("pod", "run", "client", "-n", "default", "-l", "app=client", "--", "sleep", "3600")
    server_ip = pod_json(node, "default/server")["status"]["podIP"]
    client_ip = pod_json(node, "default/client")["status"]["podIP"]
    wait_until(lambda: echo(node, server_ip).returncode == 0, timeout=10, what="the echo server to listen")
    return server_ip, client_ip


def echo(node: AgentNode, server_ip: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return node.membrane("pod", "exec", "default/client", "--", sys.executable, "-c", ECHO_ONCE, server_ip, *extra,
                         check=False)


def test_two_pods_connect_and_report_kubernetes_status(agent_node: AgentNode) -> None:
    server_ip, client_ip = run_server_and_client(agent_node)
    assert echo(agent_node, server_ip).stdout.strip() == "ping"

    pod = pod_json(agent_node, "default/server")
    assert pod["spec"]["nodeName"] == "node1"
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["hostIP"] == "172.31.254.11"
    cidr = ipaddress.IPv4Network(json.loads(agent_node.membrane("get", "ciliumnode", "node1", "-o", "json").stdout)
                                 ["spec"]["ipam"]["podCIDRs"][0])
    assert ipaddress.IPv4Address(server_ip) in cidr and ipaddress.IPv4Address(client_ip) in cidr
    assert server_ip != client_ip

    # The pod side: one /32 address, the gateway is the node's router IP, MTU for VXLAN.
    routes = agent_node.membrane("pod", "exec", "default/client", "--", "ip", "-4", "route").stdout
    assert f"default via {cidr.network_address + 1} dev eth0" in routes
    addr = agent_node.membrane("pod", "exec", "default/client", "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert f"{client_ip}/32" in addr
    link = agent_node.membrane("pod", "exec", "default/client", "--", "ip", "-o", "link", "show", "eth0").stdout
    assert "mtu 1450" in link

    endpoints = agent_node.membrane("endpoint", "list").stdout
    assert "k8s:app=echo" in endpoints and "k8s:app=client" in endpoints and "ready" in endpoints
    identities = agent_node.membrane("identity", "list").stdout
    assert "reserved:world" in identities and "k8s:app=echo" in identities
    assert f"{server_ip}/32" in agent_node.membrane("ip", "list").stdout
    nodes = agent_node.membrane("node", "list").stdout
    assert "node1" in nodes and "Ready" in nodes and str(cidr) in nodes


def test_a_pod_cannot_send_from_an_address_it_does_not_own(agent_node: AgentNode) -> None:
    server_ip, _ = run_server_and_client(agent_node)
    agent_node.membrane("pod", "exec", "default/client", "--", "ip", "addr", "add", "10.244.0.250/32", "dev", "eth0")
    spoofed = echo(agent_node, server_ip, "10.244.0.250")
    assert spoofed.returncode != 0, spoofed.stdout
    assert echo(agent_node, server_ip).stdout.strip() == "ping"


def test_agent_crash_and_restart_keeps_pods_and_open_connections(agent_node: AgentNode, tmp_path: Path) -> None:
    server_ip, _ = run_server_and_client(agent_node)
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, socket, sys, time
        sock = socket.create_connection(("{server_ip}", 7000), timeout=5)
        sock.sendall(b"before"); assert sock.recv(16) == b"before"
        print("connected", flush=True)
        while not os.path.exists("{go}"):
            time.sleep(0.05)
        sock.sendall(b"after"); print(sock.recv(16).decode(), flush=True)
    """)
    with subprocess.Popen(
        [sys.executable, "-m", "membrane", "--store", agent_node.store_url, "pod", "exec", "default/client", "--",
         sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as client:
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "connected"
            before = {p["metadata"]["name"]: p["status"]["podIP"] for p in
                      json.loads(agent_node.membrane("get", "pods", "-o", "json").stdout)["items"]}
            agent_node.kill()
            agent_node.start()
            go.touch()
            assert client.stdout.readline().strip() == "after"
            assert client.wait(timeout=10) == 0
        finally:
            client.kill()
    after = {p["metadata"]["name"]: p["status"]["podIP"] for p in
             json.loads(agent_node.membrane("get", "pods", "-o", "json").stdout)["items"]}
    assert after == before
    assert echo(agent_node, server_ip).stdout.strip() == "ping"


def test_pod_delete_removes_namespace_link_route_and_address(agent_node: AgentNode) -> None:
    run_server_and_client(agent_node)
    assert len(agent_node.pod_namespaces()) == 2
    agent_node.membrane("pod", "delete", "default/server")
    agent_node.membrane("pod", "delete", "default/client")
    assert agent_node.pod_namespaces() == []
    links = agent_node.node.run("ip", "-o", "link").stdout
    assert "lxc" not in links
    assert agent_node.node.run("ip", "route", "show", "proto", "177").stdout.strip() == ""
    assert "ready" not in agent_node.membrane("endpoint", "list").stdout
    # Addresses were released: a new pod gets one (and the ipcache forgot the old ones).
    agent_node.membrane("pod", "run", "again", "-n", "default", "--", "sleep", "60")
    assert pod_json(agent_node, "default/again")["status"]["phase"] == "Running"


def test_apply_of_a_pod_with_a_command_runs_it(agent_node: AgentNode, tmp_path: Path) -> None:
    manifest = tmp_path / "pods.yaml"
    manifest.write_text(textwrap.dedent(f"""
        apiVersion: v1
        kind: Namespace
        metadata: {{name: demo, labels: {{team: blue}}}}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {{name: web, namespace: demo, labels: {{app: web}}}}
        spec:
          containers:
          - name: web
            image: ignored
            command: ["{sys.executable}", "-c", {json.dumps(ECHO_SERVER)}]
    """))
    agent_node.membrane("apply", "-f", str(manifest))
    pod = wait_until(lambda: (p := pod_json(agent_node, "demo/web"))["status"].get("phase") == "Running" and p,
                     timeout=15, what="the applied pod to run")
    assert pod["status"]["podIP"]
    identities = agent_node.membrane("identity", "list").stdout
    assert "k8s:io.cilium.k8s.namespace.labels.team=blue" in identities


def test_namespace_dir_of_a_deleted_pod_does_not_linger_after_agent_was_down(agent_node: AgentNode) -> None:
    agent_node.membrane("pod", "run", "temp", "-n", "default", "--", "sleep", "3600")
    agent_node.kill()
    agent_node.membrane("pod", "delete", "default/temp", "--no-wait")
    agent_node.start()
    wait_until(lambda: agent_node.pod_namespaces() == [], timeout=15, what="the pod namespace to go")
    wait_until(lambda: "lxc" not in agent_node.node.run("ip", "-o", "link").stdout, timeout=5, what="the veth to go")
    assert not [pid for ns in agent_node.pod_namespaces() for pid in Netns(ns).pids()]
