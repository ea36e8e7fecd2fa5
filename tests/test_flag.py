"""``Flag`` and ``sleep_until_flag``: what an idle keeper waits on, on a fake clock."""

from __future__ import annotations

import asyncio

from anybilld.clock import FakeClock, SystemClock
from anybilld.flag import Flag, sleep_until_flag


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_flag_set_during_the_sleep_ends_it_and_cancels_the_sleep() -> None:
    clock = FakeClock()
    a, b = Flag(), Flag()
    task = asyncio.ensure_future(sleep_until_flag(clock, 100, a, b))
    await settle()
    assert clock.sleeping == [100]
    assert not task.done()
    b.set()
    await settle()
    assert task.done() and task.exception() is None
    assert clock.sleeping == []  # the clock's sleeper is gone, not left to fire later
    assert a._waiters is None and b._waiters is None  # nothing kept per wait


async def test_the_sleep_ending_first_returns_and_leaves_the_flags_clean() -> None:
    clock = FakeClock()
    a = Flag()
    task = asyncio.ensure_future(sleep_until_flag(clock, 5, a))
    await settle()
    await clock.advance(5)
    await settle()
    assert task.done() and task.exception() is None
    assert not a.is_set() and a._waiters is None


async def test_a_flag_already_set_returns_without_sleeping() -> None:
    clock = FakeClock()
    a = Flag()
    a.set()
    await asyncio.wait_for(sleep_until_flag(clock, 100, a), 5)
    assert clock.sleeping == []


async def test_cancelling_the_waiter_cleans_up() -> None:
    clock = FakeClock()
    a = Flag()
    task = asyncio.ensure_future(sleep_until_flag(clock, 100, a))
    await settle()
    task.cancel()
    await settle()
    assert task.cancelled()
    assert clock.sleeping == [] and a._waiters is None


async def test_flag_behaves_like_an_event() -> None:
    f = Flag()
    assert not f.is_set()
    waiters = [asyncio.ensure_future(f.wait()) for _ in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)
    f.set()
    await settle()
    assert all(w.result() is True for w in waiters)
    f.clear()
    assert not f.is_set()
    again = asyncio.ensure_future(f.wait())
    await settle()
    assert not again.done()
    f.set()
    await settle()
    assert again.done() and f._waiters is None


async def test_on_the_real_clock_a_timer_wakes_it_and_a_flag_cancels_the_timer() -> None:
    clock = SystemClock()
    a = Flag()
    await asyncio.wait_for(sleep_until_flag(clock, 0.01, a), 10)  # the timer fired
    assert a._waiters is None
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(sleep_until_flag(clock, 3600, a))
    await settle()
    timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert any(h.when() > loop.time() + 3000 for h in timers)
    a.set()
    await asyncio.wait_for(task, 10)
    timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert not any(h.when() > loop.time() + 3000 for h in timers)  # no hour-long timer left
    assert a._waiters is None
