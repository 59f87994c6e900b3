"""The NFLOG boundary as a reusable pytest suite: the same assertions against the kernel and the fake.

Below the flow reader is one boundary, :class:`membrane.observe.nflog.NflogSocket`: config requests
go in, netlink messages (acks, logged packets) come out. The suite pins down what crosses it, down to
the bytes: each logged packet must be exactly :func:`~membrane.observe.nflog.encode_packet` of what
the scenario knows (prefix, hook, devices, owner, sequence number), with only the packet itself and
the kernel's timestamp taken from the message. So the fake (:class:`~membrane.observe.nflog.FakeNflog`)
is held to what the kernel really sends.

The scenario is a namespace with loopback up and a tiny table: UDP to :data:`OUTPUT_PORT` is logged
in the output hook with prefix :data:`OUTPUT_PREFIX`, UDP to :data:`INPUT_PORT` in the input hook with
:data:`INPUT_PREFIX`, both to :data:`GROUP`. A test module provides an ``nflog`` fixture yielding an
:class:`NflogBackend` and subclasses :class:`NflogContract`::

    @pytest.fixture
    def nflog(netns_factory):
        backend = KernelNflog(netns_factory("mbtrc-nflog-", lo_up=True))
        yield backend
        backend.close()

    class TestKernelNflog(NflogContract):
        pass

Primitives: :class:`NflogBackend` (:class:`KernelNflog`, :class:`FakeNflogBackend`),
:func:`bind`, :func:`receive`, :func:`messages`, :func:`attributes`, :func:`ipv4_udp` and
:class:`NflogContract`.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

from membrane.observe.nflog import (
    HOOK_INPUT,
    HOOK_OUTPUT,
    IPPROTO_UDP,
    LOOPBACK_HARDWARE,
    NETLINK_NETFILTER,
    NFULA_CT,
    NFULA_PAYLOAD,
    NFULA_TIMESTAMP,
    NFULNL_CFG_F_CONNTRACK,
    NFULNL_CFG_F_SEQ,
    FakeNflog,
    NetlinkNflogSocket,
    NflogDecoder,
    NflogError,
    NflogReader,
    NflogRecord,
    NflogSettings,
    NflogSocket,
    Packet,
    config_request,
    encode_ack,
    encode_done,
    encode_packet,
)
from membrane.testing.netns import Netns

GROUP = 7
OUTPUT_PORT, INPUT_PORT = 9999, 9998
OUTPUT_PREFIX, INPUT_PREFIX = "x", "in"
LOOPBACK = "127.0.0.1"
LO_IFINDEX = 1
SENDER_PORT = 40123
#: One datagram per message, sent at once: what the byte-level tests compare.
SINGLE = NflogSettings(qthreshold=1, timeout_cs=1)

TABLE = f"""table inet mbtrc_nflog {{
    chain out {{
        type filter hook output priority filter; policy accept;
        udp dport {OUTPUT_PORT} log prefix "{OUTPUT_PREFIX}" group {GROUP}
    }}
    chain in {{
        type filter hook input priority filter; policy accept;
        udp dport {INPUT_PORT} log prefix "{INPUT_PREFIX}" group {GROUP}
    }}
}}
"""


class NflogBackend(abc.ABC):
    """One side of the boundary: sockets to read NFLOG from, and a way to make the table log."""

    uid = os.getuid()
    gid = os.getgid()
    sport = SENDER_PORT

    @abc.abstractmethod
    def socket(self) -> NflogSocket:
        """A fresh, unprepared NFLOG socket."""

    @abc.abstractmethod
    def send_udp(self, dport: int, payload: bytes = b"hello") -> None:
        """One UDP datagram ``LOOPBACK:sport → LOOPBACK:dport``, sent now (synchronously)."""

    def close(self) -> None:
        return None


class KernelNflog(NflogBackend):
    """The kernel, in ``netns`` (a fresh namespace with loopback up): the table is loaded there."""

    def __init__(self, netns: Netns) -> None:
        self.netns = netns
        netns.run("nft", "-f", "-", input=TABLE)
        self._sender = netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sender.bind((LOOPBACK, self.sport))
        # Takes the datagrams, so no port-unreachable answers travel back.
        self._sinks = []
        for port in (OUTPUT_PORT, INPUT_PORT):
            sink = netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.bind((LOOPBACK, port))
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sinks.append(sink)

    def socket(self) -> NflogSocket:
        return NetlinkNflogSocket(self.netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))

    def send_udp(self, dport: int, payload: bytes = b"hello") -> None:
        self._sender.sendto(payload, (LOOPBACK, dport))

    def close(self) -> None:
        for sock in (self._sender, *self._sinks):
            sock.close()


class FakeNflogBackend(NflogBackend):
    """:class:`FakeNflog`, with the scenario's table played by hand: loopback delivery logs in the
    output hook (out ``lo``, the sender's owner) or the input hook (in ``lo``, its hardware header,
    a timestamp)."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self.nflog = FakeNflog()
        self._clock = clock
        self._ident = 0x1234

    def socket(self) -> NflogSocket:
        return self.nflog.socket()

    def send_udp(self, dport: int, payload: bytes = b"hello") -> None:
        self._ident = (self._ident + 1) & 0xFFFF
        packet = ipv4_udp(LOOPBACK, LOOPBACK, self.sport, dport, payload, ident=self._ident)
        if dport == OUTPUT_PORT:
            self.nflog.log(GROUP, OUTPUT_PREFIX, packet, hook=HOOK_OUTPUT, outdev=LO_IFINDEX, uid=self.uid,
                           gid=self.gid)
        if dport == INPUT_PORT:
            self.nflog.log(GROUP, INPUT_PREFIX, packet, hook=HOOK_INPUT, indev=LO_IFINDEX,
                           hardware=LOOPBACK_HARDWARE, timestamp_ns=self._clock())


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, *, ident: int = 0) -> bytes:
    """An IPv4/UDP packet as a local socket sends it (DF, TTL 64, header checksum)."""
    total = 28 + len(payload)
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, 64, IPPROTO_UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack(">H", _checksum(header)) + header[12:]
    return header + struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload


