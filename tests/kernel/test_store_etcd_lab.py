"""etcd in the lab: the store forwarder across namespaces, and a whole lab with the real agent.

The forwarder test puts an HTTP server on 127.0.0.1 *inside* a fresh namespace (``mbet-…``):
only a socket created in that namespace can reach it, so an answer proves the crossing. The lab
test builds a 1-node lab on etcd (``e<random>``), runs a pod through the CLI in this (root)
namespace, and checks that ``lab down`` leaves no process, namespace or directory behind.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from membrane.lab.etcd import free_port
from membrane.lab.host import HostProcesses
from membrane.lab.state import ProcessRef, read_record
from membrane.testing.etcd import etcd_skip_reason
from membrane.testing.netns import NetnsFactory, missing_binaries, wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(etcd_skip_reason() is not None, reason=str(etcd_skip_reason()))]

SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[2].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def answers(port: int) -> str | None:
    try:
        return get(port)
    except OSError:
        return None


def test_the_forwarder_reaches_loopback_inside_another_namespace_and_skips_dead_upstreams(
    netns_factory: NetnsFactory,
) -> None:
    inside = netns_factory("mbet-", lo_up=True)
    dead, live = free_port(), free_port()
    server = inside.spawn(sys.executable, "-c", SERVER, str(live), "from inside")
    wait_until(lambda: inside.call(lambda: answers(live)) == "from inside", what="the server inside")
    listen = free_port()
    forwarder = subprocess.Popen(
        [
            sys.executable, "-m", "membrane", "lab", "forward", "--listen", f"127.0.0.1:{listen}",
            "--netns", inside.path, "--upstream", f"127.0.0.1:{dead}", "--upstream", f"127.0.0.1:{live}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert answers(live) != "from inside", "the root namespace must not reach the server by itself"
        assert wait_until(lambda: answers(listen), timeout=10, what="the forwarder") == "from inside"
        assert [get(listen) for _ in range(3)] == ["from inside"] * 3

        server.kill()
        server.wait()
        with pytest.raises(ConnectionError):  # nothing upstream: the client is reset at once
            get(listen)
    finally:
        forwarder.send_signal(signal.SIGTERM)
        output, _ = forwarder.communicate(timeout=10)
    assert forwarder.returncode == 0, output
    assert output.startswith(f"forwarding 127.0.0.1:{listen} to 127.0.0.1:{dead}, 127.0.0.1:{live} in ")


def membrane(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "membrane", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"membrane {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.skipif(bool(missing_binaries("nft", "busybox")), reason="the real agent needs nft and busybox")
def test_a_lab_on_etcd_runs_a_pod_and_down_leaves_nothing(tmp_path: Path) -> None:
    name = "e" + secrets.token_hex(4)
    env = {
        **os.environ,
        "MEMBRANE_LAB_STATE_DIR": str(tmp_path / "state"),
        "MEMBRANE_LAB_RUN_DIR": str(tmp_path / "run"),
    }
    env.pop("MEMBRANE_STORE", None)
    env.pop("MEMBRANE_LAB", None)
    record_path = tmp_path / "state" / name / "lab.json"
    processes: list[ProcessRef] = []
    try:
        up = membrane(env, "lab", "up", "--store", "etcd", "--name", name)
        assert f"lab {name} is up: 1 node, vxlan routing, etcd store" in up.stdout
        record = read_record(record_path)
        assert record.etcd is not None and record.etcd.forwarder is not None
        processes = list(record.etcd.processes)
        assert record.store_url == f"etcd://127.0.0.1:{record.etcd.forwarder_port}"

        membrane(env, "--lab", name, "pod", "run", "web", "-n", "default", "--", "busybox", "httpd", "-f", "-p", "80")

        def phase() -> str:
            pods = json.loads(membrane(env, "--lab", name, "get", "pods", "-n", "default", "-o", "json").stdout)
            items = pods.get("items", [pods])
            return str(items[0].get("status", {}).get("phase"))

        wait_until(lambda: phase() == "Running", timeout=60, what="the pod Running")
        status = membrane(env, "lab", "status", "--name", name).stdout
        assert "etcd1       172.31." in status and status.count("healthy") == 3, status
    finally:
        down = membrane(env, "lab", "down", "--name", name, check=False)
    assert down.returncode == 0, down.stderr
    assert processes, "lab up recorded the etcd member and the forwarder"
    for ref in processes:  # a zombie awaiting its reaper counts as gone
        assert not HostProcesses().is_alive(ref), f"process {ref.pid} of the lab's store survived 'lab down'"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"{name}-" not in namespaces
    assert not (tmp_path / "state" / name).exists()
    assert not (tmp_path / "run" / name).exists()
