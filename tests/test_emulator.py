"""The B2C emulator over real loopback HTTP: grants, errors, lockout, lifetimes, faults, API.

Most tests run the emulator in-process (``start_emulator``) and talk to it with an
``httpx.AsyncClient``; the subprocess tests go through ``EmulatorProcess`` like e2e tests do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from emulator_process import DEFAULT_USERS, EmulatorProcess, emulator_factory  # noqa: F401

from anybilld.emulator import (
    Emulator,
    EmulatorSettings,
    EmulatorUser,
    emulator_main,
    load_emulator_settings,
    start_emulator,
)
from anybilld.errors import ConfigError
from anybilld.secret import Secret

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT = "anybilld-demo-client"
POLICY = "b2c_1_ropc_vendor"
TOKEN_PATH = "/ad.anybill.de/oauth2/v2.0/token"
BILL = "https://ad.anybill.de/vendor/bill"
SCOPE = f"{BILL} offline_access"
ALICE, ALICE_PW = "alice@example.com", "alice-Pa55"
BOB, BOB_PW = "bob@example.com", "bob-Pa55"
DORA, DORA_PW = "dora@example.com", "dora-Pa55"
USERS = (
    EmulatorUser(username=ALICE, password=Secret(ALICE_PW)),
    EmulatorUser(username=BOB, password=Secret(BOB_PW)),
    EmulatorUser(username=DORA, password=Secret(DORA_PW), disabled=True),
)
DESCRIPTION = re.compile(
    r"^(AADB2C\d{5}): [^\r\n]+\r\n"
    r"Correlation ID: ([0-9a-f-]{36})\r\n"
    r"Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\r\n$"
)


class Harness:
    """An in-process emulator plus a client, with shorthands for the usual requests."""

    def __init__(self, emulator: Emulator, client: httpx.AsyncClient) -> None:
        self.emulator = emulator
        self.client = client

    async def token(self, form: dict[str, str], *, policy: str | None = POLICY) -> httpx.Response:
        params = {} if policy is None else {"p": policy}
        return await self.client.post(TOKEN_PATH, params=params, data=form)

    async def password(
        self, username: str = ALICE, password: str = ALICE_PW, *, policy: str = POLICY, **form: str
    ) -> httpx.Response:
        base = {
            "grant_type": "password",
            "username": username,
            "password": password,
            "client_id": CLIENT,
            "scope": SCOPE,
            "response_type": "token",
        }
        return await self.token({**base, **form}, policy=policy)

    async def refresh(
        self, refresh_token: str, *, policy: str = POLICY, **form: str
    ) -> httpx.Response:
        base = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT,
            "scope": SCOPE,
            "response_type": "token",
        }
        return await self.token({**base, **form}, policy=policy)

    async def login(self, username: str = ALICE, password: str = ALICE_PW) -> dict[str, Any]:
        r = await self.password(username, password)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def ctl(self, method: str, path: str, body: object = None) -> Any:
        r = await self.client.request(method, f"/_emulator/{path}", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async def advance(self, seconds: float) -> float:
        return float((await self.ctl("POST", "clock", {"advance": seconds}))["now"])


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_emu() -> AsyncIterator[MakeHarness]:
    """Start in-process emulators with setting overrides; all close at teardown."""
    started: list[tuple[Emulator, httpx.AsyncClient]] = []

    async def make(**overrides: Any) -> Harness:
        settings = EmulatorSettings(users=USERS, **overrides)
        emulator, server = await start_emulator(settings)
        host, port = server.address
        client = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=5.0, trust_env=False)
        started.append((emulator, client))
        return Harness(emulator, client)

    yield make
    for emulator, client in started:
        await client.aclose()
        await emulator.aclose()


@pytest.fixture
async def emu(make_emu: MakeHarness) -> Harness:
    return await make_emu()


def b2c_error(r: httpx.Response, status: int = 400) -> tuple[str, str]:
    """(code, OAuth error) of a B2C error answer, after checking its whole shape."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["cache-control"] == "private"
    assert r.headers["x-ms-gateway-requestid"]
    body = r.json()
    assert set(body) == {"error", "error_description"}
    m = DESCRIPTION.match(body["error_description"])
    assert m, repr(body["error_description"])
    uuid.UUID(m.group(2))
    return m.group(1), body["error"]


def code_of(r: httpx.Response, status: int = 400) -> str:
    return b2c_error(r, status)[0]


# --- success answers ------------------------------------------------------------------------


