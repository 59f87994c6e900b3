"""The NFLOG boundary contract against the kernel: a fresh namespace, a tiny table logging UDP on
loopback, and the same assertions the fake is held to (the unit test of the contract)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from membrane.testing.netns import NetnsFactory, missing_binaries
from membrane.testing.nflog_contract import KernelNflog, NflogBackend, NflogContract

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(bool(missing_binaries("nft")), reason="needs nft")]


@pytest.fixture
def nflog(netns_factory: NetnsFactory) -> Iterator[NflogBackend]:
    backend = KernelNflog(netns_factory("mbtrc-nflog-", lo_up=True))
    try:
        yield backend
    finally:
        backend.close()


class TestKernelNflog(NflogContract):
    pass
