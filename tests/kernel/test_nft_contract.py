"""The nft boundary contract against ``nft`` and the kernel, in a fresh network namespace per test
(the same suite runs against the fake in tests/unit/test_nft_contract.py)."""

from __future__ import annotations

import pytest

from membrane.datapath.nft import NftCommand, NftRunner
from membrane.testing.netns import NetnsFactory, missing_binaries
from membrane.testing.nft_contract import NftContract

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(missing_binaries("nft")), reason="needs nft"),
]


@pytest.fixture
def nft(netns_factory: NetnsFactory) -> NftRunner:
    return NftCommand(netns_factory("mbnft-contract-").path)


class TestKernelNftContract(NftContract):
    pass
