"""The etcd backend's pure parts (URL, JSON codec) and what a user sees when etcd is not there.

The backend's behaviour against a real etcd is the contract suite (test_store_contract.py);
fail-over and TLS are in tests/kernel/test_store_etcd_cluster.py.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys

import pytest

from membrane.core.errors import InvalidInput, StoreError
from membrane.store import open_store
from membrane.store.base import Compare, Delete, EventType, KeyValue, Put
from membrane.store.etcd import (
    EtcdStore,
    EtcdTarget,
    decode_event,
    decode_kv,
    encode_key,
    key_range,
    parse_etcd_url,
    txn_request,
)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- URL -----------------------------------------------------------------------------------------


def test_url_with_several_endpoints_and_default_port() -> None:
    target = parse_etcd_url("etcd://10.0.0.1:2379,10.0.0.2,[fd00::3]:32379")
    assert target == EtcdTarget((("10.0.0.1", 2379), ("10.0.0.2", 2379), ("fd00::3", 32379)))
    assert not target.tls
    assert [target.endpoint_url(i) for i in range(3)] == [
        "http://10.0.0.1:2379",
        "http://10.0.0.2:2379",
        "http://[fd00::3]:32379",
    ]


def test_url_with_client_certificates_speaks_https() -> None:
    target = parse_etcd_url("etcd://h1:2379,h2:2379?cacert=/etc/ca.pem&cert=/etc/c.pem&key=/etc/c.key")
    assert (target.cacert, target.cert, target.key) == ("/etc/ca.pem", "/etc/c.pem", "/etc/c.key")
    assert target.endpoint_url(1) == "https://h2:2379"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("etcd://", "names no etcd endpoint"),
        ("etcd://h:0", "invalid port"),
        ("etcd://h:http", "invalid port"),
        ("etcd://h:2379/prefix", "takes no path"),
        ("etcd://:2379", "has no host"),
        ("etcd://h?cert=/c.pem", "needs both cert= and key="),
        ("etcd://h?cacert=", "cacert= needs a file path"),
        ("etcd://h?user=root", "unknown parameter 'user'"),
    ],
)
def test_malformed_urls_are_refused_with_the_reason(url: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_etcd_url(url)
    assert problem in caught.value.problems[0]
    assert url in caught.value.problems[0]


async def test_open_store_opens_etcd_urls() -> None:
    store = await open_store("etcd://127.0.0.1:2379")
    try:
        assert isinstance(store, EtcdStore)
        assert store.url == "etcd://127.0.0.1:2379"
    finally:
        await store.close()


# -- codec ---------------------------------------------------------------------------------------


def test_keys_are_utf8_and_prefix_ranges_end_after_the_last_byte() -> None:
    assert encode_key("/a/é") == b64("/a/é".encode())
    assert key_range("/a/") == (b64(b"/a/"), b64(b"/a0"))
    assert key_range("/a/\u00e9") == (b64(b"/a/\xc3\xa9"), b64(b"/a/\xc3\xaa"))
    assert key_range("") == (b64(b"\0"), b64(b"\0")), "every key"


def test_txn_compares_absent_as_create_revision_zero_and_reads_back_on_failure() -> None:
    body = txn_request(
        [Compare("/k/new", 0), Compare("/k/old", 7)],
        [Put("/k/new", b"v", lease=12), Put("/k/plain", b"p"), Delete("/k/old")],
    )
    assert body == {
        "compare": [
            {"key": b64(b"/k/new"), "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
            {"key": b64(b"/k/old"), "target": "MOD", "result": "EQUAL", "mod_revision": "7"},
        ],
        "success": [
            {"request_put": {"key": b64(b"/k/new"), "value": b64(b"v"), "lease": "12"}},
            {"request_put": {"key": b64(b"/k/plain"), "value": b64(b"p")}},
            {"request_delete_range": {"key": b64(b"/k/old")}},
        ],
        "failure": [
            {"request_range": {"key": b64(b"/k/new")}},
            {"request_range": {"key": b64(b"/k/old")}},
        ],
    }


def test_gateway_json_decodes_with_zero_values_left_out() -> None:
    raw = {"key": b64(b"/a"), "create_revision": "5", "mod_revision": "9", "version": "3", "value": b64(b"x")}
    assert decode_kv(raw) == KeyValue("/a", b"x", 5, 9, version=3, lease=0)
    assert decode_kv({"key": b64(b"/e")}) == KeyValue("/e", b"", 0, 0, version=0, lease=0)


def test_delete_events_take_the_shape_every_backend_gives_them() -> None:
    prev = {"key": b64(b"/a"), "create_revision": "5", "mod_revision": "9", "version": "3", "lease": "77"}
    event = decode_event({"type": "DELETE", "kv": {"key": b64(b"/a"), "mod_revision": "10"}, "prev_kv": prev})
    assert event.type is EventType.DELETE
    assert event.kv == KeyValue("/a", b"", 0, 10, version=0, lease=0)
    assert event.prev_kv == KeyValue("/a", b"", 5, 9, version=3, lease=77)
    put = decode_event({"kv": {"key": b64(b"/a"), "create_revision": "11", "mod_revision": "11", "version": "1"}})
    assert (put.type, put.prev_kv, put.revision) == (EventType.PUT, None, 11)


# -- no etcd there ---------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens


async def test_an_unreachable_store_is_one_line_naming_the_url_and_each_endpoint() -> None:
    first, second = closed_port(), closed_port()
    url = f"etcd://127.0.0.1:{first},127.0.0.1:{second}"
    store = EtcdStore(url)
    try:
        with pytest.raises(StoreError) as caught:
            await store.get("/a")
    finally:
        await store.close()
    message = str(caught.value)
    assert message == (
        f"etcd store {url} is unreachable: http://127.0.0.1:{first}: connection refused; "
        f"http://127.0.0.1:{second}: connection refused"
    )


async def test_a_closed_store_refuses_calls() -> None:
    store = EtcdStore(f"etcd://127.0.0.1:{closed_port()}")
    await store.close()
    with pytest.raises(StoreError, match="is closed"):
        await store.put("/a", b"v")


def test_the_cli_reports_an_unreachable_store_in_one_line_without_a_traceback() -> None:
    url = f"etcd://127.0.0.1:{closed_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "membrane", "--store", url, "get", "pods"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: etcd store {url} is unreachable: ")
    assert result.stderr.count("\n") == 1
