"""Pod to pod across two nodes: TCP stream, TCP_RR and TCP_CRR, membrane vs the bare kernel path.

Subject: a two-node lab with the real agents; a server pod on node1 and a client pod on node2
(``membrane pod run --node``), the client driven through ``membrane pod exec``. Baseline: the
same cross-node path built here with ``ip``/``bridge`` alone (no agent, no nft table), in fresh
``mbbx-…`` namespaces, at the membrane pods' MTU::

    mbbx-<id>-u: br0 (the underlay)
      │ port n1                                  │ port n2
    mbbx-<id>-n1: eth0 10.253.0.11/24          mbbx-<id>-n2: eth0 10.253.0.12/24
      mb_host 10.253.1.1/32 (router IP)          mb_host 10.253.2.1/32
      lxc0 ══ pod mbbx-<id>-p1 10.253.1.10/32     lxc0 ══ pod mbbx-<id>-p2 10.253.2.10/32
      10.253.1.10/32 dev lxc0 scope link         10.253.2.10/32 dev lxc0 scope link
      vxlan:  vxlan0 id 2 dstport 8472 nolearning, MTU uplink - 50, static FDB + neighbour +
              10.253.2.0/24 via 10.253.2.1 dev vxlan0 src 10.253.1.1 onlink (and back)
      native: 10.253.2.0/24 via 10.253.0.12 dev eth0 (and back)

Pods have the address /32 on ``eth0``, the router IP as an on-link /32 with a permanent neighbour
entry, and ``default via`` the router IP, as membrane pods do. Both routing modes are measured,
each against its own bare path. Within each run the two sides alternate per metric, and which
side goes first alternates between runs, so drift on the machine spreads over both. Client and
server run pinned to one CPU on both sides (:class:`~bench.netpath.PinnedPlace` says why).

Primitives: :class:`BareNode`, :func:`bare_nodes`, :func:`bare_batches`, :func:`bare_path`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.cluster import (
    bench_cluster,
    require_membrane,
    require_root,
    require_tools,
    run_pod,
    sigterm_cleans_up,
    wait_pod_ip,
)
from bench.harness import BenchContext, BenchResult, Metric, measure
from bench.netpath import (
    HOST_DEVICE,
    HOST_DEVICE_PEER,
    IPERF_PORT,
    TCPRR_PORT,
    NetnsPlace,
    PinnedPlace,
    Place,
    PodPlace,
    remove_namespaces,
    run_in,
    start_servers,
    tcp_stream_gbits,
    tcprr_tps,
    traffic_cpu,
    unique_netns_prefix,
    wait_listening,
)
from membrane.lab.host import IpNetns
from membrane.lab.plan import IpBatch, Routing

TITLE = "pod-to-pod across two nodes (VXLAN, native routing): membrane vs the bare kernel path"
NETNS_PREFIX = "mbbx-"
LAB_PREFIX = "x"
NAMESPACE = "default"
MODES: tuple[Routing, ...] = ("vxlan", "native")
METRICS = (("tcp_stream", "Gbit/s"), ("tcp_rr", "trans/s"), ("tcp_crr", "trans/s"))
SIDES = ("bare", "membrane")
UPLINK_MTU = 1500  # the lab's node uplinks are veths at the default MTU
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
VXLAN_VNI, VXLAN_PORT = 2, 8472  # membrane's defaults, so both sides hash and encapsulate alike
TUNNEL_DEVICE = "vxlan0"
POD_DEVICE = "lxc0"


# -- the bare path (pure) ---------------------------------------------------------------------
@dataclass(frozen=True)
class BareNode:
    """One node of the bare path: its namespaces and addresses."""

    k: int
    netns: str
    pod_netns: str
    node_ip: str
    pod_cidr: str
    router_ip: str
    pod_ip: str

    @property
    def port(self) -> str:
        return f"n{self.k}"

    @property
    def vtep_mac(self) -> str:
        return f"02:6d:0a:fd:00:{self.k:02x}"

    @property
    def host_mac(self) -> str:
        return f"02:00:0a:fd:01:{self.k:02x}"

    @property
    def pod_mac(self) -> str:
        return f"02:00:0a:fd:02:{self.k:02x}"


def bare_nodes(prefix: str) -> tuple[BareNode, BareNode]:
    def node(k: int) -> BareNode:
        return BareNode(k, f"{prefix}n{k}", f"{prefix}p{k}", f"10.253.0.{10 + k}", f"10.253.{k}.0/24",
                        f"10.253.{k}.1", f"10.253.{k}.10")

    return node(1), node(2)


def underlay_netns(prefix: str) -> str:
    return f"{prefix}u"


def bare_batches(prefix: str, routing: Routing, pod_mtu: int) -> tuple[list[IpBatch], list[IpBatch]]:
    """The ``ip -batch`` and ``bridge -batch`` input that builds the bare path, in order."""
    underlay = underlay_netns(prefix)
    nodes = bare_nodes(prefix)
    root = [f"netns add {underlay}", *(f"netns add {n}" for node in nodes for n in (node.netns, node.pod_netns))]
    underlay_lines = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
    bridge: list[IpBatch] = []
    per_node: list[IpBatch] = []
    for node, peer in (nodes, nodes[::-1]):
        root += [
            f"link add eth0 netns {node.netns} mtu {UPLINK_MTU} type veth peer name {node.port} netns {underlay}",
            f"link add eth0 netns {node.pod_netns} address {node.pod_mac} mtu {pod_mtu} type veth"
            f" peer name {POD_DEVICE} netns {node.netns} address {node.host_mac} mtu {pod_mtu}",
        ]
        underlay_lines += [f"link set {node.port} master br0", f"link set {node.port} up"]
        lines = [
            "link set lo up",
            f"addr add {node.node_ip}/24 dev eth0",
            "link set eth0 up",
            f"link add {HOST_DEVICE} mtu {pod_mtu} type veth peer name {HOST_DEVICE_PEER} mtu {pod_mtu}",
            f"link set {HOST_DEVICE} addrgenmode none",
            f"link set {HOST_DEVICE_PEER} addrgenmode none",
            f"link set {HOST_DEVICE} up",
            f"link set {HOST_DEVICE_PEER} up",
            f"addr add {node.router_ip}/32 dev {HOST_DEVICE}",
            f"link set {POD_DEVICE} addrgenmode none",
            f"link set {POD_DEVICE} up",
            f"route add {node.pod_ip}/32 dev {POD_DEVICE} scope link",
        ]
        if routing == "vxlan":
            lines += [
                f"link add {TUNNEL_DEVICE} type vxlan id {VXLAN_VNI} local {node.node_ip} dev eth0"
                f" dstport {VXLAN_PORT} nolearning",
                f"link set {TUNNEL_DEVICE} address {node.vtep_mac} mtu {UPLINK_MTU - VXLAN_OVERHEAD}",
                f"link set {TUNNEL_DEVICE} addrgenmode none",
                f"link set {TUNNEL_DEVICE} up",
                f"neigh replace {peer.router_ip} lladdr {peer.vtep_mac} dev {TUNNEL_DEVICE} nud permanent",
                f"route add {peer.pod_cidr} via {peer.router_ip} dev {TUNNEL_DEVICE} src {node.router_ip} onlink",
            ]
            bridge.append(IpBatch(node.netns, (
                f"fdb append {peer.vtep_mac} dev {TUNNEL_DEVICE} dst {peer.node_ip} self permanent",
            )))
        else:
            lines.append(f"route add {peer.pod_cidr} via {peer.node_ip} dev eth0")
        per_node.append(IpBatch(node.netns, tuple(lines)))
        per_node.append(IpBatch(node.pod_netns, (
            "link set lo up",
            "link set eth0 addrgenmode none",
            "link set eth0 up",
            f"addr add {node.pod_ip}/32 dev eth0",
            f"route add {node.router_ip}/32 dev eth0 scope link",
            f"neigh replace {node.router_ip} lladdr {node.host_mac} dev eth0 nud permanent",
            f"route add default via {node.router_ip} dev eth0",
        )))
    return [IpBatch(None, tuple(root)), IpBatch(underlay, tuple(underlay_lines)), *per_node], bridge


# -- the bare path (kernel) -------------------------------------------------------------------
@dataclass(frozen=True)
class BarePath:
    client: NetnsPlace
    server: NetnsPlace
    server_ip: str


@contextlib.contextmanager
def bare_path(routing: Routing, pod_mtu: int) -> Iterator[BarePath]:
    """Build the bare cross-node path in fresh ``mbbx-…`` namespaces; always removed on exit."""
    prefix = unique_netns_prefix(NETNS_PREFIX)
    nodes = bare_nodes(prefix)
    names = [underlay_netns(prefix), *(n for node in nodes for n in (node.netns, node.pod_netns))]
    try:
        ip_batches, bridge_batches = bare_batches(prefix, routing, pod_mtu)
        for batch in ip_batches:
            IpNetns().apply(batch)
        for batch in bridge_batches:
            IpNetns("bridge").apply(batch)  # same -n/-batch interface as ip
        for node in nodes:
            sysctls = ["net.ipv4.ip_forward=1", f"net.ipv4.conf.{POD_DEVICE}.arp_filter=1"]
            run_in(NetnsPlace(node.netns), ["sysctl", "-q", "-w", *sysctls], timeout=10)
        yield BarePath(NetnsPlace(nodes[1].pod_netns), NetnsPlace(nodes[0].pod_netns), nodes[0].pod_ip)
    finally:
        remove_namespaces(names)


# -- the benchmark ----------------------------------------------------------------------------
Samples = dict[str, dict[str, list[float]]]  # metric -> side -> per-run values


def measure_mode(ctx: BenchContext, routing: Routing, tcprr: Path, samples: Samples, notes: dict[str, str]) -> None:
    cpu = traffic_cpu()
    with bench_cluster(ctx, 2, routing, LAB_PREFIX) as lab:
        server_cmd = f"{tcprr} -s -b 0.0.0.0 -p {TCPRR_PORT} & exec iperf3 -s -p {IPERF_PORT}"
        run_pod(lab, NAMESPACE, "bench-server", ["taskset", "-c", str(cpu), "sh", "-c", server_cmd], node="node1")
        run_pod(lab, NAMESPACE, "bench-client", ["sleep", "infinity"], node="node2")
        server_ip = wait_pod_ip(lab, NAMESPACE, "bench-server")
        wait_pod_ip(lab, NAMESPACE, "bench-client")
        server = PodPlace(lab.name, NAMESPACE, "bench-server")
        client = PodPlace(lab.name, NAMESPACE, "bench-client")
        wait_listening(server, {TCPRR_PORT, IPERF_PORT})
        link = json.loads(run_in(client, ["ip", "-j", "link", "show", "eth0"], timeout=60).stdout)
        mtu = int(link[0]["mtu"])
        notes[f"{routing} pod MTU"] = str(mtu)
        ctx.log(f"{routing}: membrane pods up: server {server_ip} on node1, client on node2, pod MTU {mtu}")

        with bare_path(routing, mtu) as bare, start_servers(PinnedPlace(bare.server, cpu), tcprr, bare.server_ip):
            sides: dict[str, tuple[Place, str]] = {"bare": (PinnedPlace(bare.client, cpu), bare.server_ip),
                                                   "membrane": (PinnedPlace(client, cpu), server_ip)}
            measurements: dict[str, Callable[[Place, str], float]] = {
                "tcp_stream": lambda place, ip: tcp_stream_gbits(place, ip, ctx.duration),
                "tcp_rr": lambda place, ip: tcprr_tps(place, tcprr, ip, "rr", ctx.duration),
                "tcp_crr": lambda place, ip: tcprr_tps(place, tcprr, ip, "crr", ctx.duration),
            }
            for i in range(ctx.runs):
                order = SIDES if i % 2 == 0 else SIDES[::-1]
                for metric, fn in measurements.items():
                    for side in order:
                        place, ip = sides[side]
                        value = measure(ctx, f"{routing} run {i + 1}/{ctx.runs} {side} {metric}", fn, place, ip)
                        samples[f"{routing} {metric}"][side].append(value)


def run(ctx: BenchContext) -> BenchResult:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    require_root()
    require_tools("nsenter", "ip", "bridge", "ss", "iperf3", "sysctl", "taskset")
    require_membrane("agent", "pod", "lab")
    tcprr = ctx.tool("tcprr")
    samples: Samples = {f"{mode} {m}": {s: [] for s in SIDES} for mode in MODES for m, _ in METRICS}
    notes: dict[str, str] = {}
    with sigterm_cleans_up():
        for mode in MODES:
            measure_mode(ctx, mode, tcprr, samples, notes)
    metrics = tuple(
        Metric(f"{mode} {name}", unit, tuple(samples[f"{mode} {name}"]["bare"]),
               tuple(samples[f"{mode} {name}"]["membrane"]))
        for mode in MODES for name, unit in METRICS
    )
    notes["per run"] = f"{ctx.duration:g} s per metric and side, one stream/connection, node2 pod -> node1 pod"
    notes["pinned"] = f"client and server on CPU {traffic_cpu()} (both sides)"
    notes["goal"] = "membrane / bare >= 0.95 for every metric"
    notes["machine load (1-min average)"] = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    return BenchResult(
        name="datapath_vxlan",
        title=TITLE,
        status="ok",
        baseline_label="bare kernel",
        subject_label="membrane",
        metrics=metrics,
        notes=notes,
        seconds=time.monotonic() - started,
    )
