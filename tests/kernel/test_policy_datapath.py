"""Policy enforcement against the real kernel: a node namespace with three pods, the agent's policy
controller rendering the ruleset, real TCP, UDP and ICMP.

What the matrix tests of the lab cannot isolate: ICMP types, IP fragments (reassembled before the
policy check, so they cannot bypass it), the node's own traffic (host identity, both directions),
audit mode, and a policy change that spares established connections while new ones are refused.
Each check first shows the traffic working without the policy that stops it.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from membrane.api import k8s
from membrane.api.endpoint import EndpointRecord
from membrane.api.manifest import parse_manifest_text
from membrane.datapath.netlink import EndpointSpec, PyrouteNetlink
from membrane.datapath.nft import NftCommand
from membrane.datapath.reconcilers import NftReconciler
from membrane.datapath.ruleset import DesiredDatapath, EndpointAddress, build_ruleset
from membrane.identity.labels import canonical, identity_labels_for_pod
from membrane.policy import EnforcementConfig
from membrane.testing.agentkit import PolicyHarness
from membrane.testing.agentkit import pod as pod_object
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(missing_binaries("busybox", "nft")), reason="needs busybox and nft"),
]

ROUTER = IPv4Address("10.244.1.1")
PODS = {"web": ("10.244.1.10", 300), "client": ("10.244.1.11", 301), "other": ("10.244.1.12", 302)}

# TCP 80/81 echo; UDP 80/81 answer with the datagram's length.
SERVER = textwrap.dedent("""
    import socket, threading
    def echo(conn):
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
    def tcp(port):
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port)); srv.listen(16)
        while True:
            threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
    def udp(port):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); srv.bind(("0.0.0.0", port))
        while True:
            data, peer = srv.recvfrom(65535)
            srv.sendto(str(len(data)).encode(), peer)
    for port in (80, 81):
        threading.Thread(target=udp, args=(port,), daemon=True).start()
        threading.Thread(target=tcp, args=(port,), daemon=True).start()
    threading.Event().wait()
""")


@dataclass
class Node:
    node: Netns
    pods: dict[str, Netns]
    records: list[EndpointRecord]
    pod_objects: list[k8s.Pod]
    reconciler: NftReconciler

    async def enforce(self, manifest: str, config: EnforcementConfig | None = None) -> None:
        """The agent's policy controller over these pods and ``manifest``, rendered and applied."""
        policies = parse_manifest_text(manifest) if manifest.strip() else []
        harness = PolicyHarness("node1", config=config).load(policies=policies, records=self.records,
                                                            pods=self.pod_objects)
        desired = DesiredDatapath.from_endpoints(
            (EndpointAddress(r.host_ifindex, r.ipv4) for r in self.records), policy=harness.policy_datapath())
        await self.reconciler.sync(build_ruleset(desired))

    def tcp(self, source: str, target: str, port: int = 80) -> bool:
        sock = self.pods[source].socket() if source in self.pods else self.node.socket()
        sock.settimeout(0.5)
        try:
            sock.connect((target, port))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def udp(self, source: str, target: str, port: int, size: int = 8) -> bool:
        sock = self.pods[source].socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.3)
        try:
            for _ in range(3):
                sock.sendto(b"x" * size, (target, port))
                try:
                    return sock.recv(64) == str(size).encode()
                except OSError:
                    continue
            return False
        finally:
            sock.close()

    def ping(self, source: str, target: str) -> bool:
        ns = self.pods.get(source, self.node)
        return ns.run("busybox", "ping", "-c", "1", "-W", "1", target, check=False).returncode == 0

    def counter(self, chain: str) -> int:
        out = self.node.run("nft", "-j", "list", "chain", "inet", "membrane", chain).stdout
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        raise AssertionError(f"no counter in {chain}")




