"""A real agent on a one-node "host" made of namespaces, for kernel and end-to-end tests.

:class:`AgentNode` builds ``<name>-node`` (the node: ``eth0`` with a /24 address) and
``<name>-uplink`` (the other end of ``eth0``), runs ``membrane agent`` inside the node with
``nsenter --net`` and a private store, state and run directory, and can kill (SIGKILL) and
restart it. :meth:`AgentNode.close` removes everything it or its agent made: pods' processes,
pods' namespaces (the agent names them with the node's prefix), both namespaces, the directory.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from membrane.testing.netns import Netns, unique_name, wait_until

NETNS_DIR = Path("/run/netns")


class AgentNode:
    def __init__(self, prefix: str, node_ip: str = "172.31.254.11/24", node_name: str = "node1",
                 agent_args: tuple[str, ...] = ()) -> None:
        self.name = unique_name(prefix)
        self.node_name = node_name
        self.node_ip = node_ip
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.store_url = f"sqlite://{self.dir}/store.db"
        self.state_dir = self.dir / "state"
        self.run_dir = self.dir / "run"
        self.socket = self.run_dir / "agent.sock"
        self.log = self.dir / "agent.log"
        self.netns_prefix = f"{self.name}-pod-"
        self.node = Netns(f"{self.name}-node", lo_up=True)
        self.uplink = Netns(f"{self.name}-uplink", lo_up=True)
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_args = agent_args

    # -- topology -------------------------------------------------------------------------------

    def create(self) -> AgentNode:
        self.node.create()
        self.uplink.create()
        subprocess.run(["ip", "link", "add", "eth0", "netns", self.node.name, "type", "veth",
                        "peer", "name", "eth0", "netns", self.uplink.name], check=True, capture_output=True)
        self.node.run("ip", "addr", "add", self.node_ip, "dev", "eth0")
        self.node.run("ip", "link", "set", "eth0", "up")
        self.uplink.run("ip", "link", "set", "eth0", "up")
        return self

    # -- the agent ------------------------------------------------------------------------------

    def agent_argv(self) -> list[str]:
        return [
            "nsenter", f"--net={self.node.path}", sys.executable, "-m", "membrane", "agent",
            "--node", self.node_name, "--store", self.store_url, "--state-dir", str(self.state_dir),
            "--run-dir", str(self.run_dir), "--netns-prefix", self.netns_prefix, *self.agent_args,
        ]

    def start(self, wait: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.agent = subprocess.Popen(self.agent_argv(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        from membrane.cni.client import AgentClient, AgentClientError

        def healthy() -> bool:
            if self.agent is not None and self.agent.poll() is not None:
                raise RuntimeError(f"agent exited with {self.agent.returncode}:\n{self.log_tail()}")
            try:
                return AgentClient(str(self.socket), timeout=2).healthz().get("status") == "ok"
            except AgentClientError:
                return False

        wait_until(healthy, timeout=timeout, interval=0.05, what="the agent to answer on its socket")

    def kill(self) -> None:
        """SIGKILL the agent, as a crash would."""
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait(timeout=10)
        self.agent = None

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(timeout=5)
        self.agent = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def membrane(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``membrane`` CLI against this node's store."""
        argv = [sys.executable, "-m", "membrane", "--store", self.store_url, *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}\n"
                                 f"agent log:\n{self.log_tail()}")
        return result

    def pod_namespaces(self) -> list[str]:
        if not NETNS_DIR.is_dir():
            return []
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(self.netns_prefix))

    # -- cleanup --------------------------------------------------------------------------------

    def close(self) -> None:
        self.kill()
        for name in self.pod_namespaces():
            pod = Netns(name)
            pod.delete()
        self.node.delete()
        self.uplink.delete()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> AgentNode:
        try:
            return self.create()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
