"""Token file formats and the atomic, durable writer that publishes them.

``render`` turns a ``PublishedToken`` into the bytes of one output format (pure, no I/O).
``atomic_write`` puts bytes on disk so that a reader sees the old file or the new one, never
a partial or empty one, also across a crash or power loss. ``write_outputs`` is what a keeper
calls: it renders and writes every output of one token set, each independently.
``remove_output`` and ``remove_stale_temp_files`` clean up after removed token sets and
after crashes.

Everything here is blocking: the daemon calls it from a worker thread, never on the loop.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .config import OutputFormat, OutputTarget
from .errors import OutputError
from .secret import Secret

log = logging.getLogger("anybilld.files")

TEMP_SUFFIX = ".anybilld-tmp"

# RFC 6750 b64token, the syntax of a Bearer token (a JWT is a subset), minus a leading "~":
# sh would tilde-expand "VAR=~x". With this alphabet the env format needs no quoting for sh
# or systemd's EnvironmentFile=, and the header format cannot be split by a CR/LF.
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._+/][A-Za-z0-9\-._~+/]*=*")

# Temp names keep at most this much of the target's name, so that a long (but legal) target
# name does not push the temp name over NAME_MAX (255 bytes).
_TEMP_NAME_KEEP = 100


@dataclass(frozen=True, kw_only=True)
class PublishedToken:
    """What the token files tell consumers; times are wall-clock Unix seconds."""

    access_token: Secret
    expires_at: float
    obtained_at: float
    merchant: str
    scope: str


def rfc3339(ts: float) -> str:
    """``2026-01-02T03:04:05Z``: UTC, whole seconds, rounded down.

    Rounding down means a consumer never believes a token lives longer than it does; for
    the positive timestamps used here it equals ``int(ts)``.
    """
    return datetime.fromtimestamp(math.floor(ts), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(fmt: OutputFormat, token: PublishedToken) -> bytes:
    """The bytes of ``token`` in output format ``fmt`` (README, "Token files").

    Raises OutputError if the access token is not a Bearer token (RFC 6750 b64token): such a
    token would need quoting in the env format and could inject lines into the header
    format, so it is refused for every format rather than written differently per format.
    """
    value = token.access_token.reveal()
    if not _TOKEN_RE.fullmatch(value):
        # Never the value itself: it is a secret, even when malformed.
        raise OutputError(
            f"access token of merchant={token.merchant} scope={token.scope} "
            f"is not an RFC 6750 bearer token ({len(value)} characters); not written"
        )
    expires = rfc3339(token.expires_at)
    if fmt == "json":
        doc = {
            "access_token": value,
            "token_type": "Bearer",
            "expires_at": expires,
            "expires_at_unix": math.floor(token.expires_at),
            "obtained_at": rfc3339(token.obtained_at),
            "merchant": token.merchant,
            "scope": token.scope,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()
    if fmt == "raw":
        return value.encode()
    if fmt == "env":
        return f"ANYBILL_ACCESS_TOKEN={value}\nANYBILL_TOKEN_EXPIRES_AT={expires}\n".encode()
    if fmt == "header":
        return f"Authorization: Bearer {value}".encode()
    raise ValueError(f"unknown output format {fmt!r}")


@dataclass(frozen=True, kw_only=True)
class OutputResult:
    """How writing one output went: ``written`` is False when unchanged or failed."""

    target: OutputTarget
    written: bool
    error: OutputError | None

    @property
    def ok(self) -> bool:
        return self.error is None


def write_outputs(
    targets: Iterable[OutputTarget], token: PublishedToken, *, root: Path
) -> list[OutputResult]:
    """Render and atomically write every output of one token set; one result per target.

    Each target is written on its own: a broken output (missing group, a symlink in the
    way, a full disk) is reported in its result and does not stop the others. Only
    OutputError is caught; anything else is a bug and propagates. Blocking.
    """
    rendered: dict[OutputFormat, bytes | OutputError] = {}
    results = []
    for target in targets:
        if target.format not in rendered:
            try:
                rendered[target.format] = render(target.format, token)
            except OutputError as exc:
                rendered[target.format] = exc
        data = rendered[target.format]
        if isinstance(data, OutputError):
            results.append(OutputResult(target=target, written=False, error=data))
            continue
        try:
            written = atomic_write(
                target.path, data, mode=target.mode, group=target.group, root=root
            )
        except OutputError as exc:
            results.append(OutputResult(target=target, written=False, error=exc))
        else:
            results.append(OutputResult(target=target, written=written, error=None))
    return results


def atomic_write(
    path: Path, data: bytes, *, mode: int, group: str | int | None, root: Path
) -> bool:
    """Replace the file at ``path`` with ``data``, atomically and durably.

    Returns True when the file was written, False when it already held exactly ``data``
    with this mode and group (nothing is touched, so readers watching it see no event).
    Raises OutputError naming the path and the cause, never the data. On failure the target
    is left as it was and no temp file remains.

    1. Resolve ``group``: a name via the group database, an int as a gid, None for "leave
       the group the file gets on creation" (the daemon's, or a setgid directory's). A
       missing group fails here, before anything is touched.
    2. Refuse if the target exists and is a symbolic link or not a regular file.
    3. ``root`` (output_dir or state_dir) must exist and be a directory; it is never
       created here. ``path`` must lie below it. Missing directories between ``root`` and
       the file are created, with the file mode's read bits turned into r-x (0640 -> 0750,
       0600 -> 0700) and the same group, so that group members can reach the file.
    4. If the target already holds exactly ``data``, has exactly ``mode`` and (if given)
       the group, return False.
    5. Create ``.<name>.<random>.anybilld-tmp`` in the target's own directory (a rename is
       only atomic within one filesystem), O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode 0600.
    6. Write all of ``data``, looping on short writes.
    7. fchown to the group (if given), then fchmod to exactly ``mode``.
    8. fsync the temp file, then close it.
    9. Rename it over the target.
    10. fsync the directory, so that the rename survives a power loss.

    Layout while a write is in flight::

        <root>/                         exists already; never created here
        └── berlin-01/                  step 3: created if missing, 0750 for a 0640 file
            ├── bill.json               the old bytes until step 9, the new ones after
            └── .bill.json.5c1e0a9b27f3.anybilld-tmp
                                        steps 5-8: 0600, then the final mode; gone at 9

    Caveats: a failure in step 10 is reported although the new file is already visible (it
    may not survive a power loss; the caller retries). Directories are given a mode and
    group only when this call creates them: outputs of different modes sharing a directory
    get the directory mode of whichever was written first. Only the target itself is
    checked for a symlink; symlinked directories below ``root`` are followed, as an operator
    may put them there on purpose.
    """
    path, root = _below(path, root)

    # (1) Resolved on every write, not cached: a group created after start-up is picked up.
    gid = _resolve_group(group, path)

    # (2) A symlink is never followed: whoever can plant a link here would otherwise have
    # tokens written wherever it points (and with our mode, e.g. readable by another group).
    # Nor is it replaced: an operator put it there on purpose, and silently swapping it for a
    # file would disconnect whatever reads through it. The same goes for non-regular files.
    try:
        st: os.stat_result | None = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None  # nothing there yet; a parent that is no directory is step 3's to report
    except OSError as exc:
        raise _error(path, "cannot inspect the target", exc) from exc
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{path}: is a symbolic link; never followed nor replaced")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: exists and is not a regular file")

    # (3)
    dir_mode = _dir_mode(mode)
    _ensure_parents(path, root, dir_mode, gid)

    # (4)
    if st is not None and _unchanged(path, data, mode, gid):
        return False

    tmp: Path | None = None
    fd = -1
    doing = "cannot create a temp file"
    try:
        # (5)
        name = f".{path.name[:_TEMP_NAME_KEEP]}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        candidate = path.parent / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(candidate, flags, 0o600)
        except FileNotFoundError:
            # A concurrent remove_output() of a sibling may have removed the directory
            # since step 3, as it became empty; create it again, once.
            _ensure_parents(path, root, dir_mode, gid)
            fd = os.open(candidate, flags, 0o600)
        tmp = candidate  # only now ours to clean up: O_EXCL failing means someone else's

        # (6)
        doing = "cannot write the temp file"
        _write_all(fd, data)

        # (7) chown before chmod: a chown may clear set-id bits. chmod at all, because
        # open() applied the umask to 0600 and the configured mode may be wider.
        if gid != -1:
            doing = f"cannot set group {group!r} (gid {gid})"
            os.fchown(fd, -1, gid)
        doing = f"cannot set mode {mode:04o}"
        os.fchmod(fd, mode)

        # (8) close() is checked too: NFS reports delayed write errors there.
        doing = "cannot fsync the temp file"
        os.fsync(fd)
        doing = "cannot close the temp file"
        closing, fd = fd, -1  # released even if close() fails: never close it twice
        os.close(closing)

        # (9) rename() replaces a symlink that appeared since step 2 instead of following it.
        doing = "cannot rename the temp file over the target"
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _error(path, doing, exc) from exc
    finally:
        if fd >= 0:
            _close_quietly(fd)
        if tmp is not None:
            _unlink_quietly(tmp)

    # (10)
    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _error(path, "written, but cannot fsync its directory", exc) from exc
    return True


def remove_output(path: Path, *, root: Path) -> None:
    """Remove the file at ``path`` and the directories below ``root`` it leaves empty.

    A missing file is fine. A symlink or other non-regular file in its place is not ours:
    it is left alone and reported as OutputError, consistently with ``atomic_write``.
    Directories are removed only while empty; ``root`` itself is never removed. Raises
    OutputError.
    """
    path, root = _below(path, root)
    changed: Path | None = None
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise _error(path, "cannot inspect the file to remove", exc) from exc
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{path}: not a regular file; not removed")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _error(path, "cannot remove", exc) from exc
        changed = path.parent

    d = path.parent
    while d != root:
        try:
            os.rmdir(d)
        except OSError:
            break  # not empty (another output lives there), already gone, or not ours
        changed = d.parent
        d = d.parent

    if changed is not None:
        try:
            _fsync_dir(changed)
        except FileNotFoundError:
            pass  # removed concurrently: nothing left to make durable
        except OSError as exc:
            raise _error(path, "removed, but cannot fsync its directory", exc) from exc


# The mode of output_dir (and of its missing parents) when the daemon creates it. Each
# output may have another group and mode, and the consumers of every one of them must be
# able to reach their files: the files' own modes, and the directories created below with
# modes derived from them, decide who may read a token, as they do under a directory that
# an operator made.
OUTPUT_DIR_MODE = 0o755


def prepare_output_dir(root: Path) -> None:
    """Create ``root`` (output_dir) and any missing parent with mode 0755, whatever the
    umask; an existing directory keeps its mode, owner and group. Raises OutputError.

    Call it at start-up only: at run time a vanished output_dir may be an unmounted
    filesystem, and tokens written into the bare mount point would be hidden by the mount.
    """
    missing: list[Path] = []
    d = root
    while not os.path.lexists(d) and d.parent != d:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        _make_dir(d, OUTPUT_DIR_MODE, -1, for_path=root)
    if not os.path.isdir(root):
        raise OutputError(f"{root}: output directory is not a directory")


def remove_stale_temp_files(directory: Path) -> int:
    """Remove ``*.anybilld-tmp`` files below ``directory``, left by a crash; return how many.

    Call it at start-up only, before any writer runs: it would otherwise delete the temp
    file of a write in progress, which then fails. Symlinked directories are not followed.
    A missing ``directory`` counts as clean; files that cannot be removed are logged and
    skipped, since a stale temp file harms nobody but the disk.
    """

    def walk_error(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            log.warning("cannot scan %s for stale temp files: %s", exc.filename, exc.strerror)

    removed = 0
    for dirpath, _dirnames, filenames in os.walk(directory, onerror=walk_error):
        for name in filenames:
            if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                continue
            tmp = Path(dirpath, name)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove stale temp file %s: %s", tmp, exc.strerror)
                continue
            removed += 1
    if removed:
        log.info("removed %d stale temp file(s) below %s", removed, directory)
    return removed


def _below(path: Path, root: Path) -> tuple[Path, Path]:
    """Normalized ``path`` and ``root``; OutputError unless ``path`` lies strictly below.

    Lexical only: guards against a ``..`` that slipped through config validation.
    """
    npath = Path(os.path.normpath(path))
    nroot = Path(os.path.normpath(root))
    if npath == nroot or not npath.is_relative_to(nroot):
        raise OutputError(f"{path}: not below {root}; refused")
    return npath, nroot


def _resolve_group(group: str | int | None, path: Path) -> int:
    """The gid to chown to, or -1 for "leave as created"."""
    if group is None:
        return -1
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OutputError(f"{path}: group {group!r} does not exist") from None


def _dir_mode(mode: int) -> int:
    """Owner rwx; r-x for group/other where the file mode lets them read (never write)."""
    read = mode & 0o044
    return 0o700 | read | (read >> 2)


def _ensure_parents(path: Path, root: Path, dir_mode: int, gid: int) -> None:
    """Step 3 of ``atomic_write``: check ``root``, create what is missing below it."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        # Not created: a missing output_dir may be an unmounted filesystem, and tokens written
        # into the mount point would be hidden once it is mounted again.
        raise OutputError(
            f"{path}: {root} does not exist (not created: it may be an unmounted filesystem)"
        ) from None
    except OSError as exc:
        raise _error(path, f"cannot inspect {root}", exc) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: {root} is not a directory")

    parent = path.parent
    if parent == root:
        return
    # Hot path: the directory exists already; one stat and done.
    try:
        if stat.S_ISDIR(os.stat(parent).st_mode):
            return
    except OSError:
        pass

    d = root
    for part in parent.relative_to(root).parts:
        d = d / part
        _make_dir(d, dir_mode, gid, for_path=path)


