"""Maglev backend selection in the kernel's nftables: the slot nft's ``jhash`` picks, and so the
backend a connection reaches through ``dnat ip to jhash … map @svc``, is what ``jhash.py`` and
``maglev.py`` predict; and a full-size (16381-element) map loads.

Topology: client (10.251.1.2) — node (10.251.1.1 | 10.251.2.1, the nft table, forwarding) —
backends (10.251.2.11..15, one TCP server per backend port that answers with the address and
port it was reached on).
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time

import pytest

from membrane.loadbalancer.jhash import hash_input, maglev_slot, nft_jhash, nft_jhash_expr
from membrane.loadbalancer.maglev import DEFAULT_TABLE_SIZE, MaglevSeed, lookup_table, nft_map_elements
from membrane.testing.netns import Netns, NetnsFactory, missing_binaries, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(missing_binaries("nft", "sysctl")), reason="needs nft and sysctl"),
]

SEED = MaglevSeed.parse("c2VlZC1mb3ItdGVz")  # b"seed-for-tes"
CLIENT = "10.251.1.2"
VIP = "10.251.9.9"
BACKENDS = [f"10.251.2.{11 + i}:{8081 + i}" for i in range(5)]
SOURCE_PORTS = range(41000, 41060)

# Answers every connection with "ADDRESS:PORT" of the local end it was reached on, on each port given.
WHOAMI = textwrap.dedent("""
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    for port in sys.argv[1:]:
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", int(port))); srv.listen(64); sel.register(srv, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            conn, _ = key.fileobj.accept()
            addr, port = conn.getsockname()
            conn.sendall(f"{addr}:{port}".encode()); conn.close()
