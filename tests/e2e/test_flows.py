"""Flows as a user sees them: real agents, real pods, real traffic, ``membrane observe``,
``membrane flows status|nodes`` and ``membrane relay``.

Every count asserted here is exact: servers are checked with ``ss`` inside their own pod (no
traffic), so the only packets between pods are the ones each test sends.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.lab import Lab
from membrane.lab.state import LabDirs
from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import kernel_test_skip_reason, wait_until
from membrane.testing.probes import TCP_ECHO

pytestmark = pytest.mark.e2e

PORT = 7000
# One connection: send, read the echo, close first (so the client's FIN comes before the server's).
ECHO_ONCE = textwrap.dedent(f"""
    import socket, sys
    sock = socket.create_connection((sys.argv[1], {PORT}), timeout=5)
    sock.sendall(b"ping"); assert sock.recv(16) == b"ping"
    sock.close(); print("ok")
""")
SPOOF = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[2], 0)); s.sendto(b"x", (sys.argv[1], 53))
""")


def listening(run: Any, pod: str) -> bool:
    out = run("pod", "exec", pod, "--", "ss", "-Htln").stdout
    return f":{PORT} " in out


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def flags(flow: dict[str, Any]) -> set[str]:
    return set(flow.get("l4", {}).get("TCP", {}).get("flags", {}))


# -- one node --------------------------------------------------------------------------------------------
@pytest.fixture
def node() -> Iterator[AgentNode]:
    with AgentNode("mbfl-") as agent_node:
        agent_node.start()
        yield agent_node


def test_pod_traffic_becomes_flows_with_pods_identities_verdicts_and_flags(node: AgentNode) -> None:
    node.membrane("pod", "run", "server", "-n", "default", "-l", "app=echo", "--",
                  sys.executable, "-c", TCP_ECHO, str(PORT))
    node.membrane("pod", "run", "client", "-n", "default", "-l", "app=client", "--", "sleep", "3600")
    server_ip = json.loads(node.membrane("get", "pod", "server", "-n", "default", "-o", "json").stdout)["status"][
        "podIP"]
    wait_until(lambda: listening(node.membrane, "default/server"), timeout=15, what="the echo server")
    sock = str(node.run_dir / "observer.sock")

    out = node.membrane("pod", "exec", "default/client", "--", sys.executable, "-c", ECHO_ONCE, server_ip).stdout
    assert out.strip() == "ok"
    wait_until(lambda: len(json_lines(node.membrane("observe", "--server", sock, "--all", "-o", "json").stdout)) >= 4,
               timeout=10, what="four flows")
    flows = [line["flow"] for line in json_lines(node.membrane("observe", "--server", sock, "--all",
                                                               "-o", "json").stdout)]
    assert [sorted(flags(f)) for f in flows] == [["SYN"], ["ACK", "SYN"], ["ACK", "FIN"], ["ACK", "FIN"]]
    assert [f.get("is_reply", False) for f in flows] == [False, True, False, True]
    assert {f["verdict"] for f in flows} == {"FORWARDED"}
    assert {f["trace_observation_point"] for f in flows} == {"TO_ENDPOINT"}
    assert [f["traffic_direction"] for f in flows] == ["INGRESS", "EGRESS", "INGRESS", "EGRESS"]
    client_side = [f["source"] if not f.get("is_reply") else f["destination"] for f in flows]
    server_side = [f["destination"] if not f.get("is_reply") else f["source"] for f in flows]
    assert {c["pod_name"] for c in client_side} == {"client"} and {s["pod_name"] for s in server_side} == {"server"}
    assert "k8s:app=client" in client_side[0]["labels"] and "k8s:app=echo" in server_side[0]["labels"]
    client_id, server_id = client_side[0]["identity"], server_side[0]["identity"]
    assert client_id >= 256 and server_id >= 256 and client_id != server_id
    assert {c["identity"] for c in client_side} == {client_id}
    assert {f["node_name"] for f in flows} == {"node1"}
    identities = node.membrane("identity", "list").stdout
    assert re.search(rf"^{client_id}\s.*k8s:app=client", identities, re.M)

    compact = node.membrane("observe", "--server", sock, "--all").stdout.splitlines()
    assert re.search(rf"default/client:\d+ \(ID:{client_id}\) -> default/server:{PORT} \(ID:{server_id}\) "
                     r"to-endpoint FORWARDED \(TCP Flags: SYN\)$", compact[0])
    assert re.search(rf"default/client:\d+ \(ID:{client_id}\) <- default/server:{PORT} \(ID:{server_id}\) "
                     r"to-endpoint FORWARDED \(TCP Flags: SYN, ACK\)$", compact[1])
    assert "Current/Max Flows: 4/4,095" in node.membrane("flows", "status", "--server", sock).stdout

    # A spoofed source: dropped, reported with its reason and its real sender.
    node.membrane("pod", "exec", "default/client", "--", "ip", "addr", "add", "10.244.0.250/32", "dev", "eth0")
    node.membrane("pod", "exec", "default/client", "--", sys.executable, "-c", SPOOF, server_ip, "10.244.0.250")
    drops = wait_until(lambda: json_lines(node.membrane("observe", "--server", sock, "--type", "drop",
                                                        "-o", "json").stdout), timeout=10, what="the drop")
    [drop] = [line["flow"] for line in drops]
    assert (drop["verdict"], drop["drop_reason_desc"]) == ("DROPPED", "INVALID_SOURCE_IP")
    assert drop["IP"]["source"] == "10.244.0.250" and drop["source"]["pod_name"] == "client"
    compact_drop = node.membrane("observe", "--server", sock, "--verdict", "DROPPED").stdout
    assert "Invalid source ip DROPPED (UDP)" in compact_drop
    assert "Current/Max Flows: 5/4,095" in node.membrane("flows", "status", "--server", sock).stdout

    # Hubble's metrics from the agent, inside the node.
    metrics = node.node.run(sys.executable, "-c",
                            "import urllib.request; print(urllib.request.urlopen("
                            "'http://127.0.0.1:9965/metrics', timeout=5).read().decode())").stdout
    assert 'hubble_drop_total{protocol="UDP",reason="INVALID_SOURCE_IP"} 1' in metrics
    assert re.search(r'hubble_flows_processed_total\{[^}]*verdict="FORWARDED"[^}]*\} 4', metrics)