async def test_password_grant_answers_b2c_shape_with_numbers_as_strings(emu: Harness) -> None:
    now = emu.emulator.now()
    r = await emu.password()
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["cache-control"] == "private"
    assert r.headers["x-ms-gateway-requestid"]
    body = r.json()
    assert set(body) == {
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "not_before",
        "expires_on",
        "refresh_token_expires_in",
    }
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == "86400"
    assert body["refresh_token_expires_in"] == "1209600"
    assert abs(int(body["not_before"]) - now) <= 2
    assert int(body["expires_on"]) == int(body["not_before"]) + 86400
    for key in ("access_token", "refresh_token"):
        assert body[key].startswith("eyJ")
        assert re.fullmatch(r"[A-Za-z0-9_\-.]+", body[key])
    assert body["access_token"].count(".") == 2  # a JWS
    assert body["refresh_token"].count(".") == 4  # a JWE, like B2C's


async def test_refresh_grant_with_numbers_as_ints(make_emu: MakeHarness) -> None:
    emu = await make_emu(numbers_as_strings=False, access_token_lifetime=3600)
    first = await emu.login()
    assert first["expires_in"] == 3600
    r = await emu.refresh(first["refresh_token"])
    assert r.status_code == 200
    body = r.json()
    for key in ("expires_in", "not_before", "expires_on", "refresh_token_expires_in"):
        assert type(body[key]) is int, key
    assert body["refresh_token"] != first["refresh_token"]
    assert body["access_token"] != first["access_token"]
    # Switching at runtime applies to the next answer.
    await emu.ctl("POST", "settings", {"numbers_as_strings": True})
    again = (await emu.refresh(body["refresh_token"])).json()
    assert again["expires_in"] == "3600"


async def test_old_refresh_token_keeps_working_unless_single_use(emu: Harness) -> None:
    first = await emu.login()
    assert (await emu.refresh(first["refresh_token"])).status_code == 200
    assert (await emu.refresh(first["refresh_token"])).status_code == 200


async def test_without_offline_access_no_refresh_token(emu: Harness) -> None:
    body = (await emu.password(scope=BILL)).json()
    assert "refresh_token" not in body
    assert "refresh_token_expires_in" not in body
    assert body["access_token"].startswith("eyJ")


async def test_openid_adds_an_id_token(emu: Harness) -> None:
    body = (await emu.password(scope=f"openid {SCOPE}")).json()
    assert body["id_token"].startswith("eyJ")
    assert body["id_token_expires_in"] == "86400"
    # An id token is no access token to a resource server.
    assert (await emu.ctl("POST", "introspect", {"access_token": body["id_token"]}))[
        "active"
    ] is False


async def test_minimal_password_answer_has_anybills_four_fields(make_emu: MakeHarness) -> None:
    emu = await make_emu(minimal_password_answer=True)
    body = await emu.login()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    refreshed = (await emu.refresh(body["refresh_token"])).json()
    assert "refresh_token_expires_in" in refreshed


async def test_policy_is_case_insensitive_and_may_sit_in_the_path(emu: Harness) -> None:
    assert (await emu.password(policy="B2C_1_ROPC_Vendor")).status_code == 200
    form = {
        "grant_type": "password",
        "username": ALICE,
        "password": ALICE_PW,
        "client_id": CLIENT,
        "scope": SCOPE,
    }
    r = await emu.client.post("/AD.anybill.de/B2C_1_ropc_vendor/oauth2/v2.0/token", data=form)
    assert r.status_code == 200
    assert emu.emulator.introspect(r.json()["access_token"])["policy"] == POLICY


async def test_other_paths_and_methods(emu: Harness) -> None:
    assert (await emu.client.post("/other.tenant/oauth2/v2.0/token?p=x")).status_code == 404
    assert (await emu.client.get(f"{TOKEN_PATH}?p={POLICY}")).status_code == 405
    assert (await emu.client.get("/_emulator/nothing")).status_code == 404
    assert await emu.ctl("GET", "requests") == []  # none of these was a token request


# --- errors ---------------------------------------------------------------------------------

VALID = {
    "grant_type": "password",
    "username": ALICE,
    "password": ALICE_PW,
    "client_id": CLIENT,
    "scope": SCOPE,
    "response_type": "token",
}


