"""The state store: each token set's grant, kept durably and privately across restarts.

One file per token set, so that 10,000 token sets need no global lock and no directory scan
on the hot path: a keeper only ever touches its own file. Files are written with
``files.atomic_write`` (atomic, fsynced, mode applied on every write)::

    <state_dir>/                 0700, made (or tightened) by prepare()
    ├── .digest-key              0600: 32 random bytes, made by the first prepare()
    └── berlin-01/               0700, created by the first save of the merchant
        ├── bill.json            0600: {"version": 1, "fingerprint": ..., ...}
        └── store.json

Corrupt state is never fatal: ``load`` logs one warning (naming merchant, scope, path and
why, never the content) and answers None, and the keeper falls back to a password login.
All methods but ``digest`` block; the daemon calls them from a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import files
from .errors import OutputError
from .secret import Secret

log = logging.getLogger("anybilld.state")

VERSION = 1
KEY_FILE = ".digest-key"  # beside the merchant directories; never a merchant id (dot)
KEY_BYTES = 32
FILE_MODE = 0o600
DIR_MODE = 0o700

# 9999-12-31T23:59:59Z: the last time a date can show; anything later is not a time.
_LATEST_TIME = 253_402_300_799.0

# A grant is about 5 KiB of JSON; anything far larger is not ours, and is not read whole.
_MAX_SIZE = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class StoredGrant:
    """What survives a restart; times are wall-clock Unix seconds.

    ``fingerprint`` is ``TokenSetSpec.grant_fingerprint()`` of the identity that obtained
    the grant: the keeper reuses the grant only while it matches. The tokens are Secrets,
    so the ``repr`` masks them.
    """

    fingerprint: str
    refresh_token: Secret | None
    refresh_token_expires_at: float | None
    first_sign_in_at: float
    access_token: Secret | None
    access_token_expires_at: float | None
    obtained_at: float
    # A block after a permanent failure outlives a restart, so that neither a restart loop
    # nor a cron job of --once runs tries a refused password again before blocked_retry.
    # ``blocked_credentials`` is a slow salted digest of the refused credentials: a new
    # password lifts the block, and the file never holds anything that reveals the password.
    blocked_until: float | None = None
    blocked_reason: str | None = None
    blocked_code: str | None = None
    blocked_credentials: str | None = None
    # The same digest of the credentials whose password login obtained this grant. When
    # the configured password differs (a rotation while stopped), the next start logs in
    # with the new one at once, as a reload would, and keeps this grant until that works.
    # None in files written before it existed: the grant is taken as the current one's.
    grant_credentials: str | None = None


class StateStore:
    """Grants on disk under ``state_dir/<merchant>/<scope>.json``.

    Holds no lock and no cache: one keeper per (merchant, scope) is the only reader and
    writer of its file, and files of different token sets never interfere.
    """

    def __init__(self, state_dir: Path) -> None:
        self._key: bytes | None = None
        self._key_id = ""
        self._dir = Path(os.path.normpath(state_dir))

    @property
    def directory(self) -> Path:
        return self._dir

    def prepare(self) -> None:
        """Create ``state_dir`` with mode 0700, or make an existing one exactly 0700.

        Call once at start-up, together with ``files.remove_stale_temp_files(state_dir)``.
        Missing parent directories are created too (with the umask's default mode), unlike
        output_dir: state is private to the daemon, and nothing mounts into it. Raises
        OutputError.
        """
        try:
            os.makedirs(self._dir, mode=DIR_MODE, exist_ok=True)
            st = os.stat(self._dir)
        except OSError as exc:
            raise OutputError(
                f"{self._dir}: cannot create state directory: {exc.strerror}"
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{self._dir}: state directory is not a directory")
        current = stat.S_IMODE(st.st_mode)
        if current != DIR_MODE:
            # makedirs applied the umask; an existing directory may have been made by hand.
            # Refresh tokens are as good as passwords: nobody else may list or read them.
            if current & 0o077:
                log.warning(
                    "state directory %s had mode %04o; tightened to %04o",
                    self._dir,
                    current,
                    DIR_MODE,
                )
            try:
                os.chmod(self._dir, DIR_MODE)
            except OSError as exc:
                raise OutputError(
                    f"{self._dir}: cannot set mode {DIR_MODE:04o}: {exc.strerror}"
                ) from exc
        self._key = self._load_key()
        self._key_id = _key_id(self._key)

    def digest(self, text: str) -> str:
        """HMAC-SHA256 of ``text`` under this state directory's own random key.

        For what must be recognised later but never revealed (the credentials a block was
        earned with): without the key, which is as private as the refresh tokens beside
        it, the digest does not help anyone guess a password. Cheap, so it runs on the loop.
        """
        key, kid = self._the_key()
        return f"{kid}:{hmac.new(key, text.encode(), hashlib.sha256).hexdigest()}"

    def recognises(self, stored_digest: str | None) -> bool:
        """Whether ``stored_digest`` was made under this directory's key, so comparing it
        with ``digest()`` means something. Not after the key file was lost or replaced:
        then a stored digest is unknown, never a changed password (a new login, a lifted
        block). Digests from before key ids existed are taken as made under this key."""
        if stored_digest is None:
            return False
        kid, sep, _ = stored_digest.partition(":")
        return not sep or kid == self._the_key()[1]

    def _the_key(self) -> tuple[bytes, str]:
        """The key and its id, computed once: every save of a blocked token set digests."""
        if self._key is None:  # prepare() loads it; this is for stores used without it
            self._key = self._load_key()
            self._key_id = _key_id(self._key)
        return self._key, self._key_id

    def _load_key(self) -> bytes:
        path = self._dir / KEY_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                key = files.read_at_most(fd, KEY_BYTES + 1)
            finally:
                os.close(fd)
            if len(key) == KEY_BYTES:
                return key
            log.warning("%s is not a %d-byte key; making a new one", path, KEY_BYTES)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"{path}: cannot read: {exc.strerror}") from exc
        key = os.urandom(KEY_BYTES)
        files.atomic_write(path, key, mode=FILE_MODE, group=None, root=self._dir)
        return key

    def path(self, merchant: str, scope: str) -> Path:
        """``state_dir/<merchant>/<scope>.json``; ValueError for a name that is no file name."""
        return self._dir / _component("merchant", merchant) / f"{_component('scope', scope)}.json"

    def load(self, merchant: str, scope: str) -> StoredGrant | None:
        """The stored grant, or None if there is none or it cannot be used.

        Never raises for what is on disk: a missing file is silently None; an unreadable,
        truncated, garbage, wrongly typed or unknown-version file is None plus one WARNING.
        Unknown extra fields are ignored. Does not compare the fingerprint: that is the
        keeper's decision.
        """
        path = self.path(merchant, scope)
        try:
            raw = _read_limited(path)
            return _decode(raw)
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = f"unreadable: {exc.strerror or type(exc).__name__}"
        except _CorruptState as exc:
            reason = exc.reason
        log.warning(
            "ignoring state of merchant=%s scope=%s at %s: %s; the next login uses the password",
            merchant,
            scope,
            path,
            reason,
            extra={"merchant": merchant, "scope": scope},
        )
        return None

    def save(self, merchant: str, scope: str, grant: StoredGrant) -> None:
        """Write ``grant`` atomically and durably (mode 0600, directory 0700).

        Raises OutputError (``prepare`` not run, disk full, ...); the previous state is then
        left as it was.
        """
        path = self.path(merchant, scope)
        files.atomic_write(
            path,
            _encode(grant),
            mode=FILE_MODE,  # atomic_write derives 0700 for the merchant directory from it
            group=None,
            root=self._dir,
        )
        # atomic_write sets a directory's mode only when it creates it; a merchant
        # directory made by hand or restored from a backup keeps its own. State is private:
        # make it exactly 0700, as prepare() does for state_dir.
        try:
            st = os.lstat(path.parent)
            if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != DIR_MODE:
                os.chmod(path.parent, DIR_MODE)
        except OSError as exc:
            raise OutputError(
                f"{path.parent}: cannot set mode {DIR_MODE:04o}: {exc.strerror}"
            ) from exc

    def remove(self, merchant: str, scope: str) -> None:
        """Remove the state of one token set, and its merchant directory once empty.

        A missing file is fine. Raises OutputError.
        """
        files.remove_output(self.path(merchant, scope), root=self._dir)

    def stored_keys(self) -> set[tuple[str, str]]:
        """Every (merchant, scope) with a state file: to clean up after removed token sets.

        Scans the whole directory: meant for start-up and reload, not the hot path.
        Symlinks and other odd entries are ignored, and so is an unreadable merchant
        directory; a missing state_dir holds nothing.
        """
        keys: set[tuple[str, str]] = set()
        try:
            top = os.scandir(self._dir)
        except FileNotFoundError:
            return keys
        except OSError as exc:
            raise OutputError(f"{self._dir}: cannot list state directory: {exc.strerror}") from exc
        with top:
            for merchant in top:
                if not merchant.is_dir(follow_symlinks=False):
                    continue
                try:
                    inner = os.scandir(merchant.path)
                except OSError:
                    continue
                with inner:
                    for entry in inner:
                        if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                            keys.add((merchant.name, entry.name.removesuffix(".json")))
        return keys


def _component(kind: str, value: str) -> str:
    # Config validation already restricts ids; this keeps a bad one from leaving state_dir.
    if value in ("", ".", "..") or "/" in value or "\0" in value:
        raise ValueError(f"{kind} {value!r} cannot be used as a file name")
    return value


def _read_limited(path: Path) -> bytes:
    """The file's bytes; _CorruptState if it is not a regular file or is too large.

    O_NONBLOCK so that a FIFO in its place cannot hang the thread; O_NOFOLLOW because a
    symlink is not ours (``save`` refuses to replace one as well).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _CorruptState("not a regular file")
        raw = files.read_at_most(fd, _MAX_SIZE + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_SIZE:
        raise _CorruptState(f"larger than {_MAX_SIZE} bytes")
    return raw


class _CorruptState(Exception):
    """The state file's content cannot be used; ``reason`` never quotes the content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _encode(grant: StoredGrant) -> bytes:
    doc = {
        "version": VERSION,
        "fingerprint": grant.fingerprint,
        "refresh_token": _reveal(grant.refresh_token),
        "refresh_token_expires_at": grant.refresh_token_expires_at,
        "first_sign_in_at": grant.first_sign_in_at,
        "access_token": _reveal(grant.access_token),
        "access_token_expires_at": grant.access_token_expires_at,
        "obtained_at": grant.obtained_at,
        "blocked_until": grant.blocked_until,
        "blocked_reason": grant.blocked_reason,
        "blocked_code": grant.blocked_code,
        "blocked_credentials": grant.blocked_credentials,
        "grant_credentials": grant.grant_credentials,
    }
    # allow_nan=False: a NaN time is a bug upstream, and would not load again anyway.
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()


def _reveal(secret: Secret | None) -> str | None:
    return None if secret is None else secret.reveal()


def _decode(raw: bytes) -> StoredGrant:
    """Parse a state file strictly; _CorruptState with a content-free reason otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _CorruptState("not UTF-8 text") from None
    if not text.strip():
        raise _CorruptState("empty")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        # lineno/colno only: the exception's doc attribute holds the whole text.
        raise _CorruptState(f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError):
        # NaN/Infinity, an integer too long to convert, nesting too deep for the parser.
        raise _CorruptState("not valid JSON") from None
    if not isinstance(doc, dict):
        raise _CorruptState("not a JSON object")
    if "version" not in doc:
        raise _CorruptState("no version field")
    version = doc["version"]
    if type(version) is not int:  # not isinstance: True == 1
        raise _CorruptState("version is not an integer")
    if version != VERSION:
        raise _CorruptState(f"unsupported version {version} (this daemon reads {VERSION})")
    refresh_token = _opt_text(doc, "refresh_token")
    access_token = _opt_text(doc, "access_token")
    return StoredGrant(
        fingerprint=_text(doc, "fingerprint"),
        refresh_token=None if refresh_token is None else Secret(refresh_token),
        refresh_token_expires_at=_opt_time(doc, "refresh_token_expires_at"),
        first_sign_in_at=_time(doc, "first_sign_in_at"),
        access_token=None if access_token is None else Secret(access_token),
        access_token_expires_at=_opt_time(doc, "access_token_expires_at"),
        obtained_at=_time(doc, "obtained_at"),
        # Optional: files written before blocks were stored have none of these.
        blocked_until=_opt_time(doc, "blocked_until") if "blocked_until" in doc else None,
        blocked_reason=_opt_text(doc, "blocked_reason") if "blocked_reason" in doc else None,
        blocked_code=_opt_text(doc, "blocked_code") if "blocked_code" in doc else None,
        blocked_credentials=(
            _opt_text(doc, "blocked_credentials") if "blocked_credentials" in doc else None
        ),
        grant_credentials=(
            _opt_text(doc, "grant_credentials") if "grant_credentials" in doc else None
        ),
    )


def _reject_constant(name: str) -> object:
    raise ValueError("non-finite number")


def _get(doc: dict[str, object], key: str) -> object:
    # Every field is written every time, null or not: a missing one means a foreign file.
    if key not in doc:
        raise _CorruptState(f"field {key!r} is missing")
    return doc[key]


def _opt_text(doc: dict[str, object], key: str) -> str | None:
    value = _get(doc, key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _CorruptState(f"field {key!r} is not a non-empty string")
    return value


def _text(doc: dict[str, object], key: str) -> str:
    value = _opt_text(doc, key)
    if value is None:
        raise _CorruptState(f"field {key!r} is null")
    return value


def _opt_time(doc: dict[str, object], key: str) -> float | None:
    value = _get(doc, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):  # True is an int
        raise _CorruptState(f"field {key!r} is not a number")
    try:
        result = float(value)
    except OverflowError:
        raise _CorruptState(f"field {key!r} is out of range") from None
    if not math.isfinite(result) or result < 0 or result > _LATEST_TIME:
        raise _CorruptState(f"field {key!r} is not a time")
    return result


def _time(doc: dict[str, object], key: str) -> float:
    value = _opt_time(doc, key)
    if value is None:
        raise _CorruptState(f"field {key!r} is null")
    return value


def _key_id(key: bytes) -> str:
    """A short name of the key stored with each digest; tells keys apart, reveals nothing."""
    return hashlib.sha256(b"anybilld digest key id\0" + key).hexdigest()[:12]
