"""Network policy on the real datapath: the upstream netpol e2e layout on a two-node lab.

Namespaces ``x``, ``y``, ``z`` (labelled ``ns=<name>``) with pods ``a``, ``b``, ``c`` (labelled
``pod=<name>``, named ports ``serve-80-tcp`` ...), spread over two nodes joined by VXLAN; every pod
serves TCP and UDP on 80 and 81. An outside client on the underlay has two addresses (``ext1``,
``ext2``). For each case the policies are written to the store, the test waits until both agents
report that their datapath reflects that store revision, then probes the whole matrix (9+2 sources
x 9 destinations x 4 ports, in parallel from inside the pods) and compares it with the matrix the
policy engine computes for the same objects (:mod:`membrane.policy.reachability`). A pod to itself
never leaves its namespace, so loopback pairs are not compared (as upstream).

One lab and one set of pods serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import yaml

from membrane.api.manifest import parse_manifest_text
from membrane.api.meta import ApiObject
from membrane.api.registry import ObjectRef
from membrane.cni.client import AgentClient
from membrane.lab import Lab
from membrane.lab.state import LabDirs
from membrane.policy.reachability import NetpolModel, Reachability, default_model, engine_probe, probe_matrix
from membrane.store import open_store
from membrane.store.base import Delete
from membrane.store.objects import ObjectClient, ref_key
from membrane.testing.netns import kernel_test_skip_reason, wait_until

pytestmark = pytest.mark.e2e

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 81))
PLURALS = {"NetworkPolicy": "networkpolicies", "CiliumNetworkPolicy": "ciliumnetworkpolicies",
           "CiliumClusterwideNetworkPolicy": "ciliumclusterwidenetworkpolicies"}

# TCP on 80/81 echoes per connection; UDP on 80/81 answers every datagram.
SERVER = textwrap.dedent("""
    import socket, threading
    def echo(conn):
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
    def tcp(port):
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port)); srv.listen(64)
        while True:
            threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
    def udp(port):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); srv.bind(("0.0.0.0", port))
        while True:
            data, peer = srv.recvfrom(64)
            srv.sendto(data, peer)
    for port in (80, 81):
        threading.Thread(target=udp, args=(port,), daemon=True).start()
        threading.Thread(target=tcp, args=(port,), daemon=True).start()
    threading.Event().wait()