@pytest.mark.parametrize(
    ("changes", "policy", "code", "error"),
    [
        ({}, None, "AADB2C90022", "invalid_request"),
        ({}, "b2c_1_nope", "AADB2C90022", "invalid_request"),
        ({"client_id": None}, POLICY, "AADB2C90008", "invalid_request"),
        ({"client_id": "someone-else"}, POLICY, "AADB2C90018", "unauthorized_client"),
        ({"grant_type": None}, POLICY, "AADB2C90083", "invalid_request"),
        ({"grant_type": "client_credentials"}, POLICY, "AADB2C90086", "unsupported_grant_type"),
        ({"scope": None}, POLICY, "AADB2C90010", "invalid_request"),
        ({"scope": "  "}, POLICY, "AADB2C90010", "invalid_request"),
        ({"scope": f"{BILL} https://ad.anybill.de/vendor/admin"}, POLICY, "AADB2C90117", None),
        ({"scope": "offline_access email"}, POLICY, "AADB2C90117", None),
        ({"scope": "openid offline_access"}, POLICY, "AADB2C90055", None),
        ({"response_type": "code"}, POLICY, "AADB2C90013", None),
        ({"username": None}, POLICY, "AADB2C90083", "invalid_request"),
        ({"password": None}, POLICY, "AADB2C90083", "invalid_request"),
        ({"username": "nobody@example.com"}, POLICY, "AADB2C90225", "access_denied"),
        ({"password": "wrong"}, POLICY, "AADB2C90225", "access_denied"),
        ({"username": DORA, "password": DORA_PW}, POLICY, "AADB2C90111", "access_denied"),
        (
            {"grant_type": "refresh_token", "refresh_token": "eyJunknown"},
            POLICY,
            "AADB2C90087",
            "invalid_grant",
        ),
        ({"grant_type": "refresh_token"}, POLICY, "AADB2C90083", "invalid_request"),
    ],
)
async def test_validation_errors(
    emu: Harness,
    changes: dict[str, str | None],
    policy: str | None,
    code: str,
    error: str | None,
) -> None:
    form = {k: v for k, v in {**VALID, **changes}.items() if v is not None}
    got_code, got_error = b2c_error(await emu.token(form, policy=policy))
    assert got_code == code
    if error is not None:
        assert got_error == error
    [record] = await emu.ctl("GET", "requests")
    assert record["status"] == 400
    assert record["code"] == code


async def test_every_correlation_id_differs_and_timestamp_uses_the_emulator_clock(
    emu: Harness,
) -> None:
    await emu.advance(10 * 86400)
    expected_day = time.strftime("%Y-%m-%d", time.gmtime(emu.emulator.now()))
    descriptions = [
        (await emu.password(password="wrong")).json()["error_description"] for _ in range(3)
    ]
    ids = {DESCRIPTION.match(d).group(2) for d in descriptions}  # type: ignore[union-attr]
    assert len(ids) == 3
    assert all(f"Timestamp: {expected_day} " in d for d in descriptions)


# --- lockout --------------------------------------------------------------------------------


async def test_lockout_counts_distinct_wrong_passwords(emu: Harness) -> None:
    # One stale password repeated counts once: no lockout.
    for _ in range(15):
        assert code_of(await emu.password(password="stale-password")) == "AADB2C90225"
    [alice] = [u for u in await emu.ctl("GET", "users") if u["username"] == ALICE]
    assert alice["failed_attempts"] == 1
    assert alice["locked_until"] is None
    assert (await emu.password()).status_code == 200  # success resets the count
    # Ten distinct wrong passwords lock the account...
    for i in range(10):
        assert code_of(await emu.password(password=f"guess-{i}")) == "AADB2C90225"
    [alice] = [u for u in await emu.ctl("GET", "users") if u["username"] == ALICE]
    assert alice["failed_attempts"] == 10
    assert alice["locked_until"] == pytest.approx(emu.emulator.now() + 60, abs=2)
    # ...so even the right password gets 90114 while locked; other users are unaffected.
    assert code_of(await emu.password()) == "AADB2C90114"
    assert code_of(await emu.password(password="guess-99")) == "AADB2C90114"
    assert (await emu.password(BOB, BOB_PW)).status_code == 200
    # The lock ends with lockout_duration on the emulator clock.
    await emu.advance(61)
    assert (await emu.password()).status_code == 200
    [alice] = [u for u in await emu.ctl("GET", "users") if u["username"] == ALICE]
    assert alice["failed_attempts"] == 0
    assert alice["locked_until"] is None


async def test_lockout_threshold_and_duration_are_settings(make_emu: MakeHarness) -> None:
    emu = await make_emu(lockout_threshold=3, lockout_duration=600)
    for i in range(3):
        await emu.password(password=f"guess-{i}")
    assert code_of(await emu.password()) == "AADB2C90114"
    await emu.advance(599)
    assert code_of(await emu.password()) == "AADB2C90114"
    await emu.advance(2)
    assert (await emu.password()).status_code == 200


# --- lifetimes, revocation, binding ---------------------------------------------------------


async def test_refresh_token_lifetime_expiry(make_emu: MakeHarness) -> None:
    emu = await make_emu(refresh_token_lifetime=1000)
    first = await emu.login()
    await emu.advance(999)
    second = (await emu.refresh(first["refresh_token"])).json()
    await emu.advance(2)
    assert code_of(await emu.refresh(first["refresh_token"])) == "AADB2C90080"
    # The new token's lifetime runs from its own issue.
    assert (await emu.refresh(second["refresh_token"])).status_code == 200


