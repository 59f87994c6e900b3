"""NFLOG: the kernel's packet log, read from Python — a sans-io decoder and one asyncio reader.

nft rules ``log group N snaplen S prefix "…"`` hand a copy of the packet's first bytes, its
prefix and metadata to nfnetlink_log, which sends them to whichever netlink socket is bound to
group N in that network namespace (no socket bound: the kernel discards them at no cost).

Wire format (one datagram holds one or more netlink messages; with a queue threshold the kernel
batches them as a multipart message closed by NLMSG_DONE)::

    nlmsghdr  len:u32 type:u16 flags:u16 seq:u32 pid:u32      type = NFNL_SUBSYS_ULOG<<8 | 0
    nfgenmsg  family:u8 version:u8 res_id:be16 (the group)
    attributes (len:u16 type:u16 value, 4-byte aligned), all integers big-endian:
      PACKET_HDR  hw_protocol:be16 hook:u8 pad:u8       MARK       skb mark
      TIMESTAMP   sec:be64 usec:be64 (when the skb has one)  IFINDEX_INDEV / _OUTDEV
      PAYLOAD     the packet from the network header on, cut at the snaplen
      PREFIX      NUL-terminated log prefix              SEQ        per-group sequence number

Loss. When the reader's receive buffer is full the kernel drops a whole batch. With
``NFULNL_CFG_F_SEQ`` every message is numbered, so the decoder counts exactly how many were lost
from the gaps; the socket also sets ``NETLINK_NO_ENOBUFS`` (so an overflow does not fail the next
read) and a large ``SO_RCVBUFFORCE``. Conntrack data cannot ride along on this kernel
(``NFULNL_CFG_F_CONNTRACK`` needs CONFIG_NETFILTER_NETLINK_GLUE_CT: the bind is refused with
EOPNOTSUPP, pinned by the contract suite), which is why the datapath encodes direction and reason
in the prefix (see :mod:`membrane.datapath.flowcodes`) and a service connection's frontend comes
from a log in the service chain, before DNAT (see :mod:`membrane.observe.services`).

Primitives: :class:`Packet` and :func:`decode_packet` (IPv4/IPv6 header → 5-tuple, TCP flags,
ICMP type), :class:`NflogRecord`, :class:`NflogDecoder` (datagrams → records, loss accounting),
:func:`config_request` (the bind/configure message), :class:`NflogSettings`,
:class:`NflogStats`, :class:`NflogReader` (the asyncio reader), the :class:`FlowEventSource`
protocol it implements and :class:`FakeFlowEventSource` for tests. Below the reader, the
:class:`NflogSocket` protocol is the boundary with the kernel: :class:`NetlinkNflogSocket` is the
real one, :class:`FakeNflog` a fake nfnetlink_log whose sockets carry the kernel's bytes, built
with :func:`encode_packet`, :func:`encode_done` and :func:`encode_ack` (checked against the kernel
by :mod:`membrane.testing.nflog_contract`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

# -- kernel constants (include/uapi/linux/netfilter/nfnetlink_log.h, netlink.h) -------------------
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = (NFNL_SUBSYS_ULOG << 8) | 0
NFULNL_MSG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | 1
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER
SO_RCVBUFFORCE, SO_TIMESTAMP = 33, 29  # not exported by Python's socket module

NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_UID = 11
NFULA_SEQ = 12
NFULA_GID = 14
NFULA_HWTYPE = 15
NFULA_HWHEADER = 16
NFULA_HWLEN = 17
NFULA_CT = 18  # the conntrack entry (NFULNL_CFG_F_CONNTRACK)
NLM_F_CAPPED = 0x100

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x1
NFULNL_CFG_F_CONNTRACK = 0x4  # needs CONFIG_NETFILTER_NETLINK_GLUE_CT (EOPNOTSUPP without)

NFULNL_NLBUFSIZ_MAX = 131072  # the kernel refuses larger batch buffers (ERANGE)

# Netfilter hooks as NFULA_PACKET_HDR numbers them.
HOOK_PREROUTING, HOOK_INPUT, HOOK_FORWARD, HOOK_OUTPUT, HOOK_POSTROUTING = 0, 1, 2, 3, 4

# IP protocol numbers and TCP flag bits (the NS bit sits in the byte before the flags).
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_SCTP = 1, 6, 17, 58, 132
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR, TCP_NS = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100,
)
_WANTED_ATTRS = frozenset({NFULA_PACKET_HDR, NFULA_MARK, NFULA_TIMESTAMP, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV,
                           NFULA_PAYLOAD, NFULA_PREFIX, NFULA_SEQ})
_IPV6_EXTENSIONS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options (fragment: 44)

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_BE16 = struct.Struct(">H")
_LENGTH_FRAGMENT = struct.Struct(">H2xH")  # IPv4 total length, (id), flags + fragment offset
_I32 = struct.Struct("=i")
_BE32 = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">QQ")
_PORTS = struct.Struct(">HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


# -- packets ----------------------------------------------------------------------------------------
# Rows are NamedTuples: immutable like frozen dataclasses, but built several times faster, and the
# decoder builds two per event.
class Packet(NamedTuple):
    """What a flow needs from the copied headers. ``length`` is the IP packet's full length (from
    its header, not the truncated copy)."""

    ip_version: int
    source: str
    destination: str
    protocol: int
    length: int
    source_port: int = 0
    destination_port: int = 0
    tcp_flags: int = 0
    icmp_type: int = 0
    icmp_code: int = 0


def decode_packet(data: bytes, start: int = 0, end: int | None = None) -> Packet | None:
    """The network and transport headers of a copied packet (``data[start:end]``); None when not
    even the IP header is there."""
    if end is None:
        end = len(data)
    if end - start < 1:
        return None
    version = data[start] >> 4
    if version == 4:
        if end - start < 20:
            return None
        ihl = (data[start] & 0x0F) * 4
        length, fragment = _LENGTH_FRAGMENT.unpack_from(data, start + 2)
        protocol = data[start + 9]
        source = _ipv4_text(data[start + 12 : start + 16])
        destination = _ipv4_text(data[start + 16 : start + 20])
        # Non-first fragments carry no transport header.
        l4 = start + ihl if fragment & 0x1FFF == 0 else end
        return _transport(4, source, destination, protocol, length, data, l4, end)
    if version == 6:
        if end - start < 40:
            return None
        length = 40 + _BE16.unpack_from(data, start + 4)[0]
        source = socket.inet_ntop(socket.AF_INET6, data[start + 8 : start + 24])
        destination = socket.inet_ntop(socket.AF_INET6, data[start + 24 : start + 40])
        protocol, offset = data[start + 6], start + 40
        while protocol in _IPV6_EXTENSIONS and offset + 2 <= end:
            protocol, offset = data[offset], offset + (data[offset + 1] + 1) * 8
        if protocol == 44 and offset + 8 <= end:  # fragment header: transport only in the first
            first = _BE16.unpack_from(data, offset + 2)[0] & 0xFFF8 == 0
            protocol, offset = data[offset], offset + 8 if first else end
        return _transport(6, source, destination, protocol, length, data, offset, end)
    return None


_ADDRESSES: dict[bytes, str] = {}


def _ipv4_text(raw: bytes) -> str:
    # A node sees few distinct addresses; a bounded cache saves the formatting on every event.
    text = _ADDRESSES.get(raw)
    if text is None:
        text = socket.inet_ntoa(raw)
        if len(_ADDRESSES) < 65536:
            _ADDRESSES[raw] = text
    return text


def _transport(
    version: int, source: str, destination: str, protocol: int, length: int, data: bytes, offset: int, end: int
) -> Packet:
    available = end - offset
    if protocol == IPPROTO_TCP and available >= 14:
        sport, dport = _PORTS.unpack_from(data, offset)
        flags = data[offset + 13] | ((data[offset + 12] & 0x01) << 8)
        return Packet(version, source, destination, protocol, length, sport, dport, flags)
    if protocol in (IPPROTO_UDP, IPPROTO_SCTP) and available >= 4:
        sport, dport = _PORTS.unpack_from(data, offset)
        return Packet(version, source, destination, protocol, length, sport, dport)
    if protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6) and available >= 2:
        return Packet(version, source, destination, protocol, length, 0, 0, 0, data[offset], data[offset + 1])
    return Packet(version, source, destination, protocol, length)


# -- NFLOG messages -------------------------------------------------------------------------------
class NflogRecord(NamedTuple):
    """One logged packet. ``time_ns`` is the kernel's timestamp when the packet had one, else the
    time the reader received it; ``seq`` is the group's sequence number (-1 when not numbered)."""

    prefix: str
    time_ns: int
    hook: int
    in_ifindex: int
    out_ifindex: int
    mark: int
    seq: int
    packet: Packet | None