""")

# argv: source address to bind ("" = any), then JSON [[ip, proto, port], ...]; prints JSON [bool, ...].
PROBER = textwrap.dedent("""
    import json, socket, sys
    from concurrent.futures import ThreadPoolExecutor
    source = sys.argv[1]
    def tcp(ip, port):
        try:
            with socket.create_connection((ip, port), timeout=1.0,
                                          source_address=(source, 0) if source else None) as sock:
                sock.sendall(b"p"); return sock.recv(8) == b"p"
        except OSError:
            return False
    def udp(ip, port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if source:
                sock.bind((source, 0))
            sock.settimeout(0.25)
            for _ in range(4):
                try:
                    sock.sendto(b"p", (ip, port))
                    if sock.recv(8) == b"p":
                        return True
                except OSError:
                    continue
        return False
    targets = json.loads(sys.argv[2])
    with ThreadPoolExecutor(len(targets)) as pool:
        print(json.dumps(list(pool.map(lambda t: (tcp if t[1] == "TCP" else udp)(t[0], t[2]), targets))))
""")


@dataclass
class Netpol:
    lab: Lab
    env: dict[str, str]
    pod_ips: dict[str, str]  # "x/a" -> address
    pod_netns: dict[str, str]  # "x/a" -> netns path
    pod_nodes: dict[str, str]
    outside: dict[str, str]  # "ext1"/"ext2" -> address on the client
    subnet: IPv4Network
    current: list[ApiObject]

    @property
    def pods(self) -> list[str]:
        return [f"{ns}/{pod}" for ns in NAMESPACES for pod in PODS]

    def membrane(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "membrane", "--lab", self.lab.name, *args],
                                capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"membrane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def model(self) -> NetpolModel:
        return default_model(protocols=("TCP", "UDP"), outside=self.outside)

    # -- policies -----------------------------------------------------------------------------------

    def replace_policies(self, manifest: str) -> None:
        """Delete the previous case's policies and write these; wait until both agents' datapaths
        reflect the store revisions written."""
        objects = list(parse_manifest_text(manifest, source="case.yaml")) if manifest.strip() else []
        wanted = asyncio.run(self._write(objects))
        self.current = objects
        self.wait_synced(wanted)

    async def _write(self, objects: list[ApiObject]) -> dict[str, int]:
        store = await open_store(self.lab.store_url)
        try:
            wanted: dict[str, int] = {}
            stale = [ObjectRef.of(o) for o in self.current]
            if stale:
                result = await store.txn([], [Delete(ref_key(ref)) for ref in stale])
                for ref in stale:
                    wanted[ref.info.plural] = max(wanted.get(ref.info.plural, 0), result.revision)
            if objects:
                await ObjectClient(store).apply(objects)
                for obj in objects:
                    ref = ObjectRef.of(obj)
                    kv = await store.get(ref_key(ref))
                    assert kv is not None
                    wanted[ref.info.plural] = max(wanted.get(ref.info.plural, 0), kv.mod_revision)
            return wanted
        finally:
            await store.close()

    def synced(self, wanted: dict[str, int]) -> bool:
        for node in self.lab.record.nodes:
            revisions = AgentClient(str(node.socket), timeout=5).status()["policy"]["syncedRevisions"]
            synced = {prefix.rstrip("/").rsplit("/", 1)[1]: rev for prefix, rev in revisions.items()}
            if any(synced.get(plural, 0) < rev for plural, rev in wanted.items()):
                return False
        return True

    def wait_synced(self, wanted: dict[str, int]) -> None:
        wait_until(lambda: self.synced(wanted), timeout=15, what=f"both agents to sync {wanted}")

    # -- traffic ------------------------------------------------------------------------------------

    def probe(self, sources: Sequence[str]) -> dict[tuple[str, str, str, int], bool]:
        """Every source to every pod on every port, one prober process per source, all in parallel."""
        targets = [(dst, proto, port) for dst in self.pods for proto, port in PORTS]
        payload = json.dumps([[self.pod_ips[d], proto, port] for d, proto, port in targets])

        def run(source: str) -> list[bool]:
            if source in self.outside:
                argv = self.lab.exec_argv("client", [sys.executable, "-c", PROBER, self.outside[source], payload])
            else:
                argv = ["nsenter", f"--net={self.pod_netns[source]}", sys.executable, "-c", PROBER, "", payload]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
            return list(json.loads(out))

        with ThreadPoolExecutor(len(sources)) as pool:
            results = dict(zip(sources, pool.map(run, sources), strict=True))
        return {(src, dst, proto, port): ok for src in sources
                for (dst, proto, port), ok in zip(targets, results[src], strict=True)}

    def check_case(self, manifest: str, sources: Sequence[str] | None = None) -> dict[tuple[str, str, str, int], bool]:
        """Apply, probe, and compare every (protocol, port) matrix with the engine's."""
        self.replace_policies(manifest)
        sources = list(sources or self.pods)
        observed = self.probe(sources)
        expected_probe = engine_probe(self.model(), self.model().compile(self.current))
        failures = []
        for proto, port in PORTS:
            expected = probe_matrix(expected_probe, sources, self.pods, proto, port)
            seen = Reachability(tuple(sources), tuple(self.pods),
                                {(s, d): observed[(s, d, proto, port)] for s in sources for d in self.pods})
            wrong = [pair for pair in expected.mismatches(seen) if pair[0] != pair[1]]
            if wrong:
                failures.append(f"{proto}/{port}: {len(wrong)} cells differ\n{expected.comparison(seen)}")
        assert not failures, "\n".join(failures)
        return observed


def _pods_manifest(nodes: int) -> str:
    docs = []
    for ns in NAMESPACES:
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}})
    for index, (ns, pod) in enumerate((ns, pod) for ns in NAMESPACES for pod in PODS):
        ports = [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
                 for port in (80, 81) for proto in ("TCP", "UDP")]
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
            "spec": {"nodeName": f"node{index % nodes + 1}", "containers": [{
                "name": "server", "image": "membrane/runner", "command": [sys.executable, "-c", SERVER],
                "ports": ports}]},
        })
    return yaml.safe_dump_all(docs)


