"""Pure timing policies: when to refresh, how long to back off.

Nothing here reads a clock or sleeps. The backoff waits are tenacity wait strategies (a
callable over tenacity's ``RetryCallState``), so the keeper plugs them into its one retry
layer and tests call them with a hand-made state and a seeded random source.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tenacity import RetryCallState
from tenacity.wait import wait_base

from .errors import TransientError

Uniform = Callable[[float, float], float]  # random.uniform's shape: a value in [a, b]

# When the IdP sends no refresh_token_expires_in, assume B2C's default refresh lifetime.
DEFAULT_REFRESH_TOKEN_LIFETIME = 14 * 86400.0


def refresh_delay(lifetime: float, *, at: float, jitter: float, uniform: Uniform) -> float:
    """Seconds after receipt at which to refresh a token that lives ``lifetime`` seconds.

    ``at ± jitter`` of the lifetime, drawn uniformly and anew for every refresh, so that
    token sets obtained together (a start-up, the end of an outage) drift apart instead of
    refreshing in lock-step forever.
    """
    return lifetime * uniform(at - jitter, at + jitter)


# B2C's smart lockout locks an account for a minute at first, then for longer and longer.
TEMPORARY_LOCK_FIRST_WAIT = 60.0
TEMPORARY_LOCK_MAX_WAIT = 3600.0


def temporary_lock_delay(locks: int, *, blocked_retry: float) -> float:
    """Seconds before the next password login after the ``locks``-th temporary lock
    (AADB2C90114) of an account in a row: one minute, doubling with each, up to
    ``blocked_retry`` or an hour, whichever is longer.

    Never less than a minute, whatever ``blocked_retry`` says: no attempt can succeed
    sooner, and B2C makes the lock longer. Caveat: no jitter; a lock is one account's, so
    there is no fleet to spread.
    """
    exponent = min(max(locks, 1) - 1, 64)  # min() before the power, as in window()
    cap = max(blocked_retry, TEMPORARY_LOCK_MAX_WAIT)
    return min(cap, TEMPORARY_LOCK_FIRST_WAIT * 2.0**exponent)


class wait_full_jitter(wait_base):  # named like tenacity's own wait strategies
    """Exponential backoff with full jitter: uniform(0, min(maximum, initial * 2**(n-1))).

    Without jitter, a fleet that failed together retries together; full jitter spreads it.
    Caveat: a draw may be close to zero, so an individual retry can come almost at once.
    """

    def __init__(self, initial: float, maximum: float, uniform: Uniform = random.uniform) -> None:
        self.initial = initial
        self.maximum = maximum
        self.uniform = uniform

    def window(self, attempt: int) -> float:
        # min() before the power would overflow: 2**2000 is a float error, not a number.
        exponent = min(attempt - 1, 64)
        return min(self.maximum, self.initial * 2.0**exponent)

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.uniform(0.0, self.window(retry_state.attempt_number))


class wait_retry_after(wait_base):
    """The backoff, unless the server's ``Retry-After`` asks for longer; then that wins.

    The Retry-After value is already capped (at an hour, by the identity client), and is
    deliberately not capped at ``retry_max``: the server knows its own load.
    """

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.backoff(retry_state)
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            return max(wait, exc.retry_after)
        return wait
