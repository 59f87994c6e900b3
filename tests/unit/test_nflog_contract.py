"""The NFLOG boundary contract against the fake nfnetlink_log (the kernel run is a kernel test)."""

from __future__ import annotations

import pytest

from membrane.testing.nflog_contract import FakeNflogBackend, NflogBackend, NflogContract


@pytest.fixture
def nflog() -> NflogBackend:
    return FakeNflogBackend()


class TestFakeNflog(NflogContract):
    pass
