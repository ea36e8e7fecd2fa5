"""The daemon's HTTP listener: /metrics, /healthz, /readyz, /status. Never a secret."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .files import rfc3339
from .httpserver import Request, Response, Server, serve
from .keeper import Keeper, TokenState


def token_set_status(k: Keeper) -> dict[str, Any]:
    """One token set as /status shows it: state and times, no token, no password."""

    def ts(value: float | None) -> str | None:
        # A time no date can show must not take /status down for every token set.
        try:
            return rfc3339(value) if value is not None else None
        except (ValueError, OverflowError, OSError):
            return None

    err = k.last_error
    return {
        "merchant": k.spec.merchant,
        "scope": k.spec.scope.name,
        "state": k.state.value,
        "expires_at": ts(k.published_expires_at),
        "next_refresh_at": ts(k.next_attempt_at),
        "last_success_at": ts(k.last_success_at),
        "refresh_token_expires_at": ts(k.refresh_expires_at),
        "consecutive_failures": k.consecutive_failures,
        "last_error_code": err.code if err else None,
        "last_error": err.describe() if err else None,
        "blocked_reason": k.block_reason.value if k.block_reason else None,
        "output_error": k.output_error,
        "state_error": k.state_error,
        "internal_error": k.internal_error,
    }


def not_ready(keepers: Iterable[Keeper]) -> list[Keeper]:
    """Token sets without a definite state: neither a valid token nor blocked."""
    return [k for k in keepers if not k.has_valid_token and k.state != TokenState.BLOCKED]


class Listener:
    def __init__(
        self,
        registry: CollectorRegistry,
        keepers: Callable[[], Iterable[Keeper]],
        config_info: Callable[[], dict[str, Any]],
        *,
        exposition: Callable[[], bytes] | None = None,
    ) -> None:
        """``exposition`` renders /metrics (the daemon passes ``Metrics.exposition``);
        without it, ``registry`` is rendered by prometheus_client."""
        self._registry = registry
        self._exposition = exposition
        self._keepers = keepers
        self._config_info = config_info
        self._server: Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await serve(self.handle, host, port)
        return self._server.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return Response.text(405, "method not allowed\n")
        if req.path == "/metrics":
            # This walks all token sets; run it here, on the loop, because the collector
            # reads live keeper state that only the loop thread mutates.
            if self._exposition is not None:
                body = self._exposition()
            else:
                body = generate_latest(self._registry)
            return Response(body=body, content_type=CONTENT_TYPE_LATEST)
        if req.path == "/healthz":
            return Response.text(200, "ok\n")
        if req.path == "/readyz":
            waiting = not_ready(self._keepers())
            if not waiting:
                return Response.text(200, "ready\n")
            names = [f"{k.spec.merchant}/{k.spec.scope.name} ({k.state.value})" for k in waiting]
            shown = "\n".join(names[:100])
            more = f"\n... and {len(names) - 100} more" if len(names) > 100 else ""
            return Response.text(503, f"not ready: {len(names)} token sets\n{shown}{more}\n")
        if req.path == "/status":
            keepers = sorted(self._keepers(), key=lambda k: k.key)
            doc = {"version": __version__, "config": self._config_info()}
            # One token set per line: readable with curl, and json.dumps without indent
            # runs in C (with indent it runs in Python, several times slower at 10,000).
            sets = ",\n".join(json.dumps(token_set_status(k)) for k in keepers)
            text = f'{json.dumps(doc)[:-1]}, "token_sets": [\n{sets}\n]}}\n'
            return Response(body=text.encode(), content_type="application/json")
        return Response.text(404, "not found; try /metrics /healthz /readyz /status\n")
