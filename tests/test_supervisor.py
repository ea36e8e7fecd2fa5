"""The set of keepers: the pure config diff, and applying configs to running keepers.

Keepers run against a scripted fake token endpoint (fakes.py) that answers every request
at once with a fresh grant, on a fake clock; files and state are real, under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakes import (
    REFRESH,
    KeeperEnv,
    gated_save,
    grant,
    json_output,
    make_spec,
    settle,
    wrong_password,
)

from anybilld.config import (
    SCOPE_BASE,
    Config,
    IdentitySettings,
    Merchant,
    OnRemove,
    OutputSpec,
    Scope,
    TokenSetSpec,
)
from anybilld.keeper import TokenState
from anybilld.secret import Secret
from anybilld.supervisor import Key, Supervisor, diff


def merchant(mid: str, *scopes: str, password: str = "pw-SECRET") -> Merchant:
    return Merchant(
        id=mid,
        username=f"svc-{mid}",
        password=Secret(password),
        scopes=tuple(Scope(name=s, uri=SCOPE_BASE + s) for s in scopes),
    )


class Env(KeeperEnv):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, auto=True)
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

    async def close(self) -> None:
        await self.sup.stop(timeout=5.0)
        await super().close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with Env(tmp_path) as e:
        yield e


# ---------------------------------------------------------------- diff (pure)


def spec(
    m: str = "berlin-01", scope: str = "bill", *, path: str | None = None, **kw: Any
) -> TokenSetSpec:
    """A spec as the config loader builds it, its output under /out unless ``path``."""
    outputs = None if path is None else (json_output(Path(path)),)
    return make_spec(Path("/out"), m, scope, outputs=outputs, **kw)


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
    assert sorted((s.grant, s.username, s.scope) for s in env.client.sent) == [
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
    assert {s.username for s in env.client.sent[sent:]} == {"svc-berlin-01"}
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
    assert env.client.grants == ["password", "password"]
    assert keeper.state == TokenState.OK


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


async def test_merchant_entries_sharing_one_service_account_share_its_lock(env: Env) -> None:
    # Two entries for one account (a franchise listed twice): a wrong password must cost
    # one lockout attempt of that account, not one per entry.
    env.client.auto = False
    env.client.push(wrong_password())
    shared = replace(merchant("hh-a", "bill"), username="svc-shared")
    twin = replace(merchant("hh-b", "bill"), username="SVC-Shared")
    await env.sup.apply(env.config(shared, twin))
    await settle()
    assert env.client.grants == ["password"]
    assert {k.state for k in env.sup} == {TokenState.BLOCKED}


async def test_a_reload_onto_a_shared_service_account_shares_its_lock(env: Env) -> None:
    env.client.auto = False
    env.client.push(wrong_password(), user="svc-shared")
    env.client.push(grant("b"), user="svc-hh-b")
    a = replace(merchant("hh-a", "bill"), username="svc-shared")
    b = merchant("hh-b", "bill")
    await env.sup.apply(env.config(a, b))
    await settle()
    assert sorted(s.username for s in env.client.sent) == ["svc-hh-b", "svc-shared"]
    # A reload moves hh-b onto the refused service account, with the same password: it
    # must wait out that account's block instead of spending another attempt.
    await env.sup.apply(env.config(a, replace(b, username="svc-shared")))
    await settle()
    assert len(env.client.sent) == 2
    assert {k.state for k in env.sup} == {TokenState.BLOCKED}


# ------------------------------------------------ merchant-by-merchant diff of a reload


def as_sets(d: Any) -> tuple[set[Key], set[Key], set[Key], int]:
    return ({s.key for s in d.added}, {s.key for s in d.changed}, set(d.removed), d.unchanged)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda ms: ms, id="nothing"),
        pytest.param(
            lambda ms: [ms[0], replace(ms[1], password=Secret("pw-new")), *ms[2:]], id="password"
        ),
        pytest.param(lambda ms: [ms[0], *ms[2:]], id="merchant-removed"),
        pytest.param(lambda ms: [*ms, merchant("new", "bill", "user")], id="merchant-added"),
        pytest.param(
            lambda ms: [ms[0], replace(ms[1], scopes=ms[1].scopes[:1]), *ms[2:]], id="scope-removed"
        ),
        pytest.param(
            lambda ms: [*ms[:2], replace(ms[2], client_id="client-B")], id="client-override"
        ),
        pytest.param(lambda ms: [ms[2], ms[0], ms[1]], id="reordered"),
    ],
)
async def test_a_reload_diffed_merchant_by_merchant_equals_the_full_diff(
    env: Env, edit: Any
) -> None:
    ms = [merchant("a", "bill", "store"), merchant("b", "bill", "user"), merchant("c", "bill")]
    await env.sup.apply(env.config(*ms))
    await settle()
    new = env.config(*edit(ms))
    full = diff({k: kp.spec for k, kp in env.sup.keepers.items()}, new.token_sets())
    untouched = {
        k: kp for k, kp in env.sup.keepers.items() if k not in {s.key for s in full.changed}
    }
    d = await env.sup.apply(new)
    assert as_sets(d) == as_sets(full)
    # Token sets the edit left alone keep their keeper and the very spec they ran with.
    for key, keeper in untouched.items():
        if key in env.sup.keepers:
            assert env.sup.keepers[key] is keeper


async def test_new_defaults_change_every_token_set_even_with_equal_merchant_entries(
    env: Env,
) -> None:
    ms = (merchant("a", "bill"), merchant("b", "bill"))
    await env.sup.apply(env.config(*ms))
    await settle()
    raw = OutputSpec(path="{merchant}.{scope}.token", format="raw")
    d = await env.sup.apply(env.config(*ms, outputs=(raw,)))
    await settle()
    assert {s.key for s in d.changed} == {("a", "bill"), ("b", "bill")}
    assert (env.out / "a.bill.token").exists() and (env.out / "b.bill.token").exists()


async def test_stop_finishes_a_save_that_outlasts_the_timeout(env: Env) -> None:
    """The token was handed out: it is saved and published even when the disk is slow."""
    gate = asyncio.Event()
    env.rt.run_io = gated_save(env, gate)
    await env.sup.apply(env.config(merchant("berlin-01", "bill")))
    await settle()  # the grant arrived; its save waits for the disk
    stopping = asyncio.ensure_future(env.sup.stop(timeout=0.01))
    await asyncio.sleep(0.05)  # the stop's timeout has passed
    assert not env.token_file("berlin-01", "bill").exists()
    gate.set()
    await stopping
    assert env.state_file("berlin-01", "bill").exists()
    assert env.token_file("berlin-01", "bill").exists()


async def test_stop_waits_while_answers_keep_landing_then_abandons_the_rest(env: Env) -> None:
    """Past the grace (0.7 of the timeout), answers still landing keep the stop waiting:
    under load the loop reads them late, and each one cut off would have spent a
    single-use refresh token. Once none lands for a step, the rest is abandoned."""
    env.client.auto = False  # requests stay in flight until answered below
    await env.sup.apply(
        env.config(merchant("a", "bill"), merchant("b", "bill"), merchant("c", "bill"))
    )
    await settle()
    assert len(env.client.sent) == 3  # three logins in flight, unanswered
    stopping = asyncio.ensure_future(env.sup.stop(timeout=3.0))
    await settle()
    await env.clock.advance(2.0)
    env.push("a", grant("A"))
    await settle()
    await env.clock.advance(0.2)  # past the grace of 2.1 s, but an answer landed just now
    assert not stopping.done()
    env.push("b", grant("B"))
    await settle()
    await env.clock.advance(0.2)
    assert not stopping.done()
    await env.clock.advance(0.3)  # nothing landed for a whole step
    await stopping
    assert env.token_file("a", "bill").exists() and env.token_file("b", "bill").exists()
    assert not env.token_file("c", "bill").exists()
    assert env.sup.keepers["c", "bill"].task is not None
    assert env.sup.keepers["c", "bill"].task.cancelled()
