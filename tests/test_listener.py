"""The HTTP listener's answers, by calling ``Listener.handle`` directly (no socket).

Keepers are real, driven by a scripted fake token endpoint on a fake clock (fakes.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import PASSWORD, WALL0, KeeperEnv, grant, settle, transient, wrong_password
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from anybilld import __version__
from anybilld.files import rfc3339
from anybilld.httpserver import Request, Response
from anybilld.listener import Listener
from anybilld.metrics import Metrics

CONFIG_INFO = {
    "path": "/etc/anybilld/config.yaml",
    "last_reload_successful": True,
    "last_reload_success_at": WALL0,
}


class Env(KeeperEnv):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.registry = CollectorRegistry()
        Metrics(self.registry, lambda: self.keepers)
        self.listener = Listener(self.registry, lambda: self.keepers, lambda: dict(CONFIG_INFO))

    async def get(self, path: str, method: str = "GET") -> Response:
        return await self.listener.handle(
            Request(method=method, path=path, query={}, headers={}, body=b"")
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with Env(tmp_path) as e:
        yield e


async def test_healthz_is_200_even_before_any_token(env: Env) -> None:
    env.start_merchant("m-pending")
    await settle()
    resp = await env.get("/healthz")
    assert resp.status == 200


async def test_readyz_lists_pending_token_sets_then_is_ready_once_all_are_definite(
    env: Env,
) -> None:
    env.start_merchant("m-ok", grant("ok"))
    env.start_merchant("m-pending")
    env.start_merchant("m-blocked", wrong_password())
    await settle()

    resp = await env.get("/readyz")
    assert resp.status == 503
    body = resp.body.decode()
    assert "m-pending/bill" in body
    assert "pending" in body
    assert "m-ok" not in body
    assert "m-blocked" not in body  # blocked is a definite state

    env.push("m-pending", grant("p"))
    await settle()
    resp = await env.get("/readyz")
    assert resp.status == 200


async def test_readyz_retrying_is_ready_only_while_it_holds_a_valid_token(env: Env) -> None:
    env.start_merchant("m-new", transient())  # never had a token
    env.start_merchant("m-old", grant("old", expires_in=600.0))
    await settle()
    env.push("m-old", *(transient() for _ in range(200)))
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
    env.start_merchant("m-ok", grant("ok"))
    env.start_merchant("m-blocked", wrong_password())
    env.start_merchant("m-pending")
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
    env.start_merchant("m-ok", grant("ok"))
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
