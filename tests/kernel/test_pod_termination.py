"""Graceful pod deletion with real processes: SIGTERM, the grace period, then SIGKILL.

A pod that traps SIGTERM finishes its own shutdown and is gone before its grace period ends; one
that ignores SIGTERM keeps running (and its pod shows Terminating) until the period is over, then
is killed. Either way the endpoint, the namespace and the object go afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import missing_binaries, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.timeout(120),
    pytest.mark.skipif(bool(missing_binaries("nft")), reason="the agent needs nft"),
]


@pytest.fixture
def agent_node() -> Iterator[AgentNode]:
    with AgentNode("mslterm-") as node:
        node.start()
        yield node


def pod_status(node: AgentNode, name: str) -> str | None:
    """The STATUS column of ``get pods`` for ``name`` (None once the pod is gone)."""
    for line in node.membrane("get", "pods").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[2]
    return None


def test_sigterm_then_sigkill_after_the_grace_period(agent_node: AgentNode, tmp_path: Path) -> None:
    node = agent_node
    marker = tmp_path / "shut-down-cleanly"
    # Traps SIGTERM, takes a second to shut down, then exits by itself.
    node.membrane("pod", "run", "polite", "-n", "default", "--", "sh", "-c",
                  f'trap "sleep 1; echo bye > {marker}; exit 0" TERM; while :; do sleep 0.1; done')
    # Ignores SIGTERM (its children inherit that).
    node.membrane("pod", "run", "stubborn", "-n", "default", "--", "sh", "-c",
                  'trap "" TERM; while :; do sleep 0.1; done')
    assert len(node.pod_namespaces()) == 2

    started = time.monotonic()
    node.membrane("pod", "delete", "default/polite", "--grace-period", "20")
    assert marker.read_text().strip() == "bye"  # it got to finish its shutdown
    assert time.monotonic() - started < 15  # and was not made to wait out the period
    assert pod_status(node, "polite") is None

    started = time.monotonic()
    node.membrane("pod", "delete", "default/stubborn", "--grace-period", "3", "--no-wait")
    assert pod_status(node, "stubborn") == "Terminating"
    assert len(node.pod_namespaces()) == 1  # still running, still attached
    wait_until(lambda: pod_status(node, "stubborn") is None, timeout=30, what="the stubborn pod to be removed")
    assert time.monotonic() - started >= 3  # killed only once the grace period was over
    assert node.pod_namespaces() == []
    assert "ready" not in node.membrane("endpoint", "list").stdout
