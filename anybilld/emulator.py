"""An emulator of anybill's Azure AD B2C token endpoint, with a control API for tests.

It answers ``POST /<tenant>/oauth2/v2.0/token?p=<policy>`` (and the policy-in-path form
``/<tenant>/<policy>/oauth2/v2.0/token``) the way B2C does: password and refresh grants,
numbers as strings or ints, B2C-shaped errors with an ``AADB2Cnnnnn`` code first and a
``Correlation ID`` line, smart lockout after distinct wrong passwords, refresh lifetime and
sliding window, per-user revocation, single-use refresh tokens, a rate limit, and a FIFO
queue of injected faults. Its clock is wall time plus an offset the control API moves, so
tests expire grants without waiting.

Tokens look like B2C's: access and id tokens are JWTs (``eyJ...``) signed with a per-process
HMAC key and padded to the length of an RS256 signature, so ``/_emulator/introspect`` can
check them the way a resource server would without the emulator keeping them; refresh tokens
are JWE-shaped random strings mapped to a grant record. The emulator never logs, records or
lists a password or a token.

Control API (JSON in, JSON out; control errors are ``{"error": "<message>"}`` with 400/404)::

    GET    /_emulator/health      {"ok": true}
    GET    /_emulator/requests    every token request in order (optional ?since=<id>): id,
                                  at (Unix s, emulator clock), grant_type, username (of the
                                  grant for a refresh; null if unknown), client_id, scope,
                                  policy, status (null: reset, or a hang still waiting),
                                  code ("AADB2C90225" or null), fault (kind or null;
                                  "rate_limit" for the built-in rate limit)
    DELETE /_emulator/requests    clear that record
    GET    /_emulator/users       [{username, failed_attempts, locked_until, valid_from,
                                  disabled}]
    POST   /_emulator/users       {username, password, disabled?}: add, or replace (a password
                                  change by an admin: clears the lockout, keeps grants valid)
    POST   /_emulator/revoke      {username}: every grant issued so far dies (valid-from = now)
    GET    /_emulator/faults      the queue, with the remaining ``times``
    POST   /_emulator/faults      {"faults": [fault, ...]}: append to the queue
    DELETE /_emulator/faults      clear the queue
    GET    /_emulator/clock       {"now", "offset"}
    POST   /_emulator/clock       {"advance": seconds (may be negative)} -> {"now", "offset"}
    GET    /_emulator/settings    every setting except users
    POST   /_emulator/settings    partial update of the runtime settings (``RUNTIME_SETTINGS``)
    POST   /_emulator/introspect  {"access_token"} -> {active, username, scope, client_id,
                                  policy, expires_at}

A fault is ``{"kind", "times": N (default 1, null = until cleared), "match": {"grant_type",
"username"} (optional), "processed": false, "for_seconds": S (optional)}`` plus its kind's
fields; the next token request that matches takes the first matching fault of the queue.
``for_seconds`` makes an outage of a duration: the fault ends S seconds (real monotonic
time, like the rate limit) after it was queued, even with ``times`` left; GET shows the
seconds still left as ``for_seconds``. The kinds:

    throttle      429; retry_after: int seconds, an HTTP-date string, or absent;
                  or retry_after_date: N, an HTTP date N seconds after the emulator's now;
                  body: "json" (AADB2C90229, the default) or "text"
    error         a B2C error answer for any code: code ("AADB2C90035" or "90035"),
                  status (400), optional error (the OAuth error) and message
    server_error  status: any 5xx (503), with an HTML page
    html200       200 with an HTML page
    raw           exactly status (200), body (""), content_type (JSON) and repeat (1: the
                  body repeated, for huge answers without a huge control request);
                  body_base64 instead of body gives bytes that are no UTF-8
    reset         the connection is dropped without an answer
    hang          wait seconds (3600), then answer normally; emulator shutdown drops it
    trickle       answer normally, but send the body one byte every interval seconds (1)
                  after the head, so that no single read waits long; shutdown drops it

With ``"processed": true`` the request is first handled normally (a single-use refresh token
is spent, a wrong password counted) and the fault replaces the answer: a lost answer.
Without it a faulted request changes no state (``hang`` and ``trickle`` are always
processed: they delay the real answer). Faults and the rate limit apply to the token
endpoint only, never to the control API.

Lockout: each user counts distinct wrong passwords; at ``lockout_threshold`` the user is
locked for ``lockout_duration`` (90114 even with the right password). A successful sign-in
and the end of a lock reset the count; B2C's growing lock durations are not emulated.

Caveats: state lives in memory only. Lifetimes are fixed into a grant when it is issued,
like claims in a real token, so a settings change applies to later grants. The rate limit
runs on real monotonic time, not on the movable clock. Introspection checks signature and
expiry only, as a resource server would: revoking a user does not deactivate access tokens
already issued. Unknown or missing policies answer AADB2C90022, a choice (B2C's real answer
there is unconfirmed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import email.utils
import hashlib
import hmac
import itertools
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ConfigProblem
from .httpserver import AbortConnection, Request, Response, serve
from .httpserver import Server as HTTPServer
from .secret import Secret

__all__ = [
    "RUNTIME_SETTINGS",
    "Emulator",
    "EmulatorSettings",
    "EmulatorUser",
    "emulator_main",
    "load_emulator_settings",
    "start_emulator",
]

DEFAULT_LISTEN = "127.0.0.1:8642"
VENDOR_SCOPE_BASE = "https://ad.anybill.de/vendor/"
RESOURCE_SCOPES = frozenset(
    VENDOR_SCOPE_BASE + name for name in ("bill", "category", "customer", "store", "user")
)
OFFLINE_ACCESS = "offline_access"
OPENID = "openid"
JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"

# Expired and spent grants are dropped once the table has doubled since the last sweep, so
# a long benchmark does not keep every refresh token ever issued. A dropped token answers
# AADB2C90087 (unknown) instead of 90080 / 90129: still a dead grant. The floor keeps the
# sweep out of test-sized runs, where the exact code matters.
_SWEEP_FLOOR = 50_000


@dataclass(frozen=True, kw_only=True)
class EmulatorUser:
    username: str
    password: Secret
    disabled: bool = False


@dataclass(frozen=True, kw_only=True)
class EmulatorSettings:
    """Everything the emulator is configured with; ``repr`` masks the passwords.

    ``other_policies`` / ``other_client_ids`` are further policies and clients the tenant
    knows: grants work there too, and a grant presented to the wrong one answers
    AADB2C90088 / AADB2C90279 (without them only the unknown-policy/client errors occur).
    """

    client_id: str = "anybilld-demo-client"
    tenant: str = "ad.anybill.de"
    policy: str = "b2c_1_ropc_vendor"
    other_policies: tuple[str, ...] = ()
    other_client_ids: tuple[str, ...] = ()
    access_token_lifetime: int = 86_400
    refresh_token_lifetime: int = 1_209_600
    sliding_window: int | None = 7_776_000  # None: no sliding window
    numbers_as_strings: bool = True
    minimal_password_answer: bool = False  # password grant: only anybill's four fields
    single_use_refresh_tokens: bool = False
    lockout_threshold: int = 10
    lockout_duration: int = 60
    rate_limit_per_second: float | None = None
    request_log_limit: int = 100_000  # oldest request records are dropped beyond this
    users: tuple[EmulatorUser, ...] = ()

    def token_path(self) -> str:
        return f"/{self.tenant}/oauth2/v2.0/token?p={self.policy}"


# --- setting validation, shared by the YAML loader and POST /_emulator/settings -------------


def _str(v: object) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v


def _str_tuple(v: object) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValueError("must be a list of strings")
    return tuple(_str(x) for x in v)


def _positive_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError("must be a positive integer (seconds or a count)")
    return v


def _optional_positive_int(v: object) -> int | None:
    return None if v is None else _positive_int(v)


def _optional_rate(v: object) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError("must be a positive number or null (no limit)")
    return float(v)


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


_SETTING_CHECKS: dict[str, Callable[[object], object]] = {
    "client_id": _str,
    "tenant": _str,
    "policy": _str,
    "other_policies": _str_tuple,
    "other_client_ids": _str_tuple,
    "access_token_lifetime": _positive_int,
    "refresh_token_lifetime": _positive_int,
    "sliding_window": _optional_positive_int,
    "numbers_as_strings": _bool,
    "minimal_password_answer": _bool,
    "single_use_refresh_tokens": _bool,
    "lockout_threshold": _positive_int,
    "lockout_duration": _positive_int,
    "rate_limit_per_second": _optional_rate,
    "request_log_limit": _positive_int,
}

#: What ``POST /_emulator/settings`` may change while running.
RUNTIME_SETTINGS = frozenset(
    {
        "access_token_lifetime",
        "refresh_token_lifetime",
        "sliding_window",
        "numbers_as_strings",
        "minimal_password_answer",
        "single_use_refresh_tokens",
        "lockout_threshold",
        "lockout_duration",
        "rate_limit_per_second",
    }
)


def _settings_view(s: EmulatorSettings) -> dict[str, object]:
    return {
        name: list(v) if isinstance(v := getattr(s, name), tuple) else v for name in _SETTING_CHECKS
    }


# --- B2C errors -----------------------------------------------------------------------------

# code -> (OAuth error, message). Wording paraphrases B2C's; clients must decide on the
# code only, so the text just has to read like B2C's.
_B2C_CODES: dict[str, tuple[str, str]] = {
    "AADB2C90008": ("invalid_request", "The request does not contain a client id parameter."),
    "AADB2C90010": ("invalid_request", "The request does not contain a scope parameter."),
    "AADB2C90011": ("invalid_request", "The client id does not match the one in the policy."),
    "AADB2C90012": ("invalid_scope", "The scope provided in the request is not supported."),
    "AADB2C90013": ("unsupported_response_type", "The requested response type is not supported."),
    "AADB2C90018": ("unauthorized_client", "The client id is not registered in the tenant."),
    "AADB2C90022": ("invalid_request", "The policy does not exist in the tenant."),
    "AADB2C90035": ("server_error", "The service is temporarily unavailable. Please retry."),
    "AADB2C90048": ("server_error", "An unhandled exception has occurred on the server."),
    "AADB2C90052": ("access_denied", "Invalid username or password."),
    "AADB2C90053": ("access_denied", "A user with the specified credential could not be found."),
    "AADB2C90054": ("access_denied", "Invalid username or password."),
    "AADB2C90055": ("invalid_scope", "The scope provided in the request must name a resource."),
    "AADB2C90057": ("unauthorized_client", "The application is not configured for this flow."),
    "AADB2C90058": ("unauthorized_client", "The application does not allow public clients."),
    "AADB2C90068": ("unauthorized_client", "The application is not valid for this service."),
    "AADB2C90080": ("invalid_grant", "The provided grant has expired. Please re-authenticate."),
    "AADB2C90083": ("invalid_request", "The request is missing a required parameter."),
    "AADB2C90084": ("invalid_request", "Public clients must not send a client_secret."),
    "AADB2C90085": ("invalid_grant", "The service has encountered an internal error."),
    "AADB2C90086": ("unsupported_grant_type", "The supplied grant_type is not supported."),
    "AADB2C90087": ("invalid_grant", "The provided grant is not valid."),
    "AADB2C90088": ("invalid_grant", "The provided grant has not been issued for this endpoint."),
    "AADB2C90092": ("unauthorized_client", "The application is not configured correctly."),
    "AADB2C90111": ("access_denied", "Your account has been locked. Contact your support."),
    "AADB2C90114": ("access_denied", "Your account is temporarily locked. Try again later."),
    "AADB2C90117": ("invalid_scope", "The scope provided in the request is not supported."),
    "AADB2C90118": ("access_denied", "The user has forgotten their password."),
    "AADB2C90128": ("invalid_grant", "The account associated with the grant no longer exists."),
    "AADB2C90129": ("invalid_grant", "The provided grant has been revoked. Please sign in."),
    "AADB2C90146": ("invalid_scope", "The scope names more than one resource."),
    "AADB2C90224": ("unauthorized_client", "Resource owner flow is not enabled for the app."),
    "AADB2C90225": (
        "access_denied",
        "The username or password provided in the request are invalid.",
    ),
    "AADB2C90229": ("temporarily_unavailable", "Too many requests. Please wait and try again."),
    "AADB2C90244": ("temporarily_unavailable", "There are too many requests at this moment."),
    "AADB2C90248": ("unauthorized_client", "The application cannot use this grant."),
    "AADB2C90279": ("invalid_grant", "The provided grant has not been issued for this client."),
}


class _B2CError(Exception):
    """Raised inside the token logic; ``handle`` turns it into one B2C error answer."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


