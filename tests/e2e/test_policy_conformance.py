"""Every reachability conformance case of the policy engine, replayed on the real datapath.

The engine's conformance tables (the Kubernetes network policy e2e cases and Cilium's own, each
with its expected truth tables) are checked in the unit suite against the compiled map state. Here
the same cases run on a two-node VXLAN lab with the upstream layout (namespaces ``x``, ``y``, ``z``
with pods ``a``, ``b``, ``c`` spread over both nodes, every pod serving TCP and UDP on 80 and 81),
plus an outside client holding the tables' two outside addresses: for each case the policies are
written to the store, the test waits until both agents report the store revision synced, probes
every cell of every expected (protocol, port) table with real traffic and compares.

Cases that relabel a pod or namespace do so live (``membrane label``) around the case and wait
until the affected pods carry their new identities on both agents' datapaths.

What the kernel run cannot reproduce is left out, and said so: SCTP tables (the pods serve TCP and
UDP only), a pod to itself and outside to outside (that traffic never meets the datapath), and
cases that need an agent enforcement setting other than the lab's default (skipped).

The tables name the outside ``198.51.100.10`` (``ext1``) and ``198.51.100.200`` (``ext2``); the
lab's outside is its underlay, so the client takes the same host numbers there and the policies'
``198.51.100.`` addresses are rewritten into the underlay subnet (prefix lengths kept). Pod
addresses of the model (``10.244.<ns>.<pod>``, in the upstream ipBlock cases) become the lab
pods' addresses, prefix lengths kept too.

One lab, one set of pods and one outside server serve the whole module.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import re
import string
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from membrane.lab import Lab
from membrane.lab.state import LabDirs
from membrane.policy.mapstate import EnforcementConfig
from membrane.policy.reachability import Reachability, default_model
from membrane.store import keys, open_store
from membrane.testing.netns import kernel_test_skip_reason, wait_until

pytestmark = pytest.mark.e2e

_TESTS = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> ModuleType:
    """Test modules are not a package: load one by path (registered so its dataclasses resolve)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_tables = _load("membrane_conformance_tables", _TESTS / "unit" / "test_policy_conformance.py")
_lab_kit = _load("membrane_policy_lab_kit", _TESTS / "e2e" / "test_policy.py")
Netpol = _lab_kit.Netpol

OUTSIDE_PREFIX = "198.51.100."  # the tables' outside /24
OUTSIDE_HOSTS = {"ext1": 10, "ext2": 200}  # host numbers of the tables' ext1/ext2, kept in the underlay
KERNEL_PROTOCOLS = ("TCP", "UDP")
#: The model's pod addresses (what the tables' ipBlocks name) → pod key.
MODEL_POD_IPS = {str(pod.ip): pod.key for pod in default_model().pods}
_ADDRESS = re.compile(r"(?<![\d.])\d+\.\d+\.\d+\.\d+(?![\d.])")

# argv: source address ("" = any), then JSON [[ip, proto, port], ...]; prints JSON [bool, ...].
# Short timeouts: a denied packet is dropped, so every denied cell costs a full timeout.
PROBER = textwrap.dedent("""
    import json, socket, sys
    from concurrent.futures import ThreadPoolExecutor
    source = sys.argv[1]
    def tcp(ip, port):
        for _ in range(2):
            try:
                with socket.create_connection((ip, port), timeout=0.6,
                                              source_address=(source, 0) if source else None) as sock:
                    sock.sendall(b"p"); return sock.recv(8) == b"p"
            except socket.timeout:
                return False
            except OSError:
                continue
        return False
    def udp(ip, port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if source:
                sock.bind((source, 0))
            sock.settimeout(0.15)
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


# The pods' server, but UDP bound per address (argv): a reply to a datagram sent to ext2 must come
# from ext2, or the node's connection tracking cannot match it to the (masqueraded) request.
OUTSIDE_SERVER = textwrap.dedent("""
    import socket, sys, threading
    def echo(conn):
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
    def tcp(port):
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port)); srv.listen(64)
        while True:
            threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
    def udp(address, port):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); srv.bind((address, port))
        while True:
            data, peer = srv.recvfrom(64)
            srv.sendto(data, peer)
    for port in (80, 81):
        threading.Thread(target=tcp, args=(port,), daemon=True).start()
        for address in sys.argv[1:]:
            threading.Thread(target=udp, args=(address, port), daemon=True).start()
    threading.Event().wait()
