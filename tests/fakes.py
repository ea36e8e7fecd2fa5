"""Fakes shared by the keeper-level unit tests (test_keeper, test_supervisor, test_metrics,
test_listener): a scripted token endpoint, its answers, and keepers on a fake clock.

No network and no real sleeping: the keepers' ``TokenClient`` is a ``FakeTokenClient`` that
answers from queues and records every request, the clock is a ``FakeClock``, and file I/O
runs inline. State and token files are real files under the test's ``tmp_path``.

A plain module (``from fakes import ...``; conftest.py puts ``tests/`` on ``sys.path``): each
test module keeps its own ``env`` fixture over a ``KeeperEnv`` (or a subclass of it).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from anybilld.clock import FakeClock
from anybilld.config import SCOPE_BASE, OutputTarget, RefreshSettings, Scope, TokenSetSpec
from anybilld.errors import BlockReason, DeadGrantError, PermanentError, TransientError
from anybilld.identity import Grant, TokenRequest
from anybilld.keeper import Account, Keeper, Runtime
from anybilld.secret import Secret
from anybilld.state import StateStore

PASSWORD = "pw-SECRET-berlin"
MONO0 = 1000.0
WALL0 = 1_800_000_000.0
# Binary-exact fractions, so times on the fake clock compare exactly.
REFRESH = RefreshSettings(
    at=0.5, jitter=0.25, retry_initial=1.0, retry_max=64.0, blocked_retry=3600.0
)
TOKEN_URL = "https://idp.invalid/ad.anybill.de/oauth2/v2.0/token"


def middle(a: float, b: float) -> float:
    """The 'random' draw in the middle: a refresh at exactly ``at``, waits half the window."""
    return (a + b) / 2


# ---------------------------------------------------------------- the fake token endpoint


@dataclass(frozen=True, kw_only=True)
class Sent:
    grant: str  # "password" | "refresh"
    username: str  # a refresh names no user: the one its refresh token was issued to
    password: str | None
    refresh_token: str | None
    scope: str  # short name
    client_id: str
    at: float  # monotonic time on the fake clock


Outcome = Grant | Exception


class FakeTokenClient:
    """Answers from scripted queues and records every request in ``sent``.

    A request takes the next answer queued for its username (``push(..., user=)``), else for
    its scope (``push(..., scope=)``), else from the default queue (``push(...)``).

    With nothing queued, a request stays in flight until ``push`` queues an answer: tests see
    requests they did not expect in ``sent`` instead of a crash hidden in the keeper's log.
    With ``auto``, it is answered at once with a fresh grant instead (``AT-1``, ``AT-2``, ...).
    """

    def __init__(self, clock: FakeClock, *, auto: bool = False) -> None:
        self.clock = clock
        self.auto = auto
        self.sent: list[Sent] = []
        self._queues: dict[tuple[str, str] | None, deque[Outcome]] = {None: deque()}
        self._issued: dict[str, str] = {}  # refresh token -> username
        self._fresh = 0
        self._more = asyncio.Event()

    def push(self, *outcomes: Outcome, user: str | None = None, scope: str | None = None) -> None:
        assert user is None or scope is None, "queue by user or by scope, not both"
        key: tuple[str, str] | None = None
        if user is not None:
            key = ("user", user)
        elif scope is not None:
            key = ("scope", scope)
        self._queues.setdefault(key, deque()).extend(outcomes)
        self._more.set()

    def clear(self) -> None:
        for q in self._queues.values():
            q.clear()

    @property
    def grants(self) -> list[str]:
        return [s.grant for s in self.sent]

    def _queue(self, sent: Sent) -> deque[Outcome]:
        for key in (("user", sent.username), ("scope", sent.scope)):
            if key in self._queues:
                return self._queues[key]
        return self._queues[None]

    async def request(self, req: TokenRequest, *, timeout: float) -> Grant:
        form = req.form
        sent = Sent(
            grant=req.grant,
            username=form.get("username") or self._issued[form["refresh_token"]],
            password=form.get("password"),
            refresh_token=form.get("refresh_token"),
            scope=form["scope"].split()[0].rsplit("/", 1)[-1],
            client_id=form["client_id"],
            at=self.clock.monotonic(),
        )
        self.sent.append(sent)
        while not (queue := self._queue(sent)) and not self.auto:
            self._more.clear()
            await self._more.wait()
        if queue:
            outcome = queue.popleft()
        else:
            self._fresh += 1
            outcome = grant(str(self._fresh))
        if isinstance(outcome, Exception):
            raise outcome
        if outcome.refresh_token is not None:
            self._issued[outcome.refresh_token.reveal()] = sent.username
        return outcome


def grant(
    name: str,
    *,
    expires_in: float = 3600.0,
    refresh: bool = True,
    refresh_expires_in: float | None = 86400.0,
) -> Grant:
    return Grant(
        access_token=Secret(f"AT-{name}"),
        expires_in=expires_in,
        refresh_token=Secret(f"RT-{name}") if refresh else None,
        refresh_token_expires_in=refresh_expires_in if refresh else None,
    )


def transient(retry_after: float | None = None) -> TransientError:
    return TransientError("identity provider unavailable", retry_after=retry_after, status=503)


def dead_grant() -> DeadGrantError:
    return DeadGrantError(
        "refresh grant no longer usable", code="AADB2C90080", correlation_id="c-1", status=400
    )


def wrong_password() -> PermanentError:
    return PermanentError(
        "rejected (credentials)",
        reason=BlockReason.CREDENTIALS,
        code="AADB2C90225",
        correlation_id="c-2",
        status=400,
    )


def temporarily_locked() -> PermanentError:
    return PermanentError(
        "rejected (locked)", reason=BlockReason.LOCKED, code="AADB2C90114", status=400
    )


def scope_refused() -> PermanentError:
    return PermanentError(
        "rejected (scope)", reason=BlockReason.SCOPE, code="AADB2C90117", status=400
    )


# ---------------------------------------------------------------- the environment


async def run_inline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """run_io without a thread: deterministic order, nothing left running after a test."""
    return fn(*args, **kwargs)


async def settle(rounds: int = 200) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def username(merchant: str) -> str:
    return f"svc-{merchant}"


def json_output(path: Path) -> OutputTarget:
    return OutputTarget(path=path, format="json", mode=0o640, group=None)


def make_spec(
    out: Path,
    merchant: str = "berlin-01",
    scope: str = "bill",
    *,
    password: str = PASSWORD,
    client_id: str = "client-A",
    outputs: tuple[OutputTarget, ...] | None = None,
    refresh: RefreshSettings = REFRESH,
) -> TokenSetSpec:
    """A token set as the config loader builds it; by default one JSON file under ``out``."""
    return TokenSetSpec(
        merchant=merchant,
        scope=Scope(name=scope, uri=SCOPE_BASE + scope),
        username=username(merchant),
        password=Secret(password),
        client_id=client_id,
        token_url=TOKEN_URL,
        policy="b2c_1_ropc_vendor",
        timeout=10.0,
        outputs=(json_output(out / merchant / f"{scope}.json"),) if outputs is None else outputs,
        refresh=refresh,
    )


class KeeperEnv:
    """What keepers run on in a test: a fake clock, a ``FakeTokenClient``, a real state
    store and output directory under ``tmp``, and a ``Runtime`` over them.

    ``keepers`` lists the keepers started here (a test may take one out again, as the daemon
    does with a removed token set); ``close`` stops every keeper ever started here.
    """

    def __init__(self, tmp: Path, *, auto: bool = False) -> None:
        self.tmp = tmp
        self.clock = FakeClock(monotonic=MONO0, wall=WALL0)
        self.client = FakeTokenClient(self.clock, auto=auto)
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
            uniform=middle,
            run_io=run_inline,
        )
        self.keepers: list[Keeper] = []
        self._started: list[Keeper] = []

    def spec(self, merchant: str = "berlin-01", scope: str = "bill", **kw: Any) -> TokenSetSpec:
        return make_spec(self.out, merchant, scope, **kw)

    def launch(self, keeper: Keeper) -> Keeper:
        self.keepers.append(keeper)
        self._started.append(keeper)
        keeper.start()
        return keeper

    def start(self, spec: TokenSetSpec | None = None, account: Account | None = None) -> Keeper:
        return self.launch(Keeper(spec or self.spec(), account or Account(), self.rt))

    def push(self, merchant: str, *outcomes: Outcome) -> None:
        """Queue answers for the requests of ``merchant`` (for its username)."""
        self.client.push(*outcomes, user=username(merchant))

    def start_merchant(self, merchant: str, *outcomes: Outcome, scope: str = "bill") -> Keeper:
        """Start a keeper (with an Account of its own) whose requests get ``outcomes``."""
        self.push(merchant, *outcomes)
        return self.start(self.spec(merchant, scope))

    def token_file(self, merchant: str = "berlin-01", scope: str = "bill") -> Path:
        return self.out / merchant / f"{scope}.json"

    def token_doc(self, merchant: str = "berlin-01", scope: str = "bill") -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.token_file(merchant, scope).read_text())
        return doc

    def state_file(self, merchant: str, scope: str) -> Path:
        return self.store.path(merchant, scope)

    async def close(self) -> None:
        for k in self._started:
            await k.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def gated_save(env: KeeperEnv, gate: asyncio.Event) -> Callable[..., Awaitable[Any]]:
    """run_io that holds every state save until ``gate`` is set (a slow disk)."""

    async def run_io(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if fn == env.store.save:
            await gate.wait()
        return fn(*args, **kwargs)

    return run_io