def _normalize_code(code: str) -> str:
    code = code.strip().upper()
    if code.isdigit():
        code = "AADB2C" + code
    if not (code.startswith("AADB2C") and code[6:].isdigit() and len(code) > 6):
        raise ValueError(f"not an AADB2C code: {code!r}")
    return code


def _timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_SIG_PAD = 256 - 32  # an RS256 signature's length minus the HMAC-SHA256 in front
_JWT_HEADER = _b64(b'{"typ":"JWT","alg":"RS256","kid":"anybilld-emulator"}')
# B2C refresh tokens are compact JWEs with an empty encrypted-key part: header..iv.ct.tag.
_JWE_HEADER = _b64(b'{"kid":"anybilld_emulator_rt","ver":"1.0","zip":"Deflate","ser":"1.0"}')
_HTML_ERROR = (
    "<!DOCTYPE html><html><head><title>Service unavailable</title></head><body><h1>{status}"
    "</h1><p>The service is unavailable. Please try again later.</p></body></html>"
)
_HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>Sign in</title></head><body><h1>Something went wrong"
    "</h1><p>We can't sign you in right now. Please try again later.</p></body></html>"
)


# --- state ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _User:
    username: str
    password: Secret
    disabled: bool
    wrong: set[bytes] = field(default_factory=set)  # digests of distinct wrong passwords
    locked_until: float | None = None
    valid_from: float | None = None  # grants issued before this are revoked
    sub: str = field(init=False)  # the object id B2C puts into ``sub``; stable per name

    def __post_init__(self) -> None:
        self.sub = str(
            uuid.uuid5(uuid.NAMESPACE_URL, "anybilld-emulator:" + self.username.casefold())
        )


