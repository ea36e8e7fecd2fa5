"""One token set's life on a fake clock, against a scripted token endpoint.

No network and no real sleeping: the keeper's ``TokenClient`` is a fake that answers from
a queue and records every request, the clock is a ``FakeClock`` moved by ``Env.advance``,
and file I/O runs inline. State and token files are real files under ``tmp_path``.

The fakes live in fakes.py, shared with test_supervisor/test_metrics/test_listener.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from fakes import (
    MONO0,
    PASSWORD,
    REFRESH,
    WALL0,
    KeeperEnv,
    Outcome,
    dead_grant,
    gated_save,
    grant,
    scope_refused,
    settle,
    temporarily_locked,
    transient,
    wrong_password,
)

from anybilld.config import OutputTarget
from anybilld.errors import BlockReason, PermanentError, TransientError
from anybilld.files import rfc3339
from anybilld.keeper import Account, Keeper, TokenState
from anybilld.secret import Secret
from anybilld.state import StateStore


def upper(a: float, b: float) -> float:
    """The top draw: a backoff wait equals its window."""
    return b


class Env(KeeperEnv):
    async def advance(self, seconds: float) -> None:
        """Move the clock by ``seconds``, waking every sleeper due meanwhile in order and
        letting the woken keepers run (and sleep again) before the clock moves on."""
        target = self.clock.monotonic() + seconds
        await settle()
        for _ in range(100_000):
            pending = self.clock.sleeping
            if not pending or self.clock.monotonic() + pending[0] > target:
                break
            await self.clock.advance(pending[0])
            await settle()
        else:
            raise AssertionError("the keepers never stop sleeping for zero seconds")
        await self.clock.advance(target - self.clock.monotonic())
        await settle()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with Env(tmp_path) as e:
        yield e


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- first start


async def test_first_start_logs_in_once_publishes_and_saves_private_state(env: Env) -> None:
    env.client.push(grant("1", expires_in=3600.0, refresh_expires_in=86400.0))
    keeper = env.start()
    await settle()

    assert env.client.grants == ["password"]
    sent = env.client.sent[0]
    assert (sent.username, sent.password, sent.scope, sent.client_id) == (
        "svc-berlin-01",
        PASSWORD,
        "bill",
        "client-A",
    )

    assert env.token_doc() == {
        "access_token": "AT-1",
        "token_type": "Bearer",
        "expires_at": rfc3339(WALL0 + 3600),
        "expires_at_unix": int(WALL0 + 3600),
        "obtained_at": rfc3339(WALL0),
        "merchant": "berlin-01",
        "scope": "bill",
    }
    assert mode_of(env.token_file()) == 0o640

    state_path = env.store.path("berlin-01", "bill")
    assert mode_of(state_path) == 0o600
    assert mode_of(state_path.parent) == 0o700
    stored = env.store.load("berlin-01", "bill")
    assert stored is not None
    assert stored.fingerprint == keeper.spec.grant_fingerprint()
    assert stored.refresh_token == Secret("RT-1")
    assert stored.refresh_token_expires_at == WALL0 + 86400
    assert stored.access_token == Secret("AT-1")
    assert stored.access_token_expires_at == WALL0 + 3600
    assert stored.first_sign_in_at == WALL0
    assert PASSWORD not in state_path.read_text()

    assert keeper.state == TokenState.OK
    assert keeper.has_valid_token
    assert keeper.access_expires_at == WALL0 + 3600
    assert keeper.refresh_expires_at == WALL0 + 86400
    assert keeper.last_success_at == WALL0
    assert keeper.next_attempt_at == WALL0 + 1800
    assert keeper.consecutive_failures == 0


async def test_a_keeper_is_pending_until_its_first_answer(env: Env) -> None:
    keeper = env.start()  # nothing queued: the password request stays in flight
    await settle()
    assert env.client.grants == ["password"]
    assert keeper.state == TokenState.PENDING
    assert not keeper.has_valid_token
    assert not env.token_file().exists()

    env.client.push(grant("1"))
    await settle()
    assert keeper.state == TokenState.OK
    assert env.token_doc()["access_token"] == "AT-1"


# ---------------------------------------------------------------- the schedule


async def test_refresh_happens_at_the_configured_fraction_of_the_lifetime_not_before(
    env: Env,
) -> None:
    env.client.push(grant("1", expires_in=3600.0), grant("2", expires_in=3600.0))
    keeper = env.start()
    await settle()

    await env.advance(1799.0)
    assert env.client.grants == ["password"]
    assert env.token_doc()["access_token"] == "AT-1"

    await env.advance(1.0)
    assert env.client.grants == ["password", "refresh"]
    refresh = env.client.sent[1]
    assert refresh.refresh_token == "RT-1"
    assert refresh.password is None
    assert refresh.at == MONO0 + 1800
    assert env.token_doc()["access_token"] == "AT-2"
    assert env.token_doc()["expires_at_unix"] == int(WALL0 + 1800 + 3600)
    # Measured from the moment the answer arrived: the next one is 1800 s after it.
    assert keeper.next_attempt_at == WALL0 + 1800 + 1800
    stored = env.store.load("berlin-01", "bill")
    assert stored is not None
    assert stored.refresh_token == Secret("RT-2")
    assert stored.first_sign_in_at == WALL0  # a refresh does not start a new sign-in


async def test_refresh_jitter_is_drawn_anew_for_every_refresh(env: Env) -> None:
    draws = iter([0.3, 0.7, 0.5, 0.5])
    asked: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        asked.append((a, b))
        return next(draws)

    env.rt.uniform = uniform
    env.client.push(grant("1"), grant("2"), grant("3"))
    env.start()
    await env.advance(1080.0 + 2520.0)

    assert env.client.grants == ["password", "refresh", "refresh"]
    assert [s.at for s in env.client.sent] == [MONO0, MONO0 + 1080, MONO0 + 1080 + 2520]
    assert asked[:3] == [(0.25, 0.75)] * 3


async def test_refresh_token_past_its_expiry_is_not_used_a_password_login_is(env: Env) -> None:
    env.client.push(grant("1", expires_in=3600.0, refresh_expires_in=1000.0), grant("2"))
    env.start()
    await env.advance(1800.0)
    assert env.client.grants == ["password", "password"]
    assert env.token_doc()["access_token"] == "AT-2"


async def test_a_wall_clock_step_does_not_move_the_refresh_schedule(env: Env) -> None:
    env.client.push(grant("1"), grant("2"))
    env.start()
    await settle()
    env.clock.jump_wall(-7200.0)  # NTP or an operator steps the wall clock back two hours
    await env.advance(1799.0)
    assert env.client.grants == ["password"]
    await env.advance(1.0)
    assert env.client.grants == ["password", "refresh"]
    assert env.client.sent[1].at == MONO0 + 1800


async def test_a_hanging_login_of_one_merchant_does_not_delay_another(env: Env) -> None:
    env.client.push(grant("h1"), scope="store")
    stuck = env.start(env.spec("stuck", "bill"))  # its answer never comes
    other = env.start(env.spec("hamburg", "store"))
    await settle()
    assert stuck.state == TokenState.PENDING
    assert other.state == TokenState.OK
    assert env.token_doc("hamburg", "store")["access_token"] == "AT-h1"


# ---------------------------------------------------------------- restart


async def test_restart_with_a_valid_stored_token_sends_no_request_and_republishes(
    env: Env,
) -> None:
    env.client.push(grant("1"))
    first = env.start()
    await env.advance(600.0)
    published = env.token_file().read_bytes()
    await first.stop()
    env.token_file().unlink()

    second = env.start()  # a new keeper, as after a restart: same store, new Account
    await settle()

    assert env.client.grants == ["password"]
    assert env.token_file().read_bytes() == published
    assert second.state == TokenState.OK
    assert second.has_valid_token
    assert second.access_expires_at == WALL0 + 3600
    # Scheduled from when the token was obtained, not from the restart.
    assert second.next_attempt_at == WALL0 + 1800

    env.client.push(grant("2"))
    await env.advance(1199.0)
    assert env.client.grants == ["password"]
    await env.advance(1.0)
    assert env.client.grants == ["password", "refresh"]
    assert env.client.sent[1].refresh_token == "RT-1"


async def test_restart_with_existing_files_leaves_them_untouched(env: Env) -> None:
    env.client.push(grant("1"))
    first = env.start()
    await settle()
    await first.stop()
    before = os.stat(env.token_file())

    env.start()
    await settle()
    after = os.stat(env.token_file())
    assert env.client.grants == ["password"]
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_restart_with_an_expired_access_token_refreshes_without_the_password(
    env: Env,
) -> None:
    env.client.push(grant("1", expires_in=3600.0))
    first = env.start()
    await settle()
    await first.stop()
    await env.advance(4000.0)  # the daemon was down longer than the token lived

    env.client.push(grant("2"))
    second = env.start()
    await settle()
    assert env.client.grants == ["password", "refresh"]
    assert env.client.sent[1].refresh_token == "RT-1"
    assert second.state == TokenState.OK
    assert env.token_doc()["access_token"] == "AT-2"


def lose_the_state_key(env: Env) -> None:
    """The state directory's digest key deleted (restored from a backup without it, say):
    the next start makes a new one, under which no stored digest compares."""
    (env.state_dir / ".digest-key").unlink()
    env.store = env.rt.store = StateStore(env.state_dir)
    env.store.prepare()


async def test_a_lost_state_key_costs_no_password_login(env: Env) -> None:
    env.client.push(grant("1"))
    first = env.start()
    await settle()
    await first.stop()
    lose_the_state_key(env)

    second = env.start()
    await settle()
    assert env.client.grants == ["password"]
    assert second.state == TokenState.OK
    env.client.push(grant("2"))
    await env.advance(1800.0)
    assert env.client.grants == ["password", "refresh"]


async def test_a_lost_state_key_keeps_a_stored_block(env: Env) -> None:
    env.client.push(wrong_password())
    first = env.start()
    await settle()
    assert first.state == TokenState.BLOCKED
    await first.stop()
    lose_the_state_key(env)

    second = env.start()
    await settle()
    assert env.client.grants == ["password"]  # the refused password is not tried again
    assert second.state == TokenState.BLOCKED
    # Re-stamped under the new key: a password changed while stopped is recognised.
    await second.stop()
    env.client.push(grant("1"))
    third = env.start(env.spec(password="pw-new"))
    await settle()
    assert env.client.grants == ["password", "password"]
    assert third.state == TokenState.OK


async def test_corrupt_state_is_ignored_and_replaced_after_a_password_login(env: Env) -> None:
    path = env.store.path("berlin-01", "bill")
    path.parent.mkdir(mode=0o700)
    path.write_text('{"version": 1, "refresh_token": "RT-trunc')  # a torn write
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    assert env.client.grants == ["password"]
    assert keeper.state == TokenState.OK
    stored = env.store.load("berlin-01", "bill")
    assert stored is not None and stored.refresh_token == Secret("RT-1")


async def test_a_state_save_failure_still_publishes_the_token(env: Env) -> None:
    (env.store.directory / "berlin-01").write_text("not a directory")
    env.client.push(grant("1"), grant("2"))
    keeper = env.start()
    await settle()
    assert keeper.state == TokenState.OK
    assert env.token_doc()["access_token"] == "AT-1"
    # The refresh token is still kept in memory: the refresh needs no password.
    await env.advance(1800.0)
    assert env.client.grants == ["password", "refresh"]
    assert env.token_doc()["access_token"] == "AT-2"


async def test_a_stored_grant_of_another_client_id_is_not_reused(env: Env) -> None:
    env.client.push(grant("1"))
    first = env.start(env.spec(client_id="client-A"))
    await settle()
    await first.stop()

    other = env.spec(client_id="client-B")
    env.client.push(grant("2"))
    second = env.start(other)
    await settle()

    assert env.client.grants == ["password", "password"]
    assert env.client.sent[1].client_id == "client-B"
    assert all(s.refresh_token != "RT-1" for s in env.client.sent)
    assert second.state == TokenState.OK
    assert env.token_doc()["access_token"] == "AT-2"
    stored = env.store.load("berlin-01", "bill")
    assert stored is not None
    assert stored.fingerprint == other.grant_fingerprint()
    assert stored.refresh_token == Secret("RT-2")


# ---------------------------------------------------------------- transient failures


async def test_transient_backoff_grows_caps_at_retry_max_and_retry_after_wins_when_longer(
    env: Env,
) -> None:
    env.rt.uniform = upper  # waits equal their window; the refresh comes at 0.75 * 3600
    env.client.push(grant("1"))
    env.start()
    await settle()
    env.client.push(
        transient(),
        transient(),
        transient(),
        transient(retry_after=600.0),  # longer than the backoff and than retry_max: wins
        transient(),
        transient(),
        transient(),
        transient(),
        transient(retry_after=3.0),  # shorter than the backoff: ignored
        grant("2"),
    )
    await env.advance(2700.0 + 1000.0)

    refreshes = env.client.sent[1:]
    assert [s.grant for s in refreshes] == ["refresh"] * 10
    assert refreshes[0].at == MONO0 + 2700
    waits = [b.at - a.at for a, b in pairwise(refreshes)]
    assert waits == [1.0, 2.0, 4.0, 600.0, 16.0, 32.0, 64.0, 64.0, 64.0]
    backoffs = [w for w in waits if w != 600.0]
    assert backoffs == sorted(backoffs), "backoff waits grow"
    assert max(backoffs) <= REFRESH.retry_max


async def test_transient_failures_keep_the_refresh_token_and_the_published_file(
    env: Env,
) -> None:
    env.client.push(grant("1", expires_in=3600.0))
    keeper = env.start()
    await settle()
    token_path, state_path = env.token_file(), env.store.path("berlin-01", "bill")
    published, ino = token_path.read_bytes(), os.stat(token_path).st_ino
    saved = state_path.read_bytes()

    env.client.push(*(transient() for _ in range(500)))
    await env.advance(1800.0)
    assert keeper.state == TokenState.RETRYING
    assert keeper.consecutive_failures == 1
    assert keeper.has_valid_token
    assert isinstance(keeper.last_error, TransientError)
    assert keeper.next_attempt_at == env.clock.time() + 0.5  # half the first 1 s window

    await env.advance(1799.0)  # an outage until one second before the token expires
    failures = len(env.client.sent) - 1
    assert failures > 10
    assert keeper.consecutive_failures == failures
    assert all(s.grant == "refresh" and s.refresh_token == "RT-1" for s in env.client.sent[1:])
    assert token_path.read_bytes() == published
    assert os.stat(token_path).st_ino == ino
    assert state_path.read_bytes() == saved

    await env.advance(2.0)  # the token has expired; consumers still see the last good one
    assert not keeper.has_valid_token
    assert keeper.state == TokenState.RETRYING
    assert token_path.read_bytes() == published

    env.client.clear()
    env.client.push(grant("2"))
    await env.advance(REFRESH.retry_max)
    assert keeper.state == TokenState.OK
    assert keeper.consecutive_failures == 0
    assert keeper.last_error is None
    assert keeper.has_valid_token
    assert env.token_doc()["access_token"] == "AT-2"
    assert "password" not in env.client.grants[1:]


async def test_transient_failures_of_the_first_login_retry_the_password_with_backoff(
    env: Env,
) -> None:
    env.client.push(transient(), transient(), grant("1"))
    keeper = env.start()
    await settle()
    assert keeper.state == TokenState.RETRYING
    assert not keeper.has_valid_token
    await env.advance(10.0)
    assert env.client.grants == ["password"] * 3
    assert [s.at for s in env.client.sent] == [MONO0, MONO0 + 0.5, MONO0 + 1.5]
    assert keeper.state == TokenState.OK
    assert keeper.consecutive_failures == 0


# ---------------------------------------------------------------- dead grant


async def test_a_dead_refresh_grant_leads_to_exactly_one_password_login_at_once(
    env: Env,
) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    env.client.push(dead_grant(), grant("2"))
    await env.advance(1800.0)

    assert env.client.grants == ["password", "refresh", "password"]
    assert env.client.sent[2].at == env.client.sent[1].at == MONO0 + 1800
    assert env.client.sent[2].password == PASSWORD
    assert keeper.state == TokenState.OK
    assert keeper.consecutive_failures == 0
    assert env.token_doc()["access_token"] == "AT-2"
    stored = env.store.load("berlin-01", "bill")
    assert stored is not None and stored.refresh_token == Secret("RT-2")
    assert stored.first_sign_in_at == WALL0 + 1800

    env.client.push(grant("3"))
    await env.advance(1800.0)
    assert env.client.grants == ["password", "refresh", "password", "refresh"]
    assert env.client.sent[3].refresh_token == "RT-2"


# ---------------------------------------------------------------- permanent failures


async def test_a_scope_without_state_waits_for_its_siblings_stored_block_at_start(
    env: Env,
) -> None:
    """Blocked for a wrong password, then restarted with a scope that has no state (added
    while stopped, or its file lost): the block stored by the sibling stops its login."""
    env.client.push(wrong_password())
    first = env.start()
    await settle()
    assert first.state == TokenState.BLOCKED
    await first.stop()

    account = Account()  # a restart: one account for the merchant's token sets
    new_scope = env.start(env.spec(scope="store"), account)
    sibling = env.start(env.spec(), account)
    await settle()
    assert env.client.grants == ["password"]
    assert sibling.state == new_scope.state == TokenState.BLOCKED


async def test_a_wrong_password_blocks_until_blocked_retry_then_exactly_one_attempt(
    env: Env,
) -> None:
    env.client.push(wrong_password())
    keeper = env.start()
    await settle()

    assert env.client.grants == ["password"]
    assert keeper.state == TokenState.BLOCKED
    assert keeper.block_reason == BlockReason.CREDENTIALS
    assert keeper.last_error is not None and keeper.last_error.code == "AADB2C90225"
    assert keeper.consecutive_failures == 1
    assert keeper.next_attempt_at == WALL0 + REFRESH.blocked_retry
    assert not keeper.has_valid_token
    assert not env.token_file().exists()

    await env.advance(REFRESH.blocked_retry - 1)
    assert env.client.grants == ["password"]
    assert keeper.state == TokenState.BLOCKED

    env.client.push(grant("1"))
    await env.advance(1.0)
    assert env.client.grants == ["password", "password"]
    assert env.client.sent[1].at == MONO0 + REFRESH.blocked_retry
    assert keeper.state == TokenState.OK
    assert keeper.block_reason is None
    assert env.token_doc()["access_token"] == "AT-1"


async def test_a_temporary_lock_waits_a_minute_then_longer_each_time_until_a_login_works(
    env: Env,
) -> None:
    # blocked_retry far below a minute: a temporarily locked account waits its own wait.
    refresh = replace(REFRESH, blocked_retry=1.0)
    account = Account()
    env.client.push(temporarily_locked(), temporarily_locked(), temporarily_locked(), grant("1"))
    keeper = env.start(env.spec(refresh=refresh), account)
    await settle()
    assert keeper.state == TokenState.BLOCKED
    assert keeper.block_reason == BlockReason.LOCKED
    assert keeper.next_attempt_at == WALL0 + 60.0

    await env.advance(60.0 + 120.0 + 240.0)
    assert env.client.grants == ["password"] * 4
    assert [b.at - a.at for a, b in pairwise(env.client.sent)] == [60.0, 120.0, 240.0]
    assert keeper.state == TokenState.OK

    # A login that worked starts the count again: the next lock waits a minute.
    env.client.push(dead_grant(), temporarily_locked())
    await env.advance(1800.0)
    assert env.client.grants[4:] == ["refresh", "password"]
    assert keeper.state == TokenState.BLOCKED
    assert keeper.next_attempt_at == env.clock.time() + 60.0


async def test_two_token_sets_of_one_merchant_spend_one_password_attempt(env: Env) -> None:
    account = Account()
    bill = env.start(env.spec(scope="bill"), account)
    store = env.start(env.spec(scope="store"), account)
    await settle()
    # One password login in flight; the other token set waits for the account.
    assert len(env.client.sent) == 1

    env.client.push(wrong_password())
    await settle()
    assert env.client.grants == ["password"]
    for keeper in (bill, store):
        assert keeper.state == TokenState.BLOCKED
        assert keeper.block_reason == BlockReason.CREDENTIALS
        assert keeper.next_attempt_at == WALL0 + REFRESH.blocked_retry

    # After blocked_retry, again one attempt for the whole merchant, not one per scope.
    env.client.push(wrong_password())
    await env.advance(REFRESH.blocked_retry)
    assert env.client.grants == ["password", "password"]
    assert bill.state == store.state == TokenState.BLOCKED


async def test_a_dead_grant_while_the_merchant_is_blocked_sends_no_password(env: Env) -> None:
    account = Account()
    for scope in ("bill", "store"):
        env.client.push(grant(scope), dead_grant(), wrong_password(), scope=scope)
    bill = env.start(env.spec(scope="bill"), account)
    store = env.start(env.spec(scope="store"), account)
    await settle()
    assert env.client.grants == ["password", "password"]

    # Both refresh tokens die at once; the first password login is refused.
    await env.advance(1800.0)
    assert sorted(env.client.grants[2:]) == ["password", "refresh", "refresh"]
    assert bill.state == store.state == TokenState.BLOCKED
    assert bill.block_reason == store.block_reason == BlockReason.CREDENTIALS


async def test_an_unknown_code_on_a_password_login_spends_one_attempt_per_merchant(
    env: Env,
) -> None:
    # An AADB2C code anybilld does not know may well be a new kind of credential failure:
    # like one, it must not cost the merchant one lockout attempt per scope.
    account = Account()
    env.client.push(
        *(
            PermanentError("rejected with an unknown code", reason=BlockReason.UNKNOWN, code=code)
            for code in ("AADB2C99997", "AADB2C99998", "AADB2C99999")
        )
    )
    sets = [env.start(env.spec(scope=s), account) for s in ("bill", "store", "user")]
    await settle()
    assert env.client.grants == ["password"], "each scope spent its own password attempt"
    assert all(k.state == TokenState.BLOCKED for k in sets)


async def test_a_scope_error_blocks_only_that_token_set(env: Env) -> None:
    account = Account()
    env.client.push(scope_refused(), scope="bill")
    env.client.push(grant("s1"), scope="store")
    bill = env.start(env.spec(scope="bill"), account)
    store = env.start(env.spec(scope="store"), account)
    await settle()

    assert sorted((s.grant, s.scope) for s in env.client.sent) == [
        ("password", "bill"),
        ("password", "store"),
    ]
    assert bill.state == TokenState.BLOCKED
    assert bill.block_reason == BlockReason.SCOPE
    assert store.state == TokenState.OK
    assert store.block_reason is None
    assert env.token_doc(scope="store")["access_token"] == "AT-s1"
    assert not env.token_file(scope="bill").exists()


async def test_a_refresh_refused_for_a_bad_client_blocks_but_keeps_the_file(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    published = env.token_file().read_bytes()
    env.client.push(
        PermanentError("rejected (client)", reason=BlockReason.CLIENT, code="AADB2C90057")
    )
    await env.advance(1800.0)
    assert keeper.state == TokenState.BLOCKED
    assert keeper.block_reason == BlockReason.CLIENT
    assert env.token_file().read_bytes() == published
    await env.advance(REFRESH.blocked_retry - 1)
    assert env.client.grants == ["password", "refresh"]


# ---------------------------------------------------------------- update (reload)


async def test_update_with_a_new_password_lifts_the_block_and_logs_in_at_once(
    env: Env,
) -> None:
    env.client.push(wrong_password())
    keeper = env.start()
    await settle()
    assert keeper.state == TokenState.BLOCKED

    env.client.push(grant("1"))
    keeper.update(env.spec(password="pw-new"))
    await settle()  # no time passes

    assert env.client.grants == ["password", "password"]
    assert env.client.sent[1].password == "pw-new"
    assert env.client.sent[1].at == MONO0
    assert keeper.state == TokenState.OK
    assert keeper.block_reason is None
    assert env.token_doc()["access_token"] == "AT-1"


async def test_update_with_a_new_password_lifts_the_merchant_block_for_all_its_sets(
    env: Env,
) -> None:
    account = Account()
    bill = env.start(env.spec(scope="bill"), account)
    store = env.start(env.spec(scope="store"), account)
    env.client.push(wrong_password())
    await settle()
    assert bill.state == store.state == TokenState.BLOCKED

    env.client.push(grant("b"), grant("s"))
    bill.update(env.spec(scope="bill", password="pw-new"))
    store.update(env.spec(scope="store", password="pw-new"))
    await settle()
    assert env.client.grants == ["password"] * 3
    assert [s.password for s in env.client.sent[1:]] == ["pw-new", "pw-new"]
    assert bill.state == store.state == TokenState.OK


async def test_update_with_only_new_outputs_rewrites_files_without_a_request(
    env: Env,
) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    raw = OutputTarget(
        path=env.out / "raw" / "berlin-01-bill", format="raw", mode=0o600, group=None
    )
    env_file = OutputTarget(path=env.out / "berlin-01.env", format="env", mode=0o640, group=None)
    keeper.update(env.spec(outputs=(*keeper.spec.outputs, raw, env_file)))
    await settle()

    assert env.client.grants == ["password"]
    assert raw.path.read_bytes() == b"AT-1"
    assert mode_of(raw.path) == 0o600
    assert env_file.path.read_text() == (
        f"ANYBILL_ACCESS_TOKEN=AT-1\nANYBILL_TOKEN_EXPIRES_AT={rfc3339(WALL0 + 3600)}\n"
    )
    assert keeper.state == TokenState.OK
    assert keeper.next_attempt_at == WALL0 + 1800


async def test_update_with_new_outputs_during_an_outage_writes_them_at_once(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    env.client.push(*(transient() for _ in range(100)))
    await env.advance(1800.0 + 10.0)
    assert keeper.state == TokenState.RETRYING
    assert keeper.has_valid_token

    raw = OutputTarget(path=env.out / "berlin-01.raw", format="raw", mode=0o640, group=None)
    keeper.update(env.spec(outputs=(*keeper.spec.outputs, raw)))
    await settle()
    # The token is valid: consumers of the new path must not wait for the IdP to recover.
    assert raw.path.exists(), "new output not written while the refresh keeps failing"
    assert raw.path.read_bytes() == b"AT-1"


async def test_update_with_new_timing_reschedules_without_a_request(env: Env) -> None:
    env.client.push(grant("1"), grant("2"))
    keeper = env.start()
    await settle()
    keeper.update(env.spec(refresh=replace(REFRESH, at=0.25, jitter=0.125)))
    await settle()
    assert keeper.next_attempt_at == WALL0 + 900
    await env.advance(899.0)
    assert env.client.grants == ["password"]
    await env.advance(1.0)
    assert env.client.grants == ["password", "refresh"]


async def test_update_with_new_outputs_and_new_timing_does_both(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    raw = OutputTarget(path=env.out / "berlin-01.raw", format="raw", mode=0o640, group=None)
    keeper.update(
        env.spec(
            outputs=(*keeper.spec.outputs, raw),
            refresh=replace(REFRESH, at=0.25, jitter=0.125),
        )
    )
    await settle()
    assert raw.path.read_bytes() == b"AT-1"
    assert env.client.grants == ["password"]
    assert keeper.next_attempt_at == WALL0 + 900, "new refresh timing ignored"


async def test_update_during_a_request_in_flight_sends_no_second_request(env: Env) -> None:
    keeper = env.start()  # the first password login stays in flight
    await settle()
    keeper.update(env.spec(password="pw-new"))
    await settle()
    assert len(env.client.sent) == 1, "a reload started a second request"

    # The answer for the old password arrives: it is not published; the new one logs in.
    env.client.push(grant("old"), grant("new"))
    await settle()
    assert env.client.grants == ["password", "password"]
    assert [s.password for s in env.client.sent] == [PASSWORD, "pw-new"]
    assert keeper.state == TokenState.OK
    assert env.token_doc()["access_token"] == "AT-new"


async def test_a_password_fixed_while_the_refused_login_is_in_flight_logs_in_at_once(
    env: Env,
) -> None:
    # An operator fixes a wrong password while the refused login is still on its way: the
    # refusal of the old password must neither block the new one nor stall the loop.
    keeper = env.start(env.spec(password="wrong"))
    await settle()
    keeper.update(env.spec(password="pw-new"))
    env.client.push(wrong_password(), grant("new"))
    await settle()
    assert [s.password for s in env.client.sent] == ["wrong", "pw-new"]
    assert keeper.state == TokenState.OK and keeper.block is None
    assert env.token_doc()["access_token"] == "AT-new"


async def test_a_refusal_of_replaced_credentials_blocks_nothing(env: Env) -> None:
    keeper = env.start(env.spec(password="wrong"))
    await settle()
    keeper.update(env.spec(password="pw-new"))
    # The old password's refusal arrives, then the new one meets an outage.
    env.client.push(wrong_password(), transient())
    await settle()
    assert [s.password for s in env.client.sent] == ["wrong", "pw-new"]
    assert keeper.state == TokenState.RETRYING and keeper.block is None
    # Nothing on disk would block the new password after a restart either.
    state = env.state_file("berlin-01", "bill")
    assert not state.exists() or json.loads(state.read_text())["blocked_until"] is None


async def test_a_reload_during_start_up_is_not_undone_by_the_stored_grant(env: Env) -> None:
    env.client.push(grant("1"))
    first = env.start()
    await settle()
    await first.stop()
    # The next start reads the stored grant in a worker thread; a reload changes the
    # password meanwhile: the stored refresh token must not be used for the new identity.
    gate = asyncio.Event()

    async def slow_load(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn == env.store.load:
            await gate.wait()
        return fn(*args, **kwargs)

    env.rt.run_io = slow_load
    keeper = env.start()
    await settle()
    keeper.update(env.spec(password="pw-new"))
    gate.set()
    env.client.push(grant("2"))
    await settle()
    assert env.client.grants == ["password", "password"]
    assert env.client.sent[-1].password == "pw-new"
    assert env.token_doc()["access_token"] == "AT-2"


async def test_update_with_an_unchanged_spec_does_nothing(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    before = os.stat(env.token_file())
    keeper.update(env.spec())
    await settle()
    assert env.client.grants == ["password"]
    assert os.stat(env.token_file()).st_mtime_ns == before.st_mtime_ns
    assert keeper.next_attempt_at == WALL0 + 1800


# ---------------------------------------------------------------- broken outputs


async def test_a_broken_output_is_retried_without_a_new_request(env: Env) -> None:
    writes: list[bool] = []
    env.rt.on_file_write = writes.append
    blocker = env.out / "broken"
    blocker.write_text("a file where a directory should be")
    bad = OutputTarget(path=blocker / "bill.json", format="json", mode=0o640, group=None)
    good = OutputTarget(path=env.out / "good.raw", format="raw", mode=0o640, group=None)
    env.client.push(grant("1"))
    keeper = env.start(env.spec(outputs=(bad, good)))
    await settle()

    assert keeper.state == TokenState.OK  # the token is fine; one output is not
    assert keeper.output_error is not None and str(bad.path) in keeper.output_error
    assert "AT-1" not in keeper.output_error
    assert good.path.read_bytes() == b"AT-1"  # the other output is not held up
    assert writes == [False, True]

    blocker.unlink()
    await env.advance(REFRESH.retry_initial)
    assert json.loads(bad.path.read_text())["access_token"] == "AT-1"
    assert keeper.output_error is None
    assert writes[2:] == [True, True]
    assert env.client.grants == ["password"]


# ---------------------------------------------------------------- stop


async def test_stop_lets_a_token_being_saved_and_published_finish_first(env: Env) -> None:
    gate = asyncio.Event()
    env.rt.run_io = gated_save(env, gate)
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()  # the grant arrived; its save is under way

    stopping = asyncio.ensure_future(keeper.stop())
    await settle()
    done_early = stopping.done()
    gate.set()
    await stopping
    saved = env.store.load("berlin-01", "bill")
    published = env.token_file().exists()
    await settle()

    assert not done_early, "stop() returned while the new grant was still being saved"
    assert saved is not None and saved.refresh_token == Secret("RT-1")
    assert published


# ---------------------------------------------------------------- views


@pytest.mark.parametrize(
    ("outcomes", "state", "valid"),
    [
        ([], TokenState.PENDING, False),
        ([grant("1")], TokenState.OK, True),
        ([transient()], TokenState.RETRYING, False),
        ([wrong_password()], TokenState.BLOCKED, False),
    ],
    ids=["pending", "ok", "retrying", "blocked"],
)
async def test_state_and_validity_after_the_first_answer(
    env: Env, outcomes: Iterable[Outcome], state: TokenState, valid: bool
) -> None:
    env.client.push(*outcomes)
    keeper = env.start()
    await settle()
    assert keeper.state == state
    assert keeper.has_valid_token is valid


async def test_next_attempt_at_follows_the_schedule_the_backoff_and_the_block(
    env: Env,
) -> None:
    keeper = Keeper(env.spec(), Account(), env.rt)
    assert keeper.next_attempt_at == WALL0  # not started: due at once

    env.client.push(grant("1", expires_in=600.0))
    env.launch(keeper)
    await settle()
    assert keeper.next_attempt_at == WALL0 + 300
    await env.advance(100.0)
    assert keeper.next_attempt_at == WALL0 + 300  # a point in time, not "seconds left"

    env.client.push(transient(retry_after=42.0))
    await env.advance(200.0)
    assert keeper.next_attempt_at == WALL0 + 300 + 42

    env.client.push(dead_grant(), wrong_password())
    await env.advance(42.0)
    assert env.client.grants == ["password", "refresh", "refresh", "password"]
    assert keeper.state == TokenState.BLOCKED
    assert keeper.next_attempt_at == WALL0 + 342 + REFRESH.blocked_retry


# ---------------------------------------------------------------- stopping and crashing


async def test_a_stop_begun_lets_a_refresh_under_way_land_and_saves_it(env: Env) -> None:
    # A refresh cancelled after the IdP answered would have spent a single-use refresh
    # token: a stop begun leaves the request under way alone (the supervisor decides how
    # long to wait for it), and its answer is saved.
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    await env.advance(1800.0)  # the refresh is now in flight, unanswered
    assert env.client.grants == ["password", "refresh"]
    keeper.begin_stop()
    await settle()
    assert keeper.task is not None and not keeper.task.done() and keeper.in_request
    env.client.push(grant("2"))
    await settle()
    assert keeper.task.done()  # landed, saved, and nothing more sent: the keeper ended
    await keeper.stop()
    stored = env.store.load("berlin-01", "bill")
    assert stored is not None and stored.refresh_token == Secret("RT-2")
    assert env.token_doc()["access_token"] == "AT-2"
    assert env.client.grants == ["password", "refresh"]  # and nothing after the stop


async def test_stop_cancels_the_request_under_way_and_keeps_the_old_grant(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    await env.advance(1800.0)
    await keeper.stop()
    stored = env.store.load("berlin-01", "bill")
    assert stored is not None and stored.refresh_token == Secret("RT-1")
    assert env.token_doc()["access_token"] == "AT-1"


async def test_an_unexpected_error_restarts_the_token_set_after_a_backoff(env: Env) -> None:
    failures = iter([RuntimeError("disk driver bug")])

    async def flaky_io(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn == env.store.load:
            for exc in failures:
                raise exc
        return fn(*args, **kwargs)

    env.rt.run_io = flaky_io
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    assert env.client.grants == []
    assert keeper.consecutive_failures == 1 and keeper.internal_error
    # Restarted after the first backoff window (retry_initial), not never.
    await env.advance(REFRESH.retry_initial)
    assert env.client.grants == ["password"]
    assert keeper.state == TokenState.OK and keeper.internal_error is None
    assert env.token_doc()["access_token"] == "AT-1"


async def test_a_dead_grant_answered_during_a_stop_sends_no_password(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    await env.advance(1800.0)  # the refresh is in flight
    keeper.begin_stop()
    await settle()
    env.client.push(dead_grant())
    await settle()
    await keeper.stop()
    assert env.client.grants == ["password", "refresh"]


async def test_a_bug_that_recurs_during_a_reload_is_retried_with_backoff_not_hot(
    env: Env,
) -> None:
    async def broken_io(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn == env.store.load:
            raise RuntimeError("still broken")
        return fn(*args, **kwargs)

    env.rt.run_io = broken_io
    keeper = env.start()
    await settle()
    keeper.update(env.spec(password="pw-new"))  # sets the restart event
    await settle()
    # One failure at the start, none more until the backoff has passed.
    assert keeper.consecutive_failures == 1
    await env.advance(REFRESH.retry_initial)
    assert keeper.consecutive_failures == 2
