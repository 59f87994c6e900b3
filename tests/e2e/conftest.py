"""End-to-end tests: real agents on namespace-made nodes, real traffic. Root only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from membrane.testing.agentnode import AgentNode
from membrane.testing.netns import kernel_test_skip_reason

_SKIP_REASON = kernel_test_skip_reason("nft", "ip", "nsenter")


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if _SKIP_REASON is not None:
        pytest.skip(_SKIP_REASON)


@pytest.fixture
def agent_node() -> Iterator[AgentNode]:
    with AgentNode("mbe2e") as node:
        node.start()
        yield node
