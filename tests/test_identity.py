"""The token endpoint's answers, classified: table-driven over (status, headers, body)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from anybilld import identity
from anybilld.clock import FakeClock, SystemClock
from anybilld.config import RefreshSettings, Scope, TokenSetSpec
from anybilld.errors import (
    BlockReason,
    DeadGrantError,
    IdentityError,
    PermanentError,
    TransientError,
)
from anybilld.identity import (
    RETRY_AFTER_CAP,
    IdentityClient,
    RateLimiter,
    parse_answer,
    parse_retry_after,
    password_request,
    refresh_request,
)
from anybilld.secret import Secret

NOW = 1_800_000_000.0


def b2c_error(code: str, error: str = "invalid_grant") -> bytes:
    return json.dumps(
        {
            "error": error,
            "error_description": f"AADB2C{code}: Something.\r\n"
            "Correlation ID: 0f7c1d2e-aaaa-bbbb-cccc-123456789abc\r\n"
            "Timestamp: 2026-01-30 13:35:09Z\r\n",
        }
    ).encode()


def ok(**fields: object) -> bytes:
    doc: dict[str, object] = {"access_token": "eyJaccess", "token_type": "Bearer"}
    doc.update(fields)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("body", "expires_in", "refresh", "refresh_expires_in"),
    [
        (ok(expires_in="86400", refresh_token="eyJr"), 86400, "eyJr", None),
        (
            ok(expires_in=3600, refresh_token="eyJr", refresh_token_expires_in=1209600),
            3600,
            "eyJr",
            1209600,
        ),
        (ok(expires_in="300", refresh_token_expires_in="1209600"), 300, None, 1209600),
        (ok(expires_in=60, not_before=1, expires_on="2", unknown={"x": 1}), 60, None, None),
    ],
)
def test_success_accepts_numbers_as_ints_or_digit_strings(
    body: bytes, expires_in: float, refresh: str | None, refresh_expires_in: float | None
) -> None:
    grant = parse_answer("password", 200, {}, body, now=NOW)
    assert grant.access_token.reveal() == "eyJaccess"
    assert grant.expires_in == expires_in
    assert (grant.refresh_token.reveal() if grant.refresh_token else None) == refresh
    assert grant.refresh_token_expires_in == refresh_expires_in


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Sorry</body></html>",
        b"",
        b'{"access_token": "eyJ',  # truncated
        b"[]",
        ok(),  # no expires_in
        ok(expires_in=True),
        ok(expires_in=86400.5),
        ok(expires_in="86400s"),
        ok(expires_in="-5"),
        ok(expires_in=0),
        ok(expires_in="\u0661\u0662"),  # Arabic-Indic digits pass str.isdigit()
        json.dumps({"token_type": "Bearer", "expires_in": 1}).encode(),
        json.dumps({"access_token": 5, "expires_in": 1}).encode(),
        json.dumps({"access_token": "a b", "expires_in": 1}).encode(),
        ok(expires_in=1, token_type="mac"),
        ok(expires_in=1, refresh_token=["x"]),
        ok(expires_in=10**12),  # would overflow any date; no IdP issues such a token
        ok(expires_in=60, refresh_token="eyJr", refresh_token_expires_in="99999999999"),
    ],
)
def test_unusable_200_is_transient(body: bytes) -> None:
    with pytest.raises(TransientError):
        parse_answer("refresh", 200, {}, body, now=NOW)


DEEP = 100_000  # far deeper than the interpreter's recursion limit, far below the size cap


@pytest.mark.parametrize("status", [200, 400, 429, 503])
@pytest.mark.parametrize(
    "body",
    [
        b"[" * DEEP + b"]" * DEEP,
        b"[" * DEEP,  # unterminated
        b'{"a":' * DEEP + b"1" + b"}" * DEEP,
        b'{"access_token": "eyJ", "expires_in": 60, "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"error_description": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        # Bytes that are no UTF-8 (nor the UTF-16/32 that json.loads also detects).
        b'{"access_token": "eyJ\xff\xfe", "expires_in": 60}',
        b"\xff\xfe garbage \x00",
        b"\x00\x00\x00{\xff",
        b"\xc3\x28\xa0\xa1",
        b'{"error_description": "AADB2C90225: \xff"}',
        # A digit string longer than int() converts (4,300 digits).
        ok(expires_in="9" * 5000),
        ok(expires_in=60, refresh_token="eyJr", refresh_token_expires_in="1" * 5000),
        b'{"access_token": "eyJ", "expires_in": ' + b"9" * 5000 + b"}",
    ],
)
def test_an_unreadable_answer_is_transient_whatever_it_holds(status: int, body: bytes) -> None:
    with pytest.raises(TransientError):
        parse_answer("refresh", status, {}, body, now=NOW)


def test_an_answer_the_reader_did_not_foresee_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    def unforeseen(body: bytes) -> object:
        raise MemoryError

    monkeypatch.setattr(identity, "_json", unforeseen)
    with pytest.raises(TransientError, match="malformed answer"):
        parse_answer("refresh", 200, {}, ok(expires_in=60), now=NOW)


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "9" * 5000 + "\u00b9"])
def test_a_retry_after_of_unusual_digits_is_ignored(value: str) -> None:
    # str.isdigit() holds for "²" and Arabic-Indic digits; float() refuses some of them.
    assert parse_retry_after(value, now=NOW) is None
    with pytest.raises(TransientError) as info:
        parse_answer("refresh", 429, {"retry-after": value}, b"", now=NOW)
    assert info.value.retry_after is None


@pytest.mark.parametrize(
    ("code", "grant", "cls", "reason"),
    [
        ("90080", "refresh", DeadGrantError, None),
        ("90129", "refresh", DeadGrantError, None),
        ("90088", "refresh", DeadGrantError, None),
        ("90279", "refresh", DeadGrantError, None),
        ("90225", "password", PermanentError, BlockReason.CREDENTIALS),
        ("90053", "password", PermanentError, BlockReason.CREDENTIALS),
        ("90111", "password", PermanentError, BlockReason.LOCKED),
        ("90114", "password", PermanentError, BlockReason.LOCKED),
        ("90117", "refresh", PermanentError, BlockReason.SCOPE),
        ("90018", "password", PermanentError, BlockReason.CLIENT),
        ("90086", "password", PermanentError, BlockReason.CLIENT_BUG),
        ("90244", "refresh", TransientError, None),
        ("90035", "password", TransientError, None),
        ("99999", "refresh", DeadGrantError, None),
        ("99999", "password", PermanentError, BlockReason.UNKNOWN),
        ("90080", "password", PermanentError, BlockReason.CLIENT_BUG),
    ],
)
def test_b2c_codes_are_classified(
    code: str, grant: str, cls: type[IdentityError], reason: BlockReason | None
) -> None:
    with pytest.raises(cls) as info:
        parse_answer(grant, 400, {}, b2c_error(code), now=NOW)  # type: ignore[arg-type]
    exc = info.value
    assert type(exc) is cls
    assert exc.code == f"AADB2C{code}"
    assert exc.correlation_id == "0f7c1d2e-aaaa-bbbb-cccc-123456789abc"
    assert exc.status == 400
    assert f"AADB2C{code}" in str(exc) and exc.correlation_id in str(exc)
    if reason is not None:
        assert isinstance(exc, PermanentError) and exc.reason == reason


def test_decision_is_on_the_code_not_on_the_error_field() -> None:
    with pytest.raises(PermanentError):
        parse_answer("password", 400, {}, b2c_error("90225", error="server_error"), now=NOW)


@pytest.mark.parametrize(
    ("status", "headers", "body", "retry_after"),
    [
        (429, {"retry-after": "7"}, b"Too many requests", 7.0),
        (429, {}, b2c_error("90229"), None),
        (400, {"retry-after": "30"}, b2c_error("90244"), 30.0),
        (503, {}, b"<html>down</html>", None),
        (500, {"retry-after": "99999"}, b"", RETRY_AFTER_CAP),
        (403, {}, b"<html>proxy says no</html>", None),
    ],
)
def test_transient_answers_keep_retry_after(
    status: int, headers: dict[str, str], body: bytes, retry_after: float | None
) -> None:
    with pytest.raises(TransientError) as info:
        parse_answer("refresh", status, headers, body, now=NOW)
    assert info.value.retry_after == retry_after


def test_retry_after_as_http_date() -> None:
    base = 1_800_000_000.0
    from email.utils import formatdate

    assert parse_retry_after(formatdate(base + 42, usegmt=True), now=base) == 42.0
    assert parse_retry_after(formatdate(base - 42, usegmt=True), now=base) == 0.0
    assert parse_retry_after(formatdate(base + 10**6, usegmt=True), now=base) == RETRY_AFTER_CAP
    assert parse_retry_after("soon", now=base) is None
    assert parse_retry_after(None, now=base) is None


def spec(**kw: object) -> TokenSetSpec:
    fields: dict[str, object] = dict(
        merchant="m1",
        scope=Scope(name="bill", uri="https://ad.anybill.de/vendor/bill"),
        username="svc-m1",
        password=Secret("pa55word"),
        client_id="client-1",
        token_url="https://idp.example/ad.anybill.de/oauth2/v2.0/token",
        policy="b2c_1_ropc_vendor",
        timeout=5.0,
        outputs=(),
        refresh=RefreshSettings(),
    )
    fields.update(kw)
    return TokenSetSpec(**fields)  # type: ignore[arg-type]


def test_requests_follow_the_protocol() -> None:
    s = spec()
    pw = password_request(s)
    assert pw.url.endswith("/token?p=b2c_1_ropc_vendor")
    assert dict(pw.form) == {
        "grant_type": "password",
        "username": "svc-m1",
        "password": "pa55word",
        "client_id": "client-1",
        "scope": "https://ad.anybill.de/vendor/bill offline_access",
        "response_type": "token",
    }
    rf = refresh_request(s, Secret("eyJrefresh"))
    assert rf.form["grant_type"] == "refresh_token"
    assert rf.form["refresh_token"] == "eyJrefresh"
    assert "password" not in rf.form
    assert "pa55word" not in repr(pw) and "eyJrefresh" not in repr(rf)


async def test_rate_limiter_spaces_requests_on_the_clock() -> None:
    import asyncio

    clock = FakeClock()
    limiter = RateLimiter(4.0, clock)
    times: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        times.append(clock.monotonic())

    tasks = [asyncio.ensure_future(one()) for _ in range(5)]
    await asyncio.sleep(0)
    await clock.advance(2.0)
    await asyncio.gather(*tasks)
    start = times[0]
    assert [round(t - start, 3) for t in times] == [0.0, 0.25, 0.5, 0.75, 1.0]


async def test_client_never_puts_secrets_in_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused to " + str(request.url))

    client = IdentityClient(
        clock=FakeClock(),
        max_concurrent=2,
        max_per_second=1000,
        transport=httpx.MockTransport(handler),
    )
    with pytest.raises(TransientError) as info:
        await client.request(password_request(spec()), timeout=1)
    assert "pa55word" not in str(info.value) and "pa55word" not in repr(info.value)
    await client.aclose()


async def test_client_counts_outcomes_through_the_observer() -> None:
    seen: list[tuple[str, str]] = []
    answers = iter(
        [
            httpx.Response(200, content=ok(expires_in="60", refresh_token="eyJr")),
            httpx.Response(400, content=b2c_error("90080")),
        ]
    )
    client = IdentityClient(
        clock=SystemClock(),
        max_concurrent=1,
        max_per_second=1000,
        transport=httpx.MockTransport(lambda r: next(answers)),
        observer=lambda g, o, d: seen.append((g, o)),
    )
    grant = await client.request(password_request(spec()), timeout=1)
    with pytest.raises(DeadGrantError):
        await client.request(refresh_request(spec(), grant.refresh_token or Secret("x")), timeout=1)
    assert seen == [("password", "success"), ("refresh", "dead_grant")]
    await client.aclose()


def observed_client(
    handler: Callable[[httpx.Request], Any],
) -> tuple[IdentityClient, list[tuple[str, str]]]:
    """A client over ``handler`` and the (grant, outcome) pairs its observer is told."""
    seen: list[tuple[str, str]] = []
    client = IdentityClient(
        clock=FakeClock(),
        max_concurrent=1,
        max_per_second=1000,
        transport=httpx.MockTransport(handler),
        observer=lambda g, o, d: seen.append((g, o)),
    )
    return client, seen


async def test_an_unexpected_error_is_not_counted_as_a_success() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug below the client")

    client, seen = observed_client(handler)
    with pytest.raises(RuntimeError):
        await client.request(password_request(spec()), timeout=1)
    assert seen == [("password", "error")]
    await client.aclose()


async def test_a_request_cancelled_on_the_wire_is_not_counted_as_a_success() -> None:
    import asyncio

    sent = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.set()
        await asyncio.Event().wait()  # no answer ever comes
        raise AssertionError("unreachable")

    client, seen = observed_client(handler)
    call = asyncio.ensure_future(client.request(password_request(spec()), timeout=1))
    await sent.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert seen == []
    await client.aclose()


async def test_a_deeply_nested_answer_is_a_transient_outcome() -> None:
    body = b"[" * DEEP + b"]" * DEEP
    client, seen = observed_client(lambda r: httpx.Response(200, content=body))
    with pytest.raises(TransientError, match="malformed answer"):
        await client.request(password_request(spec()), timeout=1)
    assert seen == [("password", "transient")]
    await client.aclose()


async def test_the_timeout_is_a_deadline_for_the_whole_answer_not_per_read() -> None:
    """A real loopback server that sends the head, then one byte of the body at a time,
    each well within the timeout: every read succeeds, the answer never ends."""
    import asyncio
    import contextlib

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{"
            )
            while not writer.transport.is_closing():
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.02)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen: list[tuple[str, str]] = []
    client = IdentityClient(
        clock=SystemClock(),
        max_concurrent=1,
        max_per_second=1000,
        observer=lambda g, o, d: seen.append((g, o)),
    )
    req = password_request(spec(token_url=f"http://127.0.0.1:{port}/ad/oauth2/v2.0/token"))
    try:
        # The outer bound only keeps a regression from hanging the suite.
        with pytest.raises(TransientError, match="timed out"):
            await asyncio.wait_for(client.request(req, timeout=0.3), 10)
        assert seen == [("password", "transient")]
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_a_throttle_with_retry_after_pauses_every_request_of_the_client() -> None:
    import asyncio

    clock = FakeClock()
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "5"}, content=b"slow down"),
            httpx.Response(200, content=ok(expires_in="60")),
        ]
    )
    client = IdentityClient(
        clock=clock,
        max_concurrent=2,
        max_per_second=1000,
        transport=httpx.MockTransport(lambda r: next(answers)),
    )
    with pytest.raises(TransientError) as info:
        await client.request(password_request(spec()), timeout=1)
    assert info.value.throttled and info.value.retry_after == 5.0
    # Another token set's request waits out the Retry-After too: it is the client IP that
    # was throttled, not one token set.
    other = asyncio.ensure_future(
        client.request(password_request(spec(merchant="m2", username="svc-m2")), timeout=1)
    )
    for _ in range(10):
        await asyncio.sleep(0)
    assert not other.done()
    assert clock.sleeping and clock.sleeping[0] == pytest.approx(5.0, abs=0.01)
    await clock.advance(5.01)
    grant = await other
    assert grant.expires_in == 60
    await client.aclose()


async def test_requests_waiting_for_a_rate_slot_also_wait_out_a_throttle() -> None:
    import asyncio

    clock = FakeClock()
    sent_at: list[float] = []
    answers = iter(
        [httpx.Response(429, headers={"Retry-After": "10"}, content=b"slow down")]
        + [httpx.Response(200, content=ok(expires_in="60"))] * 3
    )

    first_answer = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(clock.monotonic())
        if len(sent_at) == 1:
            await first_answer.wait()  # the 429 comes while the others queue for slots
        return next(answers)

    # One request per second: two more wait for their slots when the 429 arrives.
    client = IdentityClient(
        clock=clock, max_concurrent=4, max_per_second=1.0, transport=httpx.MockTransport(handler)
    )
    start = clock.monotonic()
    calls = [
        asyncio.ensure_future(client.request(password_request(spec(username=f"u{i}")), timeout=1))
        for i in range(3)
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    assert clock.sleeping == [1.0, 2.0]  # both queued in the rate limiter
    first_answer.set()
    for _ in range(20):
        await asyncio.sleep(0)
    await clock.advance(30.0)
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], TransientError)
    assert [round(t - start, 3) for t in sent_at[:1]] == [0.0]
    # Nothing else went out before the Retry-After had passed.
    assert all(t - start >= 10.0 for t in sent_at[1:]), sent_at
    assert len(sent_at) == 3
    await client.aclose()


async def test_after_stop_sending_nothing_waiting_goes_out() -> None:
    import asyncio

    from anybilld.identity import ClientClosed

    clock = FakeClock()
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(200, content=ok(expires_in="60"))

    client = IdentityClient(
        clock=clock, max_concurrent=4, max_per_second=1.0, transport=httpx.MockTransport(handler)
    )
    first = await client.request(password_request(spec()), timeout=1)
    assert first.expires_in == 60
    # The next one waits a second for its rate slot; shutdown begins meanwhile.
    waiting = asyncio.ensure_future(client.request(password_request(spec()), timeout=1))
    for _ in range(10):
        await asyncio.sleep(0)
    client.stop_sending()
    await clock.advance(5.0)
    with pytest.raises(ClientClosed):
        await waiting
    with pytest.raises(ClientClosed):
        await client.request(password_request(spec()), timeout=1)
    assert len(sent) == 1
    await client.aclose()


def test_a_retry_after_date_is_read_against_the_servers_own_date() -> None:
    from email.utils import formatdate

    base = 1_700_000_000.0
    # The server's clock is a day ahead of ours: its "two seconds from now" means 2 s.
    server_now = base + 86400
    later = formatdate(server_now + 2, usegmt=True)
    assert parse_retry_after(later, now=base, server_date=formatdate(server_now, usegmt=True)) == 2
    # ... and a day behind: still 2 s, not "already past".
    server_now = base - 86400
    later = formatdate(server_now + 2, usegmt=True)
    assert parse_retry_after(later, now=base, server_date=formatdate(server_now, usegmt=True)) == 2
    # An unreadable Date header: the local clock is all there is.
    assert parse_retry_after(formatdate(base + 5, usegmt=True), now=base, server_date="x") == 5
