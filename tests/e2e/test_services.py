"""Services on a three-node lab with the real agents: ClusterIP from every node to backends on every
node, random spread, node ports from outside through every node, session affinity,
externalTrafficPolicy Local keeping the client address, a refused connection without backends, a
pod reaching itself through its service, and LoadBalancer IPs from LB-IPAM pools.

Each backend pod answers a TCP connection with ``<its own address> <the client address it saw>``.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from membrane.lab import Lab
from membrane.lab.state import LabDirs
from membrane.testing.netns import kernel_test_skip_reason, wait_until

pytestmark = pytest.mark.e2e

NODES = (1, 2, 3)

SERVER = textwrap.dedent("""
    import socket
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 7000)); srv.listen(128)
    while True:
        conn, peer = srv.accept()
        with conn:
            conn.sendall(f"{conn.getsockname()[0]} {peer[0]}".encode())
""")

# argv: address port count -> JSON list of the answers: "refused" when a reset (or port
# unreachable) came back, "timeout" when nothing did within 3 s (a silent drop).
ASK = textwrap.dedent("""
    import json, socket, sys
    answers = []
    for _ in range(int(sys.argv[3])):
        try:
            with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as sock:
                answers.append(sock.recv(64).decode())
        except ConnectionRefusedError:
            answers.append("refused")
        except OSError:
            answers.append("timeout")
    print(json.dumps({"answers": answers}))
""")


def service(name: str, selector: dict[str, str], *, kind: str = "ClusterIP", extra: str = "",
            annotations: str = "") -> str:
    labels = ", ".join(f"{k}: {v}" for k, v in selector.items())
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Service
        metadata:
          name: {name}
          namespace: default
        spec:
          type: {kind}
          selector: {{{labels}}}
          ports: [{{port: 80, targetPort: 7000, protocol: TCP}}]
        """).replace("namespace: default", f"namespace: default{annotations}") + extra