""")


@dataclass
class ConformanceLab:
    net: Any  # the policy lab kit's Netpol: lab, pods, store writes and the sync wait
    outside: dict[str, str]  # "ext1"/"ext2" -> address on the client

    def address(self, name: str) -> str:
        return self.outside[name] if name in self.outside else str(self.net.pod_ips[name])

    def localize(self, manifest: str) -> str:
        """The tables' outside /24 becomes the lab's underlay /24 (same host numbers), and the model's
        pod addresses the lab pods' (in one pass: a lab address may be another model pod's)."""
        underlay = IPv4Network(self.net.subnet)
        assert underlay.prefixlen == 24, underlay

        def lab_address(match: re.Match[str]) -> str:
            key = MODEL_POD_IPS.get(match.group(0))
            return str(self.net.pod_ips[key]) if key is not None else match.group(0)

        manifest = _ADDRESS.sub(lab_address, manifest)
        return manifest.replace(OUTSIDE_PREFIX, str(underlay.network_address).rsplit(".", 1)[0] + ".")

    def probe(self, cells: Sequence[tuple[str, str, str, int]]) -> dict[tuple[str, str, str, int], bool]:
        """The given (source, destination, protocol, port) cells, one prober per source, all in parallel."""
        by_source: dict[str, list[tuple[str, str, int]]] = {}
        for src, dst, proto, port in cells:
            by_source.setdefault(src, []).append((dst, proto, port))

        def run(source: str) -> list[bool]:
            targets = by_source[source]
            payload = json.dumps([[self.address(d), proto, port] for d, proto, port in targets])
            if source in self.outside:
                argv = self.net.lab.exec_argv("client", [sys.executable, "-c", PROBER, self.outside[source], payload])
            else:
                argv = ["nsenter", f"--net={self.net.pod_netns[source]}", sys.executable, "-c", PROBER, "", payload]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
            return list(json.loads(out))

        with ThreadPoolExecutor(len(by_source)) as pool:
            results = dict(zip(by_source, pool.map(run, by_source), strict=True))
        return {
            (src, dst, proto, port): ok
            for src, targets in by_source.items()
            for (dst, proto, port), ok in zip(targets, results[src], strict=True)
        }


async def _identities(store_url: str) -> dict[str, tuple[int, int, int]]:
    """``ns/pod`` -> (identity, endpoint record revision, identity record revision)."""
    store = await open_store(store_url)
    try:
        found = {}
        for kv in (await store.list(keys.ENDPOINTS))[0]:
            record = json.loads(kv.value)
            identity = await store.get(keys.identity_id_key(record["identity"]))
            found[f"{record['namespace']}/{record['pod']}"] = (
                record["identity"],
                kv.mod_revision,
                identity.mod_revision if identity else 0,
            )
        return found
    finally:
        await store.close()


@contextmanager
def _relabelled(lab: ConformanceLab, case: Any) -> Iterator[None]:
    """The case's extra pod and namespace labels, live, until the block ends; both ways, waits until
    the affected pods carry their new identities and both agents' datapaths reflect them."""
    commands = [
        (["pod", pod.split("/")[1], "-n", pod.split("/")[0]], labels) for pod, labels in case.pod_labels.items()
    ]
    commands += [(["namespace", ns], labels) for ns, labels in case.namespace_labels.items()]
    affected = {pod for pod in case.pod_labels} | {p for p in lab.net.pods if p.split("/")[0] in case.namespace_labels}

    def change(add: bool) -> None:
        before = asyncio.run(_identities(lab.net.lab.store_url))
        for target, labels in commands:
            changes = [f"{k}={v}" if add else f"{k}-" for k, v in labels.items()]
            lab.net.membrane("label", *target, *changes)
        now: dict[str, tuple[int, int, int]] = {}

        def moved() -> bool:
            now.update(asyncio.run(_identities(lab.net.lab.store_url)))
            return all(now[p][0] != before[p][0] for p in affected)

        wait_until(moved, timeout=15, what=f"new identities for {sorted(affected)}")
        lab.net.wait_synced({"endpoints": max(now[p][1] for p in affected), "id": max(now[p][2] for p in affected)})

    if not commands:
        yield
        return
    change(add=True)
    try:
        yield
    finally:
        change(add=False)


def _never_on_the_datapath(source: str, destination: str) -> bool:
    # A pod to itself stays in its namespace; outside to outside stays on the underlay.
    return source == destination or (source.startswith("ext") and destination.startswith("ext"))


def _skip_reason(case: Any) -> str | None:
    default = EnforcementConfig()
    if changed := {k: v for k, v in vars(case.config).items() if getattr(default, k) != v}:
        return f"needs agents configured with {changed}; the lab's agents run the default enforcement"
    if not any(spec.split("/")[0] in KERNEL_PROTOCOLS for spec in case.expect):
        return "only SCTP tables; the pods serve TCP and UDP"
    return None


