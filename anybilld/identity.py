"""The token endpoint: building grant requests, reading answers, and one shared HTTP client.

The protocol half is sans-I/O: ``password_request`` / ``refresh_request`` build a
``TokenRequest`` from a token set's spec, and ``parse_answer`` turns (status, headers, body)
into a ``Grant`` or raises one of the IdentityError classes of ``errors``. Only
``IdentityClient`` touches the network: one httpx client shared by every token set, behind a
concurrency cap and a request-rate cap so that thousands of token sets never stampede the
IdP (B2C throttles one client IP at about 20 requests per second across tenants).

Classification follows how B2C answers (the tables below): the decision is made on the
``AADB2Cnnnnn`` code at the start of ``error_description``, not on ``error``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

import httpx

from .clock import Clock
from .config import TokenSetSpec
from .errors import (
    AnybilldError,
    BlockReason,
    DeadGrantError,
    ErrorContext,
    IdentityError,
    PermanentError,
    TransientError,
)
from .secret import Secret

GrantType = Literal["password", "refresh"]

# A Retry-After longer than this is not believed: a typo in a proxy must not park a token
# set for a day.
RETRY_AFTER_CAP = 3600.0
# Nobody's token answer is this large; reading more would only let garbage eat memory.
MAX_ANSWER_BYTES = 256 * 1024

_DEAD_GRANT = {"90080", "90129", "90128", "90087", "90088", "90279", "90085"}
_PERMANENT = {
    **dict.fromkeys(("90225", "90052", "90054", "90053"), BlockReason.CREDENTIALS),
    # 90114 (temporarily locked) is blocked like the permanent locks, for the whole
    # merchant, but tried again after a wait of its own (see TEMPORARY_LOCK).
    **dict.fromkeys(("90111", "90118", "90114"), BlockReason.LOCKED),
    **dict.fromkeys(("90012", "90117", "90055", "90146"), BlockReason.SCOPE),
    **dict.fromkeys(
        ("90018", "90011", "90068", "90092", "90224", "90248", "90058", "90057", "90084"),
        BlockReason.CLIENT,
    ),
    **dict.fromkeys(("90008", "90010", "90083", "90086", "90013"), BlockReason.CLIENT_BUG),
}
# The code of a temporary lock (smart lockout): the wait before the next password login
# is at least a minute and grows with each lock in a row (policy.temporary_lock_delay),
# instead of blocked_retry.
TEMPORARY_LOCK = "AADB2C90114"
_THROTTLED = {"90244", "90229"}
_UNAVAILABLE = {"90035", "90048"}

_CODE_RE = re.compile(r"^\s*AADB2C(\d{5})\b")
_CORRELATION_RE = re.compile(r"Correlation ID:\s*([0-9A-Za-z-]+)")


@dataclass(frozen=True, kw_only=True)
class TokenRequest:
    """One POST to the token endpoint. ``form`` holds secrets: never log it."""

    grant: GrantType
    url: str
    form: Mapping[str, str]

    def __repr__(self) -> str:
        return f"TokenRequest(grant={self.grant!r}, url={self.url!r})"


@dataclass(frozen=True, kw_only=True)
class Grant:
    """A successful answer; lifetimes in seconds, counted from the local time of receipt."""

    access_token: Secret
    expires_in: float
    refresh_token: Secret | None
    refresh_token_expires_in: float | None


def _endpoint(spec: TokenSetSpec) -> str:
    sep = "&" if "?" in spec.token_url else "?"
    return f"{spec.token_url}{sep}{urlencode({'p': spec.policy})}"


def password_request(spec: TokenSetSpec) -> TokenRequest:
    return TokenRequest(
        grant="password",
        url=_endpoint(spec),
        form={
            "grant_type": "password",
            "username": spec.username,
            "password": spec.password.reveal(),
            "client_id": spec.client_id,
            "scope": spec.scope_param,
            "response_type": "token",
        },
    )


def refresh_request(spec: TokenSetSpec, refresh_token: Secret) -> TokenRequest:
    return TokenRequest(
        grant="refresh",
        url=_endpoint(spec),
        form={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.reveal(),
            "client_id": spec.client_id,
            "scope": spec.scope_param,
            "response_type": "token",
        },
    )


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; be lenient about the suffix
        return None
    return when.timestamp()


def parse_retry_after(
    value: str | None, *, now: float, server_date: str | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP date), capped.

    An HTTP date is measured against the answer's own ``Date`` header when it has one, so
    that a server clock far ahead of or behind the local one (``now``) changes nothing: a
    server an hour ahead asking for two seconds means two seconds, not an hour.
    """
    if not value:
        return None
    value = value.strip()
    # ASCII only: str.isdigit() also holds for "²", which float() refuses.
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    when = _http_date(value)
    if when is None:
        return None
    sent = _http_date(server_date)
    base = sent if sent is not None else now
    return min(max(0.0, when - base), RETRY_AFTER_CAP)


# Far above anything B2C issues (access tokens live at most a day, refresh tokens at most
# 90 days), and far below what would overflow a date: a larger lifetime is garbage.
MAX_LIFETIME = 10 * 365 * 86400
_MAX_DIGITS = len(str(MAX_LIFETIME)) + 10  # room for leading zeros, far below int()'s limit


