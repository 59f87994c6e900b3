"""Modules: the agent is a list of them, each declaring the tables it reads and writes.

A :class:`Module` names its input and output tables, the long-running tasks that keep its outputs
current (pure controllers, reconcilers) and an optional ``start`` step that must finish before
the modules that read its tables start (restoring endpoints after a restart, the first sync).
:func:`start_order` sorts modules so every table's writer starts before its readers — data flows
one way, so a cycle is a wiring error and is refused — and :class:`ModuleRunner` starts them in
that order and stops them in reverse::

    runner = ModuleRunner(lifecycle, [intent, endpoints, policy, datapath, api])
    await runner.start()      # intent first (it writes what the others read) … api last
    ...
    await runner.stop()       # api first … intent last

:class:`Controller` is the loop every pure controller runs in: take snapshots of the inputs, call
the pure function, wait until one of the inputs changes (debounced, so a burst of changes costs
one computation).

Primitives: :class:`Module`, :func:`start_order`, :class:`ModuleRunner`, :class:`Controller`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from membrane.core.lifecycle import Lifecycle
from membrane.core.reconciler import Reconciler
from membrane.core.statedb import Table, wait_any

log = logging.getLogger(__name__)

Task = Callable[[], Awaitable[None]]


@dataclass
class Module:
    """One capability of the agent as data: what it reads, what it writes, what runs."""

    name: str
    reads: tuple[Table[Any], ...] = ()
    writes: tuple[Table[Any], ...] = ()
    #: Pure controllers (input tables → this module's tables) and reconcilers (its desired tables →
    #: the kernel, the store, a peer): run as supervised tasks and listed by ``status --verbose``.
    controllers: tuple[Controller, ...] = ()
    reconcilers: tuple[Reconciler[Any], ...] = ()
    #: Other long-running loops by name, supervised by the lifecycle.
    tasks: dict[str, Task] = field(default_factory=dict)
    #: Runs once after the module's reconcilers and before its controllers and other tasks; the
    #: next module starts after it returns.
    start: Task | None = None
    #: Runs once at shutdown, after the tasks of every later module have stopped.
    stop: Task | None = None
    #: Tasks that must run before ``start`` (a reconciler that ``start`` waits on).
    early_tasks: dict[str, Task] = field(default_factory=dict)


def start_order(modules: Sequence[Module]) -> list[Module]:
    """Modules sorted so that a table's writer comes before its readers (stable otherwise)."""
    writer_of: dict[str, str] = {}
    for module in modules:
        for table in module.writes:
            if table.name in writer_of:
                raise ValueError(f"table {table.name} is written by {writer_of[table.name]} and {module.name}")
            writer_of[table.name] = module.name
    by_name = {m.name: m for m in modules}
    needs = {m.name: {writer_of[t.name] for t in m.reads if t.name in writer_of} - {m.name} for m in modules}
    ordered: list[Module] = []
    placed: set[str] = set()
    while len(ordered) < len(modules):
        ready = [m for m in modules if m.name not in placed and needs[m.name] <= placed]
        if not ready:
            stuck = sorted(n for n in by_name if n not in placed)
            raise ValueError(f"modules read each other's tables in a cycle: {', '.join(stuck)}")
        ordered.append(ready[0])
        placed.add(ready[0].name)
    return ordered