def _params() -> list[Any]:
    params = []
    for case in _tables.CASES:
        marks = [pytest.mark.skip(reason=reason)] if (reason := _skip_reason(case)) else []
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConformanceLab]:
    if (reason := kernel_test_skip_reason("nft", "nsenter", "ip")) is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("conformance")
    dirs = LabDirs(state_base=base / "state", run_base=base / "run")
    env = {**os.environ, "MEMBRANE_LAB_STATE_DIR": str(dirs.state_base), "MEMBRANE_LAB_RUN_DIR": str(dirs.run_base)}
    env.pop("MEMBRANE_STORE", None)
    name = "k" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))
    with Lab.up(name, 2, client=True, dirs=dirs) as the_lab:
        subnet = IPv4Network(the_lab.record.subnet)
        outside = {n: str(subnet.network_address + host) for n, host in OUTSIDE_HOSTS.items()}
        for address in outside.values():
            the_lab.exec("client", ["ip", "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0"], check=True)
        net = Netpol(the_lab, env, {}, {}, {}, outside, subnet, [])
        manifest = base / "pods.yaml"
        manifest.write_text(_lab_kit._pods_manifest(2))
        net.membrane("apply", "-f", str(manifest))
        # The outside serves too, for the egress cells towards ext1/ext2.
        server = subprocess.Popen(
            the_lab.exec_argv("client", [sys.executable, "-c", OUTSIDE_SERVER, *outside.values()])
        )
        try:

            def ready() -> bool:
                records = [r for r in asyncio.run(_lab_kit._endpoints(the_lab.store_url)) if r["state"] == "ready"]
                for record in records:
                    key = f"{record['namespace']}/{record['pod']}"
                    net.pod_ips[key], net.pod_netns[key] = record["ipv4"], record["netns"]
                    net.pod_nodes[key] = record["node"]
                return len(records) == len(net.pods)

            wait_until(ready, timeout=60, what="nine pods attached")
            for k in (1, 2):  # the outside reaches each node's pods through that node
                cidr = json.loads(net.membrane("get", "ciliumnode", f"node{k}", "-o", "json").stdout)["spec"]["ipam"][
                    "podCIDRs"
                ][0]
                the_lab.exec("client", ["ip", "route", "add", cidr, "via", the_lab.node_ip(k)], check=True)
            conformance = ConformanceLab(net, outside)
            everything = [
                (src, dst, proto, port)
                for src in (*net.pods, *outside)
                for dst in (*net.pods, *outside)
                if not _never_on_the_datapath(src, dst)
                for proto in KERNEL_PROTOCOLS
                for port in (80, 81)
            ]
            failing: list[tuple[str, str, str, int]] = []

            def serving() -> bool:
                failing[:] = [cell for cell, ok in conformance.probe(everything).items() if not ok]
                return not failing

            try:
                wait_until(serving, timeout=30, interval=0.5, what="every pod and the outside serving")
            except TimeoutError as error:
                raise AssertionError(f"{len(failing)} cells do not connect: {failing[:20]}") from error
            yield conformance
        finally:
            server.kill()
            server.wait(timeout=10)
            net.replace_policies("")


@pytest.mark.parametrize("case", _params())
def test_the_kernel_agrees_with_the_expected_truth_table(lab: ConformanceLab, case: Any) -> None:
    with _relabelled(lab, case):
        _check(lab, case)


def _check(lab: ConformanceLab, case: Any) -> None:
    lab.net.replace_policies(lab.localize(case.policies))
    tables = {
        spec: Reachability.parse(text) for spec, text in case.expect.items() if spec.split("/")[0] in KERNEL_PROTOCOLS
    }
    cells = sorted(
        {
            (src, dst, spec.split("/")[0], int(spec.split("/")[1]))
            for spec, table in tables.items()
            for src, dst in table.cells
            if not _never_on_the_datapath(src, dst)
        }
    )
    observed = lab.probe(cells)
    failures = []
    for spec, expected in tables.items():
        proto, port = spec.split("/")
        # Cells that never meet the datapath show their expected value and never differ.
        seen = Reachability(
            expected.sources,
            expected.destinations,
            {
                (s, d): expected.cells[(s, d)] if _never_on_the_datapath(s, d) else observed[(s, d, proto, int(port))]
                for s, d in expected.cells
            },
        )
        wrong = expected.mismatches(seen)
        if wrong:
            failures.append(f"{spec}: {len(wrong)} cells differ {sorted(wrong)}\n{expected.comparison(seen)}")
    assert not failures, f"{case.name}\n" + "\n".join(failures)