""")

# SO_MARK is 36 on Linux; Python's socket module exposes it only on newer releases.
SO_MARK = getattr(socket, "SO_MARK", 36)


def _veth(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addrs: list[str]) -> None:
    a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.path)
    a.run("ip", "addr", "add", a_addr, "dev", a_if)
    a.run("ip", "link", "set", a_if, "up")
    for addr in b_addrs:
        b.run("ip", "addr", "add", addr, "dev", b_if)
    b.run("ip", "link", "set", b_if, "up")


def _service_ruleset(table: tuple[str, ...], table_size: int) -> str:
    # As the agent lays services out: a verdict map on (VIP, protocol, port) jumps to the service
    # port's chain, whose one rule DNATs to the backend in the slot the flow hashes to. Naming the
    # transport fields by protocol (``tcp sport``) gives the rule the protocol match nat needs.
    full = nft_jhash_expr("tcp", table_size=table_size, seed=SEED.jhash_seed)
    affinity = nft_jhash_expr("tcp", table_size=table_size, seed=SEED.jhash_seed, affinity=True)
    return textwrap.dedent(f"""
        table inet mmglb {{
          map svc {{
            typeof numgen random mod {table_size} : ip daddr . tcp dport
            elements = {{ {nft_map_elements(table)} }}
          }}
          chain svc_80 {{
            dnat ip to {full} map @svc
          }}
          chain svc_81_affinity {{
            dnat ip to {affinity} map @svc
          }}
          chain pre {{
            type nat hook prerouting priority dstnat; policy accept;
            ip daddr . meta l4proto . th dport vmap {{
              {VIP} . tcp . 80 : goto svc_80,
              {VIP} . tcp . 81 : goto svc_81_affinity
            }}
          }}
        }}
    """)


def _load(ns: Netns, ruleset: str) -> float:
    started = time.perf_counter()
    ns.run("nft", "-f", "-", input=ruleset, timeout=60)
    return time.perf_counter() - started


@pytest.fixture
def topology(netns_factory: NetnsFactory) -> tuple[Netns, Netns, Netns]:
    client = netns_factory("mmg-cl", lo_up=True)
    node = netns_factory("mmg-node", lo_up=True)
    backends = netns_factory("mmg-be", lo_up=True)
    _veth(client, "eth0", f"{CLIENT}/24", node, "cl0", ["10.251.1.1/24"])
    _veth(backends, "eth0", "10.251.2.11/24", node, "be0", ["10.251.2.1/24"])
    for i in range(1, len(BACKENDS)):
        backends.run("ip", "addr", "add", f"10.251.2.{11 + i}/24", "dev", "eth0")
    client.run("ip", "route", "add", "default", "via", "10.251.1.1")
    backends.run("ip", "route", "add", "default", "via", "10.251.2.1")
    node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    ports = [backend.rpartition(":")[2] for backend in BACKENDS]
    backends.spawn(sys.executable, "-c", WHOAMI, *ports)
    wait_until(
        lambda: all(f":{port} " in backends.run("ss", "-ltnH").stdout for port in ports),
        what="backend servers listening",
    )
    return client, node, backends


def _reached(client: Netns, sport: int, dport: int) -> str:
    sock = client.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(3)
        sock.bind((CLIENT, sport))  # a fixed source port makes the 5-tuple, and so the slot, known
        sock.connect((VIP, dport))
        return sock.recv(64).decode()
    finally:
        sock.close()


def test_connections_reach_the_backend_the_maglev_table_predicts(topology: tuple[Netns, Netns, Netns]) -> None:
    client, node, _ = topology
    table = lookup_table(BACKENDS, seed=SEED, table_size=DEFAULT_TABLE_SIZE)
    elapsed = _load(node, _service_ruleset(table, DEFAULT_TABLE_SIZE))
    print(f"\nnft -f of a {DEFAULT_TABLE_SIZE}-element Maglev map: {elapsed * 1000:.0f} ms")

    reached = {sport: _reached(client, sport, 80) for sport in SOURCE_PORTS}
    predicted = {
        sport: table[maglev_slot(CLIENT, sport, VIP, 80, table_size=DEFAULT_TABLE_SIZE, seed=SEED.jhash_seed)]
        for sport in SOURCE_PORTS
    }
    assert reached == predicted
    assert set(reached.values()) == set(BACKENDS)  # the ports chosen exercise every backend


def test_with_session_affinity_the_source_port_does_not_change_the_backend(
    topology: tuple[Netns, Netns, Netns],
) -> None:
    client, node, _ = topology
    table = lookup_table(BACKENDS, seed=SEED, table_size=251)
    _load(node, _service_ruleset(table, 251))
    slot = maglev_slot(CLIENT, 0, VIP, 81, table_size=251, seed=SEED.jhash_seed, affinity=True)
    reached = {_reached(client, sport, 81) for sport in SOURCE_PORTS[:12]}
    assert reached == {table[slot]}


# -- the raw hash ----------------------------------------------------------------------------------

_MOD = 0xFFFFFFFF  # reciprocal_scale(h, 2^32-1) == h-1 for h > 0: nearly the raw jhash value
_EXPRESSIONS = {
    # server port: the fields hashed for connections to it (4, 8, 12, 16 and 24 register bytes)
    9001: "ip saddr",
    9002: "ip saddr . tcp sport",
    9003: "ip saddr . ip daddr . tcp dport",
    9004: "ip saddr . tcp sport . ip daddr . tcp dport",
    9005: "ip saddr . tcp sport . ip daddr . tcp dport . ip saddr . ip daddr",
}


def _register_bytes(dport: int, saddr: str, sport: int, daddr: str) -> bytes:
    full = hash_input(saddr, sport, daddr, dport)
    src, sp, dst, dp = full[0:4], full[4:8], full[8:12], full[12:16]
    return {9001: src, 9002: src + sp, 9003: src + dst + dp, 9004: full, 9005: full + src + dst}[dport]


def test_the_jhash_replica_equals_the_kernels(netns_factory: NetnsFactory) -> None:
    """The SYN's mark is set from nft's jhash; with tcp_fwmark_accept the accepted socket carries
    it, so the server reads the kernel's result for each flow."""
    ns = netns_factory("mmg-jh", lo_up=True)
    ns.run("ip", "addr", "add", "10.251.3.1/24", "dev", "lo")
    ns.run("sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1")
    seed = 0x5EED1234
    rules = "\n".join(
        f"tcp dport {dport} meta mark set jhash {expr} mod {_MOD} seed {seed:#x}"
        for dport, expr in _EXPRESSIONS.items()
    )
    chain = f"chain out {{\ntype filter hook output priority 0;\n{rules}\n}}"
    ns.run("nft", "-f", "-", input=f"table ip mmgjh {{\n{chain}\n}}\n")

    servers = {}
    for dport in _EXPRESSIONS:
        srv = ns.socket()
        srv.bind(("10.251.3.1", dport))
        srv.listen(8)
        servers[dport] = srv
    try:
        for dport, srv in servers.items():
            for sport in (1, 40000, 54321, 65535):
                cli = ns.socket()
                cli.bind(("127.0.0.1", sport))
                cli.connect(("10.251.3.1", dport))
                conn, _ = srv.accept()
                kernel = conn.getsockopt(socket.SOL_SOCKET, SO_MARK) & 0xFFFFFFFF  # read back as a signed int
                conn.close()
                cli.close()
                data = _register_bytes(dport, "127.0.0.1", sport, "10.251.3.1")
                print(f"\nkernel vector: jhash({data.hex()}, seed={seed:#x}) mod {_MOD:#x} = {kernel:#010x}")
                assert nft_jhash(data, _MOD, seed) == kernel, (dport, sport)
    finally:
        for srv in servers.values():
            srv.close()
