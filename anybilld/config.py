"""Config v1: typed, frozen settings and the strict loader that builds them from YAML.

``load_config(path)`` reads the main file and its includes, validates everything at once
and returns a ``Config``, or raises ``ConfigError`` listing every problem with file, line,
column and key path. ``Config.token_sets()`` expands merchants x scopes into the token sets
the supervisor runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .secret import Secret

DEFAULT_TOKEN_URL = "https://adanybill.b2clogin.com/ad.anybill.de/oauth2/v2.0/token"
DEFAULT_POLICY = "b2c_1_ropc_vendor"
SCOPE_BASE = "https://ad.anybill.de/vendor/"
SHORT_SCOPES = ("bill", "category", "customer", "store", "user")
OFFLINE_ACCESS = "offline_access"

OutputFormat = Literal["json", "raw", "env", "header"]
OnRemove = Literal["delete", "keep"]
WatchMode = Literal["auto", "inotify", "poll"]


@dataclass(frozen=True, kw_only=True)
class IdentitySettings:
    client_id: str
    token_url: str = DEFAULT_TOKEN_URL
    policy: str = DEFAULT_POLICY
    timeout: float = 10.0
    ca_bundle: str | None = None
    max_concurrent_requests: int = 8
    max_requests_per_second: float = 10.0


@dataclass(frozen=True, kw_only=True)
class RefreshSettings:
    at: float = 0.5
    jitter: float = 0.1
    retry_initial: float = 1.0
    retry_max: float = 300.0
    blocked_retry: float = 3600.0


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """One output as configured: ``path`` still holds ``{merchant}`` / ``{scope}``."""

    path: str = "{merchant}/{scope}.json"
    format: OutputFormat = "json"
    mode: int = 0o640
    group: str | int | None = None  # resolved when writing: a missing group is an output error


@dataclass(frozen=True, kw_only=True)
class ReloadSettings:
    watch: WatchMode = "auto"
    poll_interval: float = 5.0


@dataclass(frozen=True, kw_only=True)
class Scope:
    name: str  # short name: "bill", or the last path segment of a full URI
    uri: str  # full URI sent to the IdP


@dataclass(frozen=True, kw_only=True)
class Merchant:
    id: str
    username: str
    password: Secret
    scopes: tuple[Scope, ...]
    outputs: tuple[OutputSpec, ...] | None = None  # None: the default outputs
    client_id: str | None = None  # None: identity.client_id


@dataclass(frozen=True, kw_only=True)
class OutputTarget:
    """One output of one token set, with its path rendered and made absolute."""

    path: Path
    format: OutputFormat
    mode: int
    group: str | int | None


@dataclass(frozen=True, kw_only=True)
class TokenSetSpec:
    """Everything one keeper needs: who logs in where, for what, and where it publishes."""

    merchant: str
    scope: Scope
    username: str
    password: Secret
    client_id: str
    token_url: str
    policy: str
    timeout: float
    outputs: tuple[OutputTarget, ...]
    refresh: RefreshSettings

    @property
    def key(self) -> tuple[str, str]:
        return (self.merchant, self.scope.name)

    @property
    def scope_param(self) -> str:
        """The ``scope`` form field: the scope's URI plus offline_access."""
        return f"{self.scope.uri} {OFFLINE_ACCESS}"

    def grant_fingerprint(self) -> str:
        """Identifies who issued a grant; a stored grant is reused only if this matches."""
        raw = "\0".join((self.token_url, self.policy, self.client_id, self.username))
        return hashlib.sha256(raw.encode()).hexdigest()

    def login_fingerprint(self) -> str:
        """Changes whenever a new login is needed: grant identity, scope or secret."""
        raw = "\0".join((self.grant_fingerprint(), self.scope.uri, self.password.fingerprint()))
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Config:
    source: Path  # the main config file, absolute
    identity: IdentitySettings
    refresh: RefreshSettings = RefreshSettings()
    outputs: tuple[OutputSpec, ...] = (OutputSpec(),)
    output_dir: Path = Path("/var/lib/anybilld/tokens")
    state_dir: Path = Path("/var/lib/anybilld/state")
    on_remove: OnRemove = "delete"
    listen_host: str = "127.0.0.1"
    listen_port: int = 9464
    reload: ReloadSettings = ReloadSettings()
    include: tuple[str, ...] = ()
    merchants: tuple[Merchant, ...] = ()
    # Every file the config was read from (main file, includes, secret files): what a
    # watcher must watch. Not part of equality: the content already is.
    files: tuple[Path, ...] = field(default=(), compare=False)

    def token_sets(self) -> tuple[TokenSetSpec, ...]:
        specs = []
        for m in self.merchants:
            for scope in m.scopes:
                specs.append(
                    TokenSetSpec(
                        merchant=m.id,
                        scope=scope,
                        username=m.username,
                        password=m.password,
                        client_id=m.client_id or self.identity.client_id,
                        token_url=self.identity.token_url,
                        policy=self.identity.policy,
                        timeout=self.identity.timeout,
                        outputs=tuple(
                            self._target(o, m.id, scope.name)
                            for o in (m.outputs if m.outputs is not None else self.outputs)
                        ),
                        refresh=self.refresh,
                    )
                )
        return tuple(specs)

    def _target(self, o: OutputSpec, merchant: str, scope: str) -> OutputTarget:
        rendered = render_output_path(o.path, merchant=merchant, scope=scope)
        return OutputTarget(
            path=self.output_dir / rendered, format=o.format, mode=o.mode, group=o.group
        )


def render_output_path(template: str, *, merchant: str, scope: str) -> str:
    """Fill ``{merchant}`` and ``{scope}``; other braces are left as they are."""
    return template.replace("{merchant}", merchant).replace("{scope}", scope)


def load_config(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read, validate and resolve the config at ``path``; raise ConfigError listing all problems.

    ``environ`` (default: ``os.environ``) supplies ``password_env`` variables and
    ``CREDENTIALS_DIRECTORY`` for ``password_credential``.
    """
    raise NotImplementedError
