"""Faults of the disk, end to end: a read-only and a full filesystem under output_dir, a
group that does not exist, a symbolic link at the target, state files truncated or full of
garbage. One daemon runs all of them side by side with a healthy merchant.

The tests may run as root (here and on CI), where file modes stop nobody: "not writable"
is a read-only tmpfs mount (``chattr +i`` where mounting is not allowed) and "full" is a
tiny tmpfs filled to the last byte. Without the privileges the test is skipped, saying so;
under ``CI=true`` it fails instead, since CI runs as root on a machine like this one.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess, merchant, wait_for
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401
from fault_kit import (
    daemon_config,
    environ_ci,
    mode_of,
    state_doc_problem,
    temp_files,
    token_doc_problem,
    users_of,
)


def _run(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        _run("umount", "-l", str(path))


def unavailable(reason: str) -> None:
    if environ_ci():
        pytest.fail(f"CI runs as root and must be able to do this: {reason}")
    pytest.skip(reason)


def fill(directory: Path) -> None:
    """Write a filler file until the filesystem is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_disk_faults_are_reported_per_token_set_others_carry_on_and_the_next_write_heals(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    mounts: list[Path],
) -> None:
    folder = tmp_path / "d"
    tokens, state = folder / "tokens", folder / "state"
    ro, full = tokens / "ro", tokens / "full"
    for p in (ro, full, tokens / "link", state / "garbage", state / "trunc"):
        p.mkdir(parents=True)

    # Not writable, also for root.
    immutable = False
    if _run("mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)):
        mounts.append(ro)
    elif _run("chattr", "+i", str(ro)):
        immutable = True
    else:
        unavailable("neither a read-only tmpfs mount nor chattr +i works here")
    # A full filesystem.
    if not _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)):
        if immutable:
            _run("chattr", "-i", str(ro))
        unavailable("cannot mount a small tmpfs for a full filesystem")
    mounts.append(full)
    fill(full)
    # A symlink at the target: never followed, never replaced.
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("the operator's own file\n")
    (tokens / "link" / "bill.json").symlink_to(elsewhere)
    # State files broken by a crash of something else, a bad restore, a disk error.
    (state / "garbage" / "bill.json").write_bytes(b"\x00\xff garbage {{{ not json")
    (state / "trunc" / "bill.json").write_bytes(b'{"version": 1, "fingerprint": "ab')

    def m(mid: str, **extra: object) -> dict[str, object]:
        return merchant(mid, f"svc-{mid}", f"{mid}-Pa55", ["bill"], **extra)

    def out(path: str, group: str | None = None) -> list[dict[str, object]]:
        return [{"path": path, "format": "json", "mode": "0640", "group": group}]

    merchants = [
        m("good"),
        m("ro", outputs=out("ro/{scope}.json")),
        m("full", outputs=out("full/{scope}.json")),
        m("nogroup", outputs=out("{merchant}/{scope}.json", "anybilld-no-such-group")),
        m("link"),
        m("garbage"),
        m("trunc"),
    ]
    emu = emulator_factory({"users": users_of(merchants), "access_token_lifetime": 3600})
    d = DaemonProcess(folder, daemon_config(emu, merchants))
    try:
        failing = {"ro": ro / "bill.json", "full": full / "bill.json"}
        failing["nogroup"] = tokens / "nogroup" / "bill.json"
        failing["link"] = tokens / "link" / "bill.json"
        healthy = ["good", "garbage", "trunc"]

        def settled() -> bool:
            sets = d.token_sets()
            return all(sets[(k, "bill")]["output_error"] for k in failing) and all(
                d.read_json(k, "bill") for k in healthy
            )

        wait_for(settled, what="every token set failing or published")
        sets, metrics, log = d.token_sets(), d.metrics(), d.log()
        causes = {
            "ro": "Read-only file system" if not immutable else "Operation not permitted",
            "full": "No space left on device",
            "nogroup": "group 'anybilld-no-such-group' does not exist",
            "link": "is a symbolic link",
        }
        for k, path in failing.items():
            error = sets[(k, "bill")]["output_error"]
            assert str(path) in error and causes[k] in error, error
            assert metrics[f'anybilld_token_output_failing{{merchant="{k}",scope="bill"}}'] == 1
            # One log line names the token set, the path and the cause.
            assert any(
                "could not publish token" in line
                and f"merchant={k} " in line
                and str(path) in line
                and causes[k] in line
                for line in log.splitlines()
            ), k
            # The token was obtained and saved: a restart would not need the password.
            assert state_doc_problem((state / k / "bill.json").read_bytes()) is None
        # Nothing half-written where it failed; the operator's file is untouched.
        assert not (ro / "bill.json").exists() and not (full / "bill.json").exists()
        assert not failing["nogroup"].exists()
        assert failing["link"].is_symlink()
        assert elsewhere.read_text() == "the operator's own file\n"
        # The others carry on; broken state was ignored (logged) and replaced.
        for k in healthy:
            assert sets[(k, "bill")]["state"] == "ok" and sets[(k, "bill")]["output_error"] is None
            assert token_doc_problem(d.token_file(k, "bill").read_bytes(), k) is None
            assert mode_of(d.token_file(k, "bill")) == 0o640
            assert metrics[f'anybilld_token_output_failing{{merchant="{k}",scope="bill"}}'] == 0
        for k in ("garbage", "trunc"):
            assert f"ignoring state of merchant={k} scope=bill" in log
            assert state_doc_problem((state / k / "bill.json").read_bytes()) is None

        # Heal every fault; the next write of each token set publishes it, without a login.
        if immutable:
            assert _run("chattr", "-i", str(ro))
        else:
            assert _run("umount", str(ro))
            mounts.remove(ro)
        (full / "filler").unlink()
        failing["link"].unlink()
        d.config["merchants"][3]["outputs"] = out("{merchant}/{scope}.json")
        d.write_config(d.config)
        d.signal(signal.SIGHUP)

        def healed() -> bool:
            sets = d.token_sets()
            return all(sets[(k, "bill")]["output_error"] is None for k in failing)

        wait_for(healed, what="every output written again")
        for k, path in failing.items():
            assert token_doc_problem(path.read_bytes(), k) is None
            assert mode_of(path) == 0o640 and not path.is_symlink()
            key = f'anybilld_token_output_failing{{merchant="{k}",scope="bill"}}'
            assert d.metrics()[key] == 0
        assert elsewhere.read_text() == "the operator's own file\n"
        record = emu.requests()
        assert sorted(r["username"] for r in record if r["grant_type"] == "password") == sorted(
            f"svc-{mm['id']}" for mm in merchants
        )
        for path in state.rglob("*.json"):
            assert mode_of(path) == 0o600 and mode_of(path.parent) == 0o700
        assert d.stop() == 0
        assert not temp_files(tokens, state)
    finally:
        d.kill()
        if immutable:
            _run("chattr", "-i", str(ro))
