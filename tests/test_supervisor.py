"""The set of keepers: the pure config diff, and applying configs to running keepers.

Keepers run against a scripted fake token endpoint on a fake clock (see test_keeper.py for
the full-size fakes); files and state are real, under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from anybilld.clock import FakeClock
from anybilld.config import (
    SCOPE_BASE,
    Config,
    IdentitySettings,
    Merchant,
    OnRemove,
    OutputSpec,
    OutputTarget,
    RefreshSettings,
    Scope,
    TokenSetSpec,
)
from anybilld.identity import Grant, TokenRequest
from anybilld.keeper import Runtime, TokenState
from anybilld.secret import Secret
from anybilld.state import StateStore
from anybilld.supervisor import Key, Supervisor, diff

REFRESH = RefreshSettings(
    at=0.5, jitter=0.25, retry_initial=1.0, retry_max=64.0, blocked_retry=3600.0
)


class FakeTokenClient:
    """Answers every request at once with a fresh grant; records (grant, username, scope).

    A refresh request names no user: it is recorded with the user its token was issued to.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self._issued: dict[str, str] = {}  # refresh token -> username
        self._n = 0

    async def request(self, req: TokenRequest, *, timeout: float) -> Grant:
        scope = req.form["scope"].split()[0].rsplit("/", 1)[-1]
        user = req.form.get("username") or self._issued[req.form["refresh_token"]]
        self.sent.append((req.grant, user, scope))
        self._n += 1
        refresh = f"RT-{self._n}"
        self._issued[refresh] = user
        return Grant(
            access_token=Secret(f"AT-{self._n}"),
            expires_in=3600.0,
            refresh_token=Secret(refresh),
            refresh_token_expires_in=86400.0,
        )


async def run_inline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


async def settle(rounds: int = 200) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def merchant(mid: str, *scopes: str, password: str = "pw-SECRET") -> Merchant:
    return Merchant(
        id=mid,
        username=f"svc-{mid}",
        password=Secret(password),
        scopes=tuple(Scope(name=s, uri=SCOPE_BASE + s) for s in scopes),
    )


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.client = FakeTokenClient()
        self.out = tmp / "out"
        self.out.mkdir()
        self.state_dir = tmp / "state"
        self.store = StateStore(self.state_dir)
        self.store.prepare()
        self.rt = Runtime(
            client=self.client,
            store=self.store,
            clock=self.clock,
            output_root=self.out,
            uniform=lambda a, b: (a + b) / 2,
            run_io=run_inline,
        )
        self.sup = Supervisor(self.rt)

    def config(
        self,
        *merchants: Merchant,
        on_remove: OnRemove = "delete",
        outputs: tuple[OutputSpec, ...] = (OutputSpec(),),
    ) -> Config:
        return Config(
            source=self.tmp / "config.yaml",
            identity=IdentitySettings(client_id="client-A", token_url="https://idp.invalid/t"),
            refresh=REFRESH,
            outputs=outputs,
            output_dir=self.out,
            state_dir=self.state_dir,
            on_remove=on_remove,
            merchants=merchants,
        )

    def token_file(self, m: str, scope: str) -> Path:
        return self.out / m / f"{scope}.json"

    def state_file(self, m: str, scope: str) -> Path:
        return self.store.path(m, scope)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    yield e
    await e.sup.stop(timeout=5.0)


# ---------------------------------------------------------------- diff (pure)


def spec(
    m: str = "berlin-01",
    scope: str = "bill",
    *,
    password: str = "pw",
    client_id: str = "client-A",
    path: str | None = None,
    refresh: RefreshSettings = REFRESH,
) -> TokenSetSpec:
    return TokenSetSpec(
        merchant=m,
        scope=Scope(name=scope, uri=SCOPE_BASE + scope),
        username=f"svc-{m}",
        password=Secret(password),
        client_id=client_id,
        token_url="https://idp.invalid/t",
        policy="b2c_1_ropc_vendor",
        timeout=10.0,
        outputs=(
            OutputTarget(
                path=Path(path or f"/out/{m}/{scope}.json"), format="json", mode=0o640, group=None
            ),
        ),
        refresh=refresh,
    )


def running(*specs: TokenSetSpec) -> dict[Key, TokenSetSpec]:
    return {s.key: s for s in specs}


B, S, H = spec("berlin-01", "bill"), spec("berlin-01", "store"), spec("hamburg", "bill")