async def test_sliding_window_ends_even_a_refreshed_grant(make_emu: MakeHarness) -> None:
    emu = await make_emu(refresh_token_lifetime=100, sliding_window=250)
    rt = (await emu.login())["refresh_token"]
    for _ in range(2):  # t+90, t+180: each refresh is inside both limits
        await emu.advance(90)
        r = await emu.refresh(rt)
        assert r.status_code == 200, r.text
        rt = r.json()["refresh_token"]
    await emu.advance(80)  # t+260: the token would live to t+280, the window ended at t+250
    r = await emu.refresh(rt)
    assert code_of(r) == "AADB2C90080"
    assert "sliding window" in r.json()["error_description"]
    # A password login starts a new window.
    rt = (await emu.login())["refresh_token"]
    assert (await emu.refresh(rt)).status_code == 200


async def test_revoke_kills_grants_issued_before(emu: Harness) -> None:
    alice_rt = (await emu.login())["refresh_token"]
    bob_rt = (await emu.login(BOB, BOB_PW))["refresh_token"]
    await emu.advance(1)
    view = await emu.ctl("POST", "revoke", {"username": ALICE})
    assert view["valid_from"] == pytest.approx(emu.emulator.now(), abs=2)
    assert code_of(await emu.refresh(alice_rt)) == "AADB2C90129"
    assert (await emu.refresh(bob_rt)).status_code == 200
    fresh = (await emu.login())["refresh_token"]
    assert (await emu.refresh(fresh)).status_code == 200
    r = await emu.client.post("/_emulator/revoke", json={"username": "nobody"})
    assert r.status_code == 404


async def test_refresh_bound_to_policy_and_client(make_emu: MakeHarness) -> None:
    emu = await make_emu(other_policies=("B2C_1_ropc_other",), other_client_ids=("pos-2",))
    rt = (await emu.login())["refresh_token"]
    assert code_of(await emu.refresh(rt, policy="b2c_1_ropc_other")) == "AADB2C90088"
    assert code_of(await emu.refresh(rt, client_id="pos-2")) == "AADB2C90279"
    # Both are real endpoints of the tenant: grants issued there work there.
    other = (await emu.password(policy="b2c_1_ropc_other", client_id="pos-2")).json()
    r = await emu.refresh(other["refresh_token"], policy="B2C_1_ROPC_OTHER", client_id="pos-2")
    assert r.status_code == 200


async def test_single_use_refresh_tokens(make_emu: MakeHarness) -> None:
    emu = await make_emu(single_use_refresh_tokens=True)
    first = await emu.login()
    second = (await emu.refresh(first["refresh_token"])).json()
    assert code_of(await emu.refresh(first["refresh_token"])) == "AADB2C90129"
    assert (await emu.refresh(second["refresh_token"])).status_code == 200


async def test_disabled_user_cannot_refresh(emu: Harness) -> None:
    rt = (await emu.login())["refresh_token"]
    await emu.ctl("POST", "users", {"username": ALICE, "password": ALICE_PW, "disabled": True})
    assert code_of(await emu.refresh(rt)) == "AADB2C90111"


# --- faults ---------------------------------------------------------------------------------


async def test_throttle_faults(emu: Harness) -> None:
    date = "Wed, 21 Oct 2026 07:28:00 GMT"
    await emu.ctl(
        "POST",
        "faults",
        {
            "faults": [
                {"kind": "throttle", "retry_after": 7},
                {"kind": "throttle", "retry_after": date, "body": "text"},
                {"kind": "throttle"},
            ]
        },
    )
    r = await emu.password()
    assert code_of(r, 429) == "AADB2C90229"
    assert r.headers["retry-after"] == "7"
    r = await emu.password()
    assert r.status_code == 429
    assert r.headers["retry-after"] == date
    assert r.headers["content-type"].startswith("text/plain")
    assert "Too many requests" in r.text
    r = await emu.password()
    assert code_of(r, 429) == "AADB2C90229"
    assert "retry-after" not in r.headers
    assert (await emu.password()).status_code == 200
    records = await emu.ctl("GET", "requests")
    assert [(x["status"], x["code"], x["fault"]) for x in records] == [
        (429, "AADB2C90229", "throttle"),
        (429, None, "throttle"),
        (429, "AADB2C90229", "throttle"),
        (200, None, None),
    ]


