"""Which cluster a command talks to, and how a command reports a failure.

Resolution order (CLI contract): ``--store URL`` / ``MEMBRANE_STORE``, else ``--lab NAME`` /
``MEMBRANE_LAB``, else the only running lab, else the host's own store.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from membrane.core.config import DEFAULT_STATE_DIR
from membrane.core.errors import MembraneError
from membrane.store.base import Store

if TYPE_CHECKING:
    from membrane.lab.state import LabRecord

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class CliContext:
    store_flag: str | None = None
    lab_flag: str | None = None

    def store_url(self) -> str:
        if self.store_flag:
            return self.store_flag
        if env := os.environ.get("MEMBRANE_STORE"):
            return env
        from membrane.lab.registry import resolve_lab_store_url  # lab is optional at import time

        lab_url = resolve_lab_store_url(self.lab_flag or os.environ.get("MEMBRANE_LAB"))
        if lab_url:
            return lab_url
        return f"sqlite://{DEFAULT_STATE_DIR}/store.db"

    def lab_record(self) -> LabRecord | None:
        """The lab this command talks to, or None when it talks to a store named directly or the host's."""
        if self.store_flag or os.environ.get("MEMBRANE_STORE"):
            return None
        from membrane.lab.registry import find_lab

        return find_lab(self.lab_flag or os.environ.get("MEMBRANE_LAB"), ready_only=True)

    async def open_store(self) -> Store:
        from membrane.store import open_store

        return await open_store(self.store_url())


def fail(message: str) -> None:
    """Print one line naming what failed and why, exit 1."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def run_async(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T | None]:
    """Run a coroutine command; turn MembraneError into one line per problem on stderr and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | None:
        try:
            return asyncio.run(func(*args, **kwargs))
        except MembraneError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(f"Error: {line}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


pass_cli = click.make_pass_decorator(CliContext, ensure=True)