@dataclass
class DecodeResult:
    records: list[NflogRecord] = field(default_factory=list)
    acks: list[tuple[int, int]] = field(default_factory=list)  # (request seq, errno; 0 = success)


@dataclass
class NflogStats:
    """Counters of one reader. ``lost`` counts messages the kernel numbered but never delivered."""

    received: int = 0
    lost: int = 0
    overflows: int = 0  # ENOBUFS reported by the socket (each = one or more lost batches)
    malformed: int = 0
    datagrams: int = 0


class NflogDecoder:
    """Datagrams → records, with loss accounting from NFULA_SEQ gaps (pure: no sockets, no clock)."""

    def __init__(self, stats: NflogStats | None = None) -> None:
        self.stats = stats or NflogStats()
        self._next_seq = 0  # the kernel numbers each group instance from 0 at BIND
        self._prefixes: dict[bytes, str] = {}

    def rebound(self) -> None:
        """A new BIND starts a new group instance, numbered from 0 again."""
        self._next_seq = 0

    def feed(self, data: bytes | bytearray | memoryview, received_ns: int) -> DecodeResult:
        result = DecodeResult()
        self.stats.datagrams += 1
        raw = bytes(data)  # one copy; slicing and unpacking bytes is the fast path from here on
        offset, end = 0, len(raw)
        unpack_header = _NLMSGHDR.unpack_from
        while offset + 16 <= end:
            length, msg_type, _flags, seq, _pid = unpack_header(raw, offset)
            if length < 16 or offset + length > end:
                self.stats.malformed += 1
                break
            if msg_type == NFULNL_MSG_PACKET:
                record = self._packet(raw, offset + 16, offset + length, received_ns)
                if record is None:
                    self.stats.malformed += 1
                else:
                    result.records.append(record)
            elif msg_type == NLMSG_ERROR and length >= 20:
                code = _I32.unpack_from(raw, offset + 16)[0]
                request_seq = unpack_header(raw, offset + 20)[3] if length >= 36 else seq
                result.acks.append((request_seq, -code))
            offset += (length + 3) & ~3
        self.stats.received += len(result.records)
        return result

    def _packet(self, raw: bytes, start: int, end: int, received_ns: int) -> NflogRecord | None:
        if end - start < 4:
            return None
        prefix, hook, in_ifindex, out_ifindex, mark, seq = "", -1, 0, 0, 0, -1
        time_ns = payload_start = payload_end = 0
        unpack_attr, unpack_be32 = _NLATTR.unpack_from, _BE32.unpack_from
        offset = start + 4  # after nfgenmsg
        wanted = _WANTED_ATTRS
        while offset + 4 <= end:
            nla_len, kind = unpack_attr(raw, offset)
            if nla_len < 4 or offset + nla_len > end:
                return None
            kind &= NLA_TYPE_MASK
            if kind in wanted:  # most others (hardware header, uid, gid) are skipped with one test
                value = offset + 4
                if kind == NFULA_PAYLOAD:
                    payload_start, payload_end = value, offset + nla_len
                elif kind == NFULA_PREFIX:
                    text = raw[value : offset + nla_len]
                    known = self._prefixes.get(text)
                    if known is None:
                        known = text.split(b"\0", 1)[0].decode("ascii", "replace")
                        if len(self._prefixes) < 4096:  # a handful of rules: bounded all the same
                            self._prefixes[text] = known
                    prefix = known
                elif nla_len < 8:
                    return None
                elif kind == NFULA_PACKET_HDR:
                    hook = raw[value + 2]
                elif kind == NFULA_IFINDEX_INDEV:
                    in_ifindex = unpack_be32(raw, value)[0]
                elif kind == NFULA_IFINDEX_OUTDEV:
                    out_ifindex = unpack_be32(raw, value)[0]
                elif kind == NFULA_SEQ:
                    seq = unpack_be32(raw, value)[0]
                elif kind == NFULA_MARK:
                    mark = unpack_be32(raw, value)[0]
                elif nla_len >= 20:  # NFULA_TIMESTAMP
                    sec, usec = _TIMESTAMP.unpack_from(raw, value)
                    time_ns = sec * 1_000_000_000 + usec * 1000
            offset += (nla_len + 3) & ~3
        if seq >= 0:
            gap = (seq - self._next_seq) & 0xFFFFFFFF
            if gap < 1 << 31:  # a gap "backwards" would be a reordering the kernel never does
                self.stats.lost += gap
            self._next_seq = (seq + 1) & 0xFFFFFFFF
        packet = decode_packet(raw, payload_start, payload_end) if payload_end else None
        return NflogRecord(prefix, time_ns or received_ns, hook, in_ifindex, out_ifindex, mark, seq, packet)