@pytest.mark.parametrize(
    ("old", "new", "added", "changed", "removed", "unchanged"),
    [
        pytest.param({}, [], [], [], [], 0, id="nothing"),
        pytest.param({}, [B, S], [B.key, S.key], [], [], 0, id="first-config"),
        pytest.param(running(B, S), [B, S], [], [], [], 2, id="same-config"),
        pytest.param(
            running(B, S), [spec(B.merchant, "bill"), S], [], [], [], 2, id="equal-not-same"
        ),
        pytest.param(running(B, S), [B], [], [], [S.key], 1, id="scope-removed"),
        pytest.param(running(B, S, H), [H], [], [], [B.key, S.key], 1, id="merchant-removed"),
        pytest.param(running(B), [spec(password="new")], [], [B.key], [], 0, id="password-changed"),
        pytest.param(
            running(B), [spec(client_id="client-B")], [], [B.key], [], 0, id="client-changed"
        ),
        pytest.param(
            running(B), [spec(path="/out/other.json")], [], [B.key], [], 0, id="outputs-changed"
        ),
        pytest.param(
            running(B),
            [spec(refresh=replace(REFRESH, at=0.3))],
            [],
            [B.key],
            [],
            0,
            id="timing-changed",
        ),
        pytest.param(
            running(B, S),
            [spec(password="new"), H],
            [H.key],
            [B.key],
            [S.key],
            0,
            id="mixed",
        ),
    ],
)
def test_diff(
    old: dict[Key, TokenSetSpec],
    new: list[TokenSetSpec],
    added: list[Key],
    changed: list[Key],
    removed: list[Key],
    unchanged: int,
) -> None:
    d = diff(old, new)
    assert [s.key for s in d.added] == added
    assert [s.key for s in d.changed] == changed
    assert list(d.removed) == removed
    assert d.unchanged == unchanged
    # The changed entries carry the new specs, which is what the keepers are given.
    for s in d.changed:
        assert s in new


def test_diff_summary_counts() -> None:
    d = diff(running(B, S), [spec(password="new"), H])
    assert d.summary() == "added=1 changed=1 removed=1 unchanged=0"


# ---------------------------------------------------------------- apply


async def test_apply_starts_one_keeper_per_token_set(env: Env) -> None:
    d = await env.sup.apply(
        env.config(merchant("berlin-01", "bill", "store"), merchant("hh", "bill"))
    )
    await settle()
    assert sorted(env.sup.keepers) == [
        ("berlin-01", "bill"),
        ("berlin-01", "store"),
        ("hh", "bill"),
    ]
    assert len(d.added) == 3
    assert sorted(env.client.sent) == [
        ("password", "svc-berlin-01", "bill"),
        ("password", "svc-berlin-01", "store"),
        ("password", "svc-hh", "bill"),
    ]
    assert env.sup.counts() == {TokenState.OK: 3}
    for m, s in env.sup.keepers:
        assert env.token_file(m, s).exists()
        assert env.state_file(m, s).exists()
    # The token sets of one merchant share one account; other merchants have their own.
    kp = env.sup.keepers
    assert kp["berlin-01", "bill"].account is kp["berlin-01", "store"].account
    assert kp["berlin-01", "bill"].account is not kp["hh", "bill"].account


async def test_applying_the_same_config_again_touches_nothing(env: Env) -> None:
    config = env.config(merchant("berlin-01", "bill", "store"))
    await env.sup.apply(config)
    await settle()
    keepers = dict(env.sup.keepers)
    mtime = env.token_file("berlin-01", "bill").stat().st_mtime_ns

    d = await env.sup.apply(env.config(merchant("berlin-01", "bill", "store")))
    await settle()
    assert (len(d.added), len(d.changed), len(d.removed), d.unchanged) == (0, 0, 0, 2)
    assert env.sup.keepers == keepers
    assert all(env.sup.keepers[k] is keepers[k] for k in keepers)
    assert len(env.client.sent) == 2
    assert env.token_file("berlin-01", "bill").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("on_remove", ["delete", "keep"])
