"""The pure timing policies: the refresh schedule and the backoff, with no clock and no sleep."""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception_type
from tenacity.stop import stop_after_attempt

from anybilld.errors import BlockReason, PermanentError, TransientError
from anybilld.policy import (
    Uniform,
    refresh_delay,
    temporary_lock_delay,
    wait_full_jitter,
    wait_retry_after,
)


def upper(a: float, b: float) -> float:
    """A 'random' source that always draws the top of the range: waits equal the window."""
    return b


def lower(a: float, b: float) -> float:
    return a


def call_state(attempt: int, exc: BaseException | None = None) -> RetryCallState:
    """A tenacity RetryCallState as the retry loop hands it to a wait strategy."""
    rs = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    rs.attempt_number = attempt
    if exc is not None:
        rs.set_exception((type(exc), exc, None))
    return rs


# Derandomized: the same examples on every run, like every other test here.
PROPERTY = settings(derandomize=True, deadline=None, max_examples=300)

# ---------------------------------------------------------------- refresh_delay


@PROPERTY
@given(
    lifetime=st.floats(min_value=1.0, max_value=1e8),
    at=st.floats(min_value=0.01, max_value=0.99),
    jitter=st.floats(min_value=0.0, max_value=0.49),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_refresh_delay_stays_within_at_plus_minus_jitter_of_the_lifetime(
    lifetime: float, at: float, jitter: float, seed: int
) -> None:
    # What config validation guarantees: the window lies strictly inside (0, 1).
    assume(at - jitter > 0 and at + jitter < 1)
    delay = refresh_delay(lifetime, at=at, jitter=jitter, uniform=random.Random(seed).uniform)
    slack = 1e-9 * lifetime
    assert lifetime * (at - jitter) - slack <= delay <= lifetime * (at + jitter) + slack
    assert 0 < delay < lifetime


@pytest.mark.parametrize(
    ("uniform", "expected"),
    [(lower, 2400.0), (upper, 4800.0), (lambda a, b: (a + b) / 2, 3600.0)],
    ids=["lowest", "highest", "middle"],
)
def test_refresh_delay_reaches_both_ends_of_the_window(uniform: Uniform, expected: float) -> None:
    delay = refresh_delay(7200.0, at=0.5, jitter=1 / 6, uniform=uniform)
    assert delay == pytest.approx(expected)


def test_refresh_delay_draws_anew_on_every_call() -> None:
    draws = iter([0.4, 0.6, 0.45])
    asked: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        asked.append((a, b))
        return next(draws)

    delays = [refresh_delay(1000.0, at=0.5, jitter=0.1, uniform=uniform) for _ in range(3)]
    assert delays == pytest.approx([400.0, 600.0, 450.0])
    assert asked == [pytest.approx((0.4, 0.6))] * 3


# ---------------------------------------------------------------- wait_full_jitter


@pytest.mark.parametrize(
    ("initial", "maximum", "windows"),
    [
        (1.0, 300.0, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]),
        (0.5, 60.0, [0.5, 1, 2, 4, 8, 16, 32, 60, 60]),
        (10.0, 10.0, [10, 10, 10]),
        (5.0, 3600.0, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]),
    ],
)
def test_full_jitter_window_doubles_and_caps_at_maximum(
    initial: float, maximum: float, windows: list[float]
) -> None:
    wait = wait_full_jitter(initial, maximum, upper)
    assert [wait.window(n) for n in range(1, len(windows) + 1)] == windows
    # With the top draw, the wait is the window itself.
    assert [wait(call_state(n)) for n in range(1, len(windows) + 1)] == windows


@pytest.mark.parametrize("attempt", [65, 66, 1100, 5000, 10**6])
def test_full_jitter_never_overflows_on_huge_attempt_numbers(attempt: int) -> None:
    asked: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        asked.append((a, b))
        return b

    wait = wait_full_jitter(1.0, 300.0, uniform)
    assert wait.window(attempt) == 300.0
    assert wait(call_state(attempt)) == 300.0
    assert asked == [(0.0, 300.0)]


def test_full_jitter_with_a_huge_initial_still_caps() -> None:
    # initial * 2**64 overflows to inf, never to an OverflowError; min() then caps it.
    assert wait_full_jitter(1e300, 600.0).window(5000) == 600.0