async def test_error_fault_serves_any_code(emu: Harness) -> None:
    await emu.ctl(
        "POST",
        "faults",
        {
            "faults": [
                {"kind": "error", "code": "AADB2C90035"},
                {"kind": "error", "code": "90244", "status": 429},
                {"kind": "error", "code": "AADB2C99999", "error": "weird", "message": "Odd."},
            ]
        },
    )
    assert b2c_error(await emu.password()) == ("AADB2C90035", "server_error")
    assert code_of(await emu.password(), 429) == "AADB2C90244"
    r = await emu.password()
    assert b2c_error(r) == ("AADB2C99999", "weird")
    assert r.json()["error_description"].startswith("AADB2C99999: Odd.\r\n")


async def test_server_error_and_html200_faults(emu: Harness) -> None:
    faults = [
        {"kind": "server_error", "status": 502},
        {"kind": "server_error"},
        {"kind": "html200"},
    ]
    await emu.ctl("POST", "faults", {"faults": faults})
    for status in (502, 503, 200):
        r = await emu.password()
        assert r.status_code == status
        assert r.headers["content-type"].startswith("text/html")
        assert r.text.startswith("<!DOCTYPE html>")
        assert r.headers["cache-control"] == "private"


async def test_raw_fault_serves_exactly_the_body(emu: Harness) -> None:
    faults = [
        {"kind": "raw", "body": '{"access_token": "eyJ'},
        {"kind": "raw", "body": '{"access_token": 5, "expires_in": [1]}', "status": 200},
        {"kind": "raw", "status": 400, "body": "oops", "content_type": "text/plain"},
        {"kind": "raw", "body": "x" * 1000, "repeat": 3000},
        {"kind": "raw", "body_base64": base64.b64encode(b"\xff\xfe{\x00").decode(), "repeat": 2},
    ]
    await emu.ctl("POST", "faults", {"faults": faults})
    r = await emu.password()
    assert (r.status_code, r.text) == (200, '{"access_token": "eyJ')
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert (await emu.password()).json() == {"access_token": 5, "expires_in": [1]}
    r = await emu.password()
    assert (r.status_code, r.text, r.headers["content-type"]) == (400, "oops", "text/plain")
    assert len((await emu.password()).content) == 3_000_000
    assert (await emu.password()).content == b"\xff\xfe{\x00" * 2


async def test_reset_fault_drops_the_connection(emu: Harness) -> None:
    await emu.ctl("POST", "faults", {"faults": [{"kind": "reset"}]})
    with pytest.raises(httpx.TransportError):
        await emu.password()
    assert (await emu.password()).status_code == 200
    records = await emu.ctl("GET", "requests")
    assert [(x["status"], x["fault"]) for x in records] == [(None, "reset"), (200, None)]


async def test_hang_fault_outlasts_the_client_timeout(emu: Harness) -> None:
    await emu.ctl("POST", "faults", {"faults": [{"kind": "hang", "seconds": 30}]})
    with pytest.raises(httpx.ReadTimeout):
        await emu.client.post(
            TOKEN_PATH, params={"p": POLICY}, data=VALID, timeout=httpx.Timeout(0.3)
        )
    [record] = await emu.ctl("GET", "requests")
    assert (record["status"], record["fault"]) == (None, "hang")
    # A short hang answers normally afterwards, and the record learns the status.
    await emu.ctl("POST", "faults", {"faults": [{"kind": "hang", "seconds": 0.2}]})
    started = time.monotonic()
    assert (await emu.password()).status_code == 200
    assert time.monotonic() - started >= 0.2
    assert (await emu.ctl("GET", "requests"))[-1]["status"] == 200


async def test_shutdown_drops_a_hanging_request(make_emu: MakeHarness) -> None:
    emu = await make_emu()
    await emu.ctl("POST", "faults", {"faults": [{"kind": "hang"}]})
    pending = asyncio.ensure_future(emu.password())
    await asyncio.sleep(0.1)
    await emu.emulator.aclose()
    with pytest.raises(httpx.TransportError):
        await asyncio.wait_for(pending, 2)


async def test_processed_fault_loses_the_answer_but_spends_the_token(
    make_emu: MakeHarness,
) -> None:
    emu = await make_emu(single_use_refresh_tokens=True)
    rt = (await emu.login())["refresh_token"]
    await emu.ctl("POST", "faults", {"faults": [{"kind": "reset", "processed": True}]})
    with pytest.raises(httpx.TransportError):
        await emu.refresh(rt)
    assert code_of(await emu.refresh(rt)) == "AADB2C90129"
    # Without "processed" a fault leaves the token unspent.
    rt = (await emu.login())["refresh_token"]
    await emu.ctl("POST", "faults", {"faults": [{"kind": "server_error"}]})
    assert (await emu.refresh(rt)).status_code == 503
    assert (await emu.refresh(rt)).status_code == 200


