"""Token file formats and the atomic writer, on real files in tmp_path.

Mocks only where a fault cannot be produced otherwise (a full disk, a failing rename).
"""

from __future__ import annotations

import errno
import grp
import json
import os
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from anybilld import files
from anybilld.config import OutputFormat, OutputTarget
from anybilld.errors import OutputError
from anybilld.files import (
    PublishedToken,
    atomic_write,
    remove_output,
    remove_stale_temp_files,
    render,
    write_outputs,
)
from anybilld.secret import Secret

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_A"
PUBLISHED = PublishedToken(
    access_token=Secret(TOKEN),
    expires_at=1_800_003_600.75,  # 2027-01-15T09:00:00.75Z
    obtained_at=1_800_000_000.2,  # 2027-01-15T08:00:00.2Z
    merchant="berlin-01",
    scope="bill",
)
NO_SUCH_GROUP = "anybilld-test-no-such-group"
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(files.TEMP_SUFFIX)]


# --- formats ---------------------------------------------------------------------------

EXPECTED: list[tuple[OutputFormat, bytes]] = [
    (
        "json",
        (
            "{\n"
            f'  "access_token": "{TOKEN}",\n'
            '  "token_type": "Bearer",\n'
            '  "expires_at": "2027-01-15T09:00:00Z",\n'
            '  "expires_at_unix": 1800003600,\n'
            '  "obtained_at": "2027-01-15T08:00:00Z",\n'
            '  "merchant": "berlin-01",\n'
            '  "scope": "bill"\n'
            "}\n"
        ).encode(),
    ),
    ("raw", TOKEN.encode()),
    (
        "env",
        f"ANYBILL_ACCESS_TOKEN={TOKEN}\nANYBILL_TOKEN_EXPIRES_AT=2027-01-15T09:00:00Z\n".encode(),
    ),
    ("header", f"Authorization: Bearer {TOKEN}".encode()),
]


@pytest.mark.parametrize(("fmt", "expected"), EXPECTED, ids=[f for f, _ in EXPECTED])
def test_render_exact_bytes(fmt: OutputFormat, expected: bytes) -> None:
    assert render(fmt, PUBLISHED) == expected


def test_render_json_is_consistent() -> None:
    doc = json.loads(render("json", PUBLISHED))
    assert doc["expires_at_unix"] == int(PUBLISHED.expires_at)
    parsed = datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
    assert parsed.timestamp() == doc["expires_at_unix"]
    assert doc["access_token"] == TOKEN


def test_render_env_lines_parse() -> None:
    lines = render("env", PUBLISHED).decode().splitlines()
    assert dict(line.split("=", 1) for line in lines) == {
        "ANYBILL_ACCESS_TOKEN": TOKEN,
        "ANYBILL_TOKEN_EXPIRES_AT": "2027-01-15T09:00:00Z",
    }


@pytest.mark.parametrize("token", [TOKEN, "abc+/def==", "a~b.c-d_e"])
def test_render_env_is_sourced_by_sh_unchanged(tmp_path: Path, token: str) -> None:
    env_file = tmp_path / "token.env"
    env_file.write_bytes(render("env", replace(PUBLISHED, access_token=Secret(token))))
    out = subprocess.run(
        ["sh", "-c", '. "$1" && printf %s "$ANYBILL_ACCESS_TOKEN"', "sh", str(env_file)],
        capture_output=True,
        check=True,
        text=True,
        env={"HOME": "/nonexistent", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert out.stdout == token


@pytest.mark.parametrize("fmt", ["json", "raw", "env", "header"])
@pytest.mark.parametrize(
    "token",
    ["", "two words", "x\r\nX-Injected: 1", "~root", "a$(id)", 'a"b', "a=b", "ä"],
    ids=["empty", "space", "crlf", "tilde", "subst", "quote", "inner-eq", "non-ascii"],
)
def test_render_refuses_what_is_no_bearer_token(fmt: OutputFormat, token: str) -> None:
    bad = replace(PUBLISHED, access_token=Secret(token))
    with pytest.raises(OutputError) as info:
        render(fmt, bad)
    if token:
        assert token not in str(info.value)


# --- atomic_write: content, mode, group -----------------------------------------------


def test_write_creates_the_file(root: Path) -> None:
    target = root / "berlin-01" / "bill.json"
    assert atomic_write(target, b"one", mode=0o640, group=None, root=root) is True
    assert target.read_bytes() == b"one"
    assert atomic_write(target, b"two", mode=0o640, group=None, root=root) is True
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["bill.json"]


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o777])
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o660])
def test_mode_is_exact_whatever_the_umask(
    root: Path, umask: Callable[[int], int], mask: int, mode: int
) -> None:
    umask(mask)
    target = root / "m" / "t"
    atomic_write(target, b"x", mode=mode, group=None, root=root)
    assert mode_of(target) == mode