async def build_lan(netns_factory: NetnsFactory, prefix: str) -> Node:
    """A node namespace with the three pods attached and serving, no policy yet."""
    node = netns_factory(f"{prefix}node-", lo_up=True)
    netlink = PyrouteNetlink(node.path)
    await netlink.ensure_host_device(ROUTER, 1500)
    pods: dict[str, Netns] = {}
    records = []
    for index, (name, (ip, identity)) in enumerate(PODS.items()):
        pods[name] = netns_factory(f"{prefix}pod-", lo_up=True)
        attached = await netlink.attach_endpoint(EndpointSpec(f"ctr-{name}", pods[name].path, "eth0",
                                                              IPv4Address(ip), ROUTER))
        labels = identity_labels_for_pod("default", {"app": name}, {})
        records.append(EndpointRecord(f"ctr-{name}", index + 1, "node1", "default", name, "eth0", pods[name].path,
                                      IPv4Address(ip), identity, tuple(canonical(labels)), "runner", "ready",
                                      attached.host_ifname, attached.host_ifindex))
        pods[name].spawn(sys.executable, "-c", SERVER)
    pod_objects = [pod_object("default", name, {"app": name}) for name in PODS]
    lan = Node(node, pods, records, pod_objects, NftReconciler(NftCommand(node.path)))
    await lan.enforce("")
    wait_until(lambda: lan.tcp("client", PODS["web"][0], 81), timeout=10, what="the web pod serving")
    return lan


@pytest.fixture
async def lan(netns_factory: NetnsFactory) -> AsyncIterator[Node]:
    yield await build_lan(netns_factory, "mbpo-")


WEB, CLIENT, OTHER = (PODS[p][0] for p in ("web", "client", "other"))

PING_AND_PORT_80_FROM_CLIENT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: ANY}]}]
  - fromEndpoints: [{matchLabels: {app: other}}]
    icmps: [{fields: [{type: EchoRequest}]}]
"""


async def test_icmp_types_ports_and_identities(lan: Node) -> None:
    assert lan.ping("client", WEB) and lan.ping("other", WEB) and lan.tcp("other", WEB)
    await lan.enforce(PING_AND_PORT_80_FROM_CLIENT)
    assert lan.tcp("client", WEB, 80) and lan.udp("client", WEB, 80)
    assert not lan.tcp("client", WEB, 81) and not lan.udp("client", WEB, 81)
    assert not lan.ping("client", WEB)  # no ICMP rule for the client
    assert lan.ping("other", WEB)  # echo request allowed; the reply is related traffic
    assert not lan.tcp("other", WEB, 80)
    assert lan.tcp("web", OTHER, 81)  # egress of web is not selected
    assert lan.counter("pol_ingress_check") > 0  # the default-deny drops, counted


async def test_fragments_cannot_bypass_policy(lan: Node) -> None:
    # 4000 bytes over a 1500-byte MTU: three fragments, reassembled before the policy check.
    assert lan.udp("client", WEB, 81, size=4000)
    await lan.enforce(PING_AND_PORT_80_FROM_CLIENT)
    assert lan.udp("client", WEB, 80, size=4000)
    assert not lan.udp("client", WEB, 81, size=4000)
    assert not lan.udp("other", WEB, 80, size=4000)


async def test_the_node_itself_is_the_host_identity_both_ways(lan: Node) -> None:
    await lan.enforce("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-ingress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
""")
    assert lan.tcp("node", WEB, 81)  # ingress from the local host is allowed on isolated endpoints
    assert lan.ping("client", WEB) and not lan.tcp("other", WEB)
    assert not lan.ping("client", str(ROUTER))  # egress to the node: the host identity, not allowed
    await lan.enforce("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [host]
""")
    assert lan.ping("client", str(ROUTER)) and not lan.ping("client", WEB)


async def test_audit_mode_lets_would_be_drops_through_and_counts_them(lan: Node) -> None:
    await lan.enforce(PING_AND_PORT_80_FROM_CLIENT, EnforcementConfig(audit=True))
    assert lan.tcp("client", WEB, 81) and lan.tcp("other", WEB, 80)
    assert lan.counter("pol_audit_in") >= 2
    await lan.enforce(PING_AND_PORT_80_FROM_CLIENT)
    assert not lan.tcp("client", WEB, 81)


async def test_established_connections_survive_a_policy_that_refuses_new_ones(lan: Node) -> None:
    sock = lan.pods["client"].socket()
    sock.settimeout(2)
    sock.connect((WEB, 81))
    sock.sendall(b"one")
    assert sock.recv(8) == b"one"
    try:
        await lan.enforce(PING_AND_PORT_80_FROM_CLIENT)  # a full sync: the table is replaced
        assert not lan.tcp("client", WEB, 81)
        await lan.enforce(PING_AND_PORT_80_FROM_CLIENT.replace('"80"', '"8080"'))  # an element sync
        sock.sendall(b"two")
        assert sock.recv(8) == b"two"
    finally:
        sock.close()


L7_ON_80_PLAIN_81 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
    - ports: [{port: "81", protocol: TCP}]
"""


async def test_a_port_an_l7_rule_selects_is_closed_until_there_is_an_l7_proxy(netns_factory: NetnsFactory) -> None:
    lan = await build_lan(netns_factory, "mbpol7-")
    assert lan.tcp("client", WEB, 80)
    await lan.enforce(L7_ON_80_PLAIN_81)
    assert lan.tcp("client", WEB, 81)  # the plain L4 allow of the same policy lets the client in
    assert not lan.tcp("client", WEB, 80)  # fail closed: not allowed at L4 while nothing enforces L7
    assert lan.counter("pol_l7_in") > 0  # dropped as L7 traffic, not by default deny


IP_BLOCKS = f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-block, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {{cidr: 10.244.1.0/24, except: [{OTHER}/32]}}}}]
    ports: [{{port: 80}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-to-web-and-node, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {WEB}/32}}}}, {{ipBlock: {{cidr: {ROUTER}/32}}}}]
