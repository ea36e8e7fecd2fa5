"""Prometheus metrics over live keeper state, read from a fresh registry per test.

Keepers are real, driven by a scripted fake token endpoint on a fake clock (see
test_keeper.py for the full-size fakes), so each token set is in a state it reached the way
it would in the daemon.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from anybilld import __version__
from anybilld.clock import FakeClock
from anybilld.config import SCOPE_BASE, OutputTarget, RefreshSettings, Scope, TokenSetSpec
from anybilld.errors import BlockReason, PermanentError, TransientError
from anybilld.identity import Grant, TokenRequest
from anybilld.keeper import Account, Keeper, Runtime, TokenState
from anybilld.metrics import Metrics
from anybilld.secret import Secret
from anybilld.state import StateStore

WALL0 = 1_800_000_000.0
PASSWORD = "pw-SECRET-metrics"
REFRESH = RefreshSettings(
    at=0.5, jitter=0.25, retry_initial=1.0, retry_max=64.0, blocked_retry=3600.0
)
TOKEN_SET_METRICS = (
    "anybilld_token_expiry_timestamp_seconds",
    "anybilld_token_last_success_timestamp_seconds",
    "anybilld_token_next_refresh_timestamp_seconds",
    "anybilld_refresh_token_expiry_timestamp_seconds",
    "anybilld_token_consecutive_failures",
)

Outcome = Grant | Exception


class FakeTokenClient:
    """Answers from a queue per username; with nothing queued a request stays in flight.

    A refresh request names no user: it is matched to the user its refresh token was issued to.
    """

    def __init__(self) -> None:
        self.queues: dict[str, deque[Outcome]] = {}
        self.sent: list[str] = []
        self._issued: dict[str, str] = {}  # refresh token -> username
        self._more = asyncio.Event()

    def push(self, username: str, *outcomes: Outcome) -> None:
        self.queues.setdefault(username, deque()).extend(outcomes)
        self._more.set()

    async def request(self, req: TokenRequest, *, timeout: float) -> Grant:
        user = req.form.get("username") or self._issued[req.form["refresh_token"]]
        self.sent.append(req.grant)
        queue = self.queues.setdefault(user, deque())
        while not queue:
            self._more.clear()
            await self._more.wait()
        outcome = queue.popleft()
        if isinstance(outcome, Exception):
            raise outcome
        if outcome.refresh_token is not None:
            self._issued[outcome.refresh_token.reveal()] = user
        return outcome


def grant(name: str) -> Grant:
    return Grant(
        access_token=Secret(f"AT-{name}"),
        expires_in=3600.0,
        refresh_token=Secret(f"RT-{name}"),
        refresh_token_expires_in=86400.0,
    )


def wrong_password() -> PermanentError:
    return PermanentError(
        "rejected (credentials)", reason=BlockReason.CREDENTIALS, code="AADB2C90225"
    )


async def run_inline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


async def settle(rounds: int = 200) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class Env:
    def __init__(self, tmp: Path) -> None:
        self.out = tmp / "out"
        self.out.mkdir()
        store = StateStore(tmp / "state")
        store.prepare()
        self.clock = FakeClock(wall=WALL0)
        self.client = FakeTokenClient()
        self.registry = CollectorRegistry()
        self.keepers: list[Keeper] = []
        self.metrics = Metrics(self.registry, lambda: self.keepers)
        self.rt = Runtime(
            client=self.client,
            store=store,
            clock=self.clock,
            output_root=self.out,
            uniform=lambda a, b: (a + b) / 2,
            run_io=run_inline,
            on_file_write=self.metrics.observe_file_write,
        )
        self._all: list[Keeper] = []

    def spec(self, merchant: str, scope: str = "bill", password: str = PASSWORD) -> TokenSetSpec:
        return TokenSetSpec(
            merchant=merchant,
            scope=Scope(name=scope, uri=SCOPE_BASE + scope),
            username=merchant,
            password=Secret(password),
            client_id="client-A",
            token_url="https://idp.invalid/t",
            policy="b2c_1_ropc_vendor",
            timeout=10.0,
            outputs=(
                OutputTarget(
                    path=self.out / merchant / f"{scope}.json",
                    format="json",
                    mode=0o640,
                    group=None,
                ),
            ),
            refresh=REFRESH,
        )

    def start(self, merchant: str, *outcomes: Outcome) -> Keeper:
        self.client.push(merchant, *outcomes)
        keeper = Keeper(self.spec(merchant), Account(), self.rt)
        self.keepers.append(keeper)
        self._all.append(keeper)
        keeper.start()
        return keeper

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def close(self) -> None:
        for k in self._all:
            await k.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    yield e
    await e.close()


@pytest.fixture
async def fleet(env: Env) -> dict[str, Keeper]:
    """One token set in each state."""
    keepers = {
        "ok": env.start("m-ok", grant("ok")),
        "pending": env.start("m-pending"),  # its login stays in flight
        "retrying": env.start("m-retrying", TransientError("unavailable", status=503)),
        "blocked": env.start("m-blocked", wrong_password()),
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
    env.client.push("m-ok", grant("ok2"))
    await env.clock.advance(1800.0)
    await settle()
    assert env.value("anybilld_token_expiry_timestamp_seconds", **labels) == WALL0 + 1800 + 3600
    assert env.value("anybilld_token_expiry_timestamp_seconds", **labels) == ok.access_expires_at


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
    env.client.push("m-blocked", grant("b"))
    keeper.update(env.spec("m-blocked", password="pw-new"))
    await settle()
    assert keeper.state == TokenState.OK
    for reason in BlockReason:
        assert env.value("anybilld_token_blocked", **blocked, reason=reason.value) is None


async def test_token_sets_counts_every_state(env: Env, fleet: dict[str, Keeper]) -> None:
    for state in TokenState:
        assert env.value("anybilld_token_sets", state=state.value) == 1

    env.client.push("m-pending", grant("p"))
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
        for outcome in ("success", "transient", "dead_grant", "permanent"):
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
    env.start("m-ok", grant("ok"))
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
