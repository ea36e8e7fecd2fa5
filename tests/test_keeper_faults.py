"""Keeper behaviour the fault suite found wanting, on a fake clock: a closed client during
shutdown, and wall-clock jumps against the refresh token's expiry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import KeeperEnv, grant, settle

from anybilld.identity import ClientClosed
from anybilld.keeper import TokenState


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[KeeperEnv]:
    async with KeeperEnv(tmp_path) as e:
        yield e


async def test_a_closed_client_makes_the_keeper_wait_for_stop_instead_of_retrying(
    env: KeeperEnv,
) -> None:
    # The daemon closes the client first, then stops the keepers: in between, a keeper
    # whose renewal is due must neither send nor spin.
    env.client.push(*(ClientClosed("not sent: shutting down") for _ in range(1000)))
    keeper = env.start()
    await settle()
    assert len(env.client.sent) == 1
    await keeper.stop()
    assert len(env.client.sent) == 1


async def test_a_wall_clock_jump_neither_kills_nor_revives_a_refresh_token(
    env: KeeperEnv,
) -> None:
    env.client.push(grant("1", expires_in=100.0, refresh_expires_in=1000.0))
    keeper = env.start()
    await settle()
    # NTP moves the wall clock a day ahead: the refresh token (1000 s) is still good at the
    # refresh, 50 s on.
    env.clock.jump_wall(86400)
    env.client.push(grant("2", expires_in=100.0, refresh_expires_in=30.0))
    await env.clock.advance(60)
    await settle()
    assert env.client.grants == ["password", "refresh"]
    # Two days back: the new refresh token (30 s) is dead by the next refresh, 50 s on,
    # whatever the wall clock says.
    env.clock.jump_wall(-2 * 86400)
    env.client.push(grant("3"))
    await env.clock.advance(60)
    await settle()
    assert env.client.grants == ["password", "refresh", "password"]
    assert keeper.state == TokenState.OK