def _make_dir(d: Path, mode: int, gid: int, *, for_path: Path) -> None:
    """Create ``d`` with exactly ``mode`` (and group ``gid`` unless -1), durably; one that
    exists already (made meanwhile, by a sibling output or anyone) is left as it is."""
    try:
        os.mkdir(d, mode)
    except FileExistsError:
        return
    except OSError as exc:
        raise _error(for_path, f"cannot create directory {d}", exc) from exc
    try:
        # mkdir applied the umask (0777 under umask 000), so set the mode explicitly.
        if gid != -1:
            os.chown(d, -1, gid)
        os.chmod(d, mode)
        # The new entry must survive a crash, or the file below it would not.
        _fsync_dir(d.parent)
    except OSError as exc:
        raise _error(for_path, f"cannot set up directory {d}", exc) from exc


def _unchanged(path: Path, data: bytes, mode: int, gid: int) -> bool:
    """Step 4: does the target hold ``data`` with ``mode`` and ``gid`` already?

    Any error reading it answers "no": the write that follows then reports the real cause.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or stat.S_IMODE(st.st_mode) != mode
            or (gid != -1 and st.st_gid != gid)
            or st.st_size != len(data)
        ):
            return False
        # One more byte than expected shows a file that grew meanwhile.
        return read_at_most(fd, len(data) + 1) == data
    except OSError:
        return False
    finally:
        _close_quietly(fd)


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``, looping over short reads; fewer only at EOF."""
    chunks = []
    left = limit
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # never for a regular file; guards against looping forever
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory (EINVAL); there is nothing more to do
        # for durability there, and failing every write would help no one.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _error(path: Path, doing: str, exc: OSError) -> OutputError:
    """OutputError naming the path, what failed and the errno text (never any data)."""
    cause = exc.strerror or type(exc).__name__
    return OutputError(f"{path}: {doing}: {cause}")


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
