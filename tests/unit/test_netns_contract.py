"""FakeNetnsHost against the namespaces-and-processes contract (the kernel runs it in tests/kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from membrane.testing.netns_contract import FakeNetnsBackend, NetnsHostBackend, NetnsHostContract


@pytest.fixture
def netns_backend(tmp_path: Path) -> NetnsHostBackend:
    return FakeNetnsBackend(tmp_path)


class TestFakeNetnsHostContract(NetnsHostContract):
    pass