async def _endpoints(store_url: str) -> list[dict[str, Any]]:
    store = await open_store(store_url)
    try:
        from membrane.store import keys

        return [json.loads(kv.value) for kv in (await store.list(keys.ENDPOINTS))[0]]
    finally:
        await store.close()


@pytest.fixture(scope="module")
def netpol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Netpol]:
    if (reason := kernel_test_skip_reason("nft", "nsenter", "ss")) is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("policy")
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "p" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    with Lab.up(name, 2, client=True, dirs=dirs) as lab:
        assert lab.record.client is not None
        subnet = IPv4Network(lab.record.subnet)
        ext1 = lab.record.client.ip
        ext2 = str(IPv4Address(ext1) + 1)
        lab.exec("client", ["ip", "addr", "add", f"{ext2}/{subnet.prefixlen}", "dev", "eth0"], check=True)
        net = Netpol(lab, env, {}, {}, {}, {"ext1": ext1, "ext2": ext2}, subnet, [])
        manifest = base / "pods.yaml"
        manifest.write_text(_pods_manifest(2))
        net.membrane("apply", "-f", str(manifest))

        def ready() -> bool:
            records = [r for r in asyncio.run(_endpoints(lab.store_url)) if r["state"] == "ready"]
            for record in records:
                key = f"{record['namespace']}/{record['pod']}"
                net.pod_ips[key], net.pod_netns[key] = record["ipv4"], record["netns"]
                net.pod_nodes[key] = record["node"]
            return len(records) == len(net.pods)

        wait_until(ready, timeout=60, what="nine pods attached")
        for k in (1, 2):  # the outside reaches each node's pods through that node
            cidr = json.loads(net.membrane("get", "ciliumnode", f"node{k}", "-o", "json").stdout)["spec"]["ipam"][
                "podCIDRs"][0]
            lab.exec("client", ["ip", "route", "add", cidr, "via", lab.node_ip(k)], check=True)

        def serving() -> bool:
            return all(net.probe(["x/a"]).values())

        wait_until(serving, timeout=30, interval=0.5, what="every pod serving TCP and UDP on 80 and 81")
        yield net


# --- the cases ---------------------------------------------------------------------------------------------

EVERYONE = ("ext1", "ext2")


def test_without_policies_everything_connects(netpol: Netpol) -> None:
    observed = netpol.check_case("", [*netpol.pods, *EVERYONE])
    assert all(observed.values())
    assert {netpol.pod_nodes[p] for p in netpol.pods} == {"node1", "node2"}


def test_deny_all_ingress(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
""", [*netpol.pods, "ext1"])
    assert not any(ok for (src, dst, _, _), ok in observed.items() if dst.startswith("x/") and src != dst)
    assert all(ok for (_, dst, _, _), ok in observed.items() if not dst.startswith("x/"))
    rows = {line.split()[-1]: line.split() for line in netpol.membrane("endpoint", "list").stdout.splitlines()[1:]
            if line.split() and "/" in line.split()[-1]}
    assert rows["x/a"][1:3] == ["Enabled", "Disabled"] and rows["y/a"][1:3] == ["Disabled", "Disabled"]


def test_allow_from_the_same_namespace(netpol: Netpol) -> None:
    netpol.check_case("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: same-namespace, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {}
""")