async def test_faults_match_grant_type_and_username(emu: Harness) -> None:
    alice_rt = (await emu.login())["refresh_token"]
    faults = [
        {"kind": "server_error", "match": {"username": BOB}},
        {"kind": "error", "code": "AADB2C90035", "match": {"grant_type": "refresh_token"}},
        # The username of a refresh grant is the grant's user.
        {
            "kind": "html200",
            "match": {"grant_type": "refresh_token", "username": "ALICE@example.com"},
        },
    ]
    await emu.ctl("POST", "faults", {"faults": faults})
    assert (await emu.password()).status_code == 200  # alice, password: no match
    assert code_of(await emu.refresh(alice_rt)) == "AADB2C90035"  # FIFO: 2nd before 3rd
    assert (await emu.refresh(alice_rt)).headers["content-type"].startswith("text/html")
    assert (await emu.password(BOB, BOB_PW)).status_code == 503
    assert await emu.ctl("GET", "faults") == []


async def test_fault_times_and_until_cleared(emu: Harness) -> None:
    await emu.ctl("POST", "faults", {"faults": [{"kind": "server_error", "times": 2}]})
    assert [(await emu.password()).status_code for _ in range(3)] == [503, 503, 200]
    await emu.ctl("POST", "faults", {"faults": [{"kind": "html200", "times": None}]})
    for _ in range(5):
        assert (await emu.password()).headers["content-type"].startswith("text/html")
    [listed] = await emu.ctl("GET", "faults")
    assert listed["kind"] == "html200"
    assert listed["times"] is None
    assert await emu.ctl("DELETE", "faults") == []
    assert (await emu.password()).status_code == 200
    await emu.ctl("POST", "faults", {"faults": [{"kind": "reset", "times": 3}]})
    with pytest.raises(httpx.TransportError):
        await emu.password()
    assert (await emu.ctl("GET", "faults"))[0]["times"] == 2


async def test_trickle_fault_sends_the_real_answer_a_byte_at_a_time(emu: Harness) -> None:
    await emu.ctl("POST", "faults", {"faults": [{"kind": "trickle", "interval": 0.05}]})
    async with emu.client.stream(
        "POST", TOKEN_PATH, params={"p": POLICY}, data=VALID, timeout=httpx.Timeout(5)
    ) as r:
        assert r.status_code == 200
        assert int(r.headers["content-length"]) > 100
        chunks = []
        async for chunk in r.aiter_raw():
            chunks.append(chunk)
            if len(chunks) == 3:
                break
    assert chunks[0] == b"{"  # the real (JSON) answer...
    assert [len(c) for c in chunks] == [1, 1, 1]  # ... one byte per read
    [record] = await emu.ctl("GET", "requests")
    assert (record["status"], record["fault"]) == (200, "trickle")
    assert (await emu.password()).status_code == 200  # one fault, one request


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "explode"},
        {"kind": "trickle", "interval": 0},
        {"kind": "trickle", "seconds": 1},
        {"kind": "reset", "times": 0},
        {"kind": "reset", "match": {"merchant": "x"}},
        {"kind": "error"},
        {"kind": "error", "code": "E42"},
        {"kind": "server_error", "status": 404},
        {"kind": "throttle", "body": "xml"},
        {"kind": "hang", "seconds": -1},
        {"kind": "raw", "bogus": 1},
        {"kind": "raw", "body_base64": "not base64!"},
        {"kind": "raw", "body_base64": 5},
        {"kind": "raw", "body": "", "body_base64": ""},
    ],
)
async def test_invalid_faults_are_refused_whole(emu: Harness, fault: dict[str, Any]) -> None:
    r = await emu.client.post("/_emulator/faults", json={"faults": [{"kind": "reset"}, fault]})
    assert r.status_code == 400
    assert r.json()["error"]
    assert await emu.ctl("GET", "faults") == []


# --- rate limit -----------------------------------------------------------------------------


async def test_rate_limit(emu: Harness) -> None:
    await emu.ctl("POST", "settings", {"rate_limit_per_second": 5})
    answers = [await emu.password() for _ in range(12)]
    statuses = [r.status_code for r in answers]
    assert statuses[:5] == [200] * 5
    assert statuses.count(429) >= 5
    limited = next(r for r in answers if r.status_code == 429)
    assert code_of(limited, 429) == "AADB2C90229"
    assert limited.headers["retry-after"] == "1"
    records = await emu.ctl("GET", "requests")
    assert {x["fault"] for x in records if x["status"] == 429} == {"rate_limit"}
    await emu.ctl("POST", "settings", {"rate_limit_per_second": None})
    assert [(await emu.password()).status_code for _ in range(10)] == [200] * 10


# --- control API ----------------------------------------------------------------------------


