"""One token set's life: obtain a token, publish it, refresh it before it expires.

A ``Keeper`` is one asyncio task per (merchant, scope). It is the only place that decides
what a failure means, and it decides in one place (``_renew``):

- transient (outage, throttling, garbage): tenacity retries with full-jitter backoff,
  ``Retry-After`` winning when longer; the refresh token is kept, no password is sent;
- dead grant: exactly one password login, at once, inside the same attempt;
- permanent: the token set is blocked until ``blocked_retry`` has passed or its identity
  (username, secret, client, URL, policy, scope) changes; a temporary lock of the account
  (AADB2C90114) waits a minute instead, then longer with each lock in a row.

A new password (a rotation, by reload or while stopped) means a password login with it at
once, but the refresh grant of the previous password is kept until that login succeeds: if
the new password is refused (a typo), the token set is shown blocked and logs the refusal,
yet keeps refreshing with the old grant, so consumers never lose a working token; the new
password is tried again after ``blocked_retry`` or when the config or secret changes.

The token sets of one service account (one username at one IdP) share an ``Account``:
their password logins run one at a time, and a credential failure blocks the password
logins of all of them, so a merchant with five scopes never spends five of its ten lockout
attempts in one second. A block is saved with the state, so a restart honours it too.

Keepers never raise out of their task: every failure ends in a state the metrics, /status
and the log show, and an unexpected error restarts the token set after a backoff. The
published files are only ever replaced by a newer valid token. On shutdown a request
already sent may land within a grace period; nothing new is sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never
from tenacity.stop import stop_after_attempt, stop_base

from .clock import Clock
from .config import TokenSetSpec
from .errors import (
    BlockReason,
    DeadGrantError,
    IdentityError,
    OutputError,
    PermanentError,
    TransientError,
)
from .files import OutputResult, PublishedToken, rfc3339, write_outputs
from .flag import Flag, sleep_until_flag
from .identity import (
    TEMPORARY_LOCK,
    ClientClosed,
    Grant,
    GrantType,
    TokenRequest,
    password_request,
    refresh_request,
)
from .policy import (
    DEFAULT_REFRESH_TOKEN_LIFETIME,
    Uniform,
    refresh_delay,
    temporary_lock_delay,
    wait_full_jitter,
    wait_retry_after,
)
from .secret import Secret
from .state import StateStore, StoredGrant

log = logging.getLogger("anybilld.keeper")


# Attempts of a --once run before a transient failure counts as a failure of the run.
ONCE_ATTEMPTS = 3


class _Stopping(Exception):
    """Raised between attempts when the keeper is stopping; ends a renewal quietly."""


class TokenState(StrEnum):
    PENDING = "pending"  # no token yet
    OK = "ok"  # a valid token, nothing failing
    RETRYING = "retrying"  # the last attempt failed transiently; may still hold a token
    BLOCKED = "blocked"  # a permanent failure; waiting for blocked_retry or a config change


class TokenClient(Protocol):
    async def request(self, req: TokenRequest, *, timeout: float) -> Grant: ...


@dataclass(kw_only=True)
class Runtime:
    """What every keeper shares: the client, the disk, the clock, the randomness."""

    client: TokenClient
    store: StateStore
    clock: Clock
    output_root: Path
    uniform: Uniform = random.uniform
    # Blocking file I/O leaves the loop through this (a thread by default).
    run_io: Callable[..., Awaitable[Any]] = asyncio.to_thread
    on_file_write: Callable[[bool], None] = lambda ok: None


@dataclass(frozen=True, kw_only=True)
class _Block:
    error: PermanentError
    until: float  # monotonic
    earned_by: TokenSetSpec  # the spec whose request was refused

    @property
    def credentials(self) -> tuple[str, str, str]:
        return _credentials(self.earned_by)


def _credentials(spec: TokenSetSpec) -> tuple[str, str, str]:
    """Who is signing in, as the IdP counts lockouts: usernames are case-insensitive."""
    return (spec.token_url, spec.username.casefold(), spec.password.fingerprint())


def _credentials_text(spec: TokenSetSpec) -> str:
    return "\0".join((*_credentials(spec)[:2], spec.password.reveal()))


def _same_grant(a: TokenSetSpec, b: TokenSetSpec) -> bool:
    """Whether a refresh grant of ``a`` serves ``b``: all but the password are the same."""
    return a.grant_fingerprint() == b.grant_fingerprint() and a.scope.uri == b.scope.uri


@dataclass(kw_only=True)
class Account:
    """A merchant's service account, shared by its token sets."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    block: _Block | None = None
    # Temporary locks (AADB2C90114) in a row, until a password login succeeds: each one
    # makes the wait before the next login longer. In memory only: after a restart the
    # stored block is honoured, and the next lock waits a minute again.
    temporary_locks: int = 0
    # Token sets still reading their state: one of them may hold a block of the account
    # from before a restart, so no password login may start until they are done.
    restoring: int = 0
    restored: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.restored.set()

    def begin_restore(self) -> None:
        self.restoring += 1
        self.restored.clear()

    def end_restore(self) -> None:
        self.restoring -= 1
        if self.restoring == 0:
            self.restored.set()

    def blocked(self, spec: TokenSetSpec, now: float) -> _Block | None:
        """The block that stops a password login with ``spec``'s credentials, if any.

        A block is tied to the credentials it was earned with: a new password or username
        lifts it at once.
        """
        b = self.block
        if b is None or b.until <= now or b.credentials != _credentials(spec):
            return None
        return b


