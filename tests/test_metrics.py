"""Prometheus metrics over live keeper state, read from a fresh registry per test.

Keepers are real, driven by a scripted fake token endpoint on a fake clock (fakes.py), so
each token set is in a state it reached the way it would in the daemon.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import PASSWORD, WALL0, KeeperEnv, grant, settle, transient, wrong_password
from prometheus_client import CollectorRegistry, generate_latest

from anybilld import __version__
from anybilld.errors import BlockReason
from anybilld.keeper import Keeper, TokenState
from anybilld.metrics import Metrics

TOKEN_SET_METRICS = (
    "anybilld_token_expiry_timestamp_seconds",
    "anybilld_token_last_success_timestamp_seconds",
    "anybilld_token_next_refresh_timestamp_seconds",
    "anybilld_refresh_token_expiry_timestamp_seconds",
    "anybilld_token_consecutive_failures",
)


class Env(KeeperEnv):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, lambda: self.keepers)
        self.rt.on_file_write = self.metrics.observe_file_write

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with Env(tmp_path) as e:
        yield e


@pytest.fixture
async def fleet(env: Env) -> dict[str, Keeper]:
    """One token set in each state."""
    keepers = {
        "ok": env.start_merchant("m-ok", grant("ok")),
        "pending": env.start_merchant("m-pending"),  # its login stays in flight
        "retrying": env.start_merchant("m-retrying", transient()),
        "blocked": env.start_merchant("m-blocked", wrong_password()),
    }
    await settle()
    for state, keeper in keepers.items():
        assert keeper.state == state
    return keepers


async def test_token_set_gauges_read_the_keepers_live_state(
    env: Env, fleet: dict[str, Keeper]
) -> None:
    ok = fleet["ok"]
    labels = {"merchant": "m-ok", "scope": "bill"}
    assert ok.access_expires_at == WALL0 + 3600
    assert env.value("anybilld_token_expiry_timestamp_seconds", **labels) == WALL0 + 3600
    assert env.value("anybilld_token_last_success_timestamp_seconds", **labels) == WALL0
    assert env.value("anybilld_token_next_refresh_timestamp_seconds", **labels) == WALL0 + 1800
    assert env.value("anybilld_refresh_token_expiry_timestamp_seconds", **labels) == WALL0 + 86400
    assert env.value("anybilld_token_consecutive_failures", **labels) == 0

    retrying = {"merchant": "m-retrying", "scope": "bill"}
    assert env.value("anybilld_token_consecutive_failures", **retrying) == 1
    assert env.value("anybilld_token_next_refresh_timestamp_seconds", **retrying) == (
        fleet["retrying"].next_attempt_at
    )
    # Without a token there is no expiry to show (not a zero that looks like 1970).
    for m in ("m-pending", "m-retrying", "m-blocked"):
        assert (
            env.value("anybilld_token_expiry_timestamp_seconds", merchant=m, scope="bill") is None
        )

    # Live: the gauge follows a refresh without anyone updating it.
    env.push("m-ok", grant("ok2"))
    await env.clock.advance(1800.0)
    await settle()
    assert env.value("anybilld_token_expiry_timestamp_seconds", **labels) == WALL0 + 1800 + 3600
    assert env.value("anybilld_token_expiry_timestamp_seconds", **labels) == ok.access_expires_at


async def test_a_token_that_expired_across_a_restart_keeps_its_expiry_series(
    env: Env,
) -> None:
    """A restart during an outage: the files hold an expired token, and the metrics say so
    (the expiry alert keeps firing) instead of dropping the series as if there were none."""
    labels = {"merchant": "m-1", "scope": "bill"}
    first = env.start_merchant("m-1", grant("1"))
    await settle()
    await first.stop()
    env.keepers.remove(first)
    await env.clock.advance(4000.0)  # the daemon was down longer than the token lived

    env.push("m-1", transient())  # ... and the identity provider is down too
    second = env.start_merchant("m-1")
    await settle()
    assert second.state == TokenState.RETRYING
    assert not second.has_valid_token
    assert env.value("anybilld_token_expiry_timestamp_seconds", **labels) == WALL0 + 3600
    assert env.value("anybilld_token_last_success_timestamp_seconds", **labels) == WALL0
    assert env.token_doc("m-1", "bill")["access_token"] == "AT-1"  # what tills still read

    # The identity provider is back: the fresh token replaces the expired one.
    env.push("m-1", grant("2"))
    await env.clock.advance(second.next_attempt_at - env.clock.time())
    await settle()
    assert second.state == TokenState.OK
    now = env.clock.time()
    assert env.value("anybilld_token_expiry_timestamp_seconds", **labels) == now + 3600
    assert env.value("anybilld_token_last_success_timestamp_seconds", **labels) == now


async def test_blocked_has_a_series_only_while_blocked_with_the_reason(
    env: Env, fleet: dict[str, Keeper]
) -> None:
    blocked = {"merchant": "m-blocked", "scope": "bill"}
    assert env.value("anybilld_token_blocked", **blocked, reason="credentials") == 1
    for reason in BlockReason:
        if reason != BlockReason.CREDENTIALS:
            assert env.value("anybilld_token_blocked", **blocked, reason=reason.value) is None
        for m in ("m-ok", "m-pending", "m-retrying"):
            labels = {"merchant": m, "scope": "bill", "reason": reason.value}
            assert env.value("anybilld_token_blocked", **labels) is None

    # A new password lifts the block; once logged in, the series is gone.
    keeper = fleet["blocked"]
    env.push("m-blocked", grant("b"))
    keeper.update(env.spec("m-blocked", password="pw-new"))
    await settle()
    assert keeper.state == TokenState.OK
    for reason in BlockReason:
        assert env.value("anybilld_token_blocked", **blocked, reason=reason.value) is None


async def test_token_sets_counts_every_state(env: Env, fleet: dict[str, Keeper]) -> None:
    for state in TokenState:
        assert env.value("anybilld_token_sets", state=state.value) == 1

    env.push("m-pending", grant("p"))
    await settle()
    assert env.value("anybilld_token_sets", state="ok") == 2
    assert env.value("anybilld_token_sets", state="pending") == 0


async def test_a_removed_token_set_leaves_no_series(env: Env, fleet: dict[str, Keeper]) -> None:
    for name in ("ok", "blocked"):
        env.keepers.remove(fleet[name])
        await fleet[name].stop()

    for m in ("m-ok", "m-blocked"):
        for metric in TOKEN_SET_METRICS:
            assert env.value(metric, merchant=m, scope="bill") is None, metric
        for reason in BlockReason:
            labels = {"merchant": m, "scope": "bill", "reason": reason.value}
            assert env.value("anybilld_token_blocked", **labels) is None
    assert env.value("anybilld_token_sets", state="ok") == 0
    assert env.value("anybilld_token_sets", state="blocked") == 0
    assert env.value("anybilld_token_sets", state="pending") == 1
    text = generate_latest(env.registry).decode()
    assert "m-ok" not in text and "m-blocked" not in text


async def test_exposition_holds_no_token_and_no_password(
    env: Env, fleet: dict[str, Keeper]
) -> None:
    text = generate_latest(env.registry).decode()
    assert "anybilld_token_expiry_timestamp_seconds" in text
    for secret in ("AT-ok", "RT-ok", PASSWORD, "AT-", "RT-"):
        assert secret not in text


async def test_counters_start_at_zero_and_count(env: Env) -> None:
    for grant_type in ("password", "refresh"):
        for outcome in ("success", "transient", "dead_grant", "permanent", "error"):
            labels = {"grant": grant_type, "outcome": outcome}
            assert env.value("anybilld_token_requests_total", **labels) == 0
    assert env.value("anybilld_token_file_writes_total", outcome="success") == 0
    assert env.value("anybilld_token_file_writes_total", outcome="error") == 0
    assert env.value("anybilld_build_info", version=__version__) == 1

    env.metrics.observe_request("refresh", "transient", 0.2)
    env.metrics.observe_request("refresh", "success", 0.3)
    assert env.value("anybilld_token_requests_total", grant="refresh", outcome="transient") == 1
    assert env.value("anybilld_token_request_duration_seconds_count", grant="refresh") == 2
    assert env.value("anybilld_token_request_duration_seconds_sum", grant="refresh") == (
        pytest.approx(0.5)
    )

    # The keeper reports its file writes through the runtime's hook.
    env.start_merchant("m-ok", grant("ok"))
    await settle()
    assert env.value("anybilld_token_file_writes_total", outcome="success") == 1

    env.metrics.config_loaded(True, WALL0)
    env.metrics.config_loaded(False, WALL0 + 60)
    assert env.value("anybilld_config_last_reload_successful") == 0
    assert env.value("anybilld_config_last_reload_success_timestamp_seconds") == WALL0


async def test_metrics_use_only_the_injected_registry(env: Env) -> None:
    # A second daemon-sized Metrics on its own registry: no duplicate-registration error.
    other = CollectorRegistry()
    Metrics(other, lambda: [])
    assert other.get_sample_value("anybilld_token_sets", {"state": "ok"}) == 0