async def test_request_record_fields_and_no_secrets(emu: Harness) -> None:
    await emu.advance(3600)
    first = await emu.login()
    second = (await emu.refresh(first["refresh_token"])).json()
    await emu.password(password="a-wrong-password")
    await emu.refresh("eyJnot-a-token")
    records = await emu.ctl("GET", "requests")
    keys = {"id", "at", "grant_type", "username", "client_id", "scope", "policy"}
    keys |= {"status", "code", "fault"}
    assert all(set(r) == keys for r in records)
    assert [r["id"] for r in records] == [1, 2, 3, 4]
    assert records[0]["at"] == pytest.approx(emu.emulator.now(), abs=5)  # emulator clock
    assert [(r["grant_type"], r["username"], r["status"], r["code"]) for r in records] == [
        ("password", ALICE, 200, None),
        ("refresh_token", ALICE, 200, None),
        ("password", ALICE, 400, "AADB2C90225"),
        ("refresh_token", None, 400, "AADB2C90087"),
    ]
    assert records[0]["client_id"] == CLIENT
    assert records[0]["scope"] == SCOPE
    assert records[0]["policy"] == POLICY
    assert await emu.ctl("GET", "requests?since=2") == records[2:]

    secrets = [ALICE_PW, BOB_PW, DORA_PW, "a-wrong-password"]
    secrets += [first["access_token"], first["refresh_token"], second["refresh_token"]]
    for path in ("requests", "users", "faults", "settings", "clock"):
        text = (await emu.client.get(f"/_emulator/{path}")).text
        assert "eyJ" not in text, path
        assert not any(s in text for s in secrets), path
    await emu.ctl("DELETE", "requests")
    assert await emu.ctl("GET", "requests") == []


async def test_users_add_replace_and_list(emu: Harness) -> None:
    users = await emu.ctl("GET", "users")
    assert [u["username"] for u in users] == [ALICE, BOB, DORA]
    assert users[2] == {
        "username": DORA,
        "failed_attempts": 0,
        "locked_until": None,
        "valid_from": None,
        "disabled": True,
    }
    new = await emu.ctl("POST", "users", {"username": "carol@example.com", "password": "c-1"})
    assert new["username"] == "carol@example.com"
    assert (await emu.password("carol@example.com", "c-1")).status_code == 200
    # Usernames are case-insensitive, like B2C sign-in names.
    assert (await emu.password("CAROL@example.com", "c-1")).status_code == 200
    # A password change: the old one stops working; the lockout is cleared.
    rt = (await emu.login())["refresh_token"]
    for i in range(10):
        await emu.password(password=f"guess-{i}")
    await emu.ctl("POST", "users", {"username": ALICE, "password": "new-pw"})
    assert code_of(await emu.password()) == "AADB2C90225"
    assert (await emu.password(password="new-pw")).status_code == 200
    assert (await emu.refresh(rt)).status_code == 200  # grants survive; revoke kills them
    bad = await emu.client.post("/_emulator/users", json={"username": "x"})
    assert bad.status_code == 400


async def test_clock_api(emu: Harness) -> None:
    before = await emu.ctl("GET", "clock")
    assert before["offset"] == 0
    after = await emu.ctl("POST", "clock", {"advance": -7200})
    assert after["offset"] == -7200
    assert after["now"] == pytest.approx(time.time() - 7200, abs=2)
    body = await emu.login()
    assert int(body["not_before"]) == pytest.approx(time.time() - 7200, abs=2)
    bad = await emu.client.post("/_emulator/clock", json={"advance": "soon"})
    assert bad.status_code == 400


async def test_settings_api(emu: Harness) -> None:
    settings = await emu.ctl("GET", "settings")
    assert settings["client_id"] == CLIENT
    assert settings["access_token_lifetime"] == 86400
    assert "users" not in settings
    changed = await emu.ctl(
        "POST", "settings", {"access_token_lifetime": 600, "single_use_refresh_tokens": True}
    )
    assert changed["access_token_lifetime"] == 600
    assert changed["single_use_refresh_tokens"] is True
    assert (await emu.login())["expires_in"] == "600"
    for body in ({"client_id": "x"}, {"nonsense": 1}, {"access_token_lifetime": "long"}):
        r = await emu.client.post("/_emulator/settings", json=body)
        assert r.status_code == 400, body
    assert (await emu.client.post("/_emulator/settings", content=b"{")).status_code == 400


