"""The HTTP listener's answers, by calling ``Listener.handle`` directly (no socket).

Keepers are real, driven by a scripted fake token endpoint on a fake clock (see
test_keeper.py for the full-size fakes).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from anybilld import __version__
from anybilld.clock import FakeClock
from anybilld.config import SCOPE_BASE, OutputTarget, RefreshSettings, Scope, TokenSetSpec
from anybilld.errors import BlockReason, PermanentError, TransientError
from anybilld.files import rfc3339
from anybilld.httpserver import Request, Response
from anybilld.identity import Grant, TokenRequest
from anybilld.keeper import Account, Keeper, Runtime
from anybilld.listener import Listener
from anybilld.metrics import Metrics
from anybilld.secret import Secret
from anybilld.state import StateStore

WALL0 = 1_800_000_000.0
PASSWORD = "pw-SECRET-listener"
REFRESH = RefreshSettings(
    at=0.5, jitter=0.25, retry_initial=1.0, retry_max=64.0, blocked_retry=3600.0
)
CONFIG_INFO = {
    "path": "/etc/anybilld/config.yaml",
    "last_reload_successful": True,
    "last_reload_success_at": WALL0,
}

Outcome = Grant | Exception


class FakeTokenClient:
    """Answers from a queue per username; with nothing queued a request stays in flight.

    A refresh request names no user: it is matched to the user its refresh token was issued to.
    """

    def __init__(self) -> None:
        self.queues: dict[str, deque[Outcome]] = {}
        self._issued: dict[str, str] = {}
        self._more = asyncio.Event()

    def push(self, username: str, *outcomes: Outcome) -> None:
        self.queues.setdefault(username, deque()).extend(outcomes)
        self._more.set()

    async def request(self, req: TokenRequest, *, timeout: float) -> Grant:
        user = req.form.get("username") or self._issued[req.form["refresh_token"]]
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


def grant(name: str, expires_in: float = 3600.0) -> Grant:
    return Grant(
        access_token=Secret(f"AT-{name}"),
        expires_in=expires_in,
        refresh_token=Secret(f"RT-{name}"),
        refresh_token_expires_in=86400.0,
    )


def transient() -> TransientError:
    return TransientError("identity provider unavailable", status=503)


def wrong_password() -> PermanentError:
    return PermanentError(
        "rejected (credentials)",
        reason=BlockReason.CREDENTIALS,
        code="AADB2C90225",
        correlation_id="0f7c1d2e-aaaa",
        status=400,
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
        self.keepers: list[Keeper] = []
        self.registry = CollectorRegistry()
        Metrics(self.registry, lambda: self.keepers)
        self.listener = Listener(self.registry, lambda: self.keepers, lambda: dict(CONFIG_INFO))
        self.rt = Runtime(
            client=self.client,
            store=store,
            clock=self.clock,
            output_root=self.out,
            uniform=lambda a, b: (a + b) / 2,
            run_io=run_inline,
        )

    def start(self, merchant: str, *outcomes: Outcome, scope: str = "bill") -> Keeper:
        self.client.push(merchant, *outcomes)
        spec = TokenSetSpec(
            merchant=merchant,
            scope=Scope(name=scope, uri=SCOPE_BASE + scope),
            username=merchant,
            password=Secret(PASSWORD),
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
        keeper = Keeper(spec, Account(), self.rt)
        self.keepers.append(keeper)
        keeper.start()
        return keeper

    async def get(self, path: str, method: str = "GET") -> Response:
        return await self.listener.handle(
            Request(method=method, path=path, query={}, headers={}, body=b"")
        )

    async def close(self) -> None:
        for k in self.keepers:
            await k.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    yield e
    await e.close()


async def test_healthz_is_200_even_before_any_token(env: Env) -> None:
    env.start("m-pending")
    await settle()
    resp = await env.get("/healthz")
    assert resp.status == 200


async def test_readyz_lists_pending_token_sets_then_is_ready_once_all_are_definite(
    env: Env,
) -> None:
    env.start("m-ok", grant("ok"))
    env.start("m-pending")
    env.start("m-blocked", wrong_password())
    await settle()

    resp = await env.get("/readyz")
    assert resp.status == 503
    body = resp.body.decode()
    assert "m-pending/bill" in body
    assert "pending" in body
    assert "m-ok" not in body
    assert "m-blocked" not in body  # blocked is a definite state

    env.client.push("m-pending", grant("p"))
    await settle()
    resp = await env.get("/readyz")
    assert resp.status == 200


async def test_readyz_retrying_is_ready_only_while_it_holds_a_valid_token(env: Env) -> None:
    env.start("m-new", transient())  # never had a token
    env.start("m-old", grant("old", expires_in=600.0))
    await settle()
    env.client.push("m-old", *(transient() for _ in range(200)))
    await env.clock.advance(300.0)  # m-old's refresh fails: retrying, token still valid
    await settle()
    assert [k.state.value for k in env.keepers] == ["retrying", "retrying"]

    resp = await env.get("/readyz")
    assert resp.status == 503
    body = resp.body.decode()
    assert "m-new/bill (retrying)" in body
    assert "m-old" not in body


async def test_status_shows_every_token_set_with_the_documented_fields_and_no_secret(
    env: Env,
) -> None:
    env.start("m-ok", grant("ok"))
    env.start("m-blocked", wrong_password())
    env.start("m-pending")
    await settle()

    resp = await env.get("/status")
    assert resp.status == 200
    assert resp.content_type.startswith("application/json")
    text = resp.body.decode()
    for secret in ("AT-ok", "RT-ok", PASSWORD):
        assert secret not in text
    doc = json.loads(text)
    assert doc["version"] == __version__
    assert doc["config"] == CONFIG_INFO
    sets = {(t["merchant"], t["scope"]): t for t in doc["token_sets"]}
    assert list(sets) == [("m-blocked", "bill"), ("m-ok", "bill"), ("m-pending", "bill")]
    for t in doc["token_sets"]:
        assert {
            "merchant",
            "scope",
            "state",
            "expires_at",
            "next_refresh_at",
            "last_success_at",
            "refresh_token_expires_at",
            "consecutive_failures",
            "last_error_code",
            "blocked_reason",
        } <= set(t)

    ok = sets["m-ok", "bill"]
    assert ok["state"] == "ok"
    assert ok["expires_at"] == rfc3339(WALL0 + 3600)
    assert ok["next_refresh_at"] == rfc3339(WALL0 + 1800)
    assert ok["last_success_at"] == rfc3339(WALL0)
    assert ok["refresh_token_expires_at"] == rfc3339(WALL0 + 86400)
    assert ok["consecutive_failures"] == 0
    assert ok["last_error_code"] is None
    assert ok["blocked_reason"] is None

    blocked = sets["m-blocked", "bill"]
    assert blocked["state"] == "blocked"
    assert blocked["expires_at"] is None
    assert blocked["next_refresh_at"] == rfc3339(WALL0 + 3600)
    assert blocked["consecutive_failures"] == 1
    assert blocked["last_error_code"] == "AADB2C90225"
    assert blocked["blocked_reason"] == "credentials"

    assert sets["m-pending", "bill"]["state"] == "pending"


async def test_metrics_are_served_in_the_prometheus_format(env: Env) -> None:
    env.start("m-ok", grant("ok"))
    await settle()
    resp = await env.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == CONTENT_TYPE_LATEST
    text = resp.body.decode()
    assert 'anybilld_token_sets{state="ok"} 1.0' in text
    assert "AT-ok" not in text and PASSWORD not in text


async def test_head_is_answered_like_get(env: Env) -> None:
    assert (await env.get("/healthz", method="HEAD")).status == 200


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/extra", "/status.json"])
async def test_unknown_paths_are_404(env: Env, path: str) -> None:
    assert (await env.get(path)).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/metrics", "/status", "/healthz"])
async def test_other_methods_are_405(env: Env, method: str, path: str) -> None:
    assert (await env.get(path, method=method)).status == 405
