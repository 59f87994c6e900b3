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
(``NFULNL_CFG_F_CONNTRACK`` needs CONFIG_NETFILTER_NETLINK_GLUE_CT: EOPNOTSUPP), which is why the
datapath encodes direction and reason in the prefix (see :mod:`membrane.observe.events`).

Primitives: :class:`Packet` and :func:`decode_packet` (IPv4/IPv6 header → 5-tuple, TCP flags,
ICMP type), :class:`NflogRecord`, :class:`NflogDecoder` (datagrams → records, loss accounting),
:func:`config_request` (the bind/configure message), :class:`NflogSettings`,
:class:`NflogStats`, :class:`NflogReader` (the asyncio reader), the :class:`FlowEventSource`
protocol it implements and :class:`FakeFlowEventSource` for tests.
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
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_SEQ = 12

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
            + _attr(NFULA_CFG_FLAGS, _BE16.pack(NFULNL_CFG_F_SEQ))
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


class NflogError(OSError):
    """The kernel refused to bind or configure the group (EPERM: another reader has it)."""


def open_nflog_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in the caller's network namespace (create it inside the node's)."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


class NflogReader:
    """Reads one NFLOG group on the event loop and hands records to a sink.

    ``run()`` binds the group (on ``sock``, or a new socket in the current network namespace),
    then reads until cancelled, then unbinds and closes the socket. The sink runs on the event
    loop, once per datagram, and must be quick (append to a ring, not await).
    """

    def __init__(self, group: int, *, sock: socket.socket | None = None, settings: NflogSettings | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group} out of range (0-65535)")
        self.group = group
        self.settings = settings or NflogSettings()
        self._sock = sock
        self._clock = clock
        self._decoder = NflogDecoder()
        self._buffer = bytearray(max(self.settings.nlbufsiz, 65536) + 4096)
        self.bound = asyncio.Event()

    @property
    def stats(self) -> NflogStats:
        return self._decoder.stats

    async def run(self, sink: RecordSink) -> None:
        sock = self._sock or open_nflog_socket()
        self._sock = None  # a restarted run() opens a fresh socket: a closed one cannot be reused
        loop = asyncio.get_running_loop()
        try:
            self._prepare(sock)
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

    def _prepare(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.settings.rcvbuf)
        except PermissionError:  # without CAP_NET_ADMIN: whatever rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.settings.rcvbuf)
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        # Lets the kernel stamp packets as they arrive (NFULA_TIMESTAMP) instead of the reader
        # stamping whole batches when it reads them.
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        sock.bind((0, 0))

    async def _bind(self, sock: socket.socket, sink: RecordSink, timeout: float = 5.0) -> None:
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

    def _drain(self, sock: socket.socket, sink: RecordSink) -> None:
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
