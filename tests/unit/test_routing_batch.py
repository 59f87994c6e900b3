"""Batched rtnetlink encoding: what pyroute2's own parser reads back, and the ack bookkeeping."""

from __future__ import annotations

import errno
import struct
from ipaddress import IPv4Address, IPv4Network

from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from membrane.datapath.netlink.batch import (
    CHUNK,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    RTM_DELROUTE,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    Request,
    encode,
    fdb_request,
    neighbour_request,
    parse_acks,
    route_request,
    send_batch,
)


def decoded(message_class: type, data: bytes) -> dict[str, object]:
    msg = message_class(data)
    msg.decode()
    return {"header": dict(msg["header"]), **{k: v for k, v in msg.items() if k != "attrs" and k != "header"},
            "attrs": dict((name, value) for name, value in msg["attrs"])}


def test_a_route_request_reads_back_as_the_route_iproute2_would_send() -> None:
    request = route_request(delete=False, dst=IPv4Network("10.244.2.0/24"), gateway=IPv4Address("10.244.2.1"),
                            oif=7, proto=177, onlink=True, source=IPv4Address("10.244.1.1"))
    msg = decoded(rtmsg, encode(request, seq=42))
    header = msg["header"]
    assert isinstance(header, dict)
    assert header["type"] == RTM_NEWROUTE and header["sequence_number"] == 42
    assert header["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    assert header["length"] == len(encode(request, seq=42))
    assert (msg["family"], msg["dst_len"], msg["table"], msg["proto"], msg["type"], msg["flags"]) == (
        2, 24, 254, 177, 1, 4)
    assert msg["attrs"] == {"RTA_TABLE": 254, "RTA_DST": "10.244.2.0", "RTA_OIF": 7, "RTA_GATEWAY": "10.244.2.1",
                            "RTA_PREFSRC": "10.244.1.1"}


def test_a_route_delete_names_destination_gateway_and_device_only() -> None:
    request = route_request(delete=True, dst=IPv4Network("10.244.2.0/24"), gateway=IPv4Address("172.31.0.12"),
                            oif=3, proto=177, source=IPv4Address("10.244.1.1"))
    msg = decoded(rtmsg, encode(request, seq=1))
    assert msg["header"]["type"] == RTM_DELROUTE  # type: ignore[index]
    assert msg["attrs"] == {"RTA_TABLE": 254, "RTA_DST": "10.244.2.0", "RTA_OIF": 3, "RTA_GATEWAY": "172.31.0.12"}
    assert request.absent_ok


def test_neighbour_and_fdb_requests() -> None:
    neigh = decoded(ndmsg, encode(neighbour_request(delete=False, ip=IPv4Address("10.244.2.1"),
                                                    mac="02:6d:ac:1f:00:0c", ifindex=9), seq=1))
    assert neigh["header"]["type"] == RTM_NEWNEIGH  # type: ignore[index]
    assert (neigh["family"], neigh["ifindex"], neigh["state"]) == (2, 9, 0x80)
    assert neigh["attrs"] == {"NDA_DST": "10.244.2.1", "NDA_LLADDR": "02:6d:ac:1f:00:0c"}

    fdb = decoded(ndmsg, encode(fdb_request(delete=False, mac="02:6d:ac:1f:00:0c", dst=IPv4Address("172.31.0.12"),
                                            ifindex=9), seq=2))
    assert fdb["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND  # type: ignore[index]
    assert (fdb["family"], fdb["ifindex"], fdb["state"], fdb["flags"]) == (7, 9, 0x80, 0x02)  # AF_BRIDGE, self
    assert fdb["attrs"] == {"NDA_LLADDR": "02:6d:ac:1f:00:0c", "NDA_DST": "172.31.0.12"}


class AckingSocket:
    """Stands in for a NETLINK_ROUTE socket: acks every request, refusing the ones in ``refuse``."""

    def __init__(self, refuse: dict[str, int]) -> None:
        self.refuse = refuse
        self.sends: list[int] = []
        self._acks: list[bytes] = []
        self._requests: dict[int, bytes] = {}

    def sendall(self, data: bytes) -> None:
        count, offset = 0, 0
        while offset < len(data):
            length, _kind, _flags, seq = struct.unpack_from("=IHHI", data, offset)
            body = data[offset:offset + length]
            code = next((c for marker, c in self.refuse.items() if marker.encode() in body), 0)
            # NLMSG_ERROR: header, then the (negative) errno and the request's header.
            payload = struct.pack("=i", -code) + body[:16]
            self._acks.append(struct.pack("=IHHII", 16 + len(payload), 2, 0, seq, 0) + payload)
            offset += length
            count += 1
        self.sends.append(count)

    def recv(self, size: int) -> bytes:
        # Two acks per read, so the reader has to keep reading until every request is answered.
        data, self._acks = b"".join(self._acks[:2]), self._acks[2:]
        return data


def test_send_batch_sends_in_chunks_and_reports_each_refused_request() -> None:
    requests = [Request(RTM_NEWROUTE, 0, f"req{i:04d}".encode(), f"request {i}") for i in range(CHUNK + 10)]
    requests.append(Request(RTM_DELROUTE, 0, b"gone", "delete of something gone", absent_ok=True))
    sock = AckingSocket({"req0003": errno.ENETUNREACH, f"req{CHUNK + 1:04d}": errno.ENODEV, "gone": errno.ESRCH})
    refused = send_batch(sock, requests)  # type: ignore[arg-type]
    assert sock.sends == [CHUNK, 11]
    assert [(r.what, code) for r, code in refused] == [("request 3", errno.ENETUNREACH),
                                                      (f"request {CHUNK + 1}", errno.ENODEV)]


def test_parse_acks_reads_every_error_message() -> None:
    acks = b"".join(struct.pack("=IHHIIi", 20, 2, 0, seq, 0, -code) for seq, code in ((5, 0), (6, errno.EEXIST)))
    assert list(parse_acks(acks)) == [(5, 0), (6, errno.EEXIST)]
