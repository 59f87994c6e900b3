"""``membrane sysdump``: redaction of the store dump, and the archive's layout with fake collectors."""

from __future__ import annotations

import asyncio
import json
import tarfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from membrane.host.sysdump import (
    REDACTED,
    CollectError,
    NodeTarget,
    archive_name,
    cluster_items,
    collect,
    node_items,
    redact_entry,
    redact_url,
    write_archive,
)


def test_a_secrets_values_are_redacted_and_its_key_names_kept() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "db", "namespace": "default",
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": '{"data":{"password":"aHVudGVyMg=="}}'}},
        "data": {"password": "aHVudGVyMg=="}, "stringData": {"user": "admin"}}
    out = redact_entry("/membrane/objects/secrets/default/db", json.dumps(secret).encode())
    assert out["data"] == {"password": REDACTED}
    assert out["stringData"] == {"user": REDACTED}
    assert out["metadata"]["name"] == "db"
    assert "aHVudGVyMg" not in json.dumps(out)
    # A Secret stored anywhere else is recognised by its kind.
    assert "aHVudGVyMg" not in json.dumps(redact_entry("/membrane/other/x", json.dumps(secret).encode()))


def test_values_under_keys_naming_secret_material_are_redacted_whole() -> None:
    for key in ("/membrane/config/bgp-password", "/membrane/tokens/join", "/membrane/x/tls.key",
                "/membrane/auth/client-secret"):
        assert redact_entry(key, b"s3cr3t-value") == REDACTED, key


def test_fields_naming_secret_material_are_redacted_but_label_selectors_are_not() -> None:
    policy: dict[str, Any] = {"kind": "CiliumNetworkPolicy", "spec": {
        "endpointSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]},
        "auth": {"token": "abc", "privateKey": "-----BEGIN", "password": "pw"}}}
    out = redact_entry("/membrane/objects/ciliumnetworkpolicies/default/p", json.dumps(policy).encode())
    assert out["spec"]["endpointSelector"] == policy["spec"]["endpointSelector"]
    assert out["spec"]["auth"] == {"token": REDACTED, "privateKey": REDACTED, "password": REDACTED}


def test_plain_values_are_kept_as_json_or_text() -> None:
    assert redact_entry("/membrane/ipam/ips/10.0.0.2", b"/membrane/endpoints/n1/c1") == "/membrane/endpoints/n1/c1"
    assert redact_entry("/membrane/identities/id/1000", b'["k8s:app=web"]') == ["k8s:app=web"]
    assert redact_entry("/membrane/x", b"\xff\x00") == {"base64": "/wA="}


def test_the_store_url_loses_its_password_but_not_its_tls_paths() -> None:
    assert redact_url("etcd://root:hunter2@10.0.0.1:2379") == f"etcd://root:{REDACTED}@10.0.0.1:2379"
    url = "etcd://10.0.0.1:2379?cacert=/etc/ca.pem&cert=/etc/c.pem&key=/etc/c.key"
    assert redact_url(url) == url


