"""The NFLOG decoder: captured kernel bytes and handcrafted messages → records, losses, acks."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from membrane.observe.nflog import (
    HOOK_FORWARD,
    HOOK_OUTPUT,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    NFULA_CFG_CMD,
    NFULA_CFG_FLAGS,
    NFULA_CFG_MODE,
    NFULA_CFG_QTHRESH,
    NFULA_IFINDEX_INDEV,
    NFULA_IFINDEX_OUTDEV,
    NFULA_MARK,
    NFULA_PACKET_HDR,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULA_SEQ,
    NFULA_TIMESTAMP,
    NFULNL_CFG_CMD_BIND,
    NFULNL_COPY_PACKET,
    NFULNL_MSG_CONFIG,
    NFULNL_MSG_PACKET,
    NLMSG_DONE,
    NLMSG_ERROR,
    TCP_ACK,
    TCP_FIN,
    TCP_NS,
    TCP_SYN,
    NflogDecoder,
    NflogSettings,
    Packet,
    config_request,
    decode_packet,
)

# Captured from the kernel (6.18): a UDP packet and a TCP SYN logged in the output hook of a
# namespace, batched by a queue threshold of 2 (NLM_F_MULTI messages closed by NLMSG_DONE). The
# output hook carries no timestamp; UID and GID attributes are present and must be skipped.
CAPTURED_BATCH = bytes.fromhex(
    "740000000004000000000000000000000200000708000100080003000f000a006d623a743a463a6e3a31000008000500"
    "0000000108000b000000000008000e000000000008000c0000000000250009004500002126d24000401115f87f000001"
    "7f0000018743270f000dfe2068656c6c6f0000008c000000000400000000000000000000020000070800010008000300"
    "0f000a006d623a743a463a653a320000080005000000000108000b000000000008000e000000000008000c0000000001"
    "400009004500003cad6d400040068f4c7f0000017f000001e8fa270ea6beae9f00000000a002ffd7fe3000000204ffd7"
    "0402080ab153181b000000000103030a1400000003000000000000000000000000000007"
)
# The kernel's answer to a bind request with sequence number 1: NLMSG_ERROR with error 0 (an ack).
CAPTURED_ACK = bytes.fromhex(
    "240000000200000101000000746e00000000000048000000010405000100000000000000"
)


def test_a_captured_batch_decodes_to_both_packets_in_order() -> None:
    decoder = NflogDecoder()
    result = decoder.feed(CAPTURED_BATCH, received_ns=1_000)
    assert [r.prefix for r in result.records] == ["mb:t:F:n:1", "mb:t:F:e:2"]
    udp, tcp = result.records
    assert (udp.hook, udp.in_ifindex, udp.out_ifindex, udp.seq) == (HOOK_OUTPUT, 0, 1, 0)
    assert udp.time_ns == 1_000  # no kernel timestamp: the time it was received
    assert udp.packet == Packet(4, "127.0.0.1", "127.0.0.1", IPPROTO_UDP, 33, 34627, 9999)
    assert tcp.seq == 1
    assert tcp.packet is not None
    assert (tcp.packet.protocol, tcp.packet.destination_port, tcp.packet.length) == (IPPROTO_TCP, 9998, 60)
    assert tcp.packet.tcp_flags == TCP_SYN
    assert (decoder.stats.received, decoder.stats.lost, decoder.stats.malformed) == (2, 0, 0)


def test_the_bind_ack_is_recognised_by_its_request_sequence_number() -> None:
    result = NflogDecoder().feed(CAPTURED_ACK, received_ns=0)
    assert result.records == []
    assert result.acks == [(1, 0)]


# -- handcrafted messages -------------------------------------------------------------------------
def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def ipv4_tcp(src: str, dst: str, sport: int, dport: int, flags: int, *, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    total = ihl * 4 + 20
    header = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, 0, 64, IPPROTO_TCP, 0,
                         socket.inet_aton(src), socket.inet_aton(dst)) + options
    tcp = struct.pack(">HHIIBBHHH", sport, dport, 0, 0, (5 << 4) | (flags >> 8), flags & 0xFF, 1000, 0, 0)
    return header + tcp


def packet_message(prefix: str, payload: bytes, *, seq: int | None = None, indev: int = 0, outdev: int = 0,
                   hook: int = HOOK_FORWARD, mark: int = 0, timestamp: tuple[int, int] | None = None) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(4244))
    body += attr(NFULA_PACKET_HDR, struct.pack(">HBB", 0x0800, hook, 0))
    if mark:
        body += attr(NFULA_MARK, struct.pack(">I", mark))
    if timestamp:
        body += attr(NFULA_TIMESTAMP, struct.pack(">QQ", *timestamp))
    if indev:
        body += attr(NFULA_IFINDEX_INDEV, struct.pack(">I", indev))
    if outdev:
        body += attr(NFULA_IFINDEX_OUTDEV, struct.pack(">I", outdev))
    body += attr(NFULA_PREFIX, prefix.encode() + b"\0")
    if seq is not None:
        body += attr(NFULA_SEQ, struct.pack(">I", seq))
    body += attr(NFULA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), NFULNL_MSG_PACKET, 0, 0, 0) + body


def test_every_field_of_a_forwarded_packet_is_read() -> None:
    payload = ipv4_tcp("10.244.1.10", "10.244.1.11", 40000, 8080, TCP_SYN | TCP_ACK | TCP_NS)
    message = packet_message("mb:t:F:r:3", payload, seq=0, indev=7, outdev=5, mark=0x1234,
                             timestamp=(1_700_000_000, 250_000))
    [record] = NflogDecoder().feed(message, received_ns=5).records
    assert (record.prefix, record.hook, record.in_ifindex, record.out_ifindex, record.mark) == (
        "mb:t:F:r:3", HOOK_FORWARD, 7, 5, 0x1234)
    assert record.time_ns == 1_700_000_000_250_000_000  # the kernel's timestamp wins
    assert record.packet == Packet(4, "10.244.1.10", "10.244.1.11", IPPROTO_TCP, 40, 40000, 8080,
                                   tcp_flags=TCP_SYN | TCP_ACK | TCP_NS)


def test_sequence_gaps_count_exactly_the_messages_the_kernel_could_not_deliver() -> None:
    decoder = NflogDecoder()
    payload = ipv4_tcp("10.0.0.1", "10.0.0.2", 1, 2, TCP_SYN)
    decoder.feed(packet_message("mb:t:F:n:1", payload, seq=0) + packet_message("mb:t:F:n:1", payload, seq=1), 0)
    assert decoder.stats.lost == 0
    decoder.feed(packet_message("mb:t:F:n:1", payload, seq=5), 0)  # 2, 3 and 4 never arrived
    assert decoder.stats.lost == 3
    decoder.feed(packet_message("mb:t:F:n:1", payload, seq=6), 0)
    assert (decoder.stats.received, decoder.stats.lost) == (4, 3)


def test_loss_before_the_first_message_counts_too() -> None:
    decoder = NflogDecoder()
    decoder.feed(packet_message("mb:t:F:n:1", ipv4_tcp("10.0.0.1", "10.0.0.2", 1, 2, TCP_SYN), seq=2), 0)
    assert decoder.stats.lost == 2


def test_the_sequence_wraps_around_without_inventing_losses() -> None:
    decoder = NflogDecoder()
    payload = ipv4_tcp("10.0.0.1", "10.0.0.2", 1, 2, TCP_FIN)
    decoder.feed(packet_message("x", payload, seq=0xFFFFFFFE), 0)
    lost_before = decoder.stats.lost
    decoder.feed(packet_message("x", payload, seq=0xFFFFFFFF) + packet_message("x", payload, seq=0), 0)
    assert decoder.stats.lost == lost_before


def test_a_kernel_error_answer_carries_its_errno() -> None:
    request = config_request(4244, NflogSettings(), 9)
    error = struct.pack("=IHHII", 36, NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", -errno.EBUSY) + request[:16]
    result = NflogDecoder().feed(error, 0)
    assert result.acks == [(9, errno.EBUSY)]


def test_a_truncated_message_is_counted_as_malformed_not_raised() -> None:
    message = packet_message("mb:t:F:n:1", ipv4_tcp("10.0.0.1", "10.0.0.2", 1, 2, TCP_SYN))
    decoder = NflogDecoder()
    result = decoder.feed(message[:-10], 0)
    assert result.records == []
    assert decoder.stats.malformed == 1
    # An attribute whose length runs past its message is malformed too.
    broken = bytearray(message)
    struct.pack_into("=H", broken, 20, 4000)
    assert decoder.feed(bytes(broken), 0).records == []
    assert decoder.stats.malformed == 2


def test_a_done_message_ends_nothing_but_the_batch() -> None:
    done = struct.pack("=IHHII", 20, NLMSG_DONE, 2, 0, 0) + b"\0\0\0\0"
    payload = ipv4_tcp("10.0.0.1", "10.0.0.2", 1, 2, TCP_SYN)
    result = NflogDecoder().feed(packet_message("a", payload) + done + packet_message("b", payload), 0)
    assert [r.prefix for r in result.records] == ["a", "b"]


# -- packets -------------------------------------------------------------------------------------
def test_ipv4_options_move_the_transport_header() -> None:
    packet = decode_packet(ipv4_tcp("10.0.0.1", "10.0.0.2", 5555, 80, TCP_FIN | TCP_ACK, options=b"\x01" * 8))
    assert packet is not None
    assert (packet.source_port, packet.destination_port, packet.tcp_flags) == (5555, 80, TCP_FIN | TCP_ACK)


def test_a_later_fragment_has_no_ports() -> None:
    raw = bytearray(ipv4_tcp("10.0.0.1", "10.0.0.2", 5555, 80, TCP_SYN))
    struct.pack_into(">H", raw, 6, 100)  # fragment offset: 100 units of 8 bytes
    packet = decode_packet(bytes(raw))
    assert packet is not None
    assert (packet.protocol, packet.source_port, packet.destination_port) == (IPPROTO_TCP, 0, 0)


def test_icmp_type_and_code() -> None:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, IPPROTO_ICMP, 0,
                         socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))
    packet = decode_packet(header + bytes([3, 3, 0, 0, 0, 0, 0, 0]))
    assert packet is not None
    assert (packet.protocol, packet.icmp_type, packet.icmp_code) == (IPPROTO_ICMP, 3, 3)


def test_ipv6_with_an_extension_header() -> None:
    src = socket.inet_pton(socket.AF_INET6, "fd00::1")
    dst = socket.inet_pton(socket.AF_INET6, "fd00::2")
    hop_by_hop = bytes([IPPROTO_ICMPV6, 0]) + b"\0" * 6
    icmp = bytes([128, 0, 0, 0])
    header = struct.pack(">IHBB16s16s", 6 << 28, len(hop_by_hop) + len(icmp), 0, 64, src, dst)
    packet = decode_packet(header + hop_by_hop + icmp)
    assert packet == Packet(6, "fd00::1", "fd00::2", IPPROTO_ICMPV6, 52, icmp_type=128)


@pytest.mark.parametrize("raw", [b"", b"\x45\x00", b"\x60" + b"\0" * 20, b"\x20" + b"\0" * 40])
def test_no_ip_header_no_packet(raw: bytes) -> None:
    assert decode_packet(raw) is None


# -- configuration -------------------------------------------------------------------------------
def test_one_config_message_binds_and_configures_the_group() -> None:
    settings = NflogSettings(copy_range=96, qthreshold=32)
    request = config_request(4244, settings, seq=3)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, seq) == (len(request), NFULNL_MSG_CONFIG, 3)
    assert flags & 0x4  # NLM_F_ACK: the kernel says whether it worked
    _family, _version, group = struct.unpack_from("=BBH", request, 16)
    assert socket.ntohs(group) == 4244
    attrs: dict[int, bytes] = {}
    offset = 20
    while offset < len(request):
        size, kind = struct.unpack_from("=HH", request, offset)
        attrs[kind] = request[offset + 4 : offset + size]
        offset += (size + 3) & ~3
    assert attrs[NFULA_CFG_CMD] == bytes([NFULNL_CFG_CMD_BIND])
    assert struct.unpack(">IBB", attrs[NFULA_CFG_MODE]) == (96, NFULNL_COPY_PACKET, 0)
    assert struct.unpack(">I", attrs[NFULA_CFG_QTHRESH]) == (32,)
    assert struct.unpack(">H", attrs[NFULA_CFG_FLAGS]) == (1,)  # NFULNL_CFG_F_SEQ: numbered messages
