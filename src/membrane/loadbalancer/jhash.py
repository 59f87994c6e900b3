"""A Python replica of the Linux kernel's ``jhash()`` as nftables' ``jhash`` expression evaluates it,
so tooling can predict which Maglev slot (and so which backend) a connection gets.

Primitives: :func:`jhash` (``include/linux/jhash.h``: Bob Jenkins' lookup3 ``hashlittle`` on a
little-endian host), :func:`reciprocal_scale` and :func:`nft_jhash` (``nft_jhash_eval``:
``reciprocal_scale(jhash(regs, len, seed), mod) + offset``), :func:`hash_input` (the register bytes
the hash reads for a flow), :func:`maglev_slot` (the slot of a flow in a service's lookup table) and
:func:`nft_jhash_expr` (the nft expression text whose result :func:`maglev_slot` predicts).

Register layout. nft loads every field of a concatenation into its own 32-bit registers, in packet
(network) byte order, and zero-fills the rest of the last register; the hash then reads the whole
padded run (``nft --debug=netlink`` shows ``jhash(reg 2, 16, seed)`` for four fields). So
``ip saddr . tcp sport . ip daddr . tcp dport`` hashes 16 bytes::

    saddr[4] | sport[2] 00 00 | daddr[4] | dport[2] 00 00

The kernel reads those bytes as host-endian 32-bit words; this replica assumes a little-endian host
(x86-64, arm64), which is what every supported node runs.

The protocol is not part of the hash: every service port has its own chain, reached through a
verdict map keyed on the protocol, so adding it would not separate any two flows the rule sees. With ``sessionAffinity:
ClientIP`` the source port is left out (as in Cilium), so all connections of one client reach the
same backend: ``ip saddr . ip daddr . tcp dport`` (12 bytes).
"""

from __future__ import annotations

import ipaddress

JHASH_INITVAL = 0xDEADBEEF
_M32 = 0xFFFFFFFF

_L4PROTOS = ("tcp", "udp", "sctp")


def _rol32(word: int, shift: int) -> int:
    return ((word << shift) | (word >> (32 - shift))) & _M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    # __jhash_mix: every step is reduced to 32 bits, as C's u32 arithmetic wraps.
    a = ((a - c) & _M32) ^ _rol32(c, 4)
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ _rol32(a, 6)
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ _rol32(b, 8)
    b = (b + a) & _M32
    a = ((a - c) & _M32) ^ _rol32(c, 16)
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ _rol32(a, 19)
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ _rol32(b, 4)
    b = (b + a) & _M32
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    # __jhash_final; only c is the result.
    c ^= b
    c = (c - _rol32(b, 14)) & _M32
    a ^= c
    a = (a - _rol32(c, 11)) & _M32
    b ^= a
    b = (b - _rol32(a, 25)) & _M32
    c ^= b
    c = (c - _rol32(b, 16)) & _M32
    a ^= c
    a = (a - _rol32(c, 4)) & _M32
    b ^= a
    b = (b - _rol32(a, 14)) & _M32
    c ^= b
    c = (c - _rol32(b, 24)) & _M32
    return c


def jhash(data: bytes, initval: int = 0) -> int:
    """The kernel's ``jhash(data, len(data), initval)`` on a little-endian host (32-bit result)."""
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + initval) & _M32
    pos = 0
    # All but the last block (which may be a full 12 bytes) go through the mix.
    while length - pos > 12:
        a = (a + int.from_bytes(data[pos : pos + 4], "little")) & _M32
        b = (b + int.from_bytes(data[pos + 4 : pos + 8], "little")) & _M32
        c = (c + int.from_bytes(data[pos + 8 : pos + 12], "little")) & _M32
        a, b, c = _mix(a, b, c)
        pos += 12
    tail = data[pos:]
    if not tail:
        return c  # ``case 0``: nothing left, no final mix.
    # The switch's fall-through adds the tail bytes little-endian into a, b, c: the same as reading
    # the tail zero-padded to 12 bytes.
    padded = tail + bytes(12 - len(tail))
    a = (a + int.from_bytes(padded[0:4], "little")) & _M32
    b = (b + int.from_bytes(padded[4:8], "little")) & _M32
    c = (c + int.from_bytes(padded[8:12], "little")) & _M32
    return _final(a, b, c)


def reciprocal_scale(value: int, modulus: int) -> int:
    """``reciprocal_scale()``: maps a 32-bit value onto ``[0, modulus)`` by multiply and shift."""
    return ((value & _M32) * modulus) >> 32


def nft_jhash(data: bytes, modulus: int, seed: int = 0, offset: int = 0) -> int:
    """What ``jhash <expr> mod MODULUS seed SEED offset OFFSET`` leaves in its register, ``data``
    being the padded register bytes of ``<expr>`` (see :func:`hash_input`)."""
    if not 1 <= modulus <= _M32:
        raise ValueError(f"jhash modulus must be in 1..2^32-1, got {modulus}")
    return (reciprocal_scale(jhash(data, seed & _M32), modulus) + offset) & _M32


def _reg_pad(field: bytes) -> bytes:
    # A concatenation field occupies whole 4-byte registers, zero-filled after the value.
    return field + bytes(-len(field) % 4)


def hash_input(saddr: str, sport: int, daddr: str, dport: int, *, affinity: bool = False) -> bytes:
    """The register bytes the Maglev hash reads for an IPv4 flow (network byte order, each field
    padded to a 4-byte register). With ``affinity`` the source port is left out."""
    src = ipaddress.IPv4Address(saddr).packed
    dst = ipaddress.IPv4Address(daddr).packed
    sp = _reg_pad(sport.to_bytes(2, "big"))
    dp = _reg_pad(dport.to_bytes(2, "big"))
    if affinity:
        return src + dst + dp
    return src + sp + dst + dp


def maglev_slot(
    saddr: str, sport: int, daddr: str, dport: int, *, table_size: int, seed: int, affinity: bool = False
) -> int:
    """The lookup-table slot nft picks for this flow: the key of the service map's element whose
    value is the backend the connection is DNATed to."""
    return nft_jhash(hash_input(saddr, sport, daddr, dport, affinity=affinity), table_size, seed)


def nft_jhash_expr(l4proto: str, *, table_size: int, seed: int, affinity: bool = False) -> str:
    """The nft expression :func:`maglev_slot` replicates, e.g.
    ``jhash ip saddr . tcp sport . ip daddr . tcp dport mod 16381 seed 0x1a2b3c4d``.

    The transport fields are named by protocol (``tcp sport``), not ``th``: both load the same
    bytes, but ``tcp sport`` brings its own ``meta l4proto tcp`` dependency, which nat's port
    mapping requires (with ``th`` alone nft refuses the rule: "transport protocol mapping is only
    valid after transport protocol match"), and nft lists the rule back in exactly this text.
    Complete service rule: ``dnat ip to <this> map @<service map>``."""
    if l4proto not in _L4PROTOS:
        raise ValueError(f"unsupported protocol {l4proto!r} (expected one of {', '.join(_L4PROTOS)})")
    fields = ["ip saddr", f"{l4proto} sport", "ip daddr", f"{l4proto} dport"]
    if affinity:
        fields.remove(f"{l4proto} sport")
    return f"jhash {' . '.join(fields)} mod {table_size} seed {seed & _M32:#x}"