# -- a cluster and the relay -----------------------------------------------------------------------------
@pytest.fixture
def lab() -> Iterator[tuple[Lab, dict[str, str]]]:
    if (reason := kernel_test_skip_reason("nft", "nsenter", "ss")) is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="mbfl-"))  # short: unix socket paths live under it
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "mblo" + "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
    try:
        with Lab.up(name, 3, dirs=dirs) as built:
            yield built, env
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def relay(lab: tuple[Lab, dict[str, str]], tmp_path: Path) -> Iterator[str]:
    built, env = lab
    log = tmp_path / "relay.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "membrane", "--lab", built.name, "relay", "--listen",
                                    "127.0.0.1:0"], env=env, stdout=subprocess.DEVNULL, stderr=out)
    try:
        def address() -> str | None:
            assert process.poll() is None, f"the relay exited:\n{log.read_text()}"
            found = re.search(r"^relay listening on (\S+)$", log.read_text(), re.M)
            return found.group(1) if found else None

        yield wait_until(address, timeout=30, what="the relay to listen")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def test_the_relay_merges_every_nodes_flows_in_time_order(lab: tuple[Lab, dict[str, str]], relay: str) -> None:
    built, env = lab

    def membrane(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "membrane", "--lab", built.name, *args], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"membrane {' '.join(args)}:\n{result.stderr}"
        return result

    membrane("pod", "run", "server", "-n", "default", "--node", "node1", "-l", "app=echo", "--",
             sys.executable, "-c", TCP_ECHO, str(PORT))
    membrane("pod", "run", "client", "-n", "default", "--node", "node2", "-l", "app=client", "--", "sleep", "3600")
    membrane("pod", "run", "client3", "-n", "default", "--node", "node3", "-l", "app=client", "--", "sleep", "3600")
    server_ip = json.loads(membrane("get", "pod", "server", "-n", "default", "-o", "json").stdout)["status"]["podIP"]
    wait_until(lambda: listening(membrane, "default/server"), timeout=15, what="the echo server")

    def routed(node: str) -> bool:
        out = built.exec(node, ["ip", "-j", "route", "show", "proto", "177"], capture_output=True, check=True)
        return sum(not r["dev"].startswith("lxc") for r in json.loads(out.stdout)) == 2

    for node in ("node1", "node2", "node3"):
        wait_until(lambda n=node: routed(n), timeout=15, what=f"{node}'s routes to the other nodes' pods")
    assert membrane("pod", "exec", "default/client", "--", sys.executable, "-c", ECHO_ONCE,
                    server_ip).stdout.strip() == "ok"
    assert membrane("pod", "exec", "default/client3", "--", sys.executable, "-c", ECHO_ONCE,
                    server_ip).stdout.strip() == "ok"

    def merged() -> list[dict[str, Any]]:
        return json_lines(membrane("observe", "--server", relay, "--all", "-o", "json").stdout)

    lines = wait_until(lambda: (got := merged()) and len(got) >= 16 and got, timeout=10, what="16 flows")
    flows = [line["flow"] for line in lines]
    assert len(flows) == 16
    stamps = [line["time"] for line in lines]
    assert stamps == sorted(stamps)  # RFC 3339 with nanoseconds, all UTC: text order is time order
    by_node = {n: [f for f in flows if f["node_name"] == n] for n in ("node1", "node2", "node3")}
    # The clients' nodes see the packets enter the tunnel, the server's node sees them delivered.
    for client_node in ("node2", "node3"):
        assert [(f["trace_observation_point"], sorted(flags(f))) for f in by_node[client_node]] == [
            ("TO_OVERLAY", ["SYN"]), ("TO_ENDPOINT", ["ACK", "SYN"]), ("TO_OVERLAY", ["ACK", "FIN"]),
            ("TO_ENDPOINT", ["ACK", "FIN"])]
    assert [(f["trace_observation_point"], sorted(flags(f))) for f in by_node["node1"]] == 2 * [
        ("TO_ENDPOINT", ["SYN"]), ("TO_OVERLAY", ["ACK", "SYN"]), ("TO_ENDPOINT", ["ACK", "FIN"]),
        ("TO_OVERLAY", ["ACK", "FIN"])]
    # Every node knows every pod: the remote ones through the store.
    assert {(f["source"]["pod_name"], f["destination"]["pod_name"]) for f in flows} == {
        ("client", "server"), ("server", "client"), ("client3", "server"), ("server", "client3")}

    status = membrane("flows", "status", "--server", relay).stdout
    assert "Current/Max Flows: 16/12,285" in status and "Connected Nodes: 3/3" in status
    nodes = membrane("flows", "nodes", "--server", relay).stdout
    assert re.search(r"^node1\s+Connected\s.*8/4095", nodes, re.M)
    assert re.search(r"^node2\s+Connected\s.*4/4095", nodes, re.M)
    assert re.search(r"^node3\s+Connected\s.*4/4095", nodes, re.M)

    # A node goes away (its supervisor, then its agent): the relay says so and serves the rest.
    supervisor, agent = built.supervisor("node2"), built.agent("node2")
    assert supervisor is not None and agent is not None
    os.kill(supervisor.pid, signal.SIGKILL)
    os.kill(agent.pid, signal.SIGKILL)
    status = membrane("flows", "status", "--server", relay).stdout
    assert "Connected Nodes: 2/3" in status and "Unavailable Nodes: 1" in status and "  - node2" in status
    observed = membrane("observe", "--server", relay, "--all")
    assert "1 nodes are unavailable: node2" in observed.stderr
    assert len(observed.stdout.splitlines()) == 12