@dataclass
class Cluster:
    lab: Lab
    env: dict[str, str]
    pod_ips: dict[int, str]

    def membrane(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "membrane", "--lab", self.lab.name, *args], input=input,
                                capture_output=True, text=True, env=self.env, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"membrane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def apply(self, manifest: str) -> None:
        self.membrane("apply", "-f", "-", input=manifest)

    def get(self, kind: str, name: str) -> dict[str, object]:
        return dict(json.loads(self.membrane("get", kind, name, "-n", "default", "-o", "json").stdout))

    def cluster_ip(self, name: str) -> str:
        spec = self.get("svc", name)["spec"]
        assert isinstance(spec, dict)
        return str(spec["clusterIP"])

    def node_port(self, name: str) -> int:
        spec = self.get("svc", name)["spec"]
        assert isinstance(spec, dict)
        return int(spec["ports"][0]["nodePort"])

    def ask_from_pod(self, pod: str, address: str, count: int = 1, port: int = 80) -> dict[str, object]:
        out = self.membrane("pod", "exec", f"default/{pod}", "--", sys.executable, "-c", ASK, address, str(port),
                            str(count)).stdout
        return dict(json.loads(out))

    def ask_from_outside(self, address: str, port: int, count: int = 1) -> dict[str, object]:
        out = self.lab.exec("client", [sys.executable, "-c", ASK, address, str(port), str(count)],
                            capture_output=True, check=True).stdout
        return dict(json.loads(out))

    def programmed(self, node: int, frontend: str, backends: int) -> bool:
        """node's agent lists ``frontend`` with ``backends`` selected backends."""
        out = self.membrane("service", "list", "--node", f"node{node}", "-o", "json").stdout
        for entry in json.loads(out):
            if entry["frontend"] == frontend:
                return sum(b["selected"] for b in entry["backends"]) == backends
        return False

    def wait_programmed(self, frontend: str, backends: int, nodes: tuple[int, ...] = NODES) -> None:
        wait_until(lambda: all(self.programmed(k, frontend, backends) for k in nodes), timeout=15,
                   what=f"{frontend} with {backends} backends on nodes {nodes}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if (reason := kernel_test_skip_reason("nft", "nsenter")) is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("services")
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "s" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    with Lab.up(name, len(NODES), client=True, dirs=dirs) as lab:
        cluster = Cluster(lab, env, {})
        for k in NODES:
            cluster.membrane("pod", "run", f"web{k}", "--node", f"node{k}", "-l", "app=web", "-l", f"slot=s{k}",
                             "--", sys.executable, "-c", SERVER)
            cluster.membrane("pod", "run", f"client{k}", "--node", f"node{k}", "-l", "app=client",
                             "--", "sleep", "infinity")
            pod = cluster.get("pod", f"web{k}")
            status = pod["status"]
            assert isinstance(status, dict)
            cluster.pod_ips[k] = str(status["podIP"])
        yield cluster


def backends_seen(answers: list[str]) -> Counter[str]:
    return Counter(answer.split()[0] for answer in answers if " " in answer)


def test_a_cluster_ip_reaches_backends_on_every_node_from_every_node(cluster: Cluster) -> None:
    cluster.apply(service("web", {"app": "web"}))
    ip = cluster.cluster_ip("web")
    cluster.wait_programmed(f"{ip}:80/TCP", 3)
    for k in NODES:
        result = cluster.ask_from_pod(f"client{k}", ip, count=40)
        answers = result["answers"]
        assert isinstance(answers, list)
        seen = backends_seen(answers)
        assert set(seen) == set(cluster.pod_ips.values()), f"from node{k}: {answers}"
        assert sum(seen.values()) == 40, f"from node{k}: every connection answered: {answers}"


def test_random_spreads_three_thousand_connections_evenly(cluster: Cluster) -> None:
    cluster.apply(service("web", {"app": "web"}))
    ip = cluster.cluster_ip("web")
    cluster.wait_programmed(f"{ip}:80/TCP", 3)
    answers = cluster.ask_from_pod("client1", ip, count=3000)["answers"]
    assert isinstance(answers, list)
    seen = backends_seen(answers)
    assert sum(seen.values()) == 3000
    for backend, count in seen.items():
        assert 900 <= count <= 1100, f"{backend}: {count} of 3000 ({dict(seen)})"


UDP_ASK = textwrap.dedent("""
    import socket, sys
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.settimeout(1); sock.connect((sys.argv[1], 53))
    sock.send(b"x")
    try:
        sock.recv(64); print("answered")
    except ConnectionRefusedError:
        print("refused")
    except OSError:
        print("timeout")
""")


def test_a_udp_service_without_backends_answers_port_unreachable(cluster: Cluster) -> None:
    manifest = service("empty-dns", {"app": "nothing-matches"}).replace(
        "[{port: 80, targetPort: 7000, protocol: TCP}]", "[{port: 53, protocol: UDP}]")
    cluster.apply(manifest)
    ip = cluster.cluster_ip("empty-dns")
    cluster.wait_programmed(f"{ip}:53/UDP", 0)
    out = cluster.membrane("pod", "exec", "default/client3", "--", sys.executable, "-c", UDP_ASK, ip).stdout
    assert out.strip() == "refused"


def test_a_service_without_backends_refuses_at_once_and_the_flow_says_why(cluster: Cluster) -> None:
    cluster.apply(service("empty", {"app": "nothing-matches"}))
    ip = cluster.cluster_ip("empty")
    cluster.wait_programmed(f"{ip}:80/TCP", 0)
    # Refused, not timed out: the client learns at once, from a reset.
    assert cluster.ask_from_pod("client2", ip, count=3)["answers"] == ["refused"] * 3
    flows = cluster.membrane("observe", "--type", "drop", "--last", "50", "-o", "json").stdout
    reasons = [json.loads(line)["flow"].get("drop_reason_desc") for line in flows.splitlines() if line.strip()]
    assert "SERVICE_BACKEND_NOT_FOUND" in reasons, flows


def test_node_ports_answer_from_outside_through_every_node(cluster: Cluster) -> None:
    cluster.apply(service("web-np", {"app": "web"}, kind="NodePort"))
    port = cluster.node_port("web-np")
    cluster.wait_programmed(f"0.0.0.0:{port}/TCP", 3)
    for k in NODES:
        answers = cluster.ask_from_outside(cluster.lab.node_ip(k), port, count=30)["answers"]
        assert isinstance(answers, list)
        seen = backends_seen(answers)
        assert sum(seen.values()) == 30, f"via node{k}: {answers}"
        assert len(seen) > 1, f"via node{k}: every connection went to one backend: {answers}"


def test_external_traffic_policy_local_keeps_the_client_address_and_stays_on_the_node(cluster: Cluster) -> None:
    cluster.apply(service("web-local", {"app": "web"}, kind="NodePort",
                          extra="  externalTrafficPolicy: Local\n"))
    port = cluster.node_port("web-local")
    cluster.wait_programmed(f"0.0.0.0:{port}/TCP", 1)
    client = cluster.lab.record.client
    assert client is not None
    for k in NODES:
        answers = cluster.ask_from_outside(cluster.lab.node_ip(k), port, count=10)["answers"]
        assert isinstance(answers, list)
        backends = {a.split()[0] for a in answers}
        peers = {a.split()[1] for a in answers}
        assert backends == {cluster.pod_ips[k]}, f"via node{k}: {answers}"
        assert peers == {client.ip}, f"client address lost via node{k}: {answers}"


def test_session_affinity_keeps_a_client_on_its_backend(cluster: Cluster) -> None:
    sticky = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n"
    cluster.apply(service("web-sticky", {"app": "web"}, extra=sticky))
    ip = cluster.cluster_ip("web-sticky")
    cluster.wait_programmed(f"{ip}:80/TCP", 3)
    for k in NODES:
        answers = cluster.ask_from_pod(f"client{k}", ip, count=30)["answers"]
        assert isinstance(answers, list)
        assert len(backends_seen(answers)) == 1 and len(answers) == 30, f"from node{k}: {answers}"


def test_maglev_services_spread_and_agree_across_nodes(cluster: Cluster) -> None:
    cluster.apply(service("web-maglev", {"app": "web"},
                          annotations="\n  annotations: {service.cilium.io/lb-algorithm: maglev}"))
    ip = cluster.cluster_ip("web-maglev")
    cluster.wait_programmed(f"{ip}:80/TCP", 3)
    answers = cluster.ask_from_pod("client1", ip, count=90)["answers"]
    assert isinstance(answers, list)
    seen = backends_seen(answers)
    assert sum(seen.values()) == 90 and len(seen) == 3, dict(seen)
    listed = json.loads(cluster.membrane("service", "list", "--node", "node1", "-o", "json").stdout)
    assert any(e["frontend"] == f"{ip}:80/TCP" and e["algorithm"] == "maglev" for e in listed)


def test_a_pod_reaches_itself_through_its_service(cluster: Cluster) -> None:
    cluster.apply(service("only-web1", {"slot": "s1"}))
    ip = cluster.cluster_ip("only-web1")
    cluster.wait_programmed(f"{ip}:80/TCP", 1)
    answers = cluster.ask_from_pod("web1", ip, count=5)["answers"]
    assert isinstance(answers, list)
    assert [a.split()[0] for a in answers] == [cluster.pod_ips[1]] * 5, answers


def test_a_deleted_backend_gets_no_new_connections(cluster: Cluster) -> None:
    cluster.membrane("pod", "run", "web-extra", "--node", "node2", "-l", "app=extra", "--",
                     sys.executable, "-c", SERVER)
    cluster.apply(service("extra", {"app": "extra"}))
    ip = cluster.cluster_ip("extra")
    cluster.wait_programmed(f"{ip}:80/TCP", 1)
    assert cluster.ask_from_pod("client1", ip)["answers"] != ["refused"]
    cluster.membrane("pod", "delete", "default/web-extra", "--grace-period", "0")
    cluster.wait_programmed(f"{ip}:80/TCP", 0)
    assert cluster.ask_from_pod("client1", ip)["answers"] == ["refused"]


# A backend that keeps serving through its grace period (SIGTERM is ignored, SIGKILL ends it):
# port 7000 as SERVER; port 7002 sends its own address, then echoes.
LINGERING_SERVER = textwrap.dedent("""
    import signal, socket, threading
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    def echo(conn):
        with conn:
            conn.sendall(conn.getsockname()[0].encode().ljust(16))
            while data := conn.recv(64):
                conn.sendall(data)
    def echo_server():
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", 7002)); srv.listen(16)
        while True:
            threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
    threading.Thread(target=echo_server, daemon=True).start()
""") + SERVER

# argv: address port backend: connects through the service until it lands on `backend`, says
# "held", waits 8 s (the test deletes the backend meanwhile), then checks the connection still works.
HOLD = textwrap.dedent("""
    import socket, sys, time
    for _ in range(60):
        sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        if sock.recv(16).decode().strip() == sys.argv[3]:
            break
        sock.close()
    print("held", flush=True)
    time.sleep(8)
    sock.sendall(b"still there?")
    print("open" if sock.recv(64) == b"still there?" else "broken", flush=True)
""")


def test_a_terminating_backend_gets_no_new_connections_while_its_open_ones_finish(cluster: Cluster) -> None:
    for name, node in (("linger-a", "node1"), ("linger-b", "node2")):
        cluster.membrane("pod", "run", name, "--node", node, "-l", "app=linger", "--",
                         sys.executable, "-c", LINGERING_SERVER)
    cluster.apply(service("linger", {"app": "linger"}))
    cluster.apply(service("linger-echo", {"app": "linger"}).replace("targetPort: 7000", "targetPort: 7002"))
    ip, echo_ip = cluster.cluster_ip("linger"), cluster.cluster_ip("linger-echo")
    cluster.wait_programmed(f"{ip}:80/TCP", 2)
    cluster.wait_programmed(f"{echo_ip}:80/TCP", 2)
    status = cluster.get("pod", "linger-a")["status"]
    assert isinstance(status, dict)
    going = str(status["podIP"])
    holder = subprocess.Popen(
        [sys.executable, "-m", "membrane", "--lab", cluster.lab.name, "pod", "exec", "default/client3", "--",
         sys.executable, "-c", HOLD, echo_ip, "80", going], stdout=subprocess.PIPE, text=True, env=cluster.env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cluster.membrane("pod", "delete", "default/linger-a", "--grace-period", "60", "--no-wait")
        wait_until(lambda: "Terminating" in cluster.membrane("get", "pods", "linger-a").stdout, timeout=15,
                   what="linger-a Terminating")
        cluster.wait_programmed(f"{ip}:80/TCP", 1)
        listed = json.loads(cluster.membrane("service", "list", "--node", "node3", "-o", "json").stdout)
        (entry,) = [e for e in listed if e["frontend"] == f"{ip}:80/TCP"]
        states = {b["address"].split(":")[0]: (b["state"], b["selected"]) for b in entry["backends"]}
        assert states[going] == ("terminating", False), states
        # New connections all go to the other backend...
        answers = cluster.ask_from_pod("client3", ip, count=30)["answers"]
        assert isinstance(answers, list) and len(answers) == 30, answers
        assert going not in backends_seen(answers) and sum(backends_seen(answers).values()) == 30, answers
        # ...while the connection opened before the deletion keeps working.
        out, _ = holder.communicate(timeout=30)
        assert out.strip() == "open", out
    finally:
        holder.kill()
        holder.wait(timeout=5)
        cluster.membrane("pod", "delete", "default/linger-a", "--force", check=False)


def test_a_service_without_selector_uses_the_endpoint_slices_applied_for_it(cluster: Cluster) -> None:
    manifest = service("manual", {}).replace("  selector: {}\n", "")
    cluster.apply(manifest)
    ip = cluster.cluster_ip("manual")
    cluster.wait_programmed(f"{ip}:80/TCP", 0)
    cluster.apply(textwrap.dedent(f"""
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: manual-1
          namespace: default
          labels: {{kubernetes.io/service-name: manual}}
        addressType: IPv4
        ports: [{{port: 7000, protocol: TCP}}]
        endpoints:
        - addresses: ["{cluster.pod_ips[3]}"]
          conditions: {{ready: true}}
        """))
    cluster.wait_programmed(f"{ip}:80/TCP", 1)
    answers = cluster.ask_from_pod("client1", ip, count=5)["answers"]
    assert isinstance(answers, list) and backends_seen(answers) == {cluster.pod_ips[3]: 5}, answers
    # The derived slices of selector services are listed too, next to the applied one.
    slices = cluster.membrane("get", "endpointslices").stdout
    assert "manual-1" in slices and "web-" in slices, slices


def test_load_balancer_ips_come_from_pools_written_either_way(cluster: Cluster) -> None:
    cluster.apply(textwrap.dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumLoadBalancerIPPool
        metadata: {name: by-cidr}
        spec:
          blocks: [{cidr: 10.250.10.0/30}]
          serviceSelector: {matchLabels: {pool: cidr}}
        ---
        apiVersion: cilium.io/v2alpha1
        kind: CiliumLoadBalancerIPPool
        metadata: {name: by-range}
        spec:
          blocks: [{start: 10.250.20.5, stop: 10.250.20.7}]
          serviceSelector: {matchLabels: {pool: range}}
        """))
    for name, pool in (("lb-cidr", "cidr"), ("lb-range", "range")):
        manifest = service(name, {"app": "web"}, kind="LoadBalancer")
        cluster.apply(manifest.replace("namespace: default", f"namespace: default\n  labels: {{pool: {pool}}}"))

    def ingress(name: str) -> str:
        status = cluster.get("svc", name).get("status") or {}
        assert isinstance(status, dict)
        items = (status.get("loadBalancer") or {}).get("ingress") or []
        return str(items[0]["ip"]) if items else ""

    wait_until(lambda: ingress("lb-cidr") and ingress("lb-range"), timeout=15, what="LoadBalancer IPs")
    # Upstream hands out the first address of a CIDR block (allowFirstLastIPs defaults to Yes)
    # and the start of a range.
    assert (ingress("lb-cidr"), ingress("lb-range")) == ("10.250.10.0", "10.250.20.5")
    rows = cluster.membrane("get", "svc", "lb-cidr", "lb-range").stdout
    assert "10.250.10.0" in rows and "10.250.20.5" in rows
    ip = ingress("lb-range")
    cluster.wait_programmed(f"{ip}:80/TCP", 3)
    # The outside reaches it through node1 (announcing it by BGP or ARP is another feature).
    cluster.lab.exec("client", ["ip", "route", "replace", f"{ip}/32", "via", cluster.lab.node_ip(1)], check=True)
    answers = cluster.ask_from_outside(ip, 80, count=10)["answers"]
    assert isinstance(answers, list) and sum(backends_seen(answers).values()) == 10, answers


def test_load_balancer_source_ranges_drop_outside_clients_not_listed(cluster: Cluster) -> None:
    client = cluster.lab.record.client
    assert client is not None
    ranges = "  loadBalancerSourceRanges: [10.9.9.0/24]\n"
    manifest = service("lb-ranges", {"app": "web"}, kind="LoadBalancer", extra=ranges)
    manifest = manifest.replace("namespace: default", "namespace: default\n  labels: {pool: cidr}")
    cluster.apply(manifest)

    def ingress() -> str:
        status = cluster.get("svc", "lb-ranges").get("status") or {}
        assert isinstance(status, dict)
        items = (status.get("loadBalancer") or {}).get("ingress") or []
        return str(items[0]["ip"]) if items else ""

    ip = wait_until(ingress, timeout=15, what="a LoadBalancer IP")
    cluster.wait_programmed(f"{ip}:80/TCP", 3)
    cluster.lab.exec("client", ["ip", "route", "replace", f"{ip}/32", "via", cluster.lab.node_ip(2)], check=True)
    assert cluster.ask_from_outside(ip, 80)["answers"] == ["timeout"]
    # Pods are not checked (Cilium's rule): in-cluster clients still get through.
    assert cluster.ask_from_pod("client2", ip)["answers"] != ["timeout"]
    cluster.apply(manifest.replace("10.9.9.0/24", f"{client.ip}/32"))
    wait_until(lambda: cluster.ask_from_outside(ip, 80)["answers"] != ["timeout"], timeout=15,
               what="the listed client to get through")


def test_observe_service_shows_a_cluster_ip_connection_with_the_service_name(cluster: Cluster) -> None:
    cluster.apply(service("observed", {"app": "web"}))
    ip = cluster.cluster_ip("observed")
    cluster.wait_programmed(f"{ip}:80/TCP", 3)
    answers = cluster.ask_from_pod("client3", ip, count=5)["answers"]
    assert isinstance(answers, list) and len(backends_seen(answers)) >= 1, answers

    def flows(*filters: str) -> list[dict[str, object]]:
        out = cluster.membrane("observe", *filters, "--from-pod", "default/client3", "--last", "2000",
                               "-o", "json").stdout
        return [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]

    # The translation events (Hubble's pre-xlate-fwd) carry the frontend address and the service.
    translations = wait_until(
        lambda: [f for f in flows("--service", "default/observed", "--type", "trace-sock")
                 if f["IP"]["destination"] == ip] or None,  # type: ignore[index]
        timeout=15, what="the pre-xlate-fwd flows of client3's connections")
    assert translations is not None and len(translations) >= 5
    for flow in translations:
        assert flow["destination_service"] == {"name": "observed", "namespace": "default"}
        assert flow["l4"]["TCP"]["destination_port"] == 80  # type: ignore[index]
        assert flow["sock_xlate_point"] == "SOCK_XLATE_POINT_PRE_DIRECTION_FWD" and flow["verdict"] == "TRACED"
    # After DNAT the packets reach a backend pod and still name the service.
    to_backends = flows("--to-service", "default/observed", "--type", "trace")
    assert {f["IP"]["destination"] for f in to_backends} <= set(cluster.pod_ips.values())  # type: ignore[index]
    assert to_backends and all(f["destination_service"]["name"] == "observed" for f in to_backends)  # type: ignore[index]
    compact = cluster.membrane("observe", "--to-service", "default/observed", "--from-pod", "default/client3",
                               "--type", "trace-sock", "--last", "5").stdout
    assert "-> default/observed:80 (world) pre-xlate-fwd TRACED (TCP)" in compact.replace("<>", "->"), compact
    # Policy trace to the service: a verdict per backend, policy applied after translation.
    trace = cluster.membrane("policy", "trace", "--from", "default/client3", "--to", "service:default/observed",
                             "--port", "80/TCP").stdout
    assert [line.split(" (")[0] for line in trace.splitlines() if line.startswith("default/web")] == [
        f"default/web{k}" for k in sorted(NODES, key=lambda k: tuple(int(p) for p in cluster.pod_ips[k].split(".")))]
    assert trace.splitlines()[-1] == "Final verdict: ALLOWED (every backend)", trace
