"""A rotated password never drops a working token: the keeper on a fake clock.

A new password (by reload, or found at a restart) means a password login with it at once;
while that login is refused, the grant of the previous password keeps the token fresh, the
token set shows blocked, and the new password is tried again only after blocked_retry or
another change. Restart and reload behave alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakes import (
    MONO0,
    PASSWORD,
    REFRESH,
    KeeperEnv,
    grant,
    settle,
    wrong_password,
)

from anybilld.errors import BlockReason
from anybilld.keeper import TokenState


class Env(KeeperEnv):
    async def advance(self, seconds: float) -> None:
        """Move the clock, waking every sleeper due meanwhile in order."""
        target = self.clock.monotonic() + seconds
        await settle()
        while True:
            pending = self.clock.sleeping
            if not pending or self.clock.monotonic() + pending[0] > target:
                break
            await self.clock.advance(pending[0])
            await settle()
        await self.clock.advance(target - self.clock.monotonic())
        await settle()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with Env(tmp_path) as e:
        yield e


def sent(env: Env) -> list[tuple[str, str | None]]:
    """(grant, password or refresh token) of every request."""
    return [(s.grant, s.password or s.refresh_token) for s in env.client.sent]


async def test_a_new_password_logs_in_at_once_and_its_grant_replaces_the_old(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    env.client.push(grant("2"), grant("3"))
    keeper.update(env.spec(password="pw-new"))
    await settle()
    assert sent(env) == [("password", PASSWORD), ("password", "pw-new")]
    assert env.client.sent[1].at == MONO0
    assert env.token_doc()["access_token"] == "AT-2"
    await env.advance(1800)
    assert sent(env)[-1] == ("refresh", "RT-2")
    assert keeper.state == TokenState.OK


async def test_a_refused_new_password_keeps_refreshing_with_the_old_grant(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    env.client.push(wrong_password(), grant("2"))
    keeper.update(env.spec(password="typo"))
    await settle()

    # One try with the new password, then the old grant at once: nothing is lost.
    assert sent(env) == [("password", PASSWORD), ("password", "typo"), ("refresh", "RT-1")]
    assert env.token_doc()["access_token"] == "AT-2"
    assert keeper.has_valid_token
    assert keeper.state == TokenState.BLOCKED
    assert keeper.block_reason == BlockReason.CREDENTIALS

    # Refreshes go on, with no new password attempt before blocked_retry (1 h).
    env.client.push(grant("3"))
    await env.advance(1800)
    assert sent(env)[3:] == [("refresh", "RT-2")]
    assert env.token_doc()["access_token"] == "AT-3"
    assert keeper.state == TokenState.BLOCKED

    # After blocked_retry, the next due renewal tries the new password once more.
    env.client.push(wrong_password(), grant("4"))
    await env.advance(1800)
    assert sent(env)[4:] == [("password", "typo"), ("refresh", "RT-3")]
    assert keeper.has_valid_token


async def test_fixing_the_typo_logs_in_at_once(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    env.client.push(wrong_password(), grant("2"))
    keeper.update(env.spec(password="typo"))
    await settle()
    assert keeper.state == TokenState.BLOCKED

    env.client.push(grant("3"))
    keeper.update(env.spec(password="pw-fixed"))
    await settle()
    assert sent(env)[-1] == ("password", "pw-fixed")
    assert keeper.state == TokenState.OK and keeper.block is None
    assert env.token_doc()["access_token"] == "AT-3"


async def test_a_restart_with_a_new_password_logs_in_like_a_reload(env: Env) -> None:
    env.client.push(grant("1"))
    first = env.start()
    await settle()
    await first.stop()

    env.client.push(grant("2"))
    keeper = env.start(env.spec(password="pw-new"))
    await settle()
    assert sent(env) == [("password", PASSWORD), ("password", "pw-new")]
    assert env.token_doc()["access_token"] == "AT-2"
    assert keeper.state == TokenState.OK


async def test_a_restart_with_a_refused_new_password_keeps_the_stored_grant(env: Env) -> None:
    env.client.push(grant("1"))
    first = env.start()
    await settle()
    await first.stop()

    env.client.push(wrong_password(), grant("2"))
    second = env.start(env.spec(password="typo"))
    await settle()
    assert sent(env)[1:] == [("password", "typo"), ("refresh", "RT-1")]
    assert second.state == TokenState.BLOCKED and second.has_valid_token
    await second.stop()

    # A third start honours the stored refusal: no password before blocked_retry, and
    # the refresh grant carries on when due.
    env.client.push(grant("3"))
    third = env.start(env.spec(password="typo"))
    await settle()
    assert len(env.client.sent) == 3
    assert third.state == TokenState.BLOCKED and third.has_valid_token
    await env.advance(1800)
    assert sent(env)[3:] == [("refresh", "RT-2")]
    assert env.token_doc()["access_token"] == "AT-3"


async def test_a_refresh_in_flight_during_a_password_change_is_kept(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    await env.advance(1800)  # the refresh is sent and stays in flight
    assert sent(env)[-1] == ("refresh", "RT-1")
    keeper.update(env.spec(password="pw-new"))
    env.client.push(grant("2"), grant("3"))
    await settle()
    # The answer (a single-use refresh token may be spent) is published; then the new
    # password logs in.
    assert sent(env)[2:] == [("password", "pw-new")]
    assert env.token_doc()["access_token"] == "AT-3"
    assert keeper.state == TokenState.OK


async def test_a_new_username_drops_the_old_grant(env: Env) -> None:
    env.client.push(grant("1"))
    keeper = env.start()
    await settle()
    env.client.push(wrong_password())
    keeper.update(replace(env.spec(), username="svc-other"))
    await settle()
    # Another identity: the old grant is not theirs; a refusal blocks.
    assert sent(env) == [("password", PASSWORD), ("password", PASSWORD)]
    assert env.client.sent[1].username == "svc-other"
    assert keeper.state == TokenState.BLOCKED
    await env.advance(REFRESH.blocked_retry - 1)
    assert len(env.client.sent) == 2