def _copy_error(exc: PermanentError, detail: str) -> PermanentError:
    """A fresh exception with the same facts, so tasks never share one traceback."""
    return PermanentError(
        detail,
        reason=exc.reason,
        code=exc.code,
        correlation_id=exc.correlation_id,
        status=exc.status,
    )


class Keeper:
    """Keeps one token set's token fresh; its public attributes are its live state."""

    # Slots: a daemon holds 10,000 keepers, and a dict of 30-odd attributes each costs
    # about 1.3 KB more than slots do. A new attribute must be named here.
    __slots__ = (
        "_access",
        "_attempt_spec",
        "_due",
        "_first_sign_in",
        "_grant_credentials",
        "_in_request",
        "_lifetime",
        "_obtained_mono",
        "_obtained_wall",
        "_owed_block",
        "_persisting",
        "_refresh",
        "_refresh_deadline",
        "_republish_at",
        "_restart",
        "_restoring",
        "_state_dirty",
        "_stopping",
        "_task",
        "_wake",
        "_write_failures",
        "access_expires_at",
        "account",
        "block",
        "consecutive_failures",
        "internal_error",
        "last_error",
        "last_success_at",
        "output_error",
        "published_expires_at",
        "refresh_expires_at",
        "rt",
        "spec",
        "state",
        "state_error",
    )

    def __init__(self, spec: TokenSetSpec, account: Account, rt: Runtime) -> None:
        self.spec = spec
        self.account = account
        self.rt = rt
        # Live state, read at scrape time by metrics and /status. Times are wall clock.
        self.state = TokenState.PENDING
        self.access_expires_at: float | None = None  # of the token held
        self.published_expires_at: float | None = None  # of the token in every file
        self.refresh_expires_at: float | None = None
        # The same expiry on the monotonic clock, which decides: a wall-clock jump (NTP
        # fixing a wrong clock) must not make a good refresh token look dead, or a dead
        # one good. Wall time only bridges a restart.
        self._refresh_deadline: float | None = None
        self.last_success_at: float | None = None
        self.consecutive_failures = 0
        self.last_error: IdentityError | None = None
        self.block: _Block | None = None
        self.output_error: str | None = None  # a token file could not be written
        self.state_error: str | None = None  # the state file could not be written

        self._access: Secret | None = None
        self._refresh: Secret | None = None
        # Digest of the credentials whose password login obtained _refresh; differing from
        # the spec's, a login with the new password is owed. _owed_block: that login was
        # refused, and is not tried again before it ends (the old grant carries on).
        self._grant_credentials: str | None = None
        self._owed_block: _Block | None = None
        self._first_sign_in: float | None = None
        self._obtained_wall: float | None = None
        self._obtained_mono: float | None = None
        self._lifetime: float | None = None
        self._due = rt.clock.monotonic()  # next grant attempt, monotonic
        self._republish_at: float | None = None  # next retry of a failed file write
        self._write_failures = 0
        self._state_dirty = False  # the state file lags behind what is held in memory
        # Flags, not asyncio.Events: an idle keeper waits on all three at once (flag.py).
        self._wake = Flag()  # something changed: recompute what is due
        self._restart = Flag()  # identity changed or block lifted: act now
        self._stopping = Flag()  # finish the request under way, then end
        self._task: asyncio.Task[None] | None = None
        self._persisting: asyncio.Future[None] | None = None
        self._restoring = False  # counted in account.restoring until the state is read
        self._attempt_spec = spec  # the spec of the attempt under way or last made
        self._in_request = False  # a grant request has been handed to the client
        self.internal_error: str | None = None  # the last unexpected error, until restarted

    # ----------------------------------------------------------------- lifecycle

    @property
    def key(self) -> tuple[str, str]:
        return self.spec.key

    def start(self, *, once: bool = False) -> None:
        name = f"keeper {self.spec.merchant}/{self.spec.scope.name}"
        self.account.begin_restore()
        self._restoring = True
        self._task = asyncio.create_task(self.run(once=once), name=name)

    def _restore_done(self) -> None:
        if self._restoring:
            self._restoring = False
            self.account.end_restore()

    def begin_stop(self) -> None:
        """Send nothing new from now on; a request under way may still land."""
        self._stopping.set()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    @property
    def in_request(self) -> bool:
        """A grant request has been handed to the client and not answered yet."""
        return self._in_request

    async def stop(self, *, at_shutdown: bool = False) -> None:
        """End the task, cancelling a request under way; a token being saved and
        published always finishes (shielded).

        A request cancelled after the IdP answered has spent a single-use refresh token,
        and the next start needs the password: at shutdown the supervisor first lets the
        requests under way land (``begin_stop``), and whatever is still open here is
        logged as abandoned.
        """
        if self._task is None:
            return
        self._stopping.set()
        if at_shutdown and not self._task.done() and self._in_request:
            self._log(
                logging.WARNING,
                "request abandoned at shutdown; if the IdP answered it, a single-use "
                "refresh token is spent and the next start logs in with the password",
            )
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._restore_done()  # stopped before its state was read: siblings wait no more
        if self._persisting is not None:
            # The shield kept it running through the cancellation; wait for it, so that
            # nothing writes this token set's files after stop() returned. asyncio.wait,
            # not gather: should this wait itself be cancelled, the save goes on.
            await asyncio.wait({self._persisting})

    @property
    def saving(self) -> asyncio.Future[None] | None:
        """The save under way (state, then token files), if any."""
        p = self._persisting
        return None if p is None or p.done() else p

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    def update(self, spec: TokenSetSpec) -> None:
        """Take a new spec from a reload; only what changed is acted upon.

        A new identity means a new login (the running token stays published until the new
        one arrives); new outputs are written at once; new timing reschedules.
        """
        old, self.spec = self.spec, spec
        now = self.rt.clock.monotonic()
        if old.login_fingerprint() != spec.login_fingerprint():
            if not _same_grant(old, spec):
                self._refresh = None
            # else only the password changed: the old grant stays until the new one works.
            self._owed_block = None
            if self.block is not None:
                self.block = None
                self.state = TokenState.OK if self.has_valid_token else TokenState.PENDING
            self._due = now
            self._restart.set()
            self._wake.set()
            return
        if old.outputs != spec.outputs and self._access is not None:
            self._republish_at = now
        if (
            old.refresh != spec.refresh
            and self.state == TokenState.OK
            and self._lifetime is not None
            and self._obtained_mono is not None
        ):
            self._due = self._obtained_mono + self._delay(self._lifetime)
        self._wake.set()

    # ----------------------------------------------------------------- the loop

    async def run(self, *, once: bool = False) -> None:
        """The task's body: never raises; a bug restarts the token set after a backoff."""
        crashes = 0
        while not self._stopping.is_set():
            try:
                await self._run(once=once)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug; the other token sets must not notice
                crashes += 1
                self.consecutive_failures += 1
                self.internal_error = f"{type(exc).__name__} (restarting)"
                self._log(
                    logging.CRITICAL,
                    "keeper failed unexpectedly; starting it again",
                    error=type(exc).__name__,
                    crashes=crashes,
                    exc_info=True,
                )
                if once:
                    return
                r = self.spec.refresh
                window = wait_full_jitter(r.retry_initial, r.retry_max).window(crashes)
                # Not cut short by a reload: a bug that recurs must not become a hot loop.
                await self._sleep(window, self._stopping)

    async def _run(self, *, once: bool) -> None:
        try:
            await self._restore()
        finally:
            self._restore_done()
        self.internal_error = None
        while not self._stopping.is_set():
            self._wake.clear()
            now = self.rt.clock.monotonic()
            if self._restart.is_set():
                # An identity change or a lifted block arrived while something else (a
                # request, the start-up) was running and may have moved _due since.
                self._restart.clear()
                self._due = min(self._due, now)
            if self._republish_at is not None and self._republish_at <= now:
                await self._flush()
            if self._due <= now:
                await self._renew(stop=stop_after_attempt(ONCE_ATTEMPTS) if once else None)
                if once:
                    return
                # A renewal may end without suspending (a failure raised before any I/O);
                # yield, so that a keeper can never keep the loop from everything else.
                await asyncio.sleep(0)
                continue
            if once:
                return
            wake_at = min(self._due, self._next_flush())
            await self._sleep(wake_at - now, self._wake, self._restart, self._stopping)

    async def _sleep(self, delay: float, *events: Flag) -> None:
        """Sleep on the injected clock, returning early when any of ``events`` is set.

        Always yields to the loop at least once, so no caller can spin it.
        """
        if delay <= 0 or any(e.is_set() for e in events):
            await asyncio.sleep(0)
            return
        await sleep_until_flag(self.rt.clock, delay, *events)

    def _next_flush(self) -> float:
        return math.inf if self._republish_at is None else self._republish_at

    async def _backoff_sleep(self, delay: float) -> None:
        """Tenacity's sleep between attempts: cut short only by an identity change or a
        lifted block, but it writes files that fall due meanwhile (new outputs from a
        reload, a retry of a failed write) with the token it holds."""
        end = self.rt.clock.monotonic() + delay
        while True:
            self._wake.clear()
            now = self.rt.clock.monotonic()
            if self._republish_at is not None and self._republish_at <= now:
                await self._flush()
            if now >= end or self._restart.is_set() or self._stopping.is_set():
                return
            wake_at = min(end, self._next_flush())
            await self._sleep(wake_at - now, self._restart, self._wake, self._stopping)

    # ----------------------------------------------------------------- start-up

    async def _restore(self) -> None:
        """Reuse a stored grant of the same identity: a restart needs no password.

        A stored block of the same credentials is honoured too, so a restart never tries a
        refused password again before ``blocked_retry`` has passed.
        """
        spec = self.spec
        stored: StoredGrant | None = await self.rt.run_io(
            self.rt.store.load, spec.merchant, spec.scope.name
        )
        if stored is None or self.spec is not spec:  # a reload came first: start afresh
            return
        if stored.fingerprint != spec.grant_fingerprint():
            self._log(logging.INFO, "stored grant was issued to another identity; not reused")
            return
        now_wall, now_mono = self.rt.clock.time(), self.rt.clock.monotonic()
        if stored.obtained_at > 0:
            self._first_sign_in = stored.first_sign_in_at
        if stored.refresh_token is not None and (
            stored.refresh_token_expires_at is None or stored.refresh_token_expires_at > now_wall
        ):
            self._refresh = stored.refresh_token
            self.refresh_expires_at = stored.refresh_token_expires_at
            if stored.refresh_token_expires_at is not None:
                self._refresh_deadline = now_mono + (stored.refresh_token_expires_at - now_wall)
        # A grant whose credentials digest is unknown (none stored, or the state's key was
        # lost) is taken as the current credentials': a password login for nothing would
        # cost a lockout attempt per token set should the password be wrong.
        self._grant_credentials = (
            stored.grant_credentials
            if self.rt.store.recognises(stored.grant_credentials)
            else self._digest(spec)
        )
        if stored.grant_credentials != self._grant_credentials:
            self._state_dirty = True  # saved under the current key below
        self._restore_block(stored, now_wall, now_mono)
        owed = self._login_owed(spec)
        if owed and self.block is not None:
            # The new password was refused before the restart: the old grant carries on.
            self._owed_block = self.block
            self._due = now_mono
        elif owed:
            # Like a reload with a new password: log in with it now, keeping the old grant
            # should it be refused.
            self._due = now_mono
            self._log(logging.INFO, "the password changed since the last login; logging in")
        expires = stored.access_token_expires_at
        if stored.access_token is None or expires is None:
            await self._save_if_restamped()
            return
        if expires <= now_wall:
            # Expired while the daemon was down (a restart during an outage). The files hold
            # this token (the state is saved before them; only a failed save, alerted on as
            # output failing, leaves them newer), so its expiry is what consumers have:
            # shown as expired rather than as no token, the expiry alert keeps firing
            # across the restart until a fresh token is written.
            self.published_expires_at = expires
            self.last_success_at = stored.obtained_at
            await self._save_if_restamped()
            return
        self._access = stored.access_token
        self.access_expires_at = expires
        self.last_success_at = stored.obtained_at
        self._obtained_wall = stored.obtained_at
        self._lifetime = max(1.0, expires - stored.obtained_at)
        # Wall clock is the only bridge across a restart; from here on, monotonic.
        self._obtained_mono = now_mono - (now_wall - stored.obtained_at)
        if self._owed_block is not None:
            self._due = self._obtained_mono + self._delay(self._lifetime)
        elif self.block is None and not owed:
            self._due = self._obtained_mono + self._delay(self._lifetime)
            self.state = TokenState.OK
        elif self.block is None:
            self.state = TokenState.OK
        self._log(logging.INFO, "reusing stored token", expires_at=_iso(expires))
        await self._flush()

    async def _save_if_restamped(self) -> None:
        """Digests made under a lost key, taken as the current credentials', are saved
        under the current key at once: a password changed from now on (even while the
        daemon is stopped) is then recognised, and lifts the block."""
        if self._state_dirty:
            await self._flush()

    def _restore_block(self, stored: StoredGrant, now_wall: float, now_mono: float) -> None:
        spec = self.spec
        until_wall, reason = stored.blocked_until, stored.blocked_reason
        known = {r.value for r in BlockReason}
        if until_wall is None or until_wall <= now_wall or reason is None or reason not in known:
            return
        if self.rt.store.recognises(stored.blocked_credentials) and (
            self.rt.store.digest(_credentials_text(spec)) != stored.blocked_credentials
        ):
            return  # the credentials changed since: the block is lifted
        # Same credentials, or unknown (the state's key was lost): honour the block; a
        # change of the config or secret from now on lifts it.
        if not self.rt.store.recognises(stored.blocked_credentials):
            self._state_dirty = True  # re-stamped under the current key
        error = PermanentError(
            "blocked before the restart", reason=BlockReason(reason), code=stored.blocked_code
        )
        until = now_mono + (until_wall - now_wall)
        self.block = _Block(error=error, until=until, earned_by=spec)
        if error.reason.whole_merchant:
            self.account.block = self.block
        self._due = until
        self.state = TokenState.BLOCKED
        self.last_error = error
        self._log(
            logging.ERROR,
            f"still blocked ({reason}) after the restart; no attempt for {until - now_mono:.0f}s "
            "or until the config or secret changes",
            code=stored.blocked_code,
        )

    # ----------------------------------------------------------------- obtaining

    async def _renew(self, *, stop: stop_base | None) -> None:
        """One renewal, retried through transient failures; the single failure path."""
        r = self.spec.refresh
        retrying = AsyncRetrying(
            sleep=self._backoff_sleep,
            wait=wait_retry_after(wait_full_jitter(r.retry_initial, r.retry_max, self.rt.uniform)),
            retry=retry_if_exception_type(TransientError),
            stop=stop or stop_never,
            before_sleep=self._on_transient,
            reraise=True,
        )
        try:
            await retrying(self._obtain)
        except _Stopping:
            pass  # shutting down: nothing failed, and nothing more is sent
        except ClientClosed:
            # The daemon closed the client and is about to stop every keeper. Until this
            # one's stop() arrives, the renewal stays due: returning at once would make the
            # loop call it again and again without ever yielding, starving the very stop()
            # it waits for (a SIGTERM during an outage hung the daemon that way).
            await self._stopping.wait()
        except TransientError as exc:  # only with a stop: a --once run gave up
            self._fail(exc, TokenState.RETRYING)
        except PermanentError as exc:
            await self._on_permanent(exc)

    async def _obtain(self) -> None:
        if self._stopping.is_set():
            raise _Stopping
        spec = self.spec  # read anew on every attempt: a reload may have replaced it
        self._attempt_spec = spec
        self._restart.clear()
        if self._refresh is not None and not self._refresh_expired() and self._login_owed(spec):
            owed = await self._owed_login(spec)
            if owed is not None:
                await self._accept(owed, spec, "password")
                return
        if self._refresh is not None and not self._refresh_expired():
            try:
                grant = await self._request(refresh_request(spec, self._refresh), spec)
            except DeadGrantError as exc:
                self._fail(exc, None, "refresh grant is dead; logging in with the password once")
                self._refresh = None
            else:
                await self._accept(grant, spec, "refresh")
                return
        grant = await self._password_login(spec)
        await self._accept(grant, spec, "password")

    async def _request(self, req: TokenRequest, spec: TokenSetSpec) -> Grant:
        if self._stopping.is_set():  # e.g. the password login after a dead grant
            raise _Stopping
        self._in_request = True
        try:
            return await self.rt.client.request(req, timeout=spec.timeout)
        finally:
            self._in_request = False

    def _refresh_expired(self) -> bool:
        deadline = self._refresh_deadline
        return deadline is not None and deadline <= self.rt.clock.monotonic()

    def _digest(self, spec: TokenSetSpec) -> str:
        return self.rt.store.digest(_credentials_text(spec))

    def _login_owed(self, spec: TokenSetSpec) -> bool:
        """Whether the refresh grant held was obtained with another password than ``spec``'s."""
        return (
            self._refresh is not None
            and self._grant_credentials is not None
            and self._grant_credentials != self._digest(spec)
        )

    def _owed_block_for(self, spec: TokenSetSpec, now: float) -> _Block | None:
        b = self._owed_block
        if b is None or b.until <= now or b.credentials != _credentials(spec):
            return None
        return b

    async def _owed_login(self, spec: TokenSetSpec) -> Grant | None:
        """The password login a new password owes, while an old grant still works.

        None when it is blocked or refused: the caller then refreshes with the old grant.
        Transient failures propagate and are retried like any other.
        """
        now = self.rt.clock.monotonic()
        if self._owed_block_for(spec, now) is not None:
            return None
        try:
            return await self._password_login(spec)
        except PermanentError as exc:
            if spec.login_fingerprint() != self.spec.login_fingerprint():
                return None  # replaced meanwhile: the loop tries the newest at once
            account_block = self.account.blocked(spec, now)
            if exc.reason.whole_merchant and account_block is not None:
                until = account_block.until
            else:
                until = self.rt.clock.monotonic() + self._refusal_wait(exc, spec)
            self._owed_block = _Block(error=exc, until=until, earned_by=spec)
            self._fail(
                exc,
                None,
                f"the new password was refused ({exc.reason.value}); keeping the token "
                f"fresh with the grant of the previous one; the new one is tried again in "
                f"{until - now:.0f}s or when the config or secret changes",
            )
            return None

    async def _password_login(self, spec: TokenSetSpec) -> Grant:
        await self.account.restored.wait()  # a sibling's stored block counts too
        async with self.account.lock:
            now = self.rt.clock.monotonic()
            block = self.account.blocked(spec, now)
            if block is not None:
                raise _copy_error(
                    block.error, "the service account was refused for another token set"
                )
            try:
                granted = await self._request(password_request(spec), spec)
            except PermanentError as exc:
                if exc.reason.whole_merchant:
                    # Counted from the refusal, not from the request: the next attempt
                    # leaves blocked_retry after the IdP counted this one, however long
                    # the answer took.
                    until = self.rt.clock.monotonic() + self._refusal_wait(exc, spec)
                    self.account.block = _Block(error=exc, until=until, earned_by=spec)
                raise
            self.account.temporary_locks = 0
            return granted

    async def _accept(self, grant: Grant, spec: TokenSetSpec, via: GrantType) -> None:
        if spec.login_fingerprint() != self.spec.login_fingerprint() and not (
            via == "refresh" and _same_grant(spec, self.spec)
        ):
            # A reload changed the identity while this request was in flight: the answer
            # belongs to the old identity. The loop logs in anew at once. (A refresh of the
            # same grant under a new password is kept: its old refresh token may be spent,
            # and the new password's login follows at once all the same.)
            self._due = self.rt.clock.monotonic()
            return
        now_wall, now_mono = self.rt.clock.time(), self.rt.clock.monotonic()
        if via == "password":
            self._first_sign_in = now_wall
            self._refresh = None
            self.refresh_expires_at = self._refresh_deadline = None
            self._grant_credentials = self._digest(spec)
            self._owed_block = None
        if grant.refresh_token is not None:
            self._refresh = grant.refresh_token
            lifetime = grant.refresh_token_expires_in or DEFAULT_REFRESH_TOKEN_LIFETIME
            self.refresh_expires_at = now_wall + lifetime
            self._refresh_deadline = now_mono + lifetime
        self._access = grant.access_token
        self._lifetime = grant.expires_in
        self._obtained_wall, self._obtained_mono = now_wall, now_mono
        self.access_expires_at = now_wall + grant.expires_in
        self.last_success_at = now_wall
        self._due = now_mono + self._delay(grant.expires_in)
        self.state = TokenState.OK
        self.consecutive_failures = 0
        self.last_error = None
        self.block = None
        owed = self._owed_block_for(self.spec, now_mono)
        if owed is not None:
            # Fresh tokens, but the new password is still refused: shown, and alerted on.
            self.block, self.state, self.last_error = owed, TokenState.BLOCKED, owed.error
        self._log(
            logging.INFO,
            "token obtained",
            grant=via,
            expires_at=_iso(self.access_expires_at),
            next_refresh_in=f"{self._due - now_mono:.0f}s",
        )
        await self._persist()

    def _delay(self, lifetime: float) -> float:
        r = self.spec.refresh
        return refresh_delay(lifetime, at=r.at, jitter=r.jitter, uniform=self.rt.uniform)

    # ----------------------------------------------------------------- failures

    def _on_transient(self, rs: RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        assert isinstance(exc, TransientError)
        delay = rs.next_action.sleep if rs.next_action is not None else 0.0
        self._due = self.rt.clock.monotonic() + delay
        self.block = None  # a retry after blocked_retry that fails transiently: no longer blocked
        self._fail(exc, TokenState.RETRYING, f"will retry in {delay:.1f}s")

    async def _on_permanent(self, exc: PermanentError) -> None:
        if self._attempt_spec.login_fingerprint() != self.spec.login_fingerprint():
            # Refused credentials that a reload has replaced meanwhile: nothing to block;
            # the loop logs in with the new ones at once.
            self._log(logging.INFO, f"refused ({exc.reason.value}) with the replaced identity")
            return
        account_block = self.account.blocked(self.spec, self.rt.clock.monotonic())
        if exc.reason.whole_merchant and account_block is not None:
            until = account_block.until
        else:
            until = self.rt.clock.monotonic() + self._refusal_wait(exc, self.spec)
        self.block = _Block(error=exc, until=until, earned_by=self._attempt_spec)
        self._due = until
        wait = until - self.rt.clock.monotonic()
        self._fail(
            exc,
            TokenState.BLOCKED,
            f"blocked ({exc.reason.value}): no new attempt for {wait:.0f}s "
            "or until the config or secret changes",
        )
        await self._persist()

    def _refusal_wait(self, exc: PermanentError, spec: TokenSetSpec) -> float:
        """How long a refusal blocks password logins: ``blocked_retry``, but for a temporary
        lock of the account the wait of ``temporary_lock_delay``, at least a minute and
        growing with each lock in a row. Call it once per refusing answer: it counts them.
        """
        if exc.code != TEMPORARY_LOCK:
            return spec.refresh.blocked_retry
        self.account.temporary_locks += 1
        return temporary_lock_delay(
            self.account.temporary_locks, blocked_retry=spec.refresh.blocked_retry
        )

    def _fail(self, exc: IdentityError, state: TokenState | None, what: str = "") -> None:
        """The one failure path: count, keep for /status, log with code and correlation id."""
        self.consecutive_failures += 1
        self.last_error = exc
        if state is not None:
            self.state = state
        level = logging.ERROR if isinstance(exc, PermanentError) else logging.WARNING
        self._log(
            level,
            f"{exc.kind} failure: {exc.detail}" + (f"; {what}" if what else ""),
            code=exc.code,
            correlation_id=exc.correlation_id,
            http=exc.status,
            failures=self.consecutive_failures,
        )

    # ----------------------------------------------------------------- files

    async def _persist(self) -> None:
        """Save the state and publish, finishing even if shutdown cancels the task meanwhile:
        a new refresh token may already have replaced the old one at the IdP, and a block
        that is not on disk would let the next start try a refused password again."""
        self._state_dirty = True
        self._persisting = asyncio.ensure_future(self._flush())
        await asyncio.shield(self._persisting)
        self._persisting = None  # done: nothing for stop() to wait for, nothing to hold

    async def _stored(self) -> StoredGrant:
        spec, block = self.spec, self.block
        blocked: dict[str, Any] = {}
        if block is not None:
            wait = max(0.0, block.until - self.rt.clock.monotonic())
            blocked = {
                "blocked_until": self.rt.clock.time() + wait,
                "blocked_reason": block.error.reason.value,
                "blocked_code": block.error.code,
                "blocked_credentials": self.rt.store.digest(_credentials_text(block.earned_by)),
            }
        return StoredGrant(
            fingerprint=spec.grant_fingerprint(),
            refresh_token=self._refresh,
            refresh_token_expires_at=self.refresh_expires_at,
            first_sign_in_at=self._first_sign_in or self.last_success_at or 0.0,
            access_token=self._access,
            access_token_expires_at=self.access_expires_at,
            obtained_at=self._obtained_wall or 0.0,
            grant_credentials=self._grant_credentials,
            **blocked,
        )

    async def _flush(self) -> None:
        """Write what the disk lacks: the state file if it lags, then every token file.

        A failure is retried with backoff (retry_initial .. retry_max) without a new
        request: the token held is still good. Until then ``published_expires_at`` keeps
        the expiry of what consumers really have, which metrics, /readyz and alerts use.
        """
        spec = self.spec
        if self._state_dirty:
            try:
                stored = await self._stored()
                await self.rt.run_io(self.rt.store.save, spec.merchant, spec.scope.name, stored)
            except OutputError as exc:
                if self.state_error is None:
                    self._log(logging.ERROR, f"could not save state: {exc}")
                self.state_error = str(exc)
            else:
                self._state_dirty = False
                self.state_error = None
        if self._access is not None and self.access_expires_at is not None:
            await self._publish(spec, self._access, self.access_expires_at)
        if self.output_error is None and self.state_error is None:
            self._write_failures = 0
            self._republish_at = None
            return
        self._write_failures += 1
        r = spec.refresh
        window = wait_full_jitter(r.retry_initial, r.retry_max).window(self._write_failures)
        self._republish_at = self.rt.clock.monotonic() + window

    async def _publish(self, spec: TokenSetSpec, access: Secret, expires_at: float) -> None:
        token = PublishedToken(
            access_token=access,
            expires_at=expires_at,
            obtained_at=self._obtained_wall or self.rt.clock.time(),
            merchant=spec.merchant,
            scope=spec.scope.name,
        )
        results: list[OutputResult] = await self.rt.run_io(
            write_outputs, spec.outputs, token, root=self.rt.output_root
        )
        errors = []
        for res in results:
            self.rt.on_file_write(res.ok)
            if res.error is not None:
                errors.append(str(res.error))
                self._log(logging.ERROR, f"could not publish token: {res.error}")
        self.output_error = "; ".join(errors) or None
        if not errors:
            self.published_expires_at = expires_at

    # ----------------------------------------------------------------- views

    @property
    def has_valid_token(self) -> bool:
        """Whether consumers can read a valid token from every file of this token set."""
        exp = self.published_expires_at
        return exp is not None and exp > self.rt.clock.time()

    @property
    def next_attempt_at(self) -> float:
        """Wall-clock time of the next grant attempt."""
        return self.rt.clock.time() + max(0.0, self._due - self.rt.clock.monotonic())

    @property
    def block_reason(self) -> BlockReason | None:
        return self.block.error.reason if self.block is not None else None

    def _log(self, level: int, msg: str, *, exc_info: bool = False, **fields: object) -> None:
        log.log(
            level,
            msg,
            exc_info=exc_info,
            extra={
                "merchant": self.spec.merchant,
                "scope": self.spec.scope.name,
                "fields": {k: v for k, v in fields.items() if v is not None},
            },
        )


def _iso(ts: float | None) -> str | None:
    return rfc3339(ts) if ts is not None else None