def _attr(kind: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(4 + len(value), kind) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))


# -- encoding: the kernel's messages, byte for byte (for fakes and tests) ---------------------------
@dataclass(frozen=True)
class NflogHardware:
    """Link-layer attributes the kernel adds to a packet logged with an input device: the device
    type, its header as received, and the source hardware address."""

    hwtype: int
    header: bytes
    address: bytes


#: What ``lo`` reports: ARPHRD_LOOPBACK, an all-zero Ethernet header (type IPv4), a zero address.
LOOPBACK_HARDWARE = NflogHardware(hwtype=772, header=bytes(12) + b"\x08\x00", address=bytes(6))


def encode_packet(
    group: int, prefix: str, payload: bytes, *, hook: int, seq: int | None = None, indev: int = 0,
    outdev: int = 0, mark: int = 0, hardware: NflogHardware | None = None, timestamp_ns: int | None = None,
    uid: int | None = None, gid: int | None = None, family: int = socket.AF_INET, hw_protocol: int = 0x0800,
) -> bytes:
    """One NFULNL_MSG_PACKET as nfnetlink_log builds it, attributes in the kernel's order (checked
    against the kernel by :mod:`membrane.testing.nflog_contract`): header, prefix, devices, mark,
    hardware (input device only), timestamp (prerouting/input/forward), owner (local sockets),
    sequence number, payload."""
    attrs = _attr(NFULA_PACKET_HDR, struct.pack(">HBB", hw_protocol, hook, 0))
    if prefix:
        attrs += _attr(NFULA_PREFIX, prefix.encode() + b"\0")
    if indev:
        attrs += _attr(NFULA_IFINDEX_INDEV, _BE32.pack(indev))
    if outdev:
        attrs += _attr(NFULA_IFINDEX_OUTDEV, _BE32.pack(outdev))
    if mark:
        attrs += _attr(NFULA_MARK, _BE32.pack(mark))
    if hardware is not None:
        attrs += _attr(NFULA_HWADDR, struct.pack(">H2x8s", len(hardware.address), hardware.address))
        attrs += _attr(NFULA_HWTYPE, _BE16.pack(hardware.hwtype))
        attrs += _attr(NFULA_HWLEN, _BE16.pack(len(hardware.header)))
        attrs += _attr(NFULA_HWHEADER, hardware.header)
    if timestamp_ns is not None:
        seconds, rest = divmod(timestamp_ns, 1_000_000_000)
        attrs += _attr(NFULA_TIMESTAMP, _TIMESTAMP.pack(seconds, rest // 1000))
    if uid is not None:
        attrs += _attr(NFULA_UID, _BE32.pack(uid))
    if gid is not None:
        attrs += _attr(NFULA_GID, _BE32.pack(gid))
    if seq is not None:
        attrs += _attr(NFULA_SEQ, _BE32.pack(seq & 0xFFFFFFFF))
    attrs += _attr(NFULA_PAYLOAD, payload)
    body = struct.pack("=BBH", family, 0, socket.htons(group)) + attrs
    return _NLMSGHDR.pack(16 + len(body), NFULNL_MSG_PACKET, 0, 0, 0) + body


def encode_done(group: int) -> bytes:
    """The NLMSG_DONE that closes a batch of more than one message."""
    return _NLMSGHDR.pack(20, NLMSG_DONE, 0, 0, 0) + struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group))


