"""Three lab nodes with the real agents, in both routing modes: pods on every node reach each other with
their own addresses, reach the outside with their node's address, survive an agent restart, and a
removed node disappears from the others' routes.

One lab per routing mode serves the whole module; the test that removes a node runs last.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from signal import SIGKILL, SIGTERM

import pytest

from membrane.cni.client import AgentClient
from membrane.datapath.netlink import TUNNEL_DEVICE, vtep_mac
from membrane.lab import Lab
from membrane.lab.host import HostProcesses, HttpAgentProbe
from membrane.lab.state import LabDirs
from membrane.testing.etcd import etcd_skip_reason
from membrane.testing.netns import kernel_test_skip_reason, wait_until

pytestmark = pytest.mark.e2e

NODES = (1, 2, 3)

# Port 7000/tcp and 7001/udp answer with the source address they saw; 7002/tcp echoes.
SERVER = textwrap.dedent("""
    import socket, threading
    def who_tcp():
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", 7000)); srv.listen(16)
        while True:
            conn, peer = srv.accept()
            with conn:
                conn.sendall(peer[0].encode())
    def who_udp():
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); srv.bind(("0.0.0.0", 7001))
        while True:
            _, peer = srv.recvfrom(64)
            srv.sendto(peer[0].encode(), peer)
    def echo(conn):
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
    def echo_tcp():
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", 7002)); srv.listen(16)
        while True:
            threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
    threading.Thread(target=who_udp, daemon=True).start()
    threading.Thread(target=echo_tcp, daemon=True).start()
    who_tcp()
""")

# For each target: the source address the target saw over TCP and over UDP ("" when unanswered).
WHO = textwrap.dedent("""
    import json, socket, sys
    def tcp(target):
        try:
            with socket.create_connection((target, 7000), timeout=2) as sock:
                return sock.recv(64).decode()
        except OSError:
            return ""
    def udp(target):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.settimeout(0.3)
        for _ in range(6):
            sock.sendto(b"who", (target, 7001))
            try:
                return sock.recv(64).decode()
            except OSError:
                continue
        return ""
    print(json.dumps({t: {"tcp": tcp(t), "udp": udp(t)} for t in sys.argv[1:]}))
""")


@dataclass
class Cluster:
    lab: Lab
    mode: str
    env: dict[str, str]
    pod_ips: dict[int, str]  # node k -> the IP of pod who<k>

    def membrane(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "membrane", "--lab", self.lab.name, *args],
                                capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"membrane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def node_ip(self, k: int) -> str:
        return self.lab.node_ip(k)

    def pod_cidr(self, k: int) -> str:
        obj = json.loads(self.membrane("get", "ciliumnode", f"node{k}", "-o", "json").stdout)
        return str(obj["spec"]["ipam"]["podCIDRs"][0])

    def peer_routes(self, k: int) -> dict[str, tuple[str, str]]:
        """node k's protocol-177 routes to other nodes' pods: dst -> (gateway, device)."""
        out = self.lab.exec(f"node{k}", ["ip", "-j", "route", "show", "proto", "177"], capture_output=True,
                            check=True).stdout
        return {r["dst"]: (r.get("gateway", ""), r["dev"]) for r in json.loads(out) if not r["dev"].startswith("lxc")}

    def who(self, k: int, *targets: str) -> dict[str, dict[str, str]]:
        out = self.membrane("pod", "exec", f"default/who{k}", "--", sys.executable, "-c", WHO, *targets).stdout
        return dict(json.loads(out))

    def converged(self, nodes: tuple[int, ...]) -> bool:
        return all(len(self.peer_routes(k)) == len(nodes) - 1 for k in nodes)


@pytest.fixture(scope="module", params=[("vxlan", "sqlite"), ("native", "sqlite"), ("vxlan", "etcd"),
                                        ("native", "etcd")], ids=lambda p: f"{p[0]}-{p[1]}")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    routing, store = request.param
    if (reason := kernel_test_skip_reason("nft", "nsenter")) is not None:
        pytest.skip(reason)
    if store == "etcd" and (reason := etcd_skip_reason()) is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("multinode")
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "r" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    with Lab.up(name, len(NODES), routing=routing, store=store, client=True, dirs=dirs) as lab:
        cluster = Cluster(lab, routing, env, {})
        for k in NODES:
            cluster.membrane("pod", "run", f"who{k}", "-n", "default", "--node", f"node{k}", "--",
                             sys.executable, "-c", SERVER)
            pod = json.loads(cluster.membrane("get", "pod", f"who{k}", "-n", "default", "-o", "json").stdout)
            cluster.pod_ips[k] = pod["status"]["podIP"]
        outside = subprocess.Popen(lab.exec_argv("client", [sys.executable, "-c", SERVER]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: cluster.converged(NODES), timeout=10, what="every node to route to every other")
            yield cluster
        finally:
            outside.kill()
            outside.wait(timeout=5)


def test_every_pod_reaches_every_other_pod_with_its_own_address(cluster: Cluster) -> None:
    for k in NODES:
        others = [cluster.pod_ips[j] for j in NODES if j != k]
        seen = cluster.who(k, *others)
        own = cluster.pod_ips[k]
        assert seen == {ip: {"tcp": own, "udp": own} for ip in others}, f"from node{k} ({cluster.mode}): {seen}"


def test_pods_reach_the_outside_with_their_nodes_address(cluster: Cluster) -> None:
    assert cluster.lab.record.client is not None
    outside = cluster.lab.record.client.ip
    for k in NODES:
        seen = cluster.who(k, outside)
        node_ip = cluster.node_ip(k)
        assert seen == {outside: {"tcp": node_ip, "udp": node_ip}}, f"from node{k} ({cluster.mode}): {seen}"


def test_tunnel_list_and_the_kernel_show_each_peers_pod_cidr_and_node_ip(cluster: Cluster) -> None:
    cidrs = {k: cluster.pod_cidr(k) for k in NODES}
    rows = [line.split() for line in cluster.membrane("tunnel", "list", "--node", "node1").stdout.splitlines()]
    assert rows[0] == ["TUNNEL", "VALUE"]
    assert sorted(rows[1:]) == sorted([cidrs[k], cluster.node_ip(k)] for k in (2, 3))

    routes = cluster.peer_routes(1)
    if cluster.mode == "vxlan":
        assert routes == {cidrs[k]: (cidrs[k].rsplit(".", 1)[0] + ".1", TUNNEL_DEVICE) for k in (2, 3)}
        fdb = cluster.lab.exec("node1", ["bridge", "-j", "fdb", "show", "dev", TUNNEL_DEVICE], capture_output=True,
                               check=True).stdout
        peers = [IPv4Address(cluster.node_ip(k)) for k in (2, 3)]
        entries = {(e["mac"], e["dst"]) for e in json.loads(fdb) if "dst" in e}
        assert entries == {(vtep_mac(ip), str(ip)) for ip in peers}
    else:
        assert routes == {cidrs[k]: (cluster.node_ip(k), "eth0") for k in (2, 3)}
        link = cluster.lab.exec("node1", ["ip", "link", "show", TUNNEL_DEVICE], capture_output=True)
        assert link.returncode != 0, "native routing needs no tunnel device"


def test_an_open_cross_node_connection_survives_an_agent_restart(cluster: Cluster, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, socket, time
        sock = socket.create_connection(("{cluster.pod_ips[2]}", 7002), timeout=5)
        sock.sendall(b"before"); assert sock.recv(16) == b"before"
        print("connected", flush=True)
        while not os.path.exists("{go}"):
            time.sleep(0.02)
        sock.sendall(b"after"); print(sock.recv(16).decode(), flush=True)
    """)
    argv = [sys.executable, "-m", "membrane", "--lab", cluster.lab.name, "pod", "exec", "default/who1", "--",
            sys.executable, "-c", script]
    # Every route and neighbour change on node1 while its agent restarts and resyncs: there must be none.
    monitor = subprocess.Popen(cluster.lab.exec_argv("node1", ["ip", "monitor", "route", "neigh"]),
                               stdout=subprocess.PIPE, text=True)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=cluster.env) as client:
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "connected"
            routes_before = cluster.peer_routes(1)
            restart_agent(cluster.lab, 1)
            socket = str(cluster.lab.record.node(1).socket)
            wait_until(lambda: AgentClient(socket, timeout=5).status()["peerRouting"]["syncs"] >= 1, timeout=10,
                       what="the restarted agent's first routing sync")
            assert cluster.peer_routes(1) == routes_before
            go.touch()
            assert client.stdout.readline().strip() == "after"
            assert client.wait(timeout=10) == 0
        finally:
            client.kill()
            monitor.terminate()
    changes = monitor.communicate(timeout=10)[0]
    assert not [line for line in changes.splitlines() if "proto 177" in line or TUNNEL_DEVICE in line], changes
    assert cluster.who(1, cluster.pod_ips[2])[cluster.pod_ips[2]]["tcp"] == cluster.pod_ips[1]


