"""PyrouteNetlink against the netlink contract, in fresh namespaces (``mbnlc-…``)."""

from __future__ import annotations

import pytest

from membrane.testing.netlink_contract import KernelNetlinkBackend, NetlinkBackend, NetlinkContract
from membrane.testing.netns import NetnsFactory, missing_binaries

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(bool(missing_binaries("ip")), reason="needs ip")]


@pytest.fixture
def netlink_backend(netns_factory: NetnsFactory) -> NetlinkBackend:
    return KernelNetlinkBackend(netns_factory, "mbnlc-")


class TestKernelNetlinkContract(NetlinkContract):
    pass
