"""The errors anybilld raises, as one small tree.

    AnybilldError
     ├── ConfigError                 one or more ConfigProblem (file, line, column, key path)
     ├── IdentityError               an answer of the token endpoint that gave no token
     │    ├── TransientError         network, timeout, 5xx, 429, throttling, garbage: retry later
     │    ├── DeadGrantError         the refresh token is dead (90080 family): log in once
     │    └── PermanentError         wrong password, locked, bad client or scope: stop
     └── OutputError                 a token or state file could not be written

Callers catch the level they need: the keeper decides on the three IdentityError classes,
the supervisor only sees OutputError and ConfigError. No message or ``repr`` ever holds a
password, an access token or a refresh token: the identity client builds messages from the
AADB2C code, the correlation id and the HTTP status only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypedDict, Unpack


class AnybilldError(Exception):
    """Base of every error anybilld raises on purpose."""


@dataclass(frozen=True, kw_only=True)
class ConfigProblem:
    """One mistake in a config file, located as precisely as the YAML allows."""

    file: str
    line: int | None  # 1-based
    column: int | None  # 1-based
    key_path: str  # e.g. "merchants[2].scopes[0]"; "" for the whole document
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(AnybilldError):
    """The config is invalid; ``problems`` lists every mistake found, not only the first."""

    def __init__(
        self,
        problems: list[ConfigProblem],
        *,
        files: tuple[Path, ...] = (),
        include: tuple[str, ...] = (),
    ) -> None:
        self.problems = list(problems)
        # What the failed load read (and its include globs): a watcher keeps watching
        # them, so that fixing any one of them is noticed.
        self.files = files
        self.include = include
        super().__init__("\n".join(str(p) for p in self.problems))


class BlockReason(StrEnum):
    """Why a permanent error blocks a token set; the ``reason`` label of the metric."""

    CREDENTIALS = "credentials"  # wrong password, unknown user: blocks the whole merchant
    LOCKED = "locked"  # account locked or needs user action: blocks the whole merchant
    SCOPE = "scope"  # scope not allowed: blocks only that token set
    # Each token set of a bad client learns it with one request of its own: the request is
    # refused before any password is checked, so no account is at risk.
    CLIENT = "client"  # unknown / disabled client: blocks that token set
    CLIENT_BUG = "client_bug"  # a request the IdP calls malformed: blocks that token set
    UNKNOWN = "unknown"  # an AADB2C code anybilld does not know, on a password login

    @property
    def whole_merchant(self) -> bool:
        """Whether the failure is the account's: its password logins all stop at once.

        An unknown code counts as the account's: it may be a new kind of credential
        failure, and guessing wrong must cost one lockout attempt, not one per scope.
        """
        return self in (BlockReason.CREDENTIALS, BlockReason.LOCKED, BlockReason.UNKNOWN)


class ErrorContext(TypedDict, total=False):
    code: str | None
    correlation_id: str | None
    status: int | None


class IdentityError(AnybilldError):
    """The token endpoint gave no usable token.

    ``code`` is the AADB2C code (``"AADB2C90225"``) when the answer carried one,
    ``correlation_id`` what anybill support asks for, ``status`` the HTTP status (None when
    no answer arrived at all).
    """

    kind = "identity"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        correlation_id: str | None = None,
        status: int | None = None,
    ) -> None:
        self.detail = detail
        self.code = code
        self.correlation_id = correlation_id
        self.status = status
        super().__init__(self.describe())

    def describe(self) -> str:
        parts = [self.detail]
        if self.status is not None:
            parts.append(f"http={self.status}")
        if self.code:
            parts.append(f"code={self.code}")
        if self.correlation_id:
            parts.append(f"correlation_id={self.correlation_id}")
        return " ".join(parts)


class TransientError(IdentityError):
    """Try again later with backoff; ``retry_after`` (seconds) when the server asked for it."""

    kind = "transient"

    def __init__(
        self,
        detail: str,
        *,
        retry_after: float | None = None,
        throttled: bool = False,
        **context: Unpack[ErrorContext],
    ) -> None:
        self.retry_after = retry_after
        self.throttled = throttled  # the IdP asked this client to slow down (429, 90229)
        super().__init__(detail, **context)


class DeadGrantError(IdentityError):
    """The refresh token can no longer be used; one password grant is the way back."""

    kind = "dead_grant"


class PermanentError(IdentityError):
    """Retrying cannot help until the config or the secret changes."""

    kind = "permanent"

    def __init__(
        self, detail: str, *, reason: BlockReason, **context: Unpack[ErrorContext]
    ) -> None:
        self.reason = reason
        super().__init__(detail, **context)


class OutputError(AnybilldError):
    """A token or state file could not be written; the message names the path and the cause."""