def test_namespace_selector_and_pod_selector(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ns-and-pod, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
""")
    into_xa = {src for (src, dst, _, _), ok in observed.items() if dst == "x/a" and ok and src != dst}
    assert into_xa == {"y/b"}


def test_ip_block_with_except_from_the_outside(netpol: Netpol) -> None:
    observed = netpol.check_case(f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: ip-block, namespace: x}}
spec:
  podSelector: {{}}
  ingress:
  - from:
    - ipBlock:
        cidr: {netpol.subnet}
        except: [{netpol.outside['ext2']}/32]
""", [*netpol.pods, *EVERYONE])
    assert all(ok for (src, dst, _, _), ok in observed.items() if src == "ext1")
    assert not any(ok for (src, dst, _, _), ok in observed.items() if src == "ext2" and dst.startswith("x/"))
    # A pod that takes ext1's address cannot borrow its allowance: anti-spoofing drops it first.
    pod = "z/c"
    subprocess.run(["nsenter", f"--net={netpol.pod_netns[pod]}", "ip", "addr", "add",
                    f"{netpol.outside['ext1']}/32", "dev", "eth0"], check=True)
    try:
        spoof = subprocess.run(["nsenter", f"--net={netpol.pod_netns[pod]}", sys.executable, "-c", PROBER,
                                netpol.outside["ext1"], json.dumps([[netpol.pod_ips["x/a"], "TCP", 80],
                                                                    [netpol.pod_ips["x/a"], "UDP", 80]])],
                               capture_output=True, text=True, check=True, timeout=30)
        assert json.loads(spoof.stdout) == [False, False]
    finally:
        subprocess.run(["nsenter", f"--net={netpol.pod_netns[pod]}", "ip", "addr", "del",
                        f"{netpol.outside['ext1']}/32", "dev", "eth0"], check=True)


def test_egress_deny_all(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
""")
    assert not any(ok for (src, dst, _, _), ok in observed.items() if src.startswith("x/") and src != dst)


def test_named_port(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named-port, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - {port: serve-81-udp, protocol: UDP}
""")
    into_xa = {(proto, port) for (src, dst, proto, port), ok in observed.items() if dst == "x/a" and ok and src != dst}
    assert into_xa == {("UDP", 81)}


def test_end_port_range(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: port-range, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports:
    - {port: 81, endPort: 90, protocol: TCP}
""")
    into_x = {(proto, port) for (src, dst, proto, port), ok in observed.items()
              if dst.startswith("x/") and ok and src != dst}
    assert into_x == {("TCP", 81)}


def test_cilium_policy_with_entities(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world-only, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEntities: [world]
  egress:
  - toEntities: [cluster]
""", [*netpol.pods, *EVERYONE])
    into_xa = {src for (src, dst, _, _), ok in observed.items() if dst == "x/a" and ok}
    assert into_xa == {"x/a", "ext1", "ext2"}
    assert all(ok for (src, _, _, _), ok in observed.items() if src == "x/a")


def test_ingress_deny_wins_over_allow(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-y-deny-b80, namespace: y}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
""")
    from_yb = {(dst, proto, port): ok for (src, dst, proto, port), ok in observed.items() if src == "y/b"}
    assert from_yb[("y/a", "TCP", 80)] is False and from_yb[("y/a", "TCP", 81)] is True
    status = json.loads(netpol.membrane("get", "cnp", "allow-y-deny-b80", "-n", "y", "-o", "json").stdout)["status"]
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [("Valid", "True")]
    assert status["nodes"]["node1"]["ok"] and status["nodes"]["node2"]["ok"]
    # Both nodes hold pods of y, so both enforce it.
    assert {netpol.pod_nodes[p] for p in ("y/a", "y/b", "y/c")} == {"node1", "node2"}
    assert all(entry["enforcing"] for entry in status["nodes"].values())


def test_clusterwide_policy_across_namespaces(netpol: Netpol) -> None:
    observed = netpol.check_case("""
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: c-from-z}
spec:
  endpointSelector: {matchLabels: {pod: c}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: z}}]
    toPorts: [{ports: [{port: "80", protocol: ANY}]}]