def _number(answer: Mapping[str, object], key: str, *, required: bool) -> float | None:
    """A positive integer that B2C may send as a JSON int or as a string of digits."""
    value = answer.get(key)
    if value is None:
        if required:
            raise TransientError(f"malformed answer: no {key}")
        return None
    if isinstance(value, bool):  # bool is an int subclass; true is not 86400
        raise TransientError(f"malformed answer: {key} is a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > _MAX_DIGITS:  # int() refuses a few thousand digits with ValueError
            raise TransientError(f"malformed answer: {key} is implausibly large")
        number = int(value)
    else:
        raise TransientError(f"malformed answer: {key} is not an integer")
    if number <= 0:
        raise TransientError(f"malformed answer: {key} is not positive")
    if number > MAX_LIFETIME:
        raise TransientError(f"malformed answer: {key} is implausibly large")
    return float(number)


def _token(answer: Mapping[str, object], key: str) -> Secret | None:
    value = answer.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable():
        raise TransientError(f"malformed answer: {key} is not a token string")
    if any(c.isspace() for c in value):
        raise TransientError(f"malformed answer: {key} contains white space")
    return Secret(value)


def _json(body: bytes) -> object:
    """The decoded body, or None when it is no JSON at all.

    ValueError covers invalid JSON, bytes that are no UTF-8/16/32 (UnicodeDecodeError) and
    integers of more digits than ``int()`` takes; RecursionError a nesting deeper than the
    interpreter's stack (``[[[...]]]`` 100,000 deep fits well within MAX_ANSWER_BYTES).
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def parse_answer(
    grant: GrantType, status: int, headers: Mapping[str, str], body: bytes, *, now: float
) -> Grant:
    """Turn one HTTP answer into a Grant, or raise the IdentityError class it belongs to.

    ``now`` (wall clock) is only used to read a ``Retry-After`` HTTP date. ``headers`` must
    have lower-case names. Whatever the answer holds, the only exceptions are IdentityError
    classes: an answer that cannot be read at all is a malformed answer, a TransientError.
    """
    try:
        return _classify(grant, status, headers, body, now=now)
    except IdentityError:
        raise
    except Exception as exc:
        # A malformed answer that the checks below did not foresee. It is the IdP's answer
        # that is bad, not the token set: retried as an outage, like any other garbage,
        # instead of escaping as a crash of the keeper.
        raise TransientError(
            f"malformed answer: unreadable ({type(exc).__name__})", status=status
        ) from None


def _classify(
    grant: GrantType, status: int, headers: Mapping[str, str], body: bytes, *, now: float
) -> Grant:
    answer = _json(body)
    if status == 200:
        if not isinstance(answer, dict):
            raise TransientError("malformed answer: 200 without a JSON object", status=status)
        access = _token(answer, "access_token")
        if access is None:
            raise TransientError("malformed answer: 200 without access_token", status=status)
        token_type = answer.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TransientError("malformed answer: token_type is not Bearer", status=status)
        return Grant(
            access_token=access,
            expires_in=_number(answer, "expires_in", required=True) or 0.0,
            refresh_token=_token(answer, "refresh_token"),
            refresh_token_expires_in=_number(answer, "refresh_token_expires_in", required=False),
        )

    description = answer.get("error_description") if isinstance(answer, dict) else None
    description = description if isinstance(description, str) else ""
    match = _CODE_RE.match(description)
    code = match.group(1) if match else None
    corr = _CORRELATION_RE.search(description)
    kw: ErrorContext = {
        "code": f"AADB2C{code}" if code else None,
        "correlation_id": corr.group(1) if corr else None,
        "status": status,
    }
    retry_after = parse_retry_after(
        headers.get("retry-after"), now=now, server_date=headers.get("date")
    )

    if status == 429 or code in _THROTTLED:
        raise TransientError("throttled", retry_after=retry_after, throttled=True, **kw)
    if status >= 500 or code in _UNAVAILABLE:
        raise TransientError("identity provider unavailable", retry_after=retry_after, **kw)
    if code is None:
        # No B2C code: an HTML error page, a proxy, garbage. Nothing says the grant or the
        # password is bad, so it is treated as an outage and retried.
        raise TransientError("unexpected answer without an AADB2C code", **kw)
    if code in _DEAD_GRANT:
        if grant == "refresh":
            raise DeadGrantError("refresh grant no longer usable", **kw)
        raise PermanentError("grant error on a password login", reason=BlockReason.CLIENT_BUG, **kw)
    if code in _PERMANENT:
        reason = _PERMANENT[code]
        raise PermanentError(f"rejected ({reason.value})", reason=reason, **kw)
    # An AADB2C code this table does not know. On a refresh, one password login tells more;
    # on a password login, stopping is the only choice that cannot lock an account out.
    if grant == "refresh":
        raise DeadGrantError("refresh grant rejected with an unknown code", **kw)
    raise PermanentError("rejected with an unknown code", reason=BlockReason.UNKNOWN, **kw)


class ClientClosed(AnybilldError):
    """The client sends no new request: the daemon is shutting down.

    Requests already on the wire may still land; one still waiting for a slot would only
    be cut off by the shutdown after the IdP had spent a single-use refresh token on it.
    """


class RateLimiter:
    """Spaces calls at least ``1/rate`` seconds apart on the injected clock.

    A slot is reserved before sleeping, so concurrent callers queue in order instead of
    waking together. Caveat: with no burst allowance, the first call after a quiet period
    also waits for nothing but its own slot, which is what a shared IdP limit wants.
    """

    def __init__(self, rate: float, clock: Clock) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._next = 0.0

    async def acquire(self) -> None:
        now = self._clock.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await self._clock.sleep(slot - now)


# Called once per finished request with (grant, outcome, seconds); outcome is "success",
# the kind of the IdentityError raised ("transient", "dead_grant", "permanent"), or
# UNEXPECTED for any other exception. A cancelled request is not reported.
ExchangeObserver = Callable[[GrantType, str, float], None]
UNEXPECTED = "error"


class IdentityClient:
    """The one shared HTTP client: concurrency cap, rate cap, no retries of its own.

    Retrying is the keeper's job (one retry layer); httpx's transport retries stay off.
    ``transport`` is injectable so unit tests can use ``httpx.MockTransport``.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        max_concurrent: int,
        max_per_second: float,
        ca_bundle: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: ExchangeObserver | None = None,
    ) -> None:
        self._clock = clock
        self._observer = observer
        self._slots = asyncio.Semaphore(max_concurrent)
        self._rate = RateLimiter(max_per_second, clock)
        # When the IdP says "slow down" with a Retry-After, it means this client IP, not
        # one token set: every request waits until then.
        self._paused_until = 0.0
        self._closing = False
        verify: str | bool = ca_bundle if ca_bundle else True
        self._http = httpx.AsyncClient(
            verify=verify,
            transport=transport,
            trust_env=True,  # HTTPS_PROXY / NO_PROXY are honoured, as operators expect
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=max_concurrent, max_keepalive_connections=max_concurrent
            ),
            headers={"User-Agent": "anybilld"},
        )

    def stop_sending(self) -> None:
        """From now on, requests not yet sent raise ClientClosed instead of going out."""
        self._closing = True

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, req: TokenRequest, *, timeout: float) -> Grant:
        """Send one grant request; return the grant or raise an IdentityError subclass."""
        async with self._slots:
            # Checked again after every wait: a throttle answer may arrive while this
            # request waits for its rate slot, and then it must wait the pause out too.
            while True:
                if self._closing:
                    raise ClientClosed("not sent: shutting down")
                pause = self._paused_until - self._clock.monotonic()
                if pause > 0:
                    await self._clock.sleep(pause)
                await self._rate.acquire()
                if self._closing:
                    raise ClientClosed("not sent: shutting down")
                if self._paused_until <= self._clock.monotonic():
                    break
            started = time.perf_counter()
            # None until the request has an outcome: a request cancelled (at shutdown) has
            # none and is not counted; only a returned grant counts as a success.
            outcome: str | None = None
            try:
                status, headers, body = await self._send(req, timeout)
                grant = parse_answer(req.grant, status, headers, body, now=self._clock.time())
                outcome = "success"
                return grant
            except IdentityError as exc:
                outcome = exc.kind
                if isinstance(exc, TransientError) and exc.throttled and exc.retry_after:
                    self._paused_until = max(
                        self._paused_until, self._clock.monotonic() + exc.retry_after
                    )
                raise
            except Exception:
                outcome = UNEXPECTED  # a bug, not an answer: the keeper restarts the token set
                raise
            finally:
                if self._observer is not None and outcome is not None:
                    self._observer(req.grant, outcome, time.perf_counter() - started)

    async def _send(self, req: TokenRequest, timeout: float) -> tuple[int, dict[str, str], bytes]:
        """One exchange on the wire, from connecting to the last byte of the answer.

        ``timeout`` is a deadline for all of it. httpx applies its own timeouts to each
        network operation, so an answer that trickles a byte every few seconds would never
        time out there and would hold the token set's refresh forever. The deadline runs on
        the event loop's clock, like httpx's: it bounds real network time. Waiting for a
        slot of the caps is not part of it.
        """
        try:
            async with asyncio.timeout(timeout):
                async with self._http.stream(
                    "POST",
                    req.url,
                    data=dict(req.form),
                    timeout=httpx.Timeout(timeout),
                    headers={"Accept": "application/json"},
                ) as resp:
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_ANSWER_BYTES:
                            raise TransientError("answer too large", status=resp.status_code)
                    headers = {k.lower(): v for k, v in resp.headers.items()}
                    return resp.status_code, headers, bytes(body)
        except (httpx.TimeoutException, TimeoutError):
            raise TransientError(f"timed out after {timeout:g}s") from None
        except httpx.HTTPError as exc:
            # The exception text of httpx names the URL (no secrets: the form is in the
            # body), but keep only the class: it is what an operator can act on.
            raise TransientError(f"network error ({type(exc).__name__})") from None