@dataclass(slots=True)
class _Grant:
    user_key: str  # casefolded username
    username: str
    client_id: str
    policy: str  # lower-cased: B2C matches policy names case-insensitively
    scope: str
    first_sign_in: float
    issued_at: float
    expires_at: float
    window_ends_at: float | None
    used: bool = False


_FAULT_KINDS = frozenset(
    {"throttle", "error", "server_error", "html200", "raw", "reset", "hang", "trickle"}
)
_FAULT_FIELDS: dict[str, frozenset[str]] = {
    "throttle": frozenset({"retry_after", "retry_after_date", "body"}),
    "error": frozenset({"code", "status", "error", "message"}),
    "server_error": frozenset({"status"}),
    "html200": frozenset(),
    "raw": frozenset({"status", "body", "body_base64", "content_type", "repeat"}),
    "reset": frozenset(),
    "hang": frozenset({"seconds"}),
    "trickle": frozenset({"interval"}),
}
_FAULT_COMMON = frozenset({"kind", "times", "match", "processed", "for_seconds"})


@dataclass(slots=True, kw_only=True)
class _Fault:
    kind: str
    times: int | None
    match_grant_type: str | None
    match_username: str | None  # casefolded
    processed: bool
    spec: dict[str, Any]  # the validated fault as posted, for GET and the answer's fields
    for_seconds: float | None = None
    until: float | None = None  # monotonic end of a for_seconds fault, set when queued

    def view(self, now: float) -> dict[str, Any]:
        view = {**self.spec, "times": self.times}
        if self.until is not None:
            view["for_seconds"] = round(max(0.0, self.until - now), 3)
        return view


def _parse_fault(raw: object) -> _Fault:
    if not isinstance(raw, dict):
        raise ValueError("a fault must be an object")
    kind = raw.get("kind")
    if kind not in _FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {sorted(_FAULT_KINDS)}")
    unknown = set(raw) - _FAULT_COMMON - _FAULT_FIELDS[kind]
    if unknown:
        raise ValueError(f"unknown fields for a {kind} fault: {sorted(unknown)}")
    times = raw.get("times", 1)
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        raise ValueError("times must be a positive integer or null")
    match = raw.get("match") or {}
    if not isinstance(match, dict) or set(match) - {"grant_type", "username"}:
        raise ValueError("match may only hold grant_type and username")
    for key in ("grant_type", "username"):
        if key in match and not isinstance(match[key], str):
            raise ValueError(f"match.{key} must be a string")
    processed = raw.get("processed", False)
    if not isinstance(processed, bool):
        raise ValueError("processed must be true or false")
    for_seconds = raw.get("for_seconds")
    if for_seconds is not None and (
        isinstance(for_seconds, bool)
        or not isinstance(for_seconds, int | float)
        or for_seconds <= 0
    ):
        raise ValueError("for_seconds must be a positive number or absent")
    spec: dict[str, Any] = dict(raw)
    if kind == "throttle":
        ra = raw.get("retry_after")
        if ra is not None and (isinstance(ra, bool) or not isinstance(ra, int | str)):
            raise ValueError("retry_after must be integer seconds or an HTTP-date string")
        rad = raw.get("retry_after_date")
        if rad is not None and (isinstance(rad, bool) or not isinstance(rad, int) or rad < 0):
            raise ValueError("retry_after_date must be integer seconds from the emulator's now")
        if ra is not None and rad is not None:
            raise ValueError("give retry_after or retry_after_date, not both")
        if raw.get("body", "json") not in ("json", "text"):
            raise ValueError('throttle body must be "json" or "text"')
    elif kind == "error":
        if not isinstance(raw.get("code"), str):
            raise ValueError('an error fault needs a code such as "AADB2C90035"')
        spec["code"] = _normalize_code(raw["code"])
        _check_status(raw.get("status", 400))
        for key in ("error", "message"):
            if key in raw and not isinstance(raw[key], str):
                raise ValueError(f"{key} must be a string")
    elif kind == "server_error":
        status = _check_status(raw.get("status", 503))
        if status < 500:
            raise ValueError("a server_error status must be 5xx")
    elif kind == "raw":
        _check_status(raw.get("status", 200))
        if not isinstance(raw.get("body", ""), str):
            raise ValueError("body must be a string")
        if "body_base64" in raw:
            if "body" in raw:
                raise ValueError("give body or body_base64, not both")
            _raw_body(raw)  # refused here, not at the answer
        if not isinstance(raw.get("content_type", JSON_TYPE), str):
            raise ValueError("content_type must be a string")
        repeat = raw.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError("repeat must be a positive integer")
    elif kind == "hang":
        seconds = raw.get("seconds", 3600)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError("seconds must be a non-negative number")
    elif kind == "trickle":
        interval = raw.get("interval", 1.0)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ValueError("interval must be a positive number")
    username = match.get("username")
    return _Fault(
        kind=kind,
        times=times,
        match_grant_type=match.get("grant_type"),
        match_username=username.casefold() if isinstance(username, str) else None,
        processed=processed,
        spec=spec,
        for_seconds=None if for_seconds is None else float(for_seconds),
    )