def encode_ack(request: bytes, error: int, portid: int) -> bytes:
    """The kernel's answer to ``request`` (errno ``error``, 0 for success): an ack echoes the
    request's header (NLM_F_CAPPED), an error the whole request."""
    seq = _NLMSGHDR.unpack_from(request)[3]
    echoed, flags = (request[:16], NLM_F_CAPPED) if error == 0 else (request, 0)
    body = _I32.pack(-error) + echoed
    return _NLMSGHDR.pack(16 + len(body), NLMSG_ERROR, flags, seq, portid) + body


@dataclass(frozen=True)
class NflogSettings:
    """How the reader configures its group. ``timeout_cs`` (hundredths of a second) bounds how long
    the kernel holds a partial batch; ``qthreshold`` messages make a full one."""

    copy_range: int = 128
    qthreshold: int = 64
    timeout_cs: int = 1
    # The kernel allocates every batch at this size (atomically, then trims it): 64 messages of
    # ~200 bytes fit in 32 KiB without asking for high-order pages on each flush.
    nlbufsiz: int = 32768
    rcvbuf: int = 16 << 20
    max_datagrams_per_wakeup: int = 256
    # NFULNL_CFG_F_*: sequence numbers (loss accounting). Conntrack attributes cannot be asked for
    # where the kernel lacks the glue: the whole bind is refused (see the contract suite).
    flags: int = NFULNL_CFG_F_SEQ