async def test_removing_a_merchant_stops_its_keepers_and_handles_files_per_on_remove(
    env: Env, on_remove: OnRemove
) -> None:
    berlin, hh = merchant("berlin-01", "bill", "store"), merchant("hh", "bill", "user")
    await env.sup.apply(env.config(berlin, hh, on_remove=on_remove))
    await settle()
    removed = [env.sup.keepers["hh", "bill"], env.sup.keepers["hh", "user"]]
    kept = dict(env.sup.keepers)
    sent = len(env.client.sent)

    d = await env.sup.apply(env.config(berlin, on_remove=on_remove))
    await settle()

    assert sorted(d.removed) == [("hh", "bill"), ("hh", "user")]
    assert sorted(env.sup.keepers) == [("berlin-01", "bill"), ("berlin-01", "store")]
    assert all(env.sup.keepers[k] is kept[k] for k in env.sup.keepers)
    assert all(k not in env.sup for k in removed)
    assert len(env.client.sent) == sent

    hh_files = [env.token_file("hh", "bill"), env.token_file("hh", "user")]
    hh_state = [env.state_file("hh", "bill"), env.state_file("hh", "user")]
    if on_remove == "delete":
        assert not any(p.exists() for p in hh_files + hh_state)
        assert not (env.out / "hh").exists()  # emptied directories go too
        assert env.store.stored_keys() == {("berlin-01", "bill"), ("berlin-01", "store")}
    else:
        assert all(p.exists() for p in hh_files + hh_state)
    for s in ("bill", "store"):
        assert env.token_file("berlin-01", s).exists()
        assert env.state_file("berlin-01", s).exists()

    # The removed keepers are stopped: past their refresh time, only berlin-01 refreshes,
    # and nothing of the removed token sets comes back.
    await env.clock.advance(7200.0)
    await settle()
    assert {user for _, user, _ in env.client.sent[sent:]} == {"svc-berlin-01"}
    assert all(not p.exists() for p in hh_files) == (on_remove == "delete")


async def test_changed_outputs_are_rewritten_and_stale_ones_removed_without_a_login(
    env: Env,
) -> None:
    m = merchant("berlin-01", "bill")
    await env.sup.apply(env.config(m))
    await settle()
    keeper = env.sup.keepers["berlin-01", "bill"]
    old = env.token_file("berlin-01", "bill")
    assert old.exists()

    raw = OutputSpec(path="{merchant}.{scope}.token", format="raw")
    d = await env.sup.apply(env.config(m, outputs=(raw,)))
    await settle()
    assert [s.key for s in d.changed] == [("berlin-01", "bill")]
    assert env.sup.keepers["berlin-01", "bill"] is keeper
    assert len(env.client.sent) == 1
    assert (env.out / "berlin-01.bill.token").read_bytes() == b"AT-1"
    assert not old.exists()


async def test_a_changed_password_logs_in_again_in_the_same_keeper(env: Env) -> None:
    await env.sup.apply(env.config(merchant("berlin-01", "bill")))
    await settle()
    keeper = env.sup.keepers["berlin-01", "bill"]
    await env.sup.apply(env.config(merchant("berlin-01", "bill", password="pw-new")))
    await settle()
    assert env.sup.keepers["berlin-01", "bill"] is keeper
    assert [g for g, _, _ in env.client.sent] == ["password", "password"]
    assert keeper.state == TokenState.OK


def gated_save(env: Env, gate: asyncio.Event) -> Callable[..., Awaitable[Any]]:
    async def run_io(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn == env.store.save:
            await gate.wait()
        return fn(*args, **kwargs)

    return run_io


async def test_a_token_set_removed_while_its_token_is_being_saved_leaves_nothing(
    env: Env,
) -> None:
    gate = asyncio.Event()
    env.rt.run_io = gated_save(env, gate)
    await env.sup.apply(env.config(merchant("berlin-01", "bill"), merchant("hh", "bill")))
    await settle()  # both grants arrived; their saves wait for the (slow) disk

    applying = asyncio.ensure_future(env.sup.apply(env.config(merchant("berlin-01", "bill"))))
    await settle()
    gate.set()
    await applying
    await settle()

    assert ("hh", "bill") not in env.sup.keepers
    leftovers = [
        p for p in (env.token_file("hh", "bill"), env.state_file("hh", "bill")) if p.exists()
    ]
    assert leftovers == [], "files of a removed token set were written after its removal"
    assert env.token_file("berlin-01", "bill").exists()


async def test_stop_stops_every_keeper(env: Env) -> None:
    await env.sup.apply(env.config(merchant("berlin-01", "bill", "store")))
    await settle()
    await env.sup.stop(timeout=5.0)
    sent = len(env.client.sent)
    await env.clock.advance(7200.0)  # far past every refresh time
    await settle()
    assert len(env.client.sent) == sent