# -- helpers over the raw boundary ----------------------------------------------------------------


async def receive(sock: NflogSocket, timeout: float = 5.0) -> bytes:
    """The next datagram (the socket is non-blocking after prepare())."""
    buffer = bytearray(1 << 17)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return bytes(buffer[: sock.recv_into(buffer)])
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _resolve, ready)
        try:
            await asyncio.wait_for(ready, max(deadline - loop.time(), 0.001))
        except TimeoutError:
            raise AssertionError("no NFLOG datagram arrived") from None
        finally:
            loop.remove_reader(sock.fileno())


async def bind(sock: NflogSocket, settings: NflogSettings = SINGLE, group: int = GROUP) -> tuple[bytes, bytes]:
    """Prepare ``sock`` and bind ``group``: (the request, the answer)."""
    sock.prepare(settings)
    request = config_request(group, settings, 1)
    sock.send(request)
    return request, await receive(sock)


def messages(datagram: bytes) -> list[bytes]:
    """The netlink messages of a datagram, each with its padding."""
    out, offset = [], 0
    while offset + 16 <= len(datagram):
        length = struct.unpack_from("=I", datagram, offset)[0]
        assert length >= 16, f"bad netlink length {length}"
        padded = (length + 3) & ~3
        out.append(datagram[offset : offset + padded])
        offset += padded
    assert offset == len(datagram), "trailing bytes after the last message"
    return out


def attributes(message: bytes) -> list[tuple[int, bytes]]:
    """The attributes of an NFLOG packet message (after the netlink and nfgenmsg headers)."""
    length = struct.unpack_from("=I", message)[0]
    out, offset = [], 20
    while offset + 4 <= length:
        nla_len, kind = struct.unpack_from("=HH", message, offset)
        out.append((kind, message[offset + 4 : offset + nla_len]))
        offset += (nla_len + 3) & ~3
    return out


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _attr(message: bytes, kind: int) -> bytes | None:
    return next((value for k, value in attributes(message) if k == kind), None)