def config_request(group: int, settings: NflogSettings, seq: int, *, command: int = NFULNL_CFG_CMD_BIND) -> bytes:
    """The NFULNL_MSG_CONFIG message that binds (or unbinds) ``group`` and configures it in one go:
    the kernel applies the command first, then the copy mode, buffer size, timeout, queue threshold
    and flags carried by the same message."""
    nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group))
    attrs = _attr(NFULA_CFG_CMD, struct.pack("=B", command))
    if command == NFULNL_CFG_CMD_BIND:
        attrs += (
            _attr(NFULA_CFG_MODE, struct.pack(">IBB", settings.copy_range, NFULNL_COPY_PACKET, 0))
            + _attr(NFULA_CFG_NLBUFSIZ, _BE32.pack(settings.nlbufsiz))
            + _attr(NFULA_CFG_TIMEOUT, _BE32.pack(settings.timeout_cs))
            + _attr(NFULA_CFG_QTHRESH, _BE32.pack(settings.qthreshold))
            + _attr(NFULA_CFG_FLAGS, _BE16.pack(settings.flags))
        )
    body = nfgen + attrs
    return _NLMSGHDR.pack(16 + len(body), NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


# -- the event source boundary --------------------------------------------------------------------
RecordSink = Callable[[Sequence[NflogRecord]], None]


class FlowEventSource(Protocol):
    """Where logged packets come from: :class:`NflogReader` (the kernel) or :class:`FakeFlowEventSource`.
    ``bound`` is set while events can arrive (the group is bound)."""

    bound: asyncio.Event

    @property
    def stats(self) -> NflogStats: ...

    async def run(self, sink: RecordSink) -> None:
        """Deliver records to ``sink`` (in batches, in order) until cancelled."""
        ...


class NflogSocket(Protocol):
    """The reader's end of the NFLOG boundary: a datagram socket that carries config requests to
    nfnetlink_log and netlink messages (acks, logged packets) back. :class:`NetlinkNflogSocket` is
    the kernel's; :class:`FakeNflog` makes ones fed with byte-exact messages.
    ``recv_into`` raises BlockingIOError when nothing is waiting (the socket is non-blocking after
    ``prepare``)."""

    def prepare(self, settings: NflogSettings) -> None:
        """Non-blocking, buffers sized for ``settings``, bound (a netlink port id assigned)."""
        ...

    def fileno(self) -> int: ...

    def send(self, data: bytes) -> int: ...

    def recv_into(self, buffer: bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


class NflogError(OSError):
    """The kernel refused to bind or configure the group (EPERM: another reader has it)."""


def open_nflog_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in the caller's network namespace (create it inside the node's)."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


class NetlinkNflogSocket:
    """The real :class:`NflogSocket`: a NETLINK_NETFILTER socket (``sock``, or a new one in the
    caller's network namespace)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else open_nflog_socket()

    def prepare(self, settings: NflogSettings) -> None:
        sock = self.sock
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, settings.rcvbuf)
        except PermissionError:  # without CAP_NET_ADMIN: whatever rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.rcvbuf)
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        # Lets the kernel stamp packets as they arrive (NFULA_TIMESTAMP) instead of the reader
        # stamping whole batches when it reads them.
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        sock.bind((0, 0))

    @property
    def portid(self) -> int:
        return int(self.sock.getsockname()[0])

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> int:
        return self.sock.send(data)

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        return self.sock.recv_into(buffer)

    def close(self) -> None:
        self.sock.close()


class NflogReader:
    """Reads one NFLOG group on the event loop and hands records to a sink.

    ``run()`` binds the group (on ``sock``, or a new socket in the current network namespace),
    then reads until cancelled, then unbinds and closes the socket. The sink runs on the event
    loop, once per datagram, and must be quick (append to a ring, not await).
    """

    def __init__(self, group: int, *, sock: socket.socket | NflogSocket | None = None,
                 settings: NflogSettings | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group} out of range (0-65535)")
        self.group = group
        self.settings = settings or NflogSettings()
        self._sock: NflogSocket | None = NetlinkNflogSocket(sock) if isinstance(sock, socket.socket) else sock
        self._clock = clock
        self._decoder = NflogDecoder()
        self._buffer = bytearray(max(self.settings.nlbufsiz, 65536) + 4096)
        self.bound = asyncio.Event()

    @property
    def stats(self) -> NflogStats:
        return self._decoder.stats

    async def run(self, sink: RecordSink) -> None:
        sock = self._sock or NetlinkNflogSocket()
        self._sock = None  # a restarted run() opens a fresh socket: a closed one cannot be reused
        loop = asyncio.get_running_loop()
        try:
            sock.prepare(self.settings)
            self._decoder.rebound()
            await self._bind(sock, sink)
            readable = asyncio.Event()
            loop.add_reader(sock.fileno(), readable.set)
            try:
                self.bound.set()
                while True:
                    await readable.wait()
                    readable.clear()
                    self._drain(sock, sink)
            finally:
                loop.remove_reader(sock.fileno())
        finally:
            self.bound.clear()
            with contextlib.suppress(OSError):
                sock.send(config_request(self.group, self.settings, 0, command=NFULNL_CFG_CMD_UNBIND))
            sock.close()

    async def _bind(self, sock: NflogSocket, sink: RecordSink, timeout: float = 5.0) -> None:
        seq = 1
        sock.send(config_request(self.group, self.settings, seq))
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            try:
                size = sock.recv_into(self._buffer)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NflogError(errno.ETIMEDOUT, f"NFLOG group {self.group}: no answer to bind") from None
                ready = loop.create_future()
                loop.add_reader(sock.fileno(), ready.set_result, None)
                try:
                    await asyncio.wait_for(ready, max(deadline - time.monotonic(), 0.01))
                except TimeoutError:
                    pass
                finally:
                    loop.remove_reader(sock.fileno())
                continue
            result = self._decoder.feed(memoryview(self._buffer)[:size], self._clock())
            if result.records:
                sink(result.records)
            for request, error in result.acks:
                if request == seq:
                    if error in (errno.EPERM, errno.EBUSY):
                        raise NflogError(error, f"NFLOG group {self.group} is bound by another reader "
                                                f"in this network namespace")
                    if error:
                        raise NflogError(error, f"NFLOG group {self.group}: {errno.errorcode.get(error, error)}")
                    log.info("reading NFLOG group %d", self.group)
                    return

    def _drain(self, sock: NflogSocket, sink: RecordSink) -> None:
        view = memoryview(self._buffer)
        for _ in range(self.settings.max_datagrams_per_wakeup):
            try:
                size = sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._decoder.stats.overflows += 1
                    continue
                raise
            result = self._decoder.feed(view[:size], self._clock())
            if result.records:
                sink(result.records)
        # More may be waiting: return to the loop anyway (the reader callback fires again while
        # the socket is readable), so a flood cannot starve the agent's other tasks.


class FakeFlowEventSource:
    """A :class:`FlowEventSource` fed by the test: ``push(records)`` delivers them in order."""

    def __init__(self) -> None:
        self._stats = NflogStats()
        self._queue: asyncio.Queue[list[NflogRecord]] = asyncio.Queue()
        self.bound = asyncio.Event()

    @property
    def stats(self) -> NflogStats:
        return self._stats

    def push(self, records: Iterable[NflogRecord], *, lost: int = 0) -> None:
        batch = list(records)
        self._stats.received += len(batch)
        self._stats.lost += lost
        self._queue.put_nowait(batch)

    async def run(self, sink: RecordSink) -> None:
        self.bound.set()
        try:
            while True:
                batch = await self._queue.get()
                sink(batch)
        finally:
            self.bound.clear()


# -- a fake nfnetlink_log -------------------------------------------------------------------------
NFULNL_NLBUFSIZ_DEFAULT = 4096
_DEFAULT_COPY_RANGE = 0xFFFF
_DEFAULT_TIMEOUT_CS = 100
_DEFAULT_QTHRESHOLD = 100
_SO_SNDBUFFORCE = 32


@dataclass
class _FakeGroup:
    """One bound group (the kernel's ``nfulnl_instance``), with its defaults."""

    owner: FakeNflogSocket
    copy_range: int = _DEFAULT_COPY_RANGE
    nlbufsiz: int = NFULNL_NLBUFSIZ_DEFAULT
    timeout_cs: int = _DEFAULT_TIMEOUT_CS
    qthreshold: int = _DEFAULT_QTHRESHOLD
    flags: int = 0
    seq: int = 0
    batch: list[bytes] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class FakeNflog:
    """The nfnetlink_log of one network namespace, in memory: :meth:`socket` makes
    :class:`NflogSocket` s whose config requests it answers, and :meth:`log` is a ``log group N``
    rule firing. Messages are the kernel's bytes (:func:`encode_packet`), batched as the kernel
    batches them (a queue threshold, a flush timer on the running event loop, the batch buffer
    size), numbered per group from 0 at bind, cut at the copy range; a batch that finds the
    reader's receive buffer full is dropped whole, leaving a gap in the numbers.
    """

    def __init__(self) -> None:
        self._groups: dict[int, _FakeGroup] = {}
        self._next_portid = 0x1000
        self.dropped_batches = 0

    def socket(self) -> FakeNflogSocket:
        return FakeNflogSocket(self)

    def bound(self, group: int) -> bool:
        return group in self._groups

    def log(
        self, group: int, prefix: str, payload: bytes, *, hook: int, indev: int = 0, outdev: int = 0, mark: int = 0,
        hardware: NflogHardware | None = None, timestamp_ns: int | None = None, uid: int | None = None,
        gid: int | None = None, snaplen: int = 0,
    ) -> bool:
        """A packet logged to ``group``: False when no socket has it bound (the kernel drops it)."""
        state = self._groups.get(group)
        if state is None:
            return False
        length = len(payload)
        if snaplen:
            length = min(length, snaplen)
        payload = payload[: min(length, state.copy_range)]
        seq = None
        if state.flags & NFULNL_CFG_F_SEQ:
            seq, state.seq = state.seq, (state.seq + 1) & 0xFFFFFFFF
        message = encode_packet(group, prefix, payload, hook=hook, seq=seq, indev=indev, outdev=outdev, mark=mark,
                                hardware=hardware, timestamp_ns=timestamp_ns, uid=uid, gid=gid)
        pending = sum(len(m) for m in state.batch)
        if state.batch and pending + len(message) + 20 > state.nlbufsiz:
            self._flush(group, state)  # the batch buffer is full: send it, start another
        state.batch.append(message)
        if len(state.batch) >= state.qthreshold:
            self._flush(group, state)
        elif state.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return True  # no loop: flush() sends the batch
            state.timer = loop.call_later(state.timeout_cs / 100, self._flush, group, state)
        return True

    def flush(self) -> None:
        """Send every partial batch now (what the flush timers do)."""
        for group, state in list(self._groups.items()):
            self._flush(group, state)

    def _flush(self, group: int, state: _FakeGroup) -> None:
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if not state.batch:
            return
        datagram = b"".join(state.batch) + (encode_done(group) if len(state.batch) > 1 else b"")
        state.batch.clear()
        if not state.owner.deliver(datagram):
            self.dropped_batches += 1

    def _portid(self) -> int:
        self._next_portid += 1
        return self._next_portid

    def request(self, sock: FakeNflogSocket, data: bytes) -> None:
        """Config requests from ``sock``, answered as nfnetlink_log does (``nfulnl_recv_config``)."""
        offset = 0
        while offset + 16 <= len(data):
            length, kind, flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            request = data[offset : offset + length]
            offset += _align(length)
            if kind != NFULNL_MSG_CONFIG or length < 20:
                sock.deliver(encode_ack(request, errno.EOPNOTSUPP, sock.portid))
                continue
            error = self._config(sock, request)
            if error or flags & NLM_F_ACK:
                sock.deliver(encode_ack(request, error, sock.portid))

    def _config(self, sock: FakeNflogSocket, request: bytes) -> int:
        group = socket.ntohs(struct.unpack_from("=H", request, 18)[0])
        attrs: dict[int, bytes] = {}
        offset = 20
        while offset + 4 <= len(request):
            nla_len, kind = _NLATTR.unpack_from(request, offset)
            if nla_len < 4:
                return errno.EINVAL
            attrs[kind & NLA_TYPE_MASK] = request[offset + 4 : offset + nla_len]
            offset += _align(nla_len)
        state = self._groups.get(group)
        if state is not None and state.owner is not sock:
            return errno.EPERM
        # Checked before the command, so a refused bind leaves the group unbound (atomic). This
        # nfnetlink_log has no conntrack glue, as kernels built without NETLINK_GLUE_CT.
        if NFULA_CFG_FLAGS in attrs and _BE16.unpack(attrs[NFULA_CFG_FLAGS][:2])[0] & NFULNL_CFG_F_CONNTRACK:
            return errno.EOPNOTSUPP
        if NFULA_CFG_CMD in attrs:
            command = attrs[NFULA_CFG_CMD][0]
            if command == NFULNL_CFG_CMD_BIND:
                if state is not None:
                    return errno.EBUSY
                state = self._groups[group] = _FakeGroup(owner=sock)
            elif command == NFULNL_CFG_CMD_UNBIND:
                if state is None:
                    return errno.ENODEV
                self._release(group)
                return 0
            else:
                return errno.EOPNOTSUPP
        if state is None:
            return errno.ENODEV
        if NFULA_CFG_MODE in attrs:
            copy_range, _mode = struct.unpack_from(">IB", attrs[NFULA_CFG_MODE])
            state.copy_range = min(copy_range, _DEFAULT_COPY_RANGE) or _DEFAULT_COPY_RANGE
        if NFULA_CFG_TIMEOUT in attrs:
            state.timeout_cs = _BE32.unpack(attrs[NFULA_CFG_TIMEOUT])[0]
        if NFULA_CFG_NLBUFSIZ in attrs:
            size = _BE32.unpack(attrs[NFULA_CFG_NLBUFSIZ])[0]
            if size > NFULNL_NLBUFSIZ_MAX:
                return errno.ERANGE
            state.nlbufsiz = max(size, NFULNL_NLBUFSIZ_DEFAULT)
        if NFULA_CFG_QTHRESH in attrs:
            state.qthreshold = _BE32.unpack(attrs[NFULA_CFG_QTHRESH])[0] or 1
        if NFULA_CFG_FLAGS in attrs:
            state.flags = _BE16.unpack(attrs[NFULA_CFG_FLAGS][:2])[0]
        return 0

    def _release(self, group: int) -> None:
        state = self._groups.pop(group)
        if state.timer is not None:
            state.timer.cancel()

    def closed(self, sock: FakeNflogSocket) -> None:
        """A socket closed: its groups are released (the kernel's netlink release notifier)."""
        for group in [g for g, state in self._groups.items() if state.owner is sock]:
            self._release(group)


class FakeNflogSocket:
    """A :class:`NflogSocket` served by a :class:`FakeNflog`: a real datagram socket pair, so the
    reader's event-loop code runs as it does on netlink. The receive buffer is ``rcvbuf`` from the
    settings, doubled as the kernel doubles it; a datagram is refused while more than that is
    waiting (netlink's rule: an empty socket always takes one)."""

    def __init__(self, nflog: FakeNflog) -> None:
        self._nflog = nflog
        self._reader, self._kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._kernel.setblocking(False)
        self._waiting: list[int] = []  # sizes of the datagrams not read yet, oldest first
        self.rcvbuf = 212992  # net.core.rmem_default
        self.portid = 0

    def prepare(self, settings: NflogSettings) -> None:
        self._reader.setblocking(False)
        self.rcvbuf = 2 * settings.rcvbuf
        with contextlib.suppress(OSError):  # room for the emulated buffer in the pair itself
            self._kernel.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, min(settings.rcvbuf, 64 << 20))
        self.portid = self._nflog._portid()

    def fileno(self) -> int:
        return self._reader.fileno()

    def send(self, data: bytes) -> int:
        if not self.portid:
            raise OSError(errno.ENOTCONN, "prepare() the socket first")
        self._nflog.request(self, bytes(data))
        return len(data)

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        size = self._reader.recv_into(buffer)
        if self._waiting:
            self._waiting.pop(0)
        return size

    def deliver(self, datagram: bytes) -> bool:
        """The kernel side: False (dropped) when the receive buffer is over its size."""
        if self._kernel.fileno() < 0 or sum(self._waiting) > self.rcvbuf:
            return False
        try:
            self._kernel.send(datagram)
        except OSError:  # the pair's own buffer is full: dropped all the same
            return False
        self._waiting.append(len(datagram))
        return True

    def close(self) -> None:
        self._nflog.closed(self)
        self._reader.close()
        self._kernel.close()