""")
    into_c = {key for key, ok in observed.items() if key[1].endswith("/c") and ok and key[0] != key[1]}
    assert into_c == {(f"z/{src}", f"{ns}/c", proto, 80) for src in PODS for ns in NAMESPACES
                      for proto in ("TCP", "UDP") if f"z/{src}" != f"{ns}/c"}


# --- beyond the matrix -------------------------------------------------------------------------------------

ALLOW_X_FROM_Y = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-from-y, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
"""


def test_policy_trace_agrees_with_the_kernel(netpol: Netpol) -> None:
    observed = netpol.check_case(ALLOW_X_FROM_Y, [*netpol.pods, "ext1"])
    for src, dst, port in (("y/b", "x/a", 80), ("z/b", "x/a", 80), ("x/c", "x/b", 81), ("ext1", "x/c", 80),
                           ("x/a", "z/c", 81)):
        peer = netpol.outside.get(src, src)
        text = netpol.membrane("policy", "trace", "--from", peer, "--to", dst, "--port", f"{port}/TCP").stdout
        verdict = text.strip().splitlines()[-1]
        assert verdict == ("Final verdict: ALLOWED" if observed[(src, dst, "TCP", port)] else
                           "Final verdict: DENIED"), text
    assert "NetworkPolicy x/x-from-y" in netpol.membrane("policy", "trace", "--from", "y/a", "--to", "x/a",
                                                         "--port", "80/TCP").stdout
    rules = netpol.membrane("policy", "get", "-n", "x").stdout
    assert '"io.cilium.k8s.policy.name"' in rules and rules.strip().splitlines()[-1].startswith("Revision: ")
    selectors = netpol.membrane("policy", "selectors").stdout
    assert "x/x-from-y" in selectors


def test_policy_changes_apply_to_new_connections_and_spare_established_ones(netpol: Netpol) -> None:
    netpol.replace_policies(ALLOW_X_FROM_Y)
    # A long-lived connection y/a -> x/b:80, allowed.
    conn = subprocess.Popen(
        ["nsenter", f"--net={netpol.pod_netns['y/a']}", sys.executable, "-u", "-c", textwrap.dedent(f"""
            import socket, sys
            sock = socket.create_connection(("{netpol.pod_ips['x/b']}", 80), timeout=5)
            for line in sys.stdin:
                sock.sendall(line.encode()); print(sock.recv(64).decode().strip(), flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert conn.stdin is not None and conn.stdout is not None
    try:
        conn.stdin.write("before\n")
        conn.stdin.flush()
        assert conn.stdout.readline().strip() == "before"
        # An unrelated policy update (another namespace): the connection carries on.
        started = time.monotonic()
        netpol.replace_policies(ALLOW_X_FROM_Y + """
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-z, namespace: z}
spec:
  podSelector: {}
  policyTypes: [Ingress]
""")
        synced = time.monotonic() - started
        conn.stdin.write("after\n")
        conn.stdin.flush()
        assert conn.stdout.readline().strip() == "after"
        assert not netpol.probe(["x/a"])[("x/a", "z/b", "TCP", 80)]
        print(f"policy written, both agents synced in {synced:.2f} s")
    finally:
        conn.kill()
        conn.communicate(timeout=5)  # closes the pipes too
    # Deleting the policy: once both agents report the revision synced, new connections work at once.
    started = time.monotonic()
    netpol.replace_policies("")
    synced = time.monotonic() - started
    assert netpol.probe(["x/a"])[("x/a", "z/b", "TCP", 80)]
    print(f"policy deleted: both agents synced in {synced:.2f} s")