def _raw_body(spec: dict[str, Any]) -> bytes:
    """The bytes a raw fault answers with, once (before ``repeat``)."""
    if "body_base64" not in spec:
        return str(spec.get("body", "")).encode()
    encoded = spec["body_base64"]
    if not isinstance(encoded, str):
        raise ValueError("body_base64 must be a string")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("body_base64 is not base64") from None


def _check_status(status: object) -> int:
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    return status


class _ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- the emulator ---------------------------------------------------------------------------


class Emulator:
    """The token endpoint and control API as one ``httpserver`` handler, state in memory.

    ``wall`` and ``monotonic`` are injectable; the emulator clock is ``wall() + offset``.
    Caveat: a ``hang`` fault holds its connection until it ends or ``close()`` drops it; a
    ``trickle`` fault until its answer is sent or the server closes.
    """

    def __init__(
        self,
        settings: EmulatorSettings,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._offset = 0.0
        self._key = os.urandom(32)  # signs access tokens; dies with the process
        prefix = uuid.uuid4().hex
        self._request_id_prefix = f"{prefix[:8]}-{prefix[8:12]}-{prefix[12:16]}-{prefix[16:20]}-"
        self._request_ids = itertools.count(1)
        self._users: dict[str, _User] = {}
        for u in settings.users:
            self._users[u.username.casefold()] = _User(u.username, u.password, u.disabled)
        self._grants: dict[str, _Grant] = {}
        self._grants_after_sweep = 0
        self._faults: list[_Fault] = []
        self._records: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=settings.request_log_limit
        )
        self._next_id = 1
        self._closing = asyncio.Event()
        self._http: HTTPServer | None = None  # set by start_emulator
        self._apply(settings)

    def _apply(self, settings: EmulatorSettings) -> None:
        self._settings = settings
        self._policies = {p.lower() for p in (settings.policy, *settings.other_policies)}
        self._clients = {settings.client_id, *settings.other_client_ids}
        self._tenant = settings.tenant.lower()
        # A changed rate starts with a full bucket.
        self._bucket = max(1.0, settings.rate_limit_per_second or 0.0)
        self._bucket_at = self._monotonic()

    @property
    def settings(self) -> EmulatorSettings:
        """The current settings (runtime changes included); users as configured at start."""
        return self._settings

    def now(self) -> float:
        """The emulator clock: wall time plus the offset the control API moves."""
        return self._wall() + self._offset

    def close(self) -> None:
        """Drop every hanging request (as resets), so a server can shut down promptly."""
        self._closing.set()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop what ``start_emulator`` started: hanging requests, the listener and every
        open keep-alive connection, waiting at most ``timeout`` seconds."""
        self.close()
        if self._http is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._http.close(), timeout)

    async def handle(self, request: Request) -> Response:
        if request.path.startswith("/_emulator/"):
            try:
                status, body = self._control(request)
            except _ControlError as e:
                status, body = e.status, {"error": str(e)}
            return Response(status=status, body=json.dumps(body).encode(), content_type=JSON_TYPE)
        path_policy = self._token_path_policy(request.path)
        if path_policy is None:
            return Response.text(404, "not found\n")
        if request.method != "POST":
            return Response(status=405, headers=[("Allow", "POST")])
        return await self._token_request(request, path_policy or request.query.get("p"))

    def _token_path_policy(self, path: str) -> str | None:
        """None: not the token path; "": the path form without a policy; else the policy."""
        parts = path.strip("/").split("/")
        if len(parts) not in (4, 5) or [p.lower() for p in parts[-3:]] != [
            "oauth2",
            "v2.0",
            "token",
        ]:
            return None
        if parts[0].lower() != self._tenant:
            return None
        return parts[1] if len(parts) == 5 else ""

    # --- the token endpoint -----------------------------------------------------------------

    async def _token_request(self, request: Request, policy: str | None) -> Response:
        form = request.form()
        now = self.now()
        grant_type = form.get("grant_type")
        grant = None
        if grant_type == "refresh_token":
            grant = self._grants.get(form.get("refresh_token", ""))
            username = grant.username if grant else None
        else:
            username = form.get("username")
        record: dict[str, Any] = {
            "id": self._next_id,
            "at": round(now, 3),
            "grant_type": grant_type,
            "username": username,
            "client_id": form.get("client_id"),
            "scope": form.get("scope"),
            "policy": policy,
            "status": None,
            "code": None,
            "fault": None,
        }
        self._next_id += 1
        self._records.append(record)

        if self._rate_limited():
            record["fault"] = "rate_limit"
            record["code"] = "AADB2C90229"
            record["status"] = 429
            return self._error_response("AADB2C90229", None, now, 429, [("Retry-After", "1")])

        fault = self._take_fault(grant_type, username)
        if fault is not None:
            record["fault"] = fault.kind
            if fault.kind == "hang":
                await self._hang(float(fault.spec.get("seconds", 3600)))
                now = self.now()
            elif fault.kind != "trickle" and not fault.processed:
                return self._fault_response(fault, record, now)

        try:
            response = self._grant(form, policy, grant_type, grant, now)
            record["status"] = 200
        except _B2CError as e:
            record["status"] = 400
            record["code"] = e.code
            response = self._error_response(e.code, e.message, now)
        if fault is not None and fault.kind == "trickle":
            response.trickle = float(fault.spec.get("interval", 1.0))
        elif fault is not None and fault.processed and fault.kind != "hang":
            record["status"] = record["code"] = None
            return self._fault_response(fault, record, now)
        return response

    def _rate_limited(self) -> bool:
        rate = self._settings.rate_limit_per_second
        if rate is None:
            return False
        t = self._monotonic()
        self._bucket = min(max(1.0, rate), self._bucket + (t - self._bucket_at) * rate)
        self._bucket_at = t
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            return False
        return True

    def _take_fault(self, grant_type: str | None, username: str | None) -> _Fault | None:
        if not self._faults:
            return None
        folded = username.casefold() if username is not None else None
        t = self._monotonic()
        self._faults = [f for f in self._faults if f.until is None or f.until > t]
        for i, f in enumerate(self._faults):
            if f.match_grant_type is not None and f.match_grant_type != grant_type:
                continue
            if f.match_username is not None and f.match_username != folded:
                continue
            if f.times is not None:
                f.times -= 1
                if f.times == 0:
                    del self._faults[i]
            return f
        return None

    async def _hang(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return
        raise AbortConnection()

    def _fault_response(self, fault: _Fault, record: dict[str, Any], now: float) -> Response:
        spec = fault.spec
        kind = fault.kind
        if kind == "reset":
            raise AbortConnection()
        headers = self._headers()
        if kind == "throttle":
            ra = spec.get("retry_after")
            if spec.get("retry_after_date") is not None:
                ra = email.utils.formatdate(now + int(spec["retry_after_date"]), usegmt=True)
            extra = [] if ra is None else [("Retry-After", str(ra))]
            record["status"] = 429
            if spec.get("body", "json") == "json":
                record["code"] = "AADB2C90229"
                return self._error_response("AADB2C90229", None, now, 429, extra)
            return Response(
                status=429,
                body=b"Too many requests. Please try again later.",
                content_type="text/plain; charset=utf-8",
                headers=headers + extra,
            )
        if kind == "error":
            status = int(spec.get("status", 400))
            record["status"] = status
            record["code"] = spec["code"]
            return self._error_response(
                spec["code"], spec.get("message"), now, status, error=spec.get("error")
            )
        if kind == "server_error":
            status = int(spec.get("status", 503))
            record["status"] = status
            body = _HTML_ERROR.format(status=status).encode()
            return Response(status=status, body=body, content_type=HTML_TYPE, headers=headers)
        if kind == "html200":
            record["status"] = 200
            return Response(
                status=200, body=_HTML_PAGE.encode(), content_type=HTML_TYPE, headers=headers
            )
        # raw
        status = int(spec.get("status", 200))
        record["status"] = status
        body = _raw_body(spec) * int(spec.get("repeat", 1))
        ctype = str(spec.get("content_type", JSON_TYPE))
        return Response(status=status, body=body, content_type=ctype, headers=headers)

    def _headers(self) -> list[tuple[str, str]]:
        # uuid-shaped and unique without a uuid4 per answer: a random prefix and a counter.
        request_id = f"{self._request_id_prefix}{next(self._request_ids):012x}"
        # Date on the emulator clock, as every origin server with a clock sends it (RFC 9110
        # 6.6.1): with a moved clock, the answers show the server's time, skew and all.
        date = email.utils.formatdate(self.now(), usegmt=True)
        return [
            ("Cache-Control", "private"),
            ("x-ms-gateway-requestid", request_id),
            ("Date", date),
        ]

    def _error_response(
        self,
        code: str,
        message: str | None,
        now: float,
        status: int = 400,
        extra_headers: Iterable[tuple[str, str]] = (),
        *,
        error: str | None = None,
    ) -> Response:
        oauth_error, default_message = _B2C_CODES.get(
            code, ("invalid_request", "The request could not be completed.")
        )
        description = (
            f"{code}: {message or default_message}\r\n"
            f"Correlation ID: {uuid.uuid4()}\r\n"
            f"Timestamp: {_timestamp(now)}\r\n"
        )
        body = json.dumps({"error": error or oauth_error, "error_description": description})
        return Response(
            status=status,
            body=body.encode(),
            content_type=JSON_TYPE,
            headers=[*self._headers(), *extra_headers],
        )

    def _grant(
        self,
        form: dict[str, str],
        policy: str | None,
        grant_type: str | None,
        grant: _Grant | None,
        now: float,
    ) -> Response:
        """Validate like B2C and answer a grant; raise _B2CError with the code otherwise."""
        s = self._settings
        if not policy:
            raise _B2CError("AADB2C90022", "The request does not name a policy.")
        if policy.lower() not in self._policies:
            raise _B2CError(
                "AADB2C90022", f"The policy '{policy}' does not exist in tenant '{s.tenant}'."
            )
        client_id = form.get("client_id")
        if not client_id:
            raise _B2CError("AADB2C90008")
        if client_id not in self._clients:
            raise _B2CError(
                "AADB2C90018",
                f"The client id '{client_id}' is not registered in tenant '{s.tenant}'.",
            )
        if not grant_type:
            raise _B2CError("AADB2C90083", "The request is missing required parameter: grant_type.")
        if grant_type not in ("password", "refresh_token"):
            raise _B2CError(
                "AADB2C90086", f"The supplied grant_type [{grant_type}] is not supported."
            )
        scopes = form.get("scope", "").split()
        if not scopes:
            raise _B2CError("AADB2C90010")
        for sc in scopes:
            if sc not in RESOURCE_SCOPES and sc not in (OFFLINE_ACCESS, OPENID):
                raise _B2CError(
                    "AADB2C90117", f"The scope '{sc}' provided in request is not supported."
                )
        if not any(sc in RESOURCE_SCOPES for sc in scopes):
            raise _B2CError("AADB2C90055", "The scope must name an anybill resource.")
        for rt in form.get("response_type", "token").split():
            if rt not in ("token", "id_token"):
                raise _B2CError("AADB2C90013", f"The response type '{rt}' is not supported.")

        if grant_type == "password":
            user = self._check_password(form, now)
            first_sign_in = now
            window_ends_at = None if s.sliding_window is None else now + s.sliding_window
        else:
            user, grant = self._check_refresh(form, policy, client_id, grant, now)
            # The new refresh token inherits the first sign-in: that is the sliding window.
            first_sign_in = grant.first_sign_in
            window_ends_at = grant.window_ends_at
        body = self._issue(
            user=user,
            client_id=client_id,
            policy=policy.lower(),
            scopes=scopes,
            scope=form.get("scope", ""),
            first_sign_in=first_sign_in,
            window_ends_at=window_ends_at,
            now=now,
            minimal=grant_type == "password" and s.minimal_password_answer,
        )
        return Response(
            status=200,
            body=json.dumps(body, separators=(",", ":")).encode(),
            content_type=JSON_TYPE,
            headers=self._headers(),
        )

    def _check_password(self, form: dict[str, str], now: float) -> _User:
        s = self._settings
        username = form.get("username")
        password = form.get("password")
        if not username:
            raise _B2CError("AADB2C90083", "The request is missing required parameter: username.")
        if password is None:
            raise _B2CError("AADB2C90083", "The request is missing required parameter: password.")
        user = self._users.get(username.casefold())
        if user is None:
            raise _B2CError("AADB2C90225")
        self._expire_lock(user, now)
        if user.locked_until is not None:
            raise _B2CError("AADB2C90114")
        if not hmac.compare_digest(password.encode(), user.password.reveal().encode()):
            # Smart lockout counts distinct wrong passwords: a client that repeats one stale
            # password is not an attacker guessing. A digest, so no password stays in memory.
            user.wrong.add(hashlib.sha256(password.encode()).digest())
            if len(user.wrong) >= s.lockout_threshold:
                user.locked_until = now + s.lockout_duration
            raise _B2CError("AADB2C90225")
        if user.disabled:
            raise _B2CError("AADB2C90111")
        user.wrong.clear()
        return user

    @staticmethod
    def _expire_lock(user: _User, now: float) -> None:
        # A lock that has run out starts a fresh count (B2C would lock for longer next time;
        # the emulator keeps one fixed duration).
        if user.locked_until is not None and now >= user.locked_until:
            user.locked_until = None
            user.wrong.clear()

    def _check_refresh(
        self,
        form: dict[str, str],
        policy: str,
        client_id: str,
        grant: _Grant | None,
        now: float,
    ) -> tuple[_User, _Grant]:
        if not form.get("refresh_token"):
            raise _B2CError(
                "AADB2C90083", "The request is missing required parameter: refresh_token."
            )
        if grant is None:
            raise _B2CError("AADB2C90087")
        if grant.used:
            raise _B2CError("AADB2C90129", "The provided grant has already been redeemed.")
        if grant.policy != policy.lower():
            raise _B2CError(
                "AADB2C90088",
                "The provided grant has not been issued for this endpoint. "
                f"Actual Value : {policy.lower()} and Expected Value : {grant.policy}",
            )
        if grant.client_id != client_id:
            raise _B2CError("AADB2C90279")
        window = grant.window_ends_at
        if now >= grant.expires_at or (window is not None and now >= window):
            times = (
                f"Current time: {int(now)}, Grant issued time: {int(grant.issued_at)}, "
                f"Grant expiration time: {int(grant.expires_at)}"
            )
            if window is not None:
                times += f", Grant sliding window expiration time: {int(window)}"
            raise _B2CError(
                "AADB2C90080",
                f"The provided grant has expired. Please re-authenticate and try again. {times}",
            )
        user = self._users.get(grant.user_key)
        if user is None or (user.valid_from is not None and grant.issued_at < user.valid_from):
            raise _B2CError("AADB2C90129")
        if user.disabled:
            raise _B2CError("AADB2C90111")
        if self._settings.single_use_refresh_tokens:
            grant.used = True
        return user, grant

    def _issue(
        self,
        *,
        user: _User,
        client_id: str,
        policy: str,
        scopes: list[str],
        scope: str,
        first_sign_in: float,
        window_ends_at: float | None,
        now: float,
        minimal: bool,
    ) -> dict[str, object]:
        s = self._settings
        iat = int(now)
        exp = iat + s.access_token_lifetime
        claims = {
            "iss": f"https://emulator.invalid/{s.tenant}/v2.0/",
            "exp": exp,
            "nbf": iat,
            "iat": iat,
            "aud": VENDOR_SCOPE_BASE.rstrip("/"),
            "sub": user.sub,
            "name": user.username,
            "tfp": policy,
            "scp": " ".join(sc.rsplit("/", 1)[1] for sc in scopes if sc in RESOURCE_SCOPES),
            "azp": client_id,
            "ver": "1.0",
        }
        num: Callable[[int], object] = str if s.numbers_as_strings else int
        # One urandom call per answer: the signature tail, then the refresh token's parts.
        rnd = os.urandom(_SIG_PAD + 12 + 300 + 16)
        body: dict[str, object] = {
            "access_token": self._jwt(claims, rnd[:_SIG_PAD]),
            "token_type": "Bearer",
        }
        if not minimal:
            body["not_before"] = num(iat)
        body["expires_in"] = num(s.access_token_lifetime)
        if not minimal:
            body["expires_on"] = num(exp)
        if OPENID in scopes and not minimal:
            id_claims = {k: claims[k] for k in ("iss", "exp", "nbf", "iat", "sub", "name", "tfp")}
            id_claims.update(aud=client_id, ver="1.0")
            body["id_token"] = self._jwt(id_claims, os.urandom(_SIG_PAD))
            body["id_token_expires_in"] = num(s.access_token_lifetime)
        if OFFLINE_ACCESS in scopes:
            token = ".".join(
                (
                    _JWE_HEADER,
                    "",
                    _b64(rnd[_SIG_PAD : _SIG_PAD + 12]),
                    _b64(rnd[_SIG_PAD + 12 : _SIG_PAD + 312]),
                    _b64(rnd[_SIG_PAD + 312 :]),
                )
            )
            self._grants[token] = _Grant(
                user_key=user.username.casefold(),
                username=user.username,
                client_id=client_id,
                policy=policy,
                scope=scope,
                first_sign_in=first_sign_in,
                issued_at=now,
                expires_at=now + s.refresh_token_lifetime,
                window_ends_at=window_ends_at,
            )
            self._maybe_sweep(now)
            body["refresh_token"] = token
            if not minimal:
                body["refresh_token_expires_in"] = num(s.refresh_token_lifetime)
        return body

    def _jwt(self, claims: dict[str, object], pad: bytes) -> str:
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{_JWT_HEADER}.{payload}"
        mac = hmac.digest(self._key, signing_input.encode(), "sha256")
        # Padded with random bytes to the 256 bytes of an RS256 signature: sizes match real
        # tokens, and two tokens issued in the same second still differ.
        return f"{signing_input}.{_b64(mac + pad)}"

    def _maybe_sweep(self, now: float) -> None:
        if len(self._grants) < max(_SWEEP_FLOOR, 2 * self._grants_after_sweep):
            return
        self._grants = {
            t: g
            for t, g in self._grants.items()
            if not g.used
            and now < g.expires_at
            and (g.window_ends_at is None or now < g.window_ends_at)
        }
        self._grants_after_sweep = len(self._grants)

    # --- introspection ----------------------------------------------------------------------

    def introspect(self, token: str) -> dict[str, object]:
        """What a resource server would conclude from ``token``; never raises on garbage."""
        inactive: dict[str, object] = {
            "active": False,
            "username": None,
            "scope": None,
            "client_id": None,
            "policy": None,
            "expires_at": None,
        }
        parts = token.split(".")
        if len(parts) != 3:
            return inactive
        try:
            signature = _unb64(parts[2])
            expected = hmac.digest(self._key, f"{parts[0]}.{parts[1]}".encode(), "sha256")
            if len(signature) < 32 or not hmac.compare_digest(signature[:32], expected):
                return inactive
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, binascii.Error):
            return inactive
        if not isinstance(claims, dict) or "scp" not in claims:
            return inactive  # an id token, not an access token
        return {
            "active": self.now() < claims["exp"],
            "username": claims["name"],
            "scope": " ".join(VENDOR_SCOPE_BASE + sc for sc in str(claims["scp"]).split()),
            "client_id": claims["azp"],
            "policy": claims["tfp"],
            "expires_at": claims["exp"],
        }

    # --- control API ------------------------------------------------------------------------

    def _control(self, request: Request) -> tuple[int, object]:
        route = (request.method, request.path.rstrip("/"))
        now = self.now()
        match route:
            case ("GET", "/_emulator/health"):
                return 200, {"ok": True}
            case ("GET", "/_emulator/requests"):
                since = request.query.get("since")
                if since is None:
                    return 200, list(self._records)
                try:
                    after = int(since)
                except ValueError:
                    raise _ControlError(400, "since must be a request id") from None
                return 200, [r for r in self._records if r["id"] > after]
            case ("DELETE", "/_emulator/requests"):
                self._records.clear()
                return 200, {"ok": True}
            case ("GET", "/_emulator/users"):
                return 200, [self._user_view(u, now) for u in self._users.values()]
            case ("POST", "/_emulator/users"):
                return 200, self._post_user(_json_object(request))
            case ("POST", "/_emulator/revoke"):
                name = _json_object(request).get("username")
                user = self._users.get(name.casefold()) if isinstance(name, str) else None
                if user is None:
                    raise _ControlError(404, "no such user")
                user.valid_from = now
                return 200, self._user_view(user, now)
            case ("GET", "/_emulator/faults"):
                return 200, self._faults_view()
            case ("POST", "/_emulator/faults"):
                raw = _json_object(request).get("faults")
                if not isinstance(raw, list):
                    raise _ControlError(400, 'expected {"faults": [...]}')
                try:
                    parsed = [_parse_fault(f) for f in raw]
                except ValueError as e:
                    raise _ControlError(400, str(e)) from None
                t = self._monotonic()
                for f in parsed:
                    if f.for_seconds is not None:
                        f.until = t + f.for_seconds
                self._faults.extend(parsed)  # all or nothing: a bad fault adds none
                return 200, self._faults_view()
            case ("DELETE", "/_emulator/faults"):
                self._faults.clear()
                return 200, []
            case ("GET", "/_emulator/clock"):
                return 200, {"now": now, "offset": self._offset}
            case ("POST", "/_emulator/clock"):
                advance = _json_object(request).get("advance")
                if isinstance(advance, bool) or not isinstance(advance, int | float):
                    raise _ControlError(400, 'expected {"advance": seconds}')
                self._offset += advance
                return 200, {"now": self.now(), "offset": self._offset}
            case ("GET", "/_emulator/settings"):
                return 200, _settings_view(self._settings)
            case ("POST", "/_emulator/settings"):
                self._post_settings(_json_object(request))
                return 200, _settings_view(self._settings)
            case ("POST", "/_emulator/introspect"):
                token = _json_object(request).get("access_token")
                if not isinstance(token, str):
                    raise _ControlError(400, 'expected {"access_token": "..."}')
                return 200, self.introspect(token)
        raise _ControlError(404, f"no control endpoint {request.method} {request.path}")

    def _faults_view(self) -> list[dict[str, Any]]:
        t = self._monotonic()
        self._faults = [f for f in self._faults if f.until is None or f.until > t]
        return [f.view(t) for f in self._faults]

    def _user_view(self, user: _User, now: float) -> dict[str, object]:
        self._expire_lock(user, now)
        return {
            "username": user.username,
            "failed_attempts": len(user.wrong),
            "locked_until": user.locked_until,
            "valid_from": user.valid_from,
            "disabled": user.disabled,
        }

    def _post_user(self, body: dict[str, Any]) -> dict[str, object]:
        username, password = body.get("username"), body.get("password")
        disabled = body.get("disabled", False)
        if not isinstance(username, str) or not username or not isinstance(password, str):
            raise _ControlError(400, 'expected {"username": str, "password": str}')
        if not isinstance(disabled, bool):
            raise _ControlError(400, "disabled must be true or false")
        key = username.casefold()
        old = self._users.get(key)
        # A replacement keeps valid_from (grants survive, as with an admin password reset
        # in B2C; revoke explicitly to kill them) and clears the lockout.
        self._users[key] = _User(
            username, Secret(password), disabled, valid_from=old.valid_from if old else None
        )
        return self._user_view(self._users[key], self.now())

    def _post_settings(self, body: dict[str, Any]) -> None:
        changes: dict[str, Any] = {}
        for name, value in body.items():
            if name not in RUNTIME_SETTINGS:
                raise _ControlError(
                    400,
                    f"{name!r} cannot be changed at runtime; allowed: {sorted(RUNTIME_SETTINGS)}",
                )
            try:
                changes[name] = _SETTING_CHECKS[name](value)
            except ValueError as e:
                raise _ControlError(400, f"{name}: {e}") from None
        self._apply(dataclasses.replace(self._settings, **changes))


def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise _ControlError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise _ControlError(400, "the body must be a JSON object")
    return body


async def start_emulator(
    settings: EmulatorSettings, host: str = "127.0.0.1", port: int = 0
) -> tuple[Emulator, HTTPServer]:
    """Serve an emulator in this event loop; port 0 picks a free port (``server.address``).

    Stop with ``await emulator.aclose()``, which also drops hanging requests;
    ``await server.close()`` alone leaves a ``hang`` fault's handler waiting.
    """
    emulator = Emulator(settings)
    server = await serve(emulator.handle, host, port)
    emulator._http = server
    return emulator, server


# --- settings from YAML ---------------------------------------------------------------------


def load_emulator_settings(path: str | os.PathLike[str]) -> EmulatorSettings:
    """Read and validate an emulator YAML file; every mistake is reported at once.

    Raises ``ConfigError`` whose problems name the file, line, column and key. Unknown keys
    are errors, so a typo does not silently fall back to a default.
    """
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(
            [
                ConfigProblem(
                    file=name, line=None, column=None, key_path="", message=f"cannot read: {reason}"
                )
            ]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            [
                ConfigProblem(
                    file=name, line=None, column=None, key_path="", message="not UTF-8 text"
                )
            ]
        ) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(
            [
                ConfigProblem(
                    file=name,
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                    key_path="",
                    message=f"not valid YAML: {getattr(e, 'problem', None) or e}",
                )
            ]
        ) from None
    finally:
        loader.dispose()
    marks: dict[str, tuple[int, int]] = {}
    if node is not None:
        _collect_marks(node, "", marks)
    problems: list[ConfigProblem] = []

    def problem(key_path: str, message: str) -> None:
        line, column = marks.get(key_path, (None, None))
        problems.append(
            ConfigProblem(file=name, line=line, column=column, key_path=key_path, message=message)
        )

    if data is None:
        data = {}
    if not isinstance(data, dict):
        problem("", "the file must hold a mapping of settings")
        raise ConfigError(problems)
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "users":
            users = _load_users(value, problem)
            if users is not None:
                changes["users"] = users
        elif key in _SETTING_CHECKS:
            try:
                changes[key] = _SETTING_CHECKS[key](value)
            except ValueError as e:
                problem(str(key), str(e))
        else:
            problem(str(key), f"unknown setting; known: users, {', '.join(_SETTING_CHECKS)}")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(EmulatorSettings(), **changes)


def _load_users(
    value: object, problem: Callable[[str, str], None]
) -> tuple[EmulatorUser, ...] | None:
    if value is None:
        return ()
    if not isinstance(value, list):
        problem("users", "must be a list of {username, password, disabled}")
        return None
    users: list[EmulatorUser] = []
    seen: set[str] = set()
    ok = True
    for i, item in enumerate(value):
        where = f"users[{i}]"
        if not isinstance(item, dict):
            problem(where, "must be a mapping with username and password")
            ok = False
            continue
        item_ok = True
        for key in sorted(set(item) - {"username", "password", "disabled"}, key=str):
            problem(f"{where}.{key}", "unknown field; known: username, password, disabled")
            item_ok = False
        username, password = item.get("username"), item.get("password")
        disabled = item.get("disabled", False)
        if not isinstance(username, str) or not username:
            problem(f"{where}.username", "must be a non-empty string")
            item_ok = False
        elif username.casefold() in seen:
            problem(f"{where}.username", "duplicate username (usernames are case-insensitive)")
            item_ok = False
        else:
            seen.add(username.casefold())
        if not isinstance(password, str):
            # Never echo the value: it is a password, perhaps one YAML parsed as a number.
            problem(f"{where}.password", "must be a string (quote it)")
            item_ok = False
        if not isinstance(disabled, bool):
            problem(f"{where}.disabled", "must be true or false")
            item_ok = False
        if item_ok and isinstance(username, str) and isinstance(password, str):
            users.append(
                EmulatorUser(username=username, password=Secret(password), disabled=bool(disabled))
            )
        ok = ok and item_ok
    return tuple(users) if ok else None


def _collect_marks(node: yaml.Node, path: str, out: dict[str, tuple[int, int]]) -> None:
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            _collect_marks(value_node, f"{path}.{key}" if path else str(key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_marks(item, f"{path}[{i}]", out)


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anybilld emulator",
        description="Serve an emulator of anybill's Azure AD B2C token endpoint (for tests, "
        "demos and development without anybill credentials). Flags override the config file.",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"HOST:PORT to listen on; port 0 picks one (default {DEFAULT_LISTEN})",
    )
    p.add_argument("--config", metavar="FILE", help="emulator YAML file")
    p.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="add or replace a user (repeatable; visible in ps: for demos only)",
    )
    p.add_argument("--client-id", metavar="ID")
    p.add_argument("--access-token-lifetime", type=int, metavar="S")
    p.add_argument("--refresh-token-lifetime", type=int, metavar="S")
    p.add_argument("--sliding-window", type=int, metavar="S")
    p.add_argument(
        "--numbers-as-ints",
        action="store_true",
        help="numeric answer fields as JSON integers instead of strings",
    )
    p.add_argument("--single-use-refresh-tokens", action="store_true")
    p.add_argument("--rate-limit", type=float, metavar="PER_SECOND")
    return p


def _parse_listen(addr: str) -> tuple[str, int]:
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"--listen {addr!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


def _settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    settings = load_emulator_settings(args.config) if args.config else EmulatorSettings()
    changes: dict[str, Any] = {}
    for flag, name in (
        ("client_id", "client_id"),
        ("access_token_lifetime", "access_token_lifetime"),
        ("refresh_token_lifetime", "refresh_token_lifetime"),
        ("sliding_window", "sliding_window"),
        ("rate_limit", "rate_limit_per_second"),
    ):
        value = getattr(args, flag)
        if value is not None:
            try:
                changes[name] = _SETTING_CHECKS[name](value)
            except ValueError as e:
                raise ConfigError(
                    [
                        ConfigProblem(
                            file="<command line>",
                            line=None,
                            column=None,
                            key_path="--" + flag.replace("_", "-"),
                            message=str(e),
                        )
                    ]
                ) from None
    if args.numbers_as_ints:
        changes["numbers_as_strings"] = False
    if args.single_use_refresh_tokens:
        changes["single_use_refresh_tokens"] = True
    if args.user:
        users = {u.username.casefold(): u for u in settings.users}
        for spec in args.user:
            name, sep, password = spec.partition(":")
            if not sep or not name:
                raise ConfigError(
                    [
                        ConfigProblem(
                            file="<command line>",
                            line=None,
                            column=None,
                            key_path="--user",
                            message="expected NAME:PASSWORD",
                        )
                    ]
                )
            users[name.casefold()] = EmulatorUser(username=name, password=Secret(password))
        changes["users"] = tuple(users.values())
    return dataclasses.replace(settings, **changes)


def emulator_main(argv: list[str]) -> int:
    """``anybilld emulator``: serve until SIGTERM/SIGINT, then exit 0.

    Prints ``anybill emulator listening on http://HOST:PORT`` (the real port when 0 was
    asked for) and then the token URL to stdout once bound. Returns 2 for a bad command line
    or config, 1 when the address cannot be bound.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed why
        return e.code if isinstance(e.code, int) else 2
    try:
        settings = _settings_from_args(args)
        host, port = _parse_listen(args.listen)
    except (ConfigError, ValueError) as e:
        print(f"anybilld emulator: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(settings, host, port))


async def _run(settings: EmulatorSettings, host: str, port: int) -> int:
    # startup
    try:
        emulator, server = await start_emulator(settings, host, port)
    except OSError as e:
        print(f"anybilld emulator: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    bound_host, bound_port = server.address
    netloc = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    print(f"anybill emulator listening on http://{netloc}", flush=True)
    print(f"token URL: http://{netloc}{settings.token_path()}", flush=True)
    # main loop: signal handlers only set the event
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # shutdown, bounded: drops hanging requests and idle keep-alive clients
    await emulator.aclose()
    return 0


if __name__ == "__main__":
    raise SystemExit(emulator_main(sys.argv[1:]))