class ModuleRunner:
    """Starts modules in dependency order, stops them in reverse."""

    def __init__(self, lifecycle: Lifecycle, modules: Sequence[Module]) -> None:
        self.lifecycle = lifecycle
        self.modules = start_order(modules)
        self._started: list[tuple[Module, Lifecycle]] = []

    def controllers(self) -> list[dict[str, Any]]:
        """Every controller and reconciler with its state, for ``status --verbose``."""
        found: list[dict[str, Any]] = []
        for module in self.modules:
            for controller in module.controllers:
                health = self.lifecycle.health.get(f"{module.name}/controller {controller.name}")
                found.append({"module": module.name, "kind": "controller", "name": controller.name,
                              "runs": controller.runs, "lastDuration": round(controller.last_duration, 4),
                              "restarts": health.restarts if health else 0,
                              "lastError": health.last_error if health else ""})
            for reconciler in module.reconcilers:
                health = self.lifecycle.health.get(f"{module.name}/reconciler {reconciler.name}")
                found.append({"module": module.name, "kind": "reconciler", **reconciler.health(),
                              "restarts": health.restarts if health else 0})
        return found

    async def start(self) -> None:
        for module in self.modules:
            # Each module's tasks get a lifecycle of their own so they stop in reverse order; the
            # shared health map keeps ``status`` one list.
            tasks = Lifecycle(health=self.lifecycle.health)
            self._started.append((module, tasks))
            for name, task in module.early_tasks.items():
                tasks.start(f"{module.name}/{name}", task)
            # Reconcilers run before ``start`` (a restore waits on them); they touch nothing until
            # their table is initialized.
            for reconciler in module.reconcilers:
                tasks.start(f"{module.name}/reconciler {reconciler.name}", reconciler.run)
            if module.start is not None:
                await module.start()
            for controller in module.controllers:
                tasks.start(f"{module.name}/controller {controller.name}", controller.run)
            for name, task in module.tasks.items():
                tasks.start(f"{module.name}/{name}", task)
            log.debug("module %s started", module.name)

    async def stop(self) -> None:
        for module, tasks in reversed(self._started):
            await tasks.stop()
            if module.stop is not None:
                try:
                    await module.stop()
                except Exception:
                    log.exception("stopping module %s failed", module.name)
        self._started.clear()


class Controller:
    """Runs ``compute`` whenever one of ``inputs`` changes (and once at start).

    ``compute`` is the controller's pure function plus the write of its output tables (``outputs``,
    created uninitialized, are marked initialized after the first computation that did not return
    False); it reads the input snapshots itself. ``debounce`` lets a burst of input
    changes land before computing (at least as long as the last computation took), except for a
    change of an ``urgent`` input.
    """

    def __init__(self, name: str, inputs: Sequence[Table[Any]], compute: Callable[[], bool | None], *,
                 outputs: Sequence[Table[Any]] = (), debounce: float = 0.0, urgent: Sequence[Table[Any]] = (),
                 resync_interval: float | None = None, then: Callable[[], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        #: Inputs whose change is computed at once, without the debounce.
        self.urgent = tuple(urgent)
        #: Awaited right after each computation, in the same task: the pass of the reconciler of
        #: this controller's output, for a path that must not queue behind heavier controllers.
        self.then = then
        #: Marked initialized after the first computation: until then their reconcilers wait, so a
        #: restarted agent never prunes what it has not computed yet.
        self.outputs = tuple(outputs)
        self.compute = compute
        self.debounce = debounce
        self.resync_interval = resync_interval
        self.runs = 0
        self.last_duration = 0.0

    def run_once(self) -> None:
        started = time.perf_counter()
        wrote = self.compute()
        self.last_duration = time.perf_counter() - started
        self.runs += 1
        if wrote is not False:  # False: its inputs are not ready, nothing was written
            for table in self.outputs:
                table.initialized.set()

    async def run(self) -> None:
        while True:
            snaps = [table.snapshot() for table in self.inputs]
            urgent = [table.snapshot().changed for table in self.urgent]
            self.run_once()
            if self.then is not None:
                await self.then()
            await wait_any([s.changed for s in snaps], self.resync_interval)
            if self.debounce and not any(event.is_set() for event in urgent):
                # At least as long as the last computation took: a controller whose every run costs
                # hundreds of ms (a large cluster) takes at most half of the event loop, and the
                # changes that arrive meanwhile cost one run, not one each. An urgent change ends it.
                await wait_any([table.snapshot().changed for table in self.urgent],
                               max(self.debounce, self.last_duration))
