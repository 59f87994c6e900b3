"""The per-agent flow ring: a fixed-size buffer of the newest flows, read by position.

Every write gets the next absolute position; the ring keeps the last ``capacity`` of them and a
write beyond that overwrites the oldest::

    position:  0 … oldest-1 │ oldest … written-1 │ written
               overwritten  │ in the ring        │ the next write goes here

Readers hold a position, so a reader never sees an event twice and never skips one silently:
when the writer has overtaken it, :meth:`RingReader.next` returns a LostEvent (source
HUBBLE_RING_BUFFER) saying how many it missed, and continues at the oldest event still held.
Capacity follows Hubble's ``hubble-event-buffer-capacity``: 2^n - 1, default 4095, at most 65535.

The ring lives on one event loop: :meth:`Ring.write` must be called from the loop's thread (or
with no loop running at all); followers wait with :meth:`RingReader.next_follow`.

Primitives: :class:`Ring`, :class:`RingEvent`, :class:`RingReader`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from membrane.core.errors import InvalidInput
from membrane.observe.model import HUBBLE_RING_BUFFER, Flow, LostEvent, LostEventSourceEnum, flow_time_ns, set_time

DEFAULT_CAPACITY = 4095
MAX_CAPACITY = 65535


def validate_capacity(capacity: int) -> int:
    if not 1 <= capacity <= MAX_CAPACITY or (capacity + 1) & capacity:
        raise InvalidInput([f"flow buffer capacity {capacity}: must be 2^n-1 between 1 and {MAX_CAPACITY}"])
    return capacity


@dataclass(frozen=True, slots=True)
class RingEvent:
    """A flow or a lost-events notice with the time it happened (ns since the epoch)."""

    time_ns: int
    flow: Flow | None = None
    lost: LostEvent | None = None


# Called with (LostEventSource, count) for every loss: readers overtaken and losses written in.
LostHook = Callable[[int, int], None]


class Ring:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, clock: Callable[[], int] = time.time_ns,
                 on_lost: LostHook | None = None) -> None:
        self._capacity = validate_capacity(capacity)
        self._slots: list[RingEvent | None] = [None] * capacity
        self._written = 0
        self._seen_flows = 0
        self._clock = clock
        self._waiters: list[asyncio.Future[None]] = []
        self.on_lost = on_lost

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def written(self) -> int:
        """Events ever written; also the position the next write takes."""
        return self._written

    @property
    def oldest(self) -> int:
        """Position of the oldest event still held."""
        return max(0, self._written - self._capacity)

    @property
    def seen_flows(self) -> int:
        """Flows ever written (lost-events notices are not flows)."""
        return self._seen_flows

    def __len__(self) -> int:
        return min(self._written, self._capacity)

    def now_ns(self) -> int:
        return self._clock()

    def write(self, flow: Flow) -> int:
        """Append ``flow`` (stamped with the current time if it has none); returns its position.

        The ring keeps a reference: the flow must not be changed after it is written.
        """
        time_ns = flow_time_ns(flow)
        if time_ns is None:
            time_ns = self._clock()
            set_time(flow, time_ns)
        self._seen_flows += 1
        return self._append(RingEvent(time_ns, flow=flow))

    def write_lost(self, source: int, count: int, *, cpu: int | None = None) -> int:
        """Record that ``count`` events were lost before reaching the ring (e.g. a full queue)."""
        lost = LostEvent(source=cast(LostEventSourceEnum, source), num_events_lost=count)
        if cpu is not None:
            lost.cpu.value = cpu
        if self.on_lost is not None:
            self.on_lost(source, count)
        return self._append(RingEvent(self._clock(), lost=lost))

    def _append(self, event: RingEvent) -> int:
        position = self._written
        self._slots[position % self._capacity] = event
        self._written += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return position

    def resize(self, capacity: int) -> None:
        """Hold ``capacity`` events from now on (a live settings change). Positions stay valid: the
        newest events are kept, and readers behind the new oldest position see an overrun."""
        capacity = validate_capacity(capacity)
        if capacity == self._capacity:
            return
        slots: list[RingEvent | None] = [None] * capacity
        for position in range(max(self.oldest, self._written - capacity), self._written):
            slots[position % capacity] = self._slots[position % self._capacity]
        self._slots, self._capacity = slots, capacity

    def get(self, position: int) -> RingEvent:
        """The event at ``position``; IndexError when it was overwritten or not written yet."""
        if not self.oldest <= position < self._written:
            raise IndexError(position)
        event = self._slots[position % self._capacity]
        assert event is not None
        return event

    async def wait_written(self, position: int) -> None:
        """Return once the event at ``position`` has been written."""
        while self._written <= position:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def reader(self, position: int) -> RingReader:
        return RingReader(self, position)

    def overrun(self, missed: int) -> RingEvent:
        """The notice a reader gets when the writer overwrote ``missed`` events it had not read."""
        if self.on_lost is not None:
            self.on_lost(HUBBLE_RING_BUFFER, missed)
        return RingEvent(self._clock(), lost=LostEvent(source=HUBBLE_RING_BUFFER, num_events_lost=missed))


class RingReader:
    """Reads a ring forward from a position; see the module docstring for overruns."""

    def __init__(self, ring: Ring, position: int) -> None:
        self.ring = ring
        self.position = position

    def next(self) -> RingEvent | None:
        """The next event, a LostEvent notice if the writer overtook us, or None at the end."""
        ring = self.ring
        if self.position >= ring.written:
            return None
        if self.position < ring.oldest:
            missed = ring.oldest - self.position
            self.position = ring.oldest
            return ring.overrun(missed)
        event = ring.get(self.position)
        self.position += 1
        return event

    async def next_follow(self) -> RingEvent:
        """Like :meth:`next`, but waits for the next write at the end of the ring."""
        while True:
            event = self.next()
            if event is not None:
                return event
            await self.ring.wait_written(self.position)