class FakeSources:
    """Node n2's agent is down: its status and flows fail, the rest answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def command(self, target: NodeTarget, argv: Sequence[str]) -> bytes:
        self.calls.append((target.name, " ".join(argv)))
        if argv[0] == "bridge":
            raise CollectError('Cannot find device "membrane_vxlan"')
        return f"{target.name}: {' '.join(argv)}\n".encode()

    async def agent_log(self, target: NodeTarget) -> bytes:
        return f"log of {target.name}\n".encode()

    async def agent_status(self, target: NodeTarget) -> dict[str, Any]:
        if target.name == "n2":
            raise CollectError(f"agent not running (socket {target.agent_socket}): Connection refused")
        return {"node": target.name}

    async def flows(self, address: str, number: int) -> list[str]:
        if "n2" in address:
            raise CollectError(f"cannot reach the observer at {address}")
        return [json.dumps({"flow": {"node_name": address, "n": i}}) for i in range(min(number, 3))]

    async def store_entries(self) -> list[tuple[str, bytes]]:
        return [("/membrane/objects/secrets/default/s", b'{"kind":"Secret","data":{"k":"dG9w"}}'),
                ("/membrane/heartbeats/n1", b'{"time": 1}')]

    async def endpoint_list(self, node: str | None) -> str:
        return f"ENDPOINT of {node}"

    async def node_list(self) -> str:
        return "NAME\nn1\nn2"


def targets() -> list[NodeTarget]:
    return [NodeTarget(n, Path(f"/run/netns/{n}"), Path(f"/run/{n}/agent.sock"), f"unix:/run/{n}/observer.sock",
                       Path(f"/var/log/{n}.log")) for n in ("n1", "n2")]


def dump(tmp_path: Path, relay: str | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    sources = FakeSources()
    items = cluster_items(sources, relay, 1000)
    for target in targets():
        items += node_items(target, sources, 1000)
    files, errors = asyncio.run(collect(items))
    summary = {"errors": [{"item": i, "reason": r} for i, r in errors], "collected": sorted(files)}
    out = tmp_path / "dump.tar.gz"
    write_archive(out, "membrane-sysdump-x", files, summary)
    with tarfile.open(out) as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    return contents, json.loads(contents["membrane-sysdump-x/summary.json"])


def test_the_archive_holds_each_nodes_pieces_and_the_clusters(tmp_path: Path) -> None:
    contents, summary = dump(tmp_path, relay="127.0.0.1:4245")
    top = "membrane-sysdump-x/"
    for node in ("n1", "n2"):
        assert contents[f"{top}nodes/{node}/agent.log"] == f"log of {node}\n".encode()
        assert contents[f"{top}nodes/{node}/nft.txt"] == f"{node}: nft list table inet membrane\n".encode()
        assert b"ip -d route show table all" in contents[f"{top}nodes/{node}/routes.txt"]
        assert b"ip -d neigh show" in contents[f"{top}nodes/{node}/neighbours.txt"]
        assert b"ip -d link show" in contents[f"{top}nodes/{node}/links.txt"]
        assert contents[f"{top}nodes/{node}/endpoints.txt"] == f"ENDPOINT of {node}\n".encode()
    assert json.loads(contents[f"{top}nodes/n1/status.json"]) == {"node": "n1"}
    assert len(contents[f"{top}nodes/n1/flows.jsonl"].splitlines()) == 3
    assert len(contents[f"{top}cluster/flows.jsonl"].splitlines()) == 3
    store = json.loads(contents[f"{top}cluster/store.json"])
    assert store[1]["value"]["data"] == {"k": REDACTED}
    assert b"dG9w" not in contents[f"{top}cluster/store.json"]
    assert f"{top}nodes/n1/flows.jsonl" not in [e["item"] for e in summary["errors"]]


def test_what_could_not_be_collected_is_named_with_its_reason_and_the_rest_is_kept(tmp_path: Path) -> None:
    contents, summary = dump(tmp_path)
    failed = {e["item"]: e["reason"] for e in summary["errors"]}
    assert failed == {
        "nodes/n1/fdb.txt": 'Cannot find device "membrane_vxlan"',
        "nodes/n2/fdb.txt": 'Cannot find device "membrane_vxlan"',
        "nodes/n2/status.json": "agent not running (socket /run/n2/agent.sock): Connection refused",
        "nodes/n2/flows.jsonl": "cannot reach the observer at unix:/run/n2/observer.sock",
    }
    assert "membrane-sysdump-x/nodes/n2/status.json" not in contents
    assert "membrane-sysdump-x/nodes/n2/nft.txt" in contents
    errors = contents["membrane-sysdump-x/errors.txt"].decode()
    assert "nodes/n2/status.json: agent not running" in errors
    assert "membrane-sysdump-x/cluster/flows.jsonl" not in contents  # no relay asked for


def test_an_unexpected_exception_in_one_collector_does_not_stop_the_others() -> None:
    async def boom() -> bytes:
        raise RuntimeError("surprise")

    async def fine() -> bytes:
        return b"ok"

    from membrane.host.sysdump import Item

    files, errors = asyncio.run(collect([Item("a", boom), Item("b", fine)]))
    assert files == {"b": b"ok"}
    assert errors == [("a", "surprise")]


def test_the_archive_is_named_by_its_utc_time() -> None:
    assert archive_name(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "membrane-sysdump-20260102-030405.tar.gz"


def _host_dump(tmp_path: Path, monkeypatch: Any, output: Path) -> Any:
    from click.testing import CliRunner

    from membrane.cli.main import cli
    from membrane.host.sysdump import HostSources

    async def no_commands(self: HostSources, target: NodeTarget, argv: Sequence[str]) -> bytes:
        raise CollectError(f"{argv[0]}: not run in unit tests")

    monkeypatch.setattr(HostSources, "command", no_commands)
    config = tmp_path / "agent.yaml"
    config.write_text(f"nodeName: h1\nstore: sqlite://{tmp_path}/store.db\nrunDir: {tmp_path}/run\n")
    log = tmp_path / "agent.log"
    log.write_text("agent started\n")
    monkeypatch.delenv("MEMBRANE_STORE", raising=False)
    return CliRunner().invoke(cli, ["sysdump", "--config", str(config), "--agent-log", str(log),
                                    "--output", str(output)], catch_exceptions=False)


def test_on_a_host_with_no_agent_the_dump_is_written_and_names_each_missing_piece(
    tmp_path: Path, monkeypatch: Any
) -> None:
    output = tmp_path / "dump.tar.gz"
    result = _host_dump(tmp_path, monkeypatch, output)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(output)
    with tarfile.open(output) as tar:
        names = {m.name.split("/", 1)[1]: m for m in tar.getmembers()}
        summary = json.loads(tar.extractfile(names["summary.json"]).read())  # type: ignore[union-attr]
        log = tar.extractfile(names["nodes/h1/agent.log"]).read()  # type: ignore[union-attr]
    assert log == b"agent started\n"
    assert summary["nodes"] == ["h1"] and summary["source"] == "host"
    assert summary["store"] == f"sqlite://{tmp_path}/store.db"
    assert failed_reason(summary, "cluster/store.json") == f"store sqlite://{tmp_path}/store.db: no such file"
    assert not (tmp_path / "store.db").exists()  # a dump does not create a store
    failed = {e["item"]: e["reason"] for e in summary["errors"]}
    assert failed["nodes/h1/status.json"].startswith(f"agent not running (socket {tmp_path}/run/agent.sock)")
    assert failed["nodes/h1/nft.txt"] == "nft: not run in unit tests"
    assert "Warning: nodes/h1/status.json not collected" in result.stderr


def failed_reason(summary: dict[str, Any], item: str) -> str:
    return next(str(e["reason"]) for e in summary["errors"] if e["item"] == item)


def test_a_dump_that_cannot_be_written_fails_with_one_line(tmp_path: Path, monkeypatch: Any) -> None:
    output = tmp_path / "missing-dir" / "dump.tar.gz"
    result = _host_dump(tmp_path, monkeypatch, output)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"Error: cannot write {output}: No such file or directory"