def _payload(message: bytes) -> bytes:
    payload = _attr(message, NFULA_PAYLOAD)
    assert payload is not None, "no payload attribute"
    return payload


def _timestamp_ns(message: bytes) -> int | None:
    raw = _attr(message, NFULA_TIMESTAMP)
    if raw is None:
        return None
    seconds, usec = struct.unpack(">QQ", raw)
    return int(seconds) * 1_000_000_000 + int(usec) * 1000


def _portid(answer: bytes) -> int:
    return int(struct.unpack_from("=I", answer, 12)[0])


async def _until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class NflogContract:
    """The contract. Every test gets a fresh backend from the ``nflog`` fixture."""

    # -- binding

    async def test_bind_is_acknowledged_with_the_request_header(self, nflog: NflogBackend) -> None:
        sock = nflog.socket()
        try:
            request, answer = await bind(sock)
            assert answer == encode_ack(request, 0, _portid(answer))
            assert NflogDecoder().feed(answer, 0).acks == [(1, 0)]
        finally:
            sock.close()

    async def test_a_bound_group_refuses_another_socket(self, nflog: NflogBackend) -> None:
        first, second = nflog.socket(), nflog.socket()
        try:
            await bind(first)
            request, answer = await bind(second)
            assert answer == encode_ack(request, errno.EPERM, _portid(answer))
            with pytest.raises(NflogError, match="bound by another reader"):
                await asyncio.wait_for(NflogReader(GROUP, sock=nflog.socket()).run(lambda records: None), 10)
        finally:
            first.close()
            second.close()

    async def test_conntrack_attributes_are_refused_and_leave_the_group_unbound(self, nflog: NflogBackend) -> None:
        # Kernels without CONFIG_NETFILTER_NETLINK_GLUE_CT cannot attach NFULA_CT to a logged packet:
        # the whole request fails, the group stays free, and a bind without the flag works.
        sock = nflog.socket()
        try:
            request, answer = await bind(sock, NflogSettings(qthreshold=1, timeout_cs=1,
                                                             flags=NFULNL_CFG_F_SEQ | NFULNL_CFG_F_CONNTRACK))
            assert answer == encode_ack(request, errno.EOPNOTSUPP, _portid(answer))
            assert NflogDecoder().feed(answer, 0).acks == [(1, errno.EOPNOTSUPP)]
            request = config_request(GROUP, SINGLE, 2)
            sock.send(request)
            assert await receive(sock) == encode_ack(request, 0, _portid(answer))
            nflog.send_udp(OUTPUT_PORT)
            [message] = messages(await receive(sock))
            assert NFULA_CT not in [kind for kind, _ in attributes(message)]
        finally:
            sock.close()

    # -- one packet, byte for byte

    async def test_an_output_hook_message_is_the_kernel_encoding(self, nflog: NflogBackend) -> None:
        sock = nflog.socket()
        try:
            await bind(sock)
            nflog.send_udp(OUTPUT_PORT, b"hello")
            [message] = messages(await receive(sock))
            payload = _payload(message)
            assert message == encode_packet(GROUP, OUTPUT_PREFIX, payload, hook=HOOK_OUTPUT, seq=0,
                                             outdev=LO_IFINDEX, uid=nflog.uid, gid=nflog.gid)
            [record] = NflogDecoder().feed(message, 0).records
            assert (record.prefix, record.hook, record.in_ifindex, record.out_ifindex, record.seq) == (
                OUTPUT_PREFIX, HOOK_OUTPUT, 0, LO_IFINDEX, 0)
            assert record.packet == Packet(4, LOOPBACK, LOOPBACK, IPPROTO_UDP, 33, nflog.sport, OUTPUT_PORT)
        finally:
            sock.close()

    async def test_an_input_hook_message_carries_the_device_its_header_and_a_timestamp(
            self, nflog: NflogBackend) -> None:
        sock = nflog.socket()
        try:
            await bind(sock)
            before = time.time_ns() // 1000 * 1000
            nflog.send_udp(INPUT_PORT, b"hello")
            [message] = messages(await receive(sock))
            after = time.time_ns()
            stamp = _timestamp_ns(message)
            assert stamp is not None and before - 1_000_000 <= stamp <= after
            assert message == encode_packet(GROUP, INPUT_PREFIX, _payload(message), hook=HOOK_INPUT, seq=0,
                                             indev=LO_IFINDEX, hardware=LOOPBACK_HARDWARE, timestamp_ns=stamp)
            [record] = NflogDecoder().feed(message, 0).records
            assert (record.in_ifindex, record.out_ifindex, record.time_ns) == (LO_IFINDEX, 0, stamp)
            assert record.packet is not None and record.packet.destination_port == INPUT_PORT
        finally:
            sock.close()

    async def test_the_copy_range_cuts_the_packet_not_its_length(self, nflog: NflogBackend) -> None:
        sock = nflog.socket()
        try:
            await bind(sock, NflogSettings(qthreshold=1, timeout_cs=1, copy_range=64))
            nflog.send_udp(OUTPUT_PORT, bytes(300))
            [message] = messages(await receive(sock))
            assert len(_payload(message)) == 64
            [record] = NflogDecoder().feed(message, 0).records
            assert record.packet is not None and record.packet.length == 328
        finally:
            sock.close()

    async def test_a_batch_holds_the_messages_in_order_closed_by_done(self, nflog: NflogBackend) -> None:
        sock = nflog.socket()
        try:
            await bind(sock, NflogSettings(qthreshold=3, timeout_cs=100))
            for size in (1, 2, 3):
                nflog.send_udp(OUTPUT_PORT, bytes(size))
            datagram = await receive(sock)
            *packets, done = messages(datagram)
            assert done == encode_done(GROUP)
            assert packets == [
                encode_packet(GROUP, OUTPUT_PREFIX, _payload(m), hook=HOOK_OUTPUT, seq=seq, outdev=LO_IFINDEX,
                              uid=nflog.uid, gid=nflog.gid)
                for seq, m in enumerate(packets)
            ]
            assert [len(_payload(m)) for m in packets] == [29, 30, 31]
        finally:
            sock.close()

    # -- through the reader

    async def test_the_reader_numbers_records_from_zero_at_every_bind(self, nflog: NflogBackend) -> None:
        for round_ in range(2):
            records: list[NflogRecord] = []
            reader = NflogReader(GROUP, sock=nflog.socket(), settings=SINGLE)
            task = asyncio.create_task(reader.run(records.extend))
            try:
                await asyncio.wait_for(reader.bound.wait(), 10)
                for _ in range(3 + round_):
                    nflog.send_udp(OUTPUT_PORT)
                await _until(lambda: len(records) >= 3 + round_, what="the records")  # noqa: B023
                assert [r.seq for r in records] == list(range(3 + round_))
                assert {(r.prefix, r.out_ifindex) for r in records} == {(OUTPUT_PREFIX, LO_IFINDEX)}
                assert (reader.stats.received, reader.stats.lost) == (3 + round_, 0)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def test_an_overrun_socket_counts_every_lost_message(self, nflog: NflogBackend) -> None:
        records: list[NflogRecord] = []
        reader = NflogReader(GROUP, sock=nflog.socket(), settings=NflogSettings(qthreshold=1, rcvbuf=4096))
        task = asyncio.create_task(reader.run(records.extend))
        try:
            await asyncio.wait_for(reader.bound.wait(), 10)
            sent = 500
            for _ in range(sent):  # the event loop (the reader) does not run meanwhile
                nflog.send_udp(OUTPUT_PORT)
            stats = reader.stats
            # Messages lost after the last one received are counted when a later one arrives:
            # send one more until one gets through.
            for _ in range(100):
                nflog.send_udp(OUTPUT_PORT)
                sent += 1
                try:
                    await _until(lambda: stats.received + stats.lost == sent, timeout=0.5)  # noqa: B023
                    break
                except AssertionError:
                    continue
            assert stats.lost > 0, "500 messages should overrun a 4 KiB receive buffer"
            assert stats.received + stats.lost == sent
            assert len(records) == stats.received
            seqs = [r.seq for r in records]
            assert seqs == sorted(seqs) and seqs[0] == 0 and seqs[-1] == sent - 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
