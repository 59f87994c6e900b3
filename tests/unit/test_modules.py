"""Modules start in the order their tables require and stop in reverse; a cycle is refused."""

from __future__ import annotations

import asyncio

import pytest

from membrane.core.lifecycle import Lifecycle
from membrane.core.modules import Controller, Module, ModuleRunner, start_order
from membrane.core.statedb import StateDB


def _tables():  # type: ignore[no-untyped-def]
    db = StateDB()
    return db, db.table("intent", primary=lambda r: r), db.table("desired", primary=lambda r: r)


def test_a_tables_writer_starts_before_its_readers_whatever_the_list_order() -> None:
    _, intent, desired = _tables()
    reconcile = Module("reconcile", reads=(desired,))
    control = Module("control", reads=(intent,), writes=(desired,))
    reflect = Module("reflect", writes=(intent,))
    api = Module("api")
    assert [m.name for m in start_order([reconcile, api, control, reflect])] == ["api", "reflect", "control",
                                                                                "reconcile"]


def test_cycles_and_two_writers_are_refused() -> None:
    _, intent, desired = _tables()
    with pytest.raises(ValueError, match="cycle: a, b"):
        start_order([Module("a", reads=(intent,), writes=(desired,)), Module("b", reads=(desired,), writes=(intent,))])
    with pytest.raises(ValueError, match="written by a and b"):
        start_order([Module("a", writes=(intent,)), Module("b", writes=(intent,))])


async def test_start_runs_reconcilers_start_then_controllers_and_stop_reverses() -> None:
    _, intent, desired = _tables()
    events: list[str] = []
    writer = desired.writer("control")

    def compute() -> None:
        events.append(f"compute {len(intent.snapshot())}")
        writer.replace_all(intent.snapshot())

    async def started(name: str) -> None:
        events.append(f"start {name}")

    async def stopped(name: str) -> None:
        events.append(f"stop {name}")

    control = Module("control", reads=(intent,), writes=(desired,), controllers=(Controller("c", [intent], compute),),
                     start=lambda: started("control"), stop=lambda: stopped("control"))
    reflect = Module("reflect", writes=(intent,), start=lambda: started("reflect"), stop=lambda: stopped("reflect"))
    lifecycle = Lifecycle()
    runner = ModuleRunner(lifecycle, [control, reflect])
    await runner.start()
    for _ in range(5):
        await asyncio.sleep(0)  # the controller's first run, on the empty table
    intent.writer("reflect").upsert("a", "b")
    for _ in range(20):
        await asyncio.sleep(0)
    await runner.stop()
    assert events[:3] == ["start reflect", "start control", "compute 0"]
    assert "compute 2" in events and sorted(desired.snapshot()) == ["a", "b"]
    assert events[-2:] == ["stop control", "stop reflect"]
    assert [c["name"] for c in runner.controllers()] == ["c"]
