"""The one clock abstraction: monotonic time, wall time and sleeping, injected everywhere.

Policies take ``now`` values; the keeper and the rate limiter take a Clock, so tests move a
FakeClock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks; ``sleep`` is asyncio's."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when told to; ``sleep`` waits until ``advance`` passes it.

    Monotonic and wall time move together unless ``jump_wall`` moves the wall clock alone,
    as an NTP step or an operator's ``date -s`` would.
    """

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self._mono = monotonic
        self._wall_offset = wall - monotonic
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._wall_offset

    def jump_wall(self, seconds: float) -> None:
        self._wall_offset += seconds

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._mono + max(0.0, seconds), fut))
        try:
            await fut
        finally:
            self._sleepers = [(t, f) for t, f in self._sleepers if f is not fut]

    @property
    def sleeping(self) -> list[float]:
        """Remaining time of every pending sleep, shortest first."""
        return sorted(t - self._mono for t, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in order and letting each one run."""
        target = self._mono + seconds
        while True:
            due = [(t, f) for t, f in self._sleepers if t <= target and not f.done()]
            if not due:
                break
            t, f = min(due, key=lambda x: x[0])
            self._mono = max(self._mono, t)
            f.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
        self._mono = target
        for _ in range(5):
            await asyncio.sleep(0)