@PROPERTY
@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_full_jitter_draws_between_zero_and_the_window(attempt: int, seed: int) -> None:
    wait = wait_full_jitter(1.0, 300.0, random.Random(seed).uniform)
    assert 0.0 <= wait(call_state(attempt)) <= min(300.0, 2.0 ** min(attempt - 1, 64))


# ---------------------------------------------------------------- wait_retry_after


@pytest.mark.parametrize(
    ("attempt", "exc", "expected"),
    [
        (1, TransientError("throttled", status=429), 1.0),
        (1, TransientError("throttled", retry_after=100.0, status=429), 100.0),
        (8, TransientError("unavailable", retry_after=5.0, status=503), 128.0),
        (20, TransientError("unavailable", retry_after=299.0, status=503), 300.0),
        # Longer than retry_max: the server knows its own load, so it is not capped at 300.
        (20, TransientError("throttled", retry_after=3600.0, status=429), 3600.0),
        (3, TransientError("throttled", retry_after=0.0, status=429), 4.0),
        (
            2,
            PermanentError("rejected", reason=BlockReason.CREDENTIALS, code="AADB2C90225"),
            2.0,
        ),
        (5, None, 16.0),
    ],
    ids=[
        "no-header",
        "header-longer",
        "backoff-longer",
        "capped-backoff-longer",
        "header-beyond-retry-max",
        "zero-header",
        "not-transient",
        "no-outcome",
    ],
)
def test_retry_after_wins_only_when_longer_than_the_backoff(
    attempt: int, exc: BaseException | None, expected: float
) -> None:
    wait = wait_retry_after(wait_full_jitter(1.0, 300.0, upper))
    assert wait(call_state(attempt, exc)) == expected


async def test_retry_after_in_a_real_retry_loop_with_a_fake_sleep() -> None:
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    script: list[BaseException | str] = [
        TransientError("unavailable", status=503),
        TransientError("throttled", retry_after=100.0, status=429),
        TransientError("unavailable", status=503),
        TransientError("throttled", retry_after=1.0, status=429),
        "token",
    ]
    calls = iter(script)

    async def attempt() -> str:
        item = next(calls)
        if isinstance(item, BaseException):
            raise item
        return item

    retrying = AsyncRetrying(
        sleep=fake_sleep,
        wait=wait_retry_after(wait_full_jitter(1.0, 300.0, upper)),
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(10),
        reraise=True,
    )
    assert await retrying(attempt) == "token"
    assert waits == [1.0, 100.0, 4.0, 8.0]


# ---------------------------------------------------------------- temporary_lock_delay


@pytest.mark.parametrize(
    ("locks", "blocked_retry", "wait"),
    [
        # However short blocked_retry is, never less than a minute, and growing.
        (1, 1.0, 60.0),
        (2, 1.0, 120.0),
        (3, 1.0, 240.0),
        (6, 1.0, 1920.0),
        (7, 1.0, 3600.0),  # 3,840 capped at an hour
        (10_000, 1.0, 3600.0),  # no float overflow
        (0, 1.0, 60.0),  # nothing counted yet: the first wait
        # The default blocked_retry (an hour) is the cap...
        (1, 3600.0, 60.0),
        (7, 3600.0, 3600.0),
        # ... and a longer one lets the wait grow on to it.
        (8, 86400.0, 7680.0),
        (12, 86400.0, 86400.0),
    ],
)
def test_temporary_lock_delay_starts_at_a_minute_and_doubles_up_to_the_cap(
    locks: int, blocked_retry: float, wait: float
) -> None:
    assert temporary_lock_delay(locks, blocked_retry=blocked_retry) == wait


@PROPERTY
@given(
    locks=st.integers(min_value=1, max_value=10_000),
    blocked_retry=st.floats(min_value=1.0, max_value=90 * 86400.0),
)
def test_temporary_lock_delay_is_at_least_a_minute_and_never_shrinks(
    locks: int, blocked_retry: float
) -> None:
    wait = temporary_lock_delay(locks, blocked_retry=blocked_retry)
    assert 60.0 <= wait <= max(blocked_retry, 3600.0)
    assert temporary_lock_delay(locks + 1, blocked_retry=blocked_retry) >= wait