"""


async def test_ip_blocks_match_pod_and_node_addresses_with_deny_precedence(netns_factory: NetnsFactory) -> None:
    lan = await build_lan(netns_factory, "mbipb-")
    wait_until(lambda: lan.tcp("client", OTHER, 81), timeout=10, what="the other pod serving")
    assert lan.tcp("other", WEB) and lan.ping("client", str(ROUTER))
    await lan.enforce(IP_BLOCKS)
    # Ingress by source address: the client's address is in the block, the other pod's is the except.
    assert lan.tcp("client", WEB, 80) and not lan.udp("client", WEB, 80)  # ports: TCP 80 only
    assert not lan.tcp("client", WEB, 81) and not lan.tcp("other", WEB, 80)
    # Egress by destination address: the web pod and the node; nothing else.
    assert lan.ping("client", str(ROUTER)) and not lan.tcp("client", OTHER, 81)
    # An except is no deny: a second policy allowing the excepted address wins (an element sync).
    second = IP_BLOCKS + f"""
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-other, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: {OTHER}/32}}}}]
"""
    await lan.enforce(second)
    assert lan.tcp("other", WEB, 80) and lan.tcp("other", WEB, 81)
    # A deny anywhere beats an allow: a CNP deny on the client's identity beats its ipBlock allow.
    await lan.enforce(second + """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
""")
    assert not lan.tcp("client", WEB, 80) and lan.tcp("other", WEB, 80)
    assert lan.counter("pol_denied_in") > 0


async def test_an_ip_block_allow_beats_an_l7_rule_on_the_same_port(netns_factory: NetnsFactory) -> None:
    lan = await build_lan(netns_factory, "mbipb-")
    await lan.enforce(L7_ON_80_PLAIN_81 + f"""
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-client-address, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: {CLIENT}/32}}}}]
    ports: [{{port: 80}}]
""")
    assert lan.tcp("client", WEB, 80)  # the plain allow by address: the L7 rule is moot
    assert not lan.tcp("other", WEB, 80)
