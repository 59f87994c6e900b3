"""Every store backend against the one contract of membrane.store.base.Store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from membrane.testing.store_contract import MemoryBackend, SqliteBackend, StoreBackend, StoreContract


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreBackend]:
    chosen: StoreBackend = MemoryBackend() if request.param == "memory" else SqliteBackend(tmp_path / "s.db")
    try:
        yield chosen
    finally:
        await chosen.close()


class TestStoreContract(StoreContract):
    pass