def test_mode_is_reapplied_when_only_the_mode_differs(root: Path) -> None:
    target = root / "t"
    atomic_write(target, b"same", mode=0o640, group=None, root=root)
    target.chmod(0o666)
    assert atomic_write(target, b"same", mode=0o640, group=None, root=root) is True
    assert mode_of(target) == 0o640


def test_unchanged_file_is_not_touched(root: Path) -> None:
    target = root / "t"
    atomic_write(target, b"same", mode=0o640, group=os.getgid(), root=root)
    before = os.stat(target)
    assert atomic_write(target, b"same", mode=0o640, group=os.getgid(), root=root) is False
    after = os.stat(target)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_ctime_ns,
    )


def test_same_length_other_content_is_rewritten(root: Path) -> None:
    target = root / "t"
    atomic_write(target, b"aaaa", mode=0o640, group=None, root=root)
    assert atomic_write(target, b"bbbb", mode=0o640, group=None, root=root) is True
    assert target.read_bytes() == b"bbbb"


def test_group_by_gid_and_by_name(root: Path) -> None:
    gid = os.getgid()
    by_gid, by_name = root / "a" / "gid", root / "b" / "name"
    atomic_write(by_gid, b"x", mode=0o640, group=gid, root=root)
    atomic_write(by_name, b"x", mode=0o640, group=grp.getgrgid(gid).gr_name, root=root)
    assert os.stat(by_gid).st_gid == gid
    assert os.stat(by_name).st_gid == gid


@pytest.mark.skipif(not IS_ROOT, reason="chown to a foreign group needs root")
def test_group_is_reapplied_on_every_write(root: Path) -> None:
    target = root / "m" / "t"
    atomic_write(target, b"x", mode=0o640, group=None, root=root)
    assert atomic_write(target, b"x", mode=0o640, group=4242, root=root) is True
    assert os.stat(target).st_gid == 4242
    assert atomic_write(target, b"x", mode=0o640, group=4242, root=root) is False


@pytest.mark.skipif(not IS_ROOT, reason="chown to a foreign group needs root")
def test_created_directories_get_the_group(root: Path) -> None:
    atomic_write(root / "a" / "b" / "t", b"x", mode=0o640, group=4242, root=root)
    assert os.stat(root / "a").st_gid == 4242
    assert os.stat(root / "a" / "b").st_gid == 4242


def test_missing_group_is_an_error_and_touches_nothing(root: Path) -> None:
    target = root / "m" / "t"
    with pytest.raises(OutputError, match=NO_SUCH_GROUP):
        atomic_write(target, b"x", mode=0o640, group=NO_SUCH_GROUP, root=root)
    assert list(root.iterdir()) == []


# --- atomic_write: refusals and directories --------------------------------------------


