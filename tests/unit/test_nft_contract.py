"""The nft boundary contract against the fake runner (the kernel side is tests/kernel/test_nft_contract.py)."""

from __future__ import annotations

import pytest

from membrane.datapath.nft import FakeNftRunner, NftRunner
from membrane.testing.nft_contract import NftContract


@pytest.fixture
def nft() -> NftRunner:
    return FakeNftRunner()


class TestFakeNftContract(NftContract):
    pass