def test_a_removed_node_disappears_from_the_other_nodes_routes(cluster: Cluster) -> None:
    # Runs last in the module: node3 is gone afterwards.
    cidr3 = cluster.pod_cidr(3)
    agent, supervisor = cluster.lab.agent("node3"), cluster.lab.supervisor("node3")
    assert agent is not None and supervisor is not None and cidr3 in cluster.peer_routes(1)
    processes = HostProcesses()
    processes.signal(supervisor, SIGTERM)  # it stops the agent (SIGTERM) and restarts nothing
    wait_until(lambda: not processes.is_alive(agent), timeout=10, what="node3's agent to stop")
    cluster.membrane("delete", "ciliumnode", "node3")

    wait_until(lambda: all(cidr3 not in cluster.peer_routes(k) for k in (1, 2)), timeout=5,
               what="node3's route to go from node1 and node2")
    assert [line.split()[0] for line in cluster.membrane("tunnel", "list").stdout.splitlines()[1:]] == sorted(
        [cluster.pod_cidr(1), cluster.pod_cidr(2)], key=lambda c: tuple(int(x) for x in c.split("/")[0].split(".")))
    if cluster.mode == "vxlan":
        neigh = cluster.lab.exec("node1", ["ip", "neigh", "show", "dev", TUNNEL_DEVICE], capture_output=True).stdout
        assert cidr3.rsplit(".", 1)[0] + ".1 " not in neigh
    # The remaining nodes still reach each other.
    assert cluster.who(1, cluster.pod_ips[2])[cluster.pod_ips[2]]["tcp"] == cluster.pod_ips[1]


def restart_agent(lab: Lab, k: int) -> None:
    """SIGKILL node k's agent, as a crash would; its supervisor starts it again, as systemd would."""
    agent = lab.agent(f"node{k}")
    assert agent is not None
    processes = HostProcesses()
    processes.signal(agent, SIGKILL)
    wait_until(lambda: not processes.is_alive(agent), timeout=10, what=f"node{k}'s agent to die")

    def back() -> bool:
        now = lab.agent(f"node{k}")
        return now is not None and now != agent and HttpAgentProbe().healthy(lab.record.node(k).socket)

    wait_until(back, timeout=30, interval=0.05, what=f"node{k}'s agent to answer again")
