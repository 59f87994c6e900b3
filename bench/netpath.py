"""The hand-wired baseline of a node's pod path, and traffic tools run between two places.

The baseline is the topology the membrane agent builds for pods on one node, made with plain
``ip`` and nothing else (no nft table, no agent)::

    mbbn-<id>-a (pod)                 mbbn-<id>-r (the node)
      eth0 10.250.0.10/32               mb_host 10.250.0.1/32 (veth, peer mb_net)
      10.250.0.1 dev eth0 scope link    10.250.0.10/32 dev lxca scope link
      neigh 10.250.0.1 lladdr <lxca>    10.250.0.11/32 dev lxcb scope link
      default via 10.250.0.1            ip_forward=1, arp_filter=1 on lxca/lxcb
    mbbn-<id>-b (pod): as a, with 10.250.0.11 behind lxcb

A *place* is where a command runs: a namespace (:class:`NetnsPlace`, through ``nsenter``) or a
membrane pod (:class:`PodPlace`, through ``membrane pod exec``); :class:`PinnedPlace` runs a
place's commands on one CPU (:func:`traffic_cpu`). The measurements
(:func:`tcp_stream_gbits`, :func:`tcprr_tps`) run a client in one place against servers
started in another (:func:`start_servers`).

Primitives: :class:`Place`, :class:`NetnsPlace`, :class:`PodPlace`, :class:`PinnedPlace`,
:func:`traffic_cpu`, :class:`PodPath`,
:func:`hand_wired_pods`, :func:`unique_netns_prefix`, :func:`remove_namespaces`,
:func:`wait_listening`, :func:`start_servers`, :func:`tcp_stream_gbits`, :func:`tcprr_tps`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from membrane.lab.host import IpNetns, netns_path, start_ticks
from membrane.lab.plan import IpBatch

NETNS_PREFIX = "mbbn-"
ROUTER_IP = "10.250.0.1"
POD_IPS = ("10.250.0.10", "10.250.0.11")
HOST_DEVICE, HOST_DEVICE_PEER = "mb_host", "mb_net"
TCPRR_PORT = 5001
IPERF_PORT = 5201
LISTEN_TIMEOUT = 30.0


class Place(Protocol):
    @property
    def label(self) -> str: ...

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """The command line that runs ``cmd`` in this place."""
        ...


def run_in(place: Place, cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(place.argv(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"{place.label}: {' '.join(cmd)}: {detail[-1] if detail else result.returncode}")
    return result


@dataclass(frozen=True)
class NetnsPlace:
    netns: str

    @property
    def label(self) -> str:
        return self.netns

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={netns_path(self.netns)}", *cmd]


@dataclass(frozen=True)
class PodPlace:
    lab: str
    namespace: str
    pod: str

    @property
    def label(self) -> str:
        return f"pod {self.namespace}/{self.pod}"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return membrane_argv(self.lab, "pod", "exec", f"{self.namespace}/{self.pod}", "--", *cmd)


@dataclass(frozen=True)
class PinnedPlace:
    """``place``, with each command pinned to ``cpu`` (``taskset``; children inherit it).

    On a small VM a wake-up across vCPUs costs an inter-processor interrupt: with client and
    server on different vCPUs, 1-byte request/response rates drop several-fold, and where the
    scheduler puts them changes from one run to the next. Pinning both ends to one CPU makes
    runs comparable, and measures what the path costs rather than the wake-up.
    """

    place: Place
    cpu: int

    @property
    def label(self) -> str:
        return f"{self.place.label} (cpu {self.cpu})"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return self.place.argv(["taskset", "-c", str(self.cpu), *cmd])


def traffic_cpu() -> int:
    """The CPU to pin traffic to: the highest one this process may use."""
    return max(os.sched_getaffinity(0))


def membrane_argv(lab: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "membrane", "--lab", lab, *args]


# -- the hand-wired baseline ------------------------------------------------------------------
@dataclass(frozen=True)
class PodPath:
    """Two pods on one node: places to run commands, and their addresses."""

    node: NetnsPlace
    pods: tuple[NetnsPlace, NetnsPlace]
    ips: tuple[str, str]


def unique_netns_prefix(base: str = NETNS_PREFIX) -> str:
    """``base`` plus a random id: each benchmark names its own namespaces (``mbbn-``, ``mbbx-``)."""
    return f"{base}{secrets.token_hex(3)}-"


def baseline_batches(prefix: str, mtu: int) -> list[IpBatch]:
    node = f"{prefix}r"
    pods = [f"{prefix}a", f"{prefix}b"]
    root = [f"netns add {n}" for n in (node, *pods)]
    node_lines = [
        "link set lo up",
        f"link add {HOST_DEVICE} mtu {mtu} type veth peer name {HOST_DEVICE_PEER} mtu {mtu}",
        f"link set {HOST_DEVICE} up",
        f"link set {HOST_DEVICE_PEER} up",
        f"addr add {ROUTER_IP}/32 dev {HOST_DEVICE}",
    ]
    pod_batches = []
    for i, (pod, ip) in enumerate(zip(pods, POD_IPS, strict=True)):
        lxc, host_mac, pod_mac = f"lxc{'ab'[i]}", f"02:00:0a:fa:01:{i:02x}", f"02:00:0a:fa:02:{i:02x}"
        root.append(
            f"link add eth0 netns {pod} address {pod_mac} mtu {mtu} type veth"
            f" peer name {lxc} netns {node} address {host_mac} mtu {mtu}"
        )
        node_lines += [f"link set {lxc} up", f"route add {ip}/32 dev {lxc} scope link"]
        pod_batches.append(
            IpBatch(
                pod,
                (
                    "link set lo up",
                    "link set eth0 up",
                    f"addr add {ip}/32 dev eth0",
                    f"route add {ROUTER_IP}/32 dev eth0 scope link",
                    f"neigh replace {ROUTER_IP} lladdr {host_mac} dev eth0 nud permanent",
                    f"route add default via {ROUTER_IP} dev eth0",
                ),
            )
        )
    return [IpBatch(None, tuple(root)), IpBatch(node, tuple(node_lines)), *pod_batches]


@contextlib.contextmanager
def hand_wired_pods(mtu: int = 1500) -> Iterator[PodPath]:
    """Build the baseline in fresh ``mbbn-…`` namespaces; always removed on exit."""
    prefix = unique_netns_prefix()
    node = NetnsPlace(f"{prefix}r")
    pods = (NetnsPlace(f"{prefix}a"), NetnsPlace(f"{prefix}b"))
    netns = IpNetns()
    try:
        for batch in baseline_batches(prefix, mtu):
            netns.apply(batch)
        sysctls = [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.lxca.arp_filter=1",
            "net.ipv4.conf.lxcb.arp_filter=1",
        ]
        run_in(node, ["sysctl", "-q", "-w", *sysctls], timeout=10)
        yield PodPath(node, pods, POD_IPS)
    finally:
        remove_namespaces([node.netns, *(p.netns for p in pods)])


def remove_namespaces(names: Sequence[str]) -> None:
    """Kill, by PID, what still runs in these namespaces (servers), then delete them."""
    netns = IpNetns()
    for proc in netns.netns_processes(names):
        if start_ticks(proc.pid) == proc.start_ticks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    netns.delete_netns(names)


# -- traffic ----------------------------------------------------------------------------------
def listening_ports(place: Place) -> set[int]:
    out = run_in(place, ["ss", "-Htln"], timeout=30).stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
            ports.add(int(fields[3].rpartition(":")[2]))
    return ports


def wait_listening(place: Place, ports: set[int], timeout: float = LISTEN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ports <= listening_ports(place):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{place.label}: nothing listens on {sorted(ports)} after {timeout:g} s")
        time.sleep(0.1)


def server_commands(tcprr: Path, ip: str) -> list[list[str]]:
    return [
        [str(tcprr), "-s", "-b", ip, "-p", str(TCPRR_PORT)],
        ["iperf3", "-s", "-B", ip, "-p", str(IPERF_PORT)],
    ]


@contextlib.contextmanager
def start_servers(place: Place, tcprr: Path, ip: str) -> Iterator[None]:
    """tcprr and iperf3 servers bound to ``ip`` in a namespace, stopped (by PID) on exit.

    ``place`` runs its command with ``exec`` (nsenter, taskset), so the PID is the server's.
    """
    procs = [
        subprocess.Popen(place.argv(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for cmd in server_commands(tcprr, ip)
    ]
    try:
        wait_listening(place, {TCPRR_PORT, IPERF_PORT})
        yield
    finally:
        for proc in procs:  # nsenter execs the server: the PID is the server's
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tcp_stream_gbits(client: Place, server_ip: str, duration: float) -> float:
    """Bulk TCP throughput of one stream (iperf3), in Gbit/s as the receiver counted it."""
    cmd = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J"]
    out = subprocess.run(client.argv(cmd), capture_output=True, text=True, timeout=duration + 60, check=False)
    try:
        report = json.loads(out.stdout)
    except ValueError:
        raise RuntimeError(f"{client.label}: iperf3 gave no report: {out.stderr.strip()}") from None
    if "error" in report:
        raise RuntimeError(f"{client.label}: iperf3: {report['error']}")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


def tcprr_tps(client: Place, tcprr: Path, server_ip: str, mode: str, duration: float) -> float:
    """Transactions per second of TCP_RR (``rr``) or TCP_CRR (``crr``)."""
    cmd = [str(tcprr), "-c", server_ip, "-p", str(TCPRR_PORT), "-m", mode, "-t", f"{duration:g}"]
    out = run_in(client, cmd, timeout=duration + 60)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tps"])
