"""FakeNetlink against the netlink contract (the kernel runs the same suite in tests/kernel)."""

from __future__ import annotations

import pytest

from membrane.testing.netlink_contract import FakeNetlinkBackend, NetlinkBackend, NetlinkContract


@pytest.fixture
def netlink_backend() -> NetlinkBackend:
    return FakeNetlinkBackend()


class TestFakeNetlinkContract(NetlinkContract):
    pass
