"""Drift repair by a running agent: what someone changes by hand in the kernel comes back within the
resync period (here 1 s), without a change in the store to trigger it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from membrane.cni.client import AgentClient
from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import missing_binaries, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.timeout(120),
    pytest.mark.skipif(bool(missing_binaries("nft")), reason="the agent needs nft"),
]

RESYNC = "1"


@pytest.fixture
def agent_node() -> Iterator[AgentNode]:
    with AgentNode("mbdrift-", agent_args=("--resync-interval", RESYNC)) as node:
        node.start()
        yield node


def nft_table(node: AgentNode) -> dict[str, object] | None:
    result = node.node.run("nft", "-j", "list", "table", "inet", "membrane", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def endpoint_sources(node: AgentNode) -> list[object]:
    out = node.node.run("nft", "-j", "list", "set", "inet", "membrane", "endpoint_sources").stdout
    items = [i["set"] for i in json.loads(out)["nftables"] if "set" in i]
    return list(items[0].get("elem", []))


def test_a_deleted_table_element_and_pod_route_come_back(agent_node: AgentNode) -> None:
    node = agent_node
    node.membrane("pod", "run", "web", "-n", "default", "--", sys.executable, "-c", "import time; time.sleep(600)")
    wait_until(lambda: len(endpoint_sources(node)) == 1, timeout=20, what="the pod's anti-spoofing entry")
    [element] = endpoint_sources(node)

    # The whole table deleted by hand: the nft reconciler's next full resync restores it.
    node.node.run("nft", "delete", "table", "inet", "membrane")
    assert nft_table(node) is None
    wait_until(lambda: nft_table(node) is not None, timeout=10, what="the table to come back")
    wait_until(lambda: endpoint_sources(node) == [element], timeout=10, what="its elements to come back")

    # One element deleted by hand.
    concat = element["concat"] if isinstance(element, dict) else element  # type: ignore[index]
    node.node.run("nft", "delete", "element", "inet", "membrane", "endpoint_sources",
                  "{ " + " . ".join(str(part) for part in concat) + " }")
    assert endpoint_sources(node) == []
    wait_until(lambda: endpoint_sources(node) == [element], timeout=10, what="the element to come back")

    # The pod's /32 route deleted by hand: the endpoint wiring reconciler re-attaches.
    routes = json.loads(node.node.run("ip", "-j", "route", "show", "proto", "177").stdout)
    [route] = [r for r in routes if r["dev"].startswith("lxc")]
    node.node.run("ip", "route", "del", route["dst"], "dev", route["dev"])
    wait_until(lambda: any(r["dst"] == route["dst"] for r in json.loads(
        node.node.run("ip", "-j", "route", "show", "proto", "177").stdout)), timeout=10,
        what="the pod route to come back")

    # The agent reports its reconcilers as cilium-dbg reports its controllers: repeated full
    # resyncs, nothing failing now.
    reconcilers = {r["name"]: r for r in AgentClient(str(node.socket)).status()["reconcilers"]
                   if r["kind"] == "reconciler"}
    assert {"nft", "endpoint-wiring", "routing", "policy-status"} <= set(reconcilers)
    assert reconcilers["nft"]["fullSyncs"] >= 2 and reconcilers["nft"]["errors"] == 0