def test_symlink_target_is_refused_and_left_alone(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = root / "t"
    link.symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        atomic_write(link, b"token", mode=0o640, group=None, root=root)
    assert link.is_symlink()
    assert os.readlink(link) == str(victim)
    assert victim.read_bytes() == b"precious"
    assert temp_files(root) == []


def test_dangling_symlink_is_refused(root: Path, tmp_path: Path) -> None:
    link = root / "t"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        atomic_write(link, b"token", mode=0o640, group=None, root=root)
    assert not (tmp_path / "nowhere").exists()


def test_non_regular_target_is_refused(root: Path) -> None:
    (root / "t").mkdir()
    with pytest.raises(OutputError, match="not a regular file"):
        atomic_write(root / "t", b"x", mode=0o640, group=None, root=root)


def test_missing_root_is_not_created(tmp_path: Path) -> None:
    root = tmp_path / "unmounted"
    with pytest.raises(OutputError, match="does not exist"):
        atomic_write(root / "m" / "t", b"x", mode=0o640, group=None, root=root)
    assert not root.exists()


def test_root_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "file"
    root.write_bytes(b"")
    with pytest.raises(OutputError, match="not a directory"):
        atomic_write(root / "t", b"x", mode=0o640, group=None, root=root)


@pytest.mark.parametrize("mask", [0o000, 0o077, 0o022])
def test_output_dir_and_its_missing_parents_are_created_0755_whatever_the_umask(
    tmp_path: Path, umask: Callable[[int], int], mask: int
) -> None:
    umask(mask)
    top = tmp_path / "var"
    files.prepare_output_dir(top / "lib" / "tokens")
    for d in (top, top / "lib", top / "lib" / "tokens"):
        assert mode_of(d) == 0o755, d
    files.prepare_output_dir(top / "lib" / "tokens")  # again: nothing to do
    assert mode_of(top / "lib" / "tokens") == 0o755


@pytest.mark.parametrize("existing", [0o700, 0o777, 0o750])
def test_an_existing_output_dir_keeps_its_mode(
    tmp_path: Path, umask: Callable[[int], int], existing: int
) -> None:
    umask(0)
    root = tmp_path / "tokens"
    root.mkdir()
    os.chmod(root, existing)
    files.prepare_output_dir(root / "sub")
    assert mode_of(root) == existing
    assert mode_of(root / "sub") == 0o755
    files.prepare_output_dir(root)
    assert mode_of(root) == existing


def test_an_output_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError, match="not a directory"):
        files.prepare_output_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot create"):
        files.prepare_output_dir(tmp_path / "file" / "tokens")


@pytest.mark.parametrize("rel", ["../escape", "m/../../escape", "."])
def test_path_must_lie_below_root(root: Path, rel: str) -> None:
    with pytest.raises(OutputError, match="not below"):
        atomic_write(root / rel, b"x", mode=0o640, group=None, root=root)
    assert not (root.parent / "escape").exists()


@pytest.mark.parametrize(
    ("mode", "dir_mode"), [(0o640, 0o750), (0o600, 0o700), (0o644, 0o755), (0o660, 0o750)]
)
def test_intermediate_directories_get_the_derived_mode(
    root: Path, umask: Callable[[int], int], mode: int, dir_mode: int
) -> None:
    umask(0o077)
    root_mode = mode_of(root)
    atomic_write(root / "a" / "b" / "t", b"x", mode=mode, group=None, root=root)
    assert mode_of(root / "a") == dir_mode
    assert mode_of(root / "a" / "b") == dir_mode
    assert mode_of(root) == root_mode  # root itself is never changed


def test_existing_directories_keep_their_mode(root: Path) -> None:
    (root / "m").mkdir(mode=0o711)
    os.chmod(root / "m", 0o711)
    atomic_write(root / "m" / "t", b"x", mode=0o640, group=None, root=root)
    assert mode_of(root / "m") == 0o711


def test_long_target_name_still_gets_a_temp_file(root: Path) -> None:
    target = root / ("n" * 250)
    assert atomic_write(target, b"x", mode=0o600, group=None, root=root) is True
    assert target.read_bytes() == b"x"


# --- atomic_write: faults --------------------------------------------------------------


