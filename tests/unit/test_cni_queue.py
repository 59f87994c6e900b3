"""The CNI DEL queue: what the plugin leaves when the agent is down, and how the agent replays it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from membrane.agent.contract import CniFailure
from membrane.cni.queue import INVALID_SUFFIX, drain_del_queue, enqueue_del, queued_files
from membrane.testing.cnitool import FakeEndpointService


def del_request(container: str, ifname: str = "eth0", **extra: Any) -> dict[str, Any]:
    return {
        "command": "DEL",
        "containerID": container,
        "netns": f"/run/netns/{container}",
        "ifname": ifname,
        "args": {"K8S_POD_NAMESPACE": "shop"},
        "netconf": {"cniVersion": "1.0.0", "name": "membrane", "type": "membrane-cni"},
        **extra,
    }


def test_enqueue_writes_one_private_file_per_attachment(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    enqueue_del(queue, del_request("c1"))
    enqueue_del(queue, del_request("c1"))  # the same attachment again replaces it
    enqueue_del(queue, del_request("c1", ifname="net1"))  # a second network of the container
    assert sorted(p.name for p in queue.iterdir()) == ["c1@eth0.json", "c1@net1.json"]
    assert (queue.stat().st_mode & 0o777) == 0o700
    assert ((queue / "c1@eth0.json").stat().st_mode & 0o777) == 0o600
    assert json.loads((queue / "c1@eth0.json").read_text()) == del_request("c1")


def test_queued_files_ignore_temporaries_and_set_aside_files(tmp_path: Path) -> None:
    enqueue_del(tmp_path, del_request("c1"))
    (tmp_path / ".c2@eth0.json.123.tmp").write_text("{")
    (tmp_path / f"c3@eth0.json{INVALID_SUFFIX}").write_text("{")
    assert [Path(p).name for p in queued_files(tmp_path)] == ["c1@eth0.json"]
    assert queued_files(tmp_path / "missing") == []


async def test_drain_replays_every_del_and_empties_the_queue(tmp_path: Path) -> None:
    for container in ("c1", "c2", "c3"):
        enqueue_del(tmp_path, del_request(container))
    service = FakeEndpointService()
    report = await drain_del_queue(tmp_path, service)
    assert sorted(service.commands()) == [("DEL", "c1"), ("DEL", "c2"), ("DEL", "c3")]
    request = next(r for r in service.requests if r.container_id == "c2")
    assert (request.netns, request.ifname, request.pod_namespace) == ("/run/netns/c2", "eth0", "shop")
    assert len(report.deleted) == 3 and report.failed == [] and report.invalid == []
    assert list(tmp_path.iterdir()) == []


async def test_drain_replays_oldest_first(tmp_path: Path) -> None:
    for age, container in ((30, "newest"), (10, "oldest"), (20, "middle")):
        path = enqueue_del(tmp_path, del_request(container))
        os.utime(path, ns=(age * 10**9, age * 10**9))
    service = FakeEndpointService()
    await drain_del_queue(tmp_path, service)
    assert [c for _, c in service.commands()] == ["oldest", "middle", "newest"]


async def test_a_failed_del_keeps_its_file_for_the_next_drain(tmp_path: Path) -> None:
    enqueue_del(tmp_path, del_request("c1"))
    service = FakeEndpointService()
    service.failures["DEL"] = CniFailure(102, "nft refused")
    report = await drain_del_queue(tmp_path, service)
    assert [Path(p).name for p in report.failed] == ["c1@eth0.json"]
    assert (tmp_path / "c1@eth0.json").exists()

    del service.failures["DEL"]
    report = await drain_del_queue(tmp_path, service)
    assert [Path(p).name for p in report.deleted] == ["c1@eth0.json"]
    assert not (tmp_path / "c1@eth0.json").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"{truncated",
        b"[]",
        json.dumps(del_request("c9", command="ADD")).encode(),
        json.dumps(del_request("", ifname="eth0")).encode(),
    ],
    ids=["not-json", "not-an-object", "not-a-del", "no-container-id"],
)
async def test_an_unreadable_file_is_set_aside_not_retried(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "c9@eth0.json").write_bytes(content)
    enqueue_del(tmp_path, del_request("c1"))
    service = FakeEndpointService()
    report = await drain_del_queue(tmp_path, service)
    assert service.commands() == [("DEL", "c1")]
    assert [Path(p).name for p in report.invalid] == ["c9@eth0.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"c9@eth0.json{INVALID_SUFFIX}"]
    assert (await drain_del_queue(tmp_path, service)).invalid == []


async def test_drain_of_a_missing_directory_does_nothing(tmp_path: Path) -> None:
    report = await drain_del_queue(tmp_path / "never-created", FakeEndpointService())
    assert (report.deleted, report.failed, report.invalid) == ([], [], [])
