"""The flow ring: capacity rules, overwriting the oldest, positions, and lost-event notices."""

from __future__ import annotations

import asyncio

import pytest

from membrane.core.errors import InvalidInput
from membrane.observe.model import HUBBLE_RING_BUFFER, OBSERVER_EVENTS_QUEUE, Flow, flow_time_ns, set_time
from membrane.observe.ring import Ring


def flow(n: int) -> Flow:
    return set_time(Flow(uuid=str(n)), 1_000 + n)


def uuids(events: list[object]) -> list[str]:
    return [e.flow.uuid if e.flow is not None else f"lost:{e.lost.num_events_lost}"  # type: ignore[attr-defined]
            for e in events]


def drain(reader: object) -> list[object]:
    out = []
    while (event := reader.next()) is not None:  # type: ignore[attr-defined]
        out.append(event)
    return out


@pytest.mark.parametrize("capacity", [1, 3, 4095, 65535])
def test_capacity_of_two_to_the_n_minus_one_is_accepted(capacity: int) -> None:
    assert Ring(capacity).capacity == capacity


@pytest.mark.parametrize("capacity", [0, 2, 4096, 65536, 131071])
def test_other_capacities_are_refused(capacity: int) -> None:
    with pytest.raises(InvalidInput, match="2\\^n-1"):
        Ring(capacity)


def test_writes_overwrite_the_oldest_and_counts_stay_exact() -> None:
    ring = Ring(7)
    for n in range(10):
        assert ring.write(flow(n)) == n
    assert (len(ring), ring.capacity, ring.seen_flows, ring.oldest, ring.written) == (7, 7, 10, 3, 10)
    assert uuids(drain(ring.reader(ring.oldest))) == ["3", "4", "5", "6", "7", "8", "9"]
    with pytest.raises(IndexError):
        ring.get(2)


def test_a_reader_overtaken_by_the_writer_gets_one_lost_notice_then_continues() -> None:
    lost: list[tuple[int, int]] = []
    ring = Ring(3, on_lost=lambda source, count: lost.append((source, count)))
    reader = ring.reader(0)
    ring.write(flow(0))
    assert uuids([reader.next()]) == ["0"]
    for n in range(1, 8):  # positions 1..7; the ring keeps 5, 6, 7
        ring.write(flow(n))
    events = drain(reader)
    assert uuids(events) == ["lost:4", "5", "6", "7"]
    assert events[0].lost.source == HUBBLE_RING_BUFFER  # type: ignore[attr-defined]
    assert lost == [(HUBBLE_RING_BUFFER, 4)]


def test_lost_events_written_in_are_events_but_not_flows() -> None:
    ring = Ring(7)
    ring.write(flow(0))
    ring.write_lost(OBSERVER_EVENTS_QUEUE, 12, cpu=1)
    ring.write(flow(1))
    events = drain(ring.reader(0))
    assert uuids(events) == ["0", "lost:12", "1"]
    assert events[1].lost.cpu.value == 1  # type: ignore[attr-defined]
    assert (len(ring), ring.seen_flows) == (3, 2)


def test_flows_without_time_are_stamped_with_the_clock() -> None:
    ring = Ring(3, clock=lambda: 123_456)
    ring.write(Flow(uuid="x"))
    assert flow_time_ns(ring.get(0).flow) == 123_456  # type: ignore[arg-type]


async def test_follow_sees_every_write_once_in_order() -> None:
    ring = Ring(15)
    reader = ring.reader(ring.written)
    received: list[str] = []

    async def follow() -> None:
        while len(received) < 6:
            received.append((await reader.next_follow()).flow.uuid)  # type: ignore[union-attr]

    task = asyncio.create_task(follow())
    for n in range(6):
        await asyncio.sleep(0)  # let the follower wait between writes, and sometimes not
        ring.write(flow(n))
        if n % 2:  # two writes before the follower runs again
            ring.write(flow(n + 100))
    await asyncio.wait_for(task, 5)
    assert received == ["0", "1", "101", "2", "3", "103"]