def test_short_writes_are_completed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def dribble(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(os, "write", dribble)
    payload = bytes(range(256)) * 4
    atomic_write(root / "t", payload, mode=0o640, group=None, root=root)
    monkeypatch.undo()
    assert (root / "t").read_bytes() == payload


def _fail(err: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize(
    ("function", "err"),
    [
        ("write", errno.ENOSPC),
        ("fchown", errno.EPERM),
        ("fchmod", errno.EPERM),
        ("fsync", errno.EIO),
        ("close", errno.EIO),
        ("replace", errno.EXDEV),
    ],
)
def test_a_failure_leaves_the_target_and_no_temp_file(
    root: Path, monkeypatch: pytest.MonkeyPatch, function: str, err: int
) -> None:
    target = root / "m" / "t"
    atomic_write(target, b"old token", mode=0o640, group=None, root=root)
    group = os.getgid()  # so that fchown is called at all
    real = getattr(os, function)
    if function == "close":
        # Fail only the close of the temp file (as NFS may report a delayed write error);
        # closing other descriptors must still work.
        def close(fd: int) -> None:
            is_temp = os.readlink(f"/proc/self/fd/{fd}").endswith(files.TEMP_SUFFIX)
            real(fd)
            if is_temp:
                raise OSError(err, os.strerror(err))

        monkeypatch.setattr(os, "close", close)
    else:
        monkeypatch.setattr(os, function, _fail(err))
    with pytest.raises(OutputError) as info:
        atomic_write(target, b"NEW-SECRET-TOKEN", mode=0o640, group=group, root=root)
    monkeypatch.undo()
    message = str(info.value)
    assert str(target) in message
    assert os.strerror(err) in message
    assert "NEW-SECRET-TOKEN" not in message
    assert target.read_bytes() == b"old token"
    assert temp_files(root) == []


def test_a_failed_first_write_leaves_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", _fail(errno.ENOSPC))
    with pytest.raises(OutputError, match="No space left"):
        atomic_write(root / "t", b"x", mode=0o640, group=None, root=root)
    monkeypatch.undo()
    assert list(root.iterdir()) == []


def test_directory_removed_between_check_and_create_is_recreated(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race with remove_output() of a sibling: the directory vanishes after step 3.
    target = root / "m" / "t"
    real_ensure = files._ensure_parents
    calls: list[int] = []

    def ensure_then_vanish(*args: Any) -> None:
        real_ensure(*args)
        if not calls:
            calls.append(1)
            os.rmdir(root / "m")

    monkeypatch.setattr(files, "_ensure_parents", ensure_then_vanish)
    assert atomic_write(target, b"x", mode=0o640, group=None, root=root) is True
    assert target.read_bytes() == b"x"


@pytest.fixture
def memory_root(root: Path) -> Iterator[Path]:
    """A root on tmpfs when there is one, else ``root``.

    fsync is free on tmpfs, so a thousand rewrites cost CPU only and not the disk's (shared,
    variable) flush latency. Still real files: what keeps readers safe is the rename, not
    the fsync, which only matters for a power loss that no test can produce.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield root
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="anybilld-test-") as d:
        yield Path(d)


def test_readers_never_see_a_partial_file(memory_root: Path) -> None:
    root = memory_root
    target = root / "m" / "t.json"
    # Different lengths, so that a torn or truncated read cannot look like a payload.
    payloads = [(f"{i:04d}:" + "x" * (1 + (i * 997) % 9000)).encode() for i in range(1000)]
    allowed = set(payloads)
    atomic_write(target, payloads[0], mode=0o640, group=None, root=root)
    stop = threading.Event()
    bad: list[bytes] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            with open(target, "rb") as f:
                got = f.read()
            reads[0] += 1
            if got not in allowed:
                bad.append(got[:20])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for payload in payloads[1:]:
            atomic_write(target, payload, mode=0o640, group=None, root=root)
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert reads[0] > 100
    assert target.read_bytes() == payloads[-1]
    assert temp_files(root) == []


# --- write_outputs ---------------------------------------------------------------------


def test_write_outputs_writes_each_target_independently(root: Path, tmp_path: Path) -> None:
    (root / "m").mkdir()
    (root / "m" / "link").symlink_to(tmp_path / "elsewhere")
    targets = [
        OutputTarget(path=root / "m" / "bill.json", format="json", mode=0o640, group=None),
        OutputTarget(path=root / "m" / "link", format="raw", mode=0o640, group=None),
        OutputTarget(path=root / "m" / "bill.env", format="env", mode=0o640, group=NO_SUCH_GROUP),
        OutputTarget(path=root / "m" / "bill.raw", format="raw", mode=0o600, group=None),
    ]
    results = write_outputs(targets, PUBLISHED, root=root)
    assert [(r.target, r.ok, r.written) for r in results] == [
        (targets[0], True, True),
        (targets[1], False, False),
        (targets[2], False, False),
        (targets[3], True, True),
    ]
    assert "symbolic link" in str(results[1].error)
    assert NO_SUCH_GROUP in str(results[2].error)
    assert (root / "m" / "bill.raw").read_bytes() == TOKEN.encode()
    assert not (root / "m" / "bill.env").exists()

    again = write_outputs(targets, PUBLISHED, root=root)
    assert [r.written for r in again] == [False, False, False, False]


def test_write_outputs_with_a_malformed_token_writes_nothing(root: Path) -> None:
    bad = replace(PUBLISHED, access_token=Secret("not a token"))
    targets = [
        OutputTarget(path=root / "a.json", format="json", mode=0o640, group=None),
        OutputTarget(path=root / "a.env", format="env", mode=0o640, group=None),
    ]
    results = write_outputs(targets, bad, root=root)
    assert [r.ok for r in results] == [False, False]
    assert list(root.iterdir()) == []


# --- removal and crash leftovers -------------------------------------------------------


def test_remove_output_removes_empty_directories_but_not_root(root: Path) -> None:
    target = root / "a" / "b" / "t"
    atomic_write(target, b"x", mode=0o640, group=None, root=root)
    remove_output(target, root=root)
    assert root.is_dir()
    assert list(root.iterdir()) == []


def test_remove_output_keeps_directories_still_in_use(root: Path) -> None:
    gone, kept = root / "a" / "b" / "t", root / "a" / "u"
    atomic_write(gone, b"x", mode=0o640, group=None, root=root)
    atomic_write(kept, b"x", mode=0o640, group=None, root=root)
    remove_output(gone, root=root)
    assert not (root / "a" / "b").exists()
    assert kept.read_bytes() == b"x"


def test_remove_output_of_a_missing_file_is_fine(root: Path, tmp_path: Path) -> None:
    remove_output(root / "a" / "t", root=root)
    remove_output(tmp_path / "no-root" / "t", root=tmp_path / "no-root")
    assert root.is_dir()


def test_remove_output_leaves_a_symlink_alone(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (root / "t").symlink_to(victim)
    with pytest.raises(OutputError, match="not a regular file"):
        remove_output(root / "t", root=root)
    assert (root / "t").is_symlink()
    assert victim.read_bytes() == b"precious"


def test_remove_stale_temp_files(root: Path) -> None:
    (root / "m" / "n").mkdir(parents=True)
    stale = [
        root / ".t.json.0123456789ab.anybilld-tmp",
        root / "m" / "n" / ".bill.json.ba9876543210.anybilld-tmp",
    ]
    kept = [root / "m" / "bill.json", root / "m" / "anybilld-tmp", root / "m" / ".hidden"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert remove_stale_temp_files(root) == 2
    assert all(not p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert remove_stale_temp_files(root) == 0


def test_remove_stale_temp_files_of_a_missing_directory(tmp_path: Path) -> None:
    assert remove_stale_temp_files(tmp_path / "missing") == 0
