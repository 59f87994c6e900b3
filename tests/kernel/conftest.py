"""Kernel tests: root only; every test gets fresh, uniquely named network namespaces.

Fixtures: ``netns_factory`` (call it with your prefix: ``netns_factory("mbdp-node")``; every
namespace it made, and every process left inside, is removed after the test, pass or fail).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from membrane.testing.netns import NetnsFactory, kernel_test_skip_reason

_SKIP_REASON = kernel_test_skip_reason()


@pytest.fixture(autouse=True)
def _kernel_only() -> None:
    # Autouse in this directory only: every kernel test skips cleanly on a machine without root.
    if _SKIP_REASON is not None:
        pytest.skip(_SKIP_REASON)


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    with NetnsFactory() as factory:
        yield factory
