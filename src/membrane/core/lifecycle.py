"""Supervised asyncio tasks owned by one lifecycle.

Every long-running loop of a daemon is a named task started through :class:`Lifecycle`; none is
fire-and-forget. A task that raises is logged and restarted with exponential backoff, so one
failing controller degrades the agent instead of killing it; ``stop()`` cancels them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from membrane.core.errors import MembraneError

log = logging.getLogger(__name__)


@dataclass
class TaskHealth:
    name: str
    restarts: int = 0
    last_error: str = ""
    last_error_time: float = 0.0

    @property
    def healthy(self) -> bool:
        return not self.last_error or time.time() - self.last_error_time > 60


@dataclass
class Lifecycle:
    min_backoff: float = 0.2
    max_backoff: float = 10.0
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    health: dict[str, TaskHealth] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        """Run ``factory()`` as task ``name``; restart it with backoff when it fails."""
        if name in self._tasks:
            raise ValueError(f"task {name} already started")
        self.health[name] = TaskHealth(name)
        self._tasks[name] = asyncio.create_task(self._supervise(name, factory, restart), name=name)

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        backoff = self.min_backoff
        health = self.health[name]
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                health.restarts += 1
                health.last_error = f"{type(exc).__name__}: {exc}"
                health.last_error_time = time.time()
                if isinstance(exc, MembraneError):
                    # An expected failure (store unreachable, kernel refused): one line is enough.
                    log.warning("task %s failed, restarting: %s", name, exc)
                else:
                    log.exception("task %s failed", name)
                if not restart:
                    return
            if time.monotonic() - started > 30:
                backoff = self.min_backoff  # it ran fine for a while: start over
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def stop(self) -> None:
        self.stopping.set()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()


class Trigger:
    """A coalescing wake-up: many ``fire()`` calls while a consumer is busy cause one more run.

    Used for rate-limited syncs: ``await trigger.wait()`` returns once per burst of changes.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True
