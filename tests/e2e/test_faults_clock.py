"""Clocks, end to end: the IdP's clock far ahead of or behind ours, and our own wall clock
jumping while the daemon runs (libfaketime), change nothing about when refreshes happen.

Refresh times are read from the emulator's record (on its clock, which does not jump):
with 3-second tokens refreshed at 0.5 ± 0.1 of their lifetime, consecutive refreshes of a
token set are 1.2-1.8 s apart, checked with generous slack for a busy machine.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_process import DaemonProcess, merchant, wait_for
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401
from fault_kit import daemon_config, environ_ci, users_of

DAY = 86400
LIFETIME = 3
GAP = (1.0, 2.6)  # 0.4 .. 0.6 of the lifetime, plus slack either side


def ok_grants(emu: EmulatorProcess, since: int = 0) -> list[dict[str, Any]]:
    return [r for r in emu.requests(since) if r["status"] == 200 and r["fault"] is None]


def assert_refresh_cadence(grants: list[dict[str, Any]]) -> None:
    gaps = [round(b["at"] - a["at"], 2) for a, b in itertools.pairwise(grants)]
    assert all(GAP[0] <= g <= GAP[1] for g in gaps), gaps


@pytest.mark.parametrize("offset", [10 * DAY, -10 * DAY], ids=["ahead", "behind"])
def test_a_server_clock_far_ahead_or_behind_changes_nothing(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
    offset: int,
) -> None:
    merchants = [merchant("berlin", "svc-berlin", "berlin-Pa55", ["bill"])]
    emu = emulator_factory({"users": users_of(merchants), "access_token_lifetime": LIFETIME})
    emu.advance_clock(offset)
    d = DaemonProcess(tmp_path / "d", daemon_config(emu, merchants))
    daemons.append(d)
    wait_for(lambda: len(ok_grants(emu)) >= 4, what="three refreshes")
    # A throttle whose Retry-After is an HTTP date on the server's clock, two seconds on.
    emu.add_faults({"kind": "throttle", "retry_after_date": 2, "body": "text"})
    wait_for(lambda: any(r["fault"] == "throttle" for r in emu.requests()), what="the throttle")
    throttled = next(r for r in emu.requests() if r["fault"] == "throttle")
    wait_for(lambda: len(ok_grants(emu, throttled["id"])) >= 2, what="refreshes after it")

    grants = ok_grants(emu)
    assert [g["grant_type"] for g in grants].count("password") == 1
    assert_refresh_cadence([g for g in grants if g["at"] < throttled["at"]])
    after = ok_grants(emu, throttled["id"])
    # Two seconds, as the server meant: not "an hour" (ahead) nor "at once" (behind).
    assert 1.8 <= after[0]["at"] - throttled["at"] <= 2 + 1.5
    assert_refresh_cadence(after)
    doc = d.read_json("berlin", "bill")
    assert doc is not None
    # The published expiry is in our time: received now, good for the token's lifetime.
    from datetime import datetime

    obtained = datetime.fromisoformat(doc["obtained_at"].replace("Z", "+00:00")).timestamp()
    assert doc["expires_at_unix"] - obtained in (LIFETIME - 1, LIFETIME)
    assert d.stop() == 0


def faketime_library() -> str | None:
    patterns = [
        "/usr/lib/*/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
        "/usr/lib64/faketime/libfaketime.so.1",
    ]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def test_a_wall_clock_jump_on_the_local_machine_changes_nothing(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    library = faketime_library()
    if library is None:
        if environ_ci():
            pytest.fail("libfaketime is missing on CI (apt-get install faketime)")
        pytest.skip("libfaketime is not installed (Debian package faketime)")
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")

    def jump(offset: str) -> None:
        tmp = offset_file.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        tmp.replace(offset_file)

    merchants = [merchant("berlin", "svc-berlin", "berlin-Pa55", ["bill"])]
    # Refresh tokens live an hour: a jump of a day must not make them look dead.
    emu = emulator_factory(
        {
            "users": users_of(merchants),
            "access_token_lifetime": LIFETIME,
            "refresh_token_lifetime": 3600,
        }
    )
    env = {
        "LD_PRELOAD": library,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    d = DaemonProcess(tmp_path / "d", daemon_config(emu, merchants), env=env)
    daemons.append(d)
    marks = []
    for offset in ("+1d", "-1d", "+0"):
        wait_for(lambda: len(ok_grants(emu)) >= 3 + 2 * len(marks), what="refreshes")
        marks.append(emu.requests()[-1]["id"])
        jump(offset)
        if offset == "+1d":
            # The jump took effect: what the daemon publishes now is dated a day ahead.
            def dated_ahead() -> bool:
                doc = d.read_json("berlin", "bill")
                return doc is not None and doc["expires_at_unix"] > emu.now() + DAY / 2

            wait_for(dated_ahead, what="a token file dated a day ahead")
    wait_for(lambda: len(ok_grants(emu, marks[-1])) >= 2, what="refreshes after the last jump")
    grants = ok_grants(emu)
    assert [g["grant_type"] for g in grants].count("password") == 1
    assert all(r["status"] == 200 for r in emu.requests())
    assert_refresh_cadence(grants)
    assert d.token_sets()[("berlin", "bill")]["state"] == "ok"
    assert d.stop() == 0