async def test_introspect(emu: Harness) -> None:
    token = (await emu.password(scope=f"{BILL} https://ad.anybill.de/vendor/store")).json()[
        "access_token"
    ]
    info = await emu.ctl("POST", "introspect", {"access_token": token})
    assert info["active"] is True
    assert info["username"] == ALICE
    assert info["scope"] == f"{BILL} https://ad.anybill.de/vendor/store"
    assert info["client_id"] == CLIENT
    assert info["expires_at"] == pytest.approx(emu.emulator.now() + 86400, abs=2)
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload[:-2]}AA.{signature}"
    for bad in (forged, "eyJ.eyJ.abc", "garbage", ""):
        assert (await emu.ctl("POST", "introspect", {"access_token": bad}))["active"] is False
    await emu.advance(86401)
    assert (await emu.ctl("POST", "introspect", {"access_token": token}))["active"] is False


async def test_health(emu: Harness) -> None:
    assert await emu.ctl("GET", "health") == {"ok": True}


# --- settings files and command line --------------------------------------------------------


def test_example_config_loads() -> None:
    settings = load_emulator_settings(REPO_ROOT / "configs" / "emulator.yaml")
    assert settings.client_id == "anybilld-demo-client"
    assert len(settings.users) >= 2
    assert "demo-password" not in repr(settings)


def test_bad_config_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "emulator.yaml"
    path.write_text(
        "client_id: pos\n"
        "access_token_lifetime: soon\n"
        "lockout_treshold: 3\n"
        "users:\n"
        "  - username: a@example.com\n"
        "    password: 1234\n"
        "  - {username: A@example.com, password: x}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_emulator_settings(path)
    text = str(info.value)
    assert f"{path}:2:24: access_token_lifetime:" in text
    assert f"{path}:3:19: lockout_treshold: unknown setting" in text
    assert f"{path}:6:15: users[0].password: must be a string" in text
    assert "users[1].username: duplicate" in text
    assert "1234" not in text  # a password is never echoed

    path.write_text("users: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_emulator_settings(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_emulator_settings(tmp_path / "missing.yaml")


def test_command_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert emulator_main(["--listen", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert emulator_main(["--user", "no-colon"]) == 2
    assert emulator_main(["--access-token-lifetime", "0"]) == 2
    assert emulator_main(["--bogus"]) == 2
    assert emulator_main(["--help"]) == 0


def test_subprocess_emulator_end_to_end(tmp_path: Path) -> None:
    config = {
        "client_id": "pos-1",
        "access_token_lifetime": 3600,
        "users": [dict(u) for u in DEFAULT_USERS],
    }
    args = [
        "--user",
        "cli@example.com:cli:pw",
        "--numbers-as-ints",
        "--refresh-token-lifetime",
        "99",
    ]
    with EmulatorProcess(config, tmp_dir=tmp_path / "emu", extra_args=args) as emu:
        assert emu.health() == {"ok": True}
        assert emu.token_url == f"{emu.base_url}/ad.anybill.de/oauth2/v2.0/token?p={POLICY}"
        settings = emu.settings()
        assert (settings["client_id"], settings["access_token_lifetime"]) == ("pos-1", 3600)
        assert settings["refresh_token_lifetime"] == 99  # the flag beats the file
        assert settings["numbers_as_strings"] is False
        form = {"grant_type": "password", "username": "cli@example.com", "password": "cli:pw"}
        form |= {"client_id": "pos-1", "scope": SCOPE}
        with httpx.Client(timeout=5, trust_env=False) as client:
            body = client.post(emu.token_url, data=form).json()
            assert body["expires_in"] == 3600
            assert emu.introspect(body["access_token"])["username"] == "cli@example.com"
            emu.add_faults({"kind": "throttle", "retry_after": 2})
            assert client.post(emu.token_url, data=form).status_code == 429
            emu.advance_clock(100)
            refresh = {
                **form,
                "grant_type": "refresh_token",
                "refresh_token": body["refresh_token"],
            }
            answer = client.post(emu.token_url, data=refresh).json()
            assert answer["error_description"].startswith("AADB2C90080")
            emu.revoke("cli@example.com")
            assert emu.add_user("new@example.com", "pw")["username"] == "new@example.com"
            assert [u["username"] for u in emu.users()][-1] == "new@example.com"
        assert [r["status"] for r in emu.requests()] == [200, 429, 400]
        emu.clear_requests()
        assert emu.requests() == []
        emu.add_faults({"kind": "reset", "times": None})
        assert len(emu.faults()) == 1
        emu.clear_faults()
        assert emu.settings(single_use_refresh_tokens=True)["single_use_refresh_tokens"]
    assert "eyJ" not in emu.stderr_path.read_text()


def test_subprocess_fixture_factory_stops_cleanly(
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
) -> None:
    emu = emulator_factory()
    assert emu.users()[0]["username"] == DEFAULT_USERS[0]["username"]
    assert json.loads(emu.client.get("/_emulator/health").text) == {"ok": True}
