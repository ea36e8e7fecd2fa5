"""``Flag``: an ``asyncio.Event`` for the many-keepers case, and ``sleep_until_flag``.

A keeper that waits for "its refresh is due, or a reload changed it, or the daemon stops"
used to wrap each of its three events and the sleep in a task of its own and pass all four
to ``asyncio.wait``: about 5 KB per idle token set, half of the daemon's memory at 10,000
token sets. Here one future is shared by the flags and a timer handle wakes it.

Caveat: like ``asyncio.Event``, a flag belongs to the loop that first waits on it.
"""

from __future__ import annotations

import asyncio

from .clock import Clock, SystemClock

__all__ = ["Flag", "sleep_until_flag"]


class Flag:
    """``is_set``/``set``/``clear``/``wait`` as on ``asyncio.Event``; no deque until a wait."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._add(fut)
        try:
            await fut
        finally:
            self._discard(fut)
        return True

    def _add(self, fut: asyncio.Future[None]) -> None:
        if self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)

    def _discard(self, fut: asyncio.Future[None]) -> None:
        if self._waiters is not None and fut in self._waiters:
            self._waiters.remove(fut)
            if not self._waiters:
                self._waiters = None


async def sleep_until_flag(clock: Clock, delay: float, *flags: Flag) -> None:
    """Sleep ``delay`` seconds on ``clock``, returning early once any of ``flags`` is set.

    On the real clock a timer handle wakes the shared future, so a sleeping keeper holds no
    task besides its own; any other clock (a test's fake) sleeps in a task, cancelled when
    a flag wins. A flag already set returns after one yield.
    """
    if any(f.is_set() for f in flags):
        await asyncio.sleep(0)
        return
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    for f in flags:
        f._add(woken)
    timer: asyncio.TimerHandle | None = None
    sleeper: asyncio.Future[None] | None = None
    if type(clock) is SystemClock:
        timer = loop.call_later(max(0.0, delay), wake)
    else:
        sleeper = asyncio.ensure_future(clock.sleep(delay))
        sleeper.add_done_callback(wake)
    try:
        await woken
    finally:
        if timer is not None:
            timer.cancel()
        if sleeper is not None:
            sleeper.remove_done_callback(wake)
            sleeper.cancel()
        for f in flags:
            f._discard(woken)
