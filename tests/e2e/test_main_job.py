"""The main job end to end: the daemon as a subprocess against the emulator over loopback.

Every test reads what a user would: the token files, the emulator's record of requests,
/metrics, /status and the daemon's exit codes. ``DaemonProcess.stop()`` scans every log
line and every response the test read for passwords and tokens.
"""

from __future__ import annotations

import json
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_process import DaemonProcess, merchant, wait_for
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401

MERCHANTS = [
    ("berlin", "svc-berlin", "berlin-Pa55", ["bill", "store"]),
    ("hamburg", "svc-hamburg", "hamburg-Pa55", ["bill", "customer"]),
    ("munich", "svc-munich", "munich-Pa55", ["user", "category"]),
]
FAST_REFRESH = {
    "at": 0.5,
    "jitter": 0.1,
    "retry_initial": "0.2",
    "retry_max": "2",
    "blocked_retry": "1h",
}


@pytest.fixture
def make_emulator(
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
) -> Callable[..., EmulatorProcess]:
    """``emulator_factory`` for the users of MERCHANTS; ``settings`` go into the config."""

    def make(**settings: Any) -> EmulatorProcess:
        users = [{"username": u, "password": p} for _, u, p, _ in MERCHANTS]
        return emulator_factory({"users": users, **settings})

    return make


def token_url(emu: EmulatorProcess) -> str:
    return f"{emu.base_url}/ad.anybill.de/oauth2/v2.0/token"


def daemon_config(emu: EmulatorProcess, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "identity": {
            "token_url": token_url(emu),
            "client_id": "anybilld-demo-client",
            "timeout": "3",
            "max_requests_per_second": 50,
        },
        "refresh": dict(FAST_REFRESH),
        "outputs": [
            {"path": "{merchant}/{scope}.json", "format": "json", "mode": "0640"},
            {"path": "{merchant}/{scope}.token", "format": "raw", "mode": "0600"},
        ],
        "merchants": [merchant(m, u, p, s) for m, u, p, s in MERCHANTS],
    }
    config.update(extra)
    return config


def start(
    daemons: list[DaemonProcess], folder: Path, config: dict[str, Any], **kw: Any
) -> DaemonProcess:
    d = DaemonProcess(folder, config, **kw)
    daemons.append(d)
    return d


def all_keys() -> list[tuple[str, str]]:
    return [(m, s) for m, _, _, scopes in MERCHANTS for s in scopes]


def password_grants(emu: EmulatorProcess, username: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in emu.requests()
        if r["grant_type"] == "password" and (username is None or r["username"] == username)
    ]


def all_files_present(d: DaemonProcess) -> bool:
    """Both outputs of every token set exist (a token set writes them one after another)."""
    return all(
        d.read_json(m, s) is not None and d.token_file(m, s, "{merchant}/{scope}.token").exists()
        for m, s in all_keys()
    )


# --------------------------------------------------------------------------- the happy path


def test_tokens_for_every_merchant_are_published_refreshed_and_exported(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=4)
    d = start(daemons, tmp_path / "d", daemon_config(emu))

    wait_for(lambda: all_files_present(d), what="all six token files")
    first = {}
    usernames = {m: u for m, u, _, _ in MERCHANTS}
    for m, s in all_keys():
        doc = d.read_json(m, s)
        assert doc is not None
        assert doc["merchant"] == m and doc["scope"] == s and doc["token_type"] == "Bearer"
        # The token really was issued by the IdP, for this merchant and this scope.
        info = emu.introspect(doc["access_token"])
        assert info["active"] and info["username"] == usernames[m]
        assert f"https://ad.anybill.de/vendor/{s}" in info["scope"]
        raw = d.token_file(m, s, "{merchant}/{scope}.token")
        # Both formats carry the same token once the pair is written (a refresh in
        # between may briefly show the new json beside the old raw file).
        wait_for(
            lambda raw=raw, m=m, s=s: (  # type: ignore[misc]
                raw.read_text() == (d.read_json(m, s) or {}).get("access_token")
            )
        )
        assert stat.S_IMODE(d.token_file(m, s).stat().st_mode) == 0o640
        assert stat.S_IMODE(d.token_file(m, s, "{merchant}/{scope}.token").stat().st_mode) == 0o600
        first[(m, s)] = doc["access_token"]

    # 4 s tokens are refreshed after about 2 s: every file changes, by a refresh grant.
    def all_refreshed() -> bool:
        return all(
            (doc := d.read_json(m, s)) is not None and doc["access_token"] != first[(m, s)]
            for m, s in all_keys()
        )

    wait_for(all_refreshed, what="every token refreshed")
    grants = [r["grant_type"] for r in emu.requests() if r["status"] == 200]
    assert grants.count("password") == 6
    assert grants.count("refresh_token") >= 6

    # Long tokens from now on, so that files and gauges hold still while they are compared.
    emu.settings(access_token_lifetime=3600)

    def stable_expiry() -> dict[tuple[str, str], int] | None:
        docs = {(m, s): d.read_json(m, s) for m, s in all_keys()}
        if any(
            doc is None or doc["expires_at_unix"] - doc_time(doc) < 1000 for doc in docs.values()
        ):
            return None
        return {k: doc["expires_at_unix"] for k, doc in docs.items() if doc is not None}

    expiry = wait_for(stable_expiry, what="long-lived tokens everywhere")

    # The gauge follows what is on disk once a token set has written all its outputs; the
    # json file above may be the first of the pair, so wait for the gauge to catch up.
    def exported_expiry() -> dict[tuple[str, str], int]:
        metrics = d.metrics()
        return {
            (m, s): int(
                metrics.get(
                    f'anybilld_token_expiry_timestamp_seconds{{merchant="{m}",scope="{s}"}}', 0
                )
            )
            for m, s in all_keys()
        }

    wait_for(lambda: exported_expiry() == expiry, what="the expiry gauge equal to the files")
    metrics = d.metrics()
    for m, s in all_keys():
        assert metrics[f'anybilld_token_consecutive_failures{{merchant="{m}",scope="{s}"}}'] == 0
    assert metrics['anybilld_token_sets{state="ok"}'] == 6
    assert metrics['anybilld_token_requests_total{grant="password",outcome="success"}'] == 6
    assert d.get("/readyz").status_code == 200
    assert d.stop() == 0


def doc_time(doc: dict[str, Any]) -> int:
    from datetime import datetime

    obtained = datetime.fromisoformat(doc["obtained_at"].replace("Z", "+00:00"))
    return int(obtained.timestamp())


def test_restart_reuses_stored_grants_without_a_password(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=3600)
    folder = tmp_path / "d"
    d = start(daemons, folder, daemon_config(emu))
    wait_for(lambda: all_files_present(d), what="all token files")
    before = {k: d.read_json(*k) for k in all_keys()}
    assert d.stop() == 0
    state_files = sorted((folder / "state").rglob("*.json"))
    assert len(state_files) == 6
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in state_files)
    assert all(stat.S_IMODE(p.parent.stat().st_mode) == 0o700 for p in state_files)
    # A consumer deletes one file while the daemon is down: the restart writes it again.
    d.token_file("berlin", "bill").unlink()
    emu.clear_requests()

    d2 = start(daemons, folder, daemon_config(emu))
    wait_for(lambda: d2.get("/readyz").status_code == 200, what="ready after restart")
    wait_for(lambda: all_files_present(d2), what="the deleted file rewritten")
    assert emu.requests() == []  # no password grant, not even a refresh: tokens still valid
    assert {k: d2.read_json(*k) for k in all_keys()} == before
    assert d2.stop() == 0


def test_restart_with_an_expired_access_token_refreshes_instead_of_logging_in(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=3600)
    folder = tmp_path / "d"
    config = daemon_config(emu)
    config["merchants"] = config["merchants"][:1]
    d = start(daemons, folder, config)
    wait_for(lambda: d.read_json("berlin", "bill") and d.read_json("berlin", "store"))
    assert d.stop() == 0
    # Age the stored access tokens past their expiry, as a long downtime would.
    for path in (folder / "state").rglob("*.json"):
        doc = json.loads(path.read_text())
        doc["access_token_expires_at"] = doc["obtained_at"] + 1
        path.write_text(json.dumps(doc))
    emu.clear_requests()
    d2 = start(daemons, folder, config)
    wait_for(lambda: len([r for r in emu.requests() if r["status"] == 200]) == 2)
    assert [r["grant_type"] for r in emu.requests()] == ["refresh_token", "refresh_token"]
    assert d2.stop() == 0


@pytest.mark.parametrize("numbers_as_strings", [True, False])
def test_numbers_as_strings_or_ints(
    tmp_path: Path,
    make_emulator: Callable[..., EmulatorProcess],
    daemons: list[DaemonProcess],
    numbers_as_strings: bool,
) -> None:
    emu = make_emulator(access_token_lifetime=3, numbers_as_strings=numbers_as_strings)
    config = daemon_config(emu)
    config["merchants"] = config["merchants"][:1]
    d = start(daemons, tmp_path / "d", config)
    wait_for(
        lambda: (
            sum(r["grant_type"] == "refresh_token" and r["status"] == 200 for r in emu.requests())
            >= 2
        ),
        what="two refreshes",
    )
    doc = d.read_json("berlin", "bill")
    assert doc is not None and emu.introspect(doc["access_token"])["active"]
    assert all(r["status"] == 200 for r in emu.requests())
    assert d.stop() == 0


# --------------------------------------------------------------------------- faults


def one_merchant(emu: EmulatorProcess, **extra: Any) -> dict[str, Any]:
    config = daemon_config(emu, **extra)
    config["merchants"] = [merchant("berlin", "svc-berlin", "berlin-Pa55", ["bill"])]
    return config


def test_a_200_html_page_is_retried_and_never_published(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator()
    emu.add_faults({"kind": "html200", "times": 2})
    d = start(daemons, tmp_path / "d", one_merchant(emu))
    wait_for(lambda: d.read_json("berlin", "bill"), what="the token file")
    record = emu.requests()
    assert [r["fault"] for r in record] == ["html200", "html200", None]
    assert [r["grant_type"] for r in record] == ["password"] * 3
    doc = d.read_json("berlin", "bill")
    assert doc is not None and emu.introspect(doc["access_token"])["active"]
    assert d.stop() == 0


def test_429_retry_after_is_honoured(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator()
    emu.add_faults({"kind": "throttle", "retry_after": 2, "body": "text"})
    d = start(daemons, tmp_path / "d", one_merchant(emu))
    wait_for(lambda: d.read_json("berlin", "bill"), what="the token file")
    throttled, success = emu.requests()
    assert throttled["status"] == 429 and success["status"] == 200
    # retry_max is 2 s and the backoff window starts at 0.2 s: only Retry-After explains
    # a gap of two seconds or more.
    assert success["at"] - throttled["at"] >= 2.0
    assert d.stop() == 0


def test_5xx_burst_on_refresh_backs_off_keeps_the_file_and_recovers(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=4)
    d = start(daemons, tmp_path / "d", one_merchant(emu))
    wait_for(lambda: d.read_json("berlin", "bill"), what="the token file")
    published = d.token_file("berlin", "bill").read_bytes()
    emu.add_faults(
        {
            "kind": "server_error",
            "status": 503,
            "times": 4,
            "match": {"grant_type": "refresh_token"},
        }
    )
    # While the outage lasts, the file keeps the last good token, byte for byte.
    wait_for(lambda: sum(r["fault"] == "server_error" for r in emu.requests()) == 4)
    assert d.token_file("berlin", "bill").read_bytes() == published
    wait_for(
        lambda: (
            d.read_json("berlin", "bill")["access_token"] != json.loads(published)["access_token"]
        )
    )  # type: ignore[index]
    grants = [(r["grant_type"], r["status"]) for r in emu.requests()]
    assert grants == [("password", 200)] + [("refresh_token", 503)] * 4 + [("refresh_token", 200)]
    assert d.token_sets()[("berlin", "bill")]["state"] == "ok"
    assert d.stop() == 0


def test_dead_grant_gets_exactly_one_password_login(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=60, refresh_token_lifetime=100)
    d = start(
        daemons,
        tmp_path / "d",
        one_merchant(emu, refresh={**FAST_REFRESH, "at": 0.1, "jitter": 0.05}),
    )
    wait_for(lambda: d.read_json("berlin", "bill"), what="the token file")
    # Move the IdP's clock past the refresh token's lifetime: the next refresh answers 90080.
    emu.advance_clock(200)
    wait_for(lambda: len(emu.requests()) >= 3 and emu.requests()[-1]["status"] == 200, timeout=40)
    record = [(r["grant_type"], r["code"]) for r in emu.requests()]
    assert record == [("password", None), ("refresh_token", "AADB2C90080"), ("password", None)]
    assert d.stop() == 0


def test_wrong_password_is_tried_once_while_other_merchants_carry_on(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=3)
    config = daemon_config(emu)
    config["merchants"][0]["password"] = "not-the-password"  # berlin: two scopes
    d = start(daemons, tmp_path / "d", config, passwords=["berlin-Pa55"])
    others = [k for k in all_keys() if k[0] != "berlin"]
    # The others are refreshed (3 s tokens) twice over while berlin stays blocked.
    wait_for(
        lambda: sum(r["grant_type"] == "refresh_token" for r in emu.requests()) >= 2 * len(others),
        what="the other merchants refreshing",
    )
    berlin = password_grants(emu, "svc-berlin")
    assert len(berlin) == 1 and berlin[0]["code"] == "AADB2C90225"
    user = next(u for u in emu.users() if u["username"] == "svc-berlin")
    assert user["failed_attempts"] == 1 and user["locked_until"] is None
    sets = d.token_sets()
    for scope in ("bill", "store"):
        ts = sets[("berlin", scope)]
        assert ts["state"] == "blocked" and ts["blocked_reason"] == "credentials"
        assert ts["last_error_code"] == "AADB2C90225"
        assert not d.token_file("berlin", scope).exists()
    assert all(sets[k]["state"] == "ok" for k in others)
    metrics = d.metrics()
    assert (
        metrics['anybilld_token_blocked{merchant="berlin",reason="credentials",scope="bill"}'] == 1
    )
    # Ready: every token set has reached a definite state (a token, or blocked).
    assert d.get("/readyz").status_code == 200
    log = d.log()
    assert "AADB2C90225" in log and "correlation_id=" in log and "merchant=berlin" in log
    assert d.stop() == 0


# --------------------------------------------------------------------------- commands


def test_check_once_and_status_commands(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=3600)
    secret = tmp_path / "berlin.secret"
    secret.write_text("berlin-Pa55\n")
    config = daemon_config(emu)
    del config["merchants"][0]["password"]
    config["merchants"][0]["password_file"] = str(secret)
    d = DaemonProcess(tmp_path / "d", config, passwords=["berlin-Pa55"], start=False)
    daemons.append(d)

    check = d.run("--check")
    assert check.returncode == 0, check.stderr
    assert "6 token sets" in check.stdout

    once = d.run("--once")
    assert once.returncode == 0, once.stderr
    assert all_files_present(d)
    assert len(password_grants(emu)) == 6

    # A second --once reuses the stored tokens: nothing is sent.
    emu.clear_requests()
    assert d.run("--once").returncode == 0
    assert emu.requests() == []

    d.start()
    wait_for(lambda: d.get("/readyz").status_code == 200)
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, "-m", "anybilld", "status", "--url", d.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=d.env,
    )
    d.seen += [table.stdout, table.stderr]
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["MERCHANT", "SCOPE", "STATE"]
    assert sorted((ln.split()[0], ln.split()[1], ln.split()[2]) for ln in lines[1:]) == sorted(
        (m, s, "ok") for m, s in all_keys()
    )
    assert d.stop() == 0

    # --once with a wrong password: exit 1, one attempt, the merchant named in the log.
    d.config["merchants"][1]["password"] = "wrong"
    d.write_config(d.config)
    emu.clear_requests()
    for p in (d.output_dir / "hamburg").glob("*"):
        p.unlink()
    for p in (d.state_dir / "hamburg").glob("*"):
        p.unlink()
    failed = d.run("--once")
    assert failed.returncode == 1
    assert "merchant=hamburg" in failed.stderr and "AADB2C90225" in failed.stderr
    assert len(password_grants(emu, "svc-hamburg")) == 1
    d.check_no_secrets()


def test_sigterm_exits_zero_promptly_with_requests_hanging(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator()
    emu.add_faults({"kind": "hang", "seconds": 60, "times": None})
    d = start(daemons, tmp_path / "d", daemon_config(emu))
    wait_for(lambda: len(emu.requests()) >= 3, what="requests hanging at the IdP")
    d.signal(signal.SIGTERM)
    # A second SIGTERM while shutting down (an impatient operator) changes nothing.
    d.signal(signal.SIGTERM)
    # stop() fails the test if the daemon needs more than 10 s.
    assert d.stop(timeout=10) == 0
    emu.clear_faults()
    assert not list((tmp_path / "d").rglob("*.anybilld-tmp"))


def test_config_errors_at_start_exit_2_naming_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    d = DaemonProcess(
        folder,
        {
            "identity": {"client_id": "c"},
            "merchants": [
                {"id": "no id!", "username": "u", "password": "pw-secret-1", "scopes": ["bil"]}
            ],
        },
        start=False,
    )
    done = d.run("--check")
    assert done.returncode == 2
    assert f"{d.config_path}:" in done.stderr
    assert "merchants[0].id" in done.stderr and "merchants[0].scopes[0]" in done.stderr
    run = d.run()
    assert run.returncode == 2 and "merchants[0].id" in run.stderr
    d.check_no_secrets()


def test_a_block_survives_restarts_and_cron_runs_until_the_secret_changes(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=3600)
    secret = tmp_path / "berlin.secret"
    secret.write_text("wrong-Pa55\n")
    config = one_merchant(emu)
    config["merchants"] = [
        {
            "id": "berlin",
            "username": "svc-berlin",
            "password_file": str(secret),
            "scopes": ["bill", "store"],
        }
    ]
    passwords = ["berlin-Pa55", "wrong-Pa55"]
    folder = tmp_path / "d"
    d = start(daemons, folder, config, passwords=passwords)
    wait_for(lambda: all(t["state"] == "blocked" for t in d.token_sets().values()))
    assert d.stop() == 0

    # Neither a restart nor a cron job of --once runs tries the refused password again.
    d2 = start(daemons, folder, config, passwords=passwords)
    sets = d2.token_sets()
    wait_for(lambda: all(t["state"] == "blocked" for t in d2.token_sets().values()))
    sets = d2.token_sets()
    assert {t["blocked_reason"] for t in sets.values()} == {"credentials"}
    assert d2.stop() == 0
    assert d2.run("--once").returncode == 1
    assert d2.run("--once").returncode == 1
    assert len(password_grants(emu, "svc-berlin")) == 1
    user = next(u for u in emu.users() if u["username"] == "svc-berlin")
    assert user["failed_attempts"] == 1

    # The operator fixes the secret: the block is lifted at once, without waiting an hour.
    secret.write_text("berlin-Pa55\n")
    once = d2.run("--once")
    assert once.returncode == 0, once.stderr
    assert [r["status"] for r in password_grants(emu, "svc-berlin")] == [400, 200, 200]
    d2.check_no_secrets()


def test_a_vanished_output_dir_is_reported_and_healed_without_a_new_login(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=4)
    d = start(daemons, tmp_path / "d", one_merchant(emu))
    key = '{merchant="berlin",scope="bill"}'
    # Every output written (the gauge exists only then), not just the first file.
    wait_for(lambda: f"anybilld_token_expiry_timestamp_seconds{key}" in d.metrics())

    import shutil

    shutil.rmtree(d.output_dir)  # an unmounted volume, an over-eager clean-up job
    wait_for(lambda: d.metrics()[f"anybilld_token_output_failing{key}"] == 1)
    # From here on nothing can be published: the exported expiry must stand still.
    published = d.metrics()[f"anybilld_token_expiry_timestamp_seconds{key}"]
    # ... also across a further refresh: a token obtained but not written is not counted.
    before = d.token_sets()[("berlin", "bill")]["last_success_at"]
    wait_for(
        lambda: d.token_sets()[("berlin", "bill")]["last_success_at"] != before,
        what="one more refresh while failing",
    )
    status = d.token_sets()[("berlin", "bill")]
    assert status["output_error"] and str(d.output_dir) in status["output_error"]
    # The daemon does not recreate output_dir (it may be a mount point), and the expiry it
    # exports stays that of the token consumers really have.
    assert not d.output_dir.exists()
    assert d.metrics()[f"anybilld_token_expiry_timestamp_seconds{key}"] == published
    assert "could not publish token" in d.log()

    d.output_dir.mkdir()
    wait_for(lambda: d.read_json("berlin", "bill"), what="the file written again")
    wait_for(lambda: d.metrics()[f"anybilld_token_output_failing{key}"] == 0)
    doc = d.read_json("berlin", "bill")
    assert doc is not None and emu.introspect(doc["access_token"])["active"]
    assert len(password_grants(emu)) == 1
    assert d.stop() == 0


def test_sighup_applies_a_new_merchant_and_refuses_to_move_output_dir(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=3600)
    d = start(daemons, tmp_path / "d", one_merchant(emu))
    wait_for(lambda: d.read_json("berlin", "bill"), what="the token file")
    first = d.token_file("berlin", "bill").read_bytes()

    d.config["merchants"].append(merchant("hamburg", "svc-hamburg", "hamburg-Pa55", ["bill"]))
    d.write_config(d.config)
    d.passwords.add("hamburg-Pa55")
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.read_json("hamburg", "bill"), what="the new merchant's token file")
    assert d.metrics()["anybilld_config_last_reload_successful"] == 1
    assert d.token_file("berlin", "bill").read_bytes() == first  # untouched
    assert [r["username"] for r in password_grants(emu)] == ["svc-berlin", "svc-hamburg"]

    d.config["output_dir"] = "elsewhere"
    d.write_config(d.config)
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.metrics()["anybilld_config_last_reload_successful"] == 0)
    assert "a new output_dir takes effect only after a restart" in d.log()
    assert d.token_file("berlin", "bill").read_bytes() == first
    assert not (d.folder / "elsewhere").exists()
    assert d.metrics()['anybilld_config_reloads_total{outcome="failure"}'] == 1
    assert d.metrics()['anybilld_config_reloads_total{outcome="success"}'] == 1
    assert d.stop() == 0


def test_sigterm_lets_a_slow_refresh_land_so_single_use_grants_survive(
    tmp_path: Path, make_emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = make_emulator(access_token_lifetime=3, single_use_refresh_tokens=True)
    folder = tmp_path / "d"
    d = start(daemons, folder, one_merchant(emu))
    wait_for(lambda: d.read_json("berlin", "bill"), what="the token file")
    # The next refresh takes a second to answer; SIGTERM arrives while it is under way.
    emu.add_faults({"kind": "hang", "seconds": 1, "match": {"grant_type": "refresh_token"}})
    wait_for(lambda: any(r["fault"] == "hang" for r in emu.requests()), what="the slow refresh")
    d.signal(signal.SIGTERM)
    assert d.stop() == 0
    hung = next(r for r in emu.requests() if r["fault"] == "hang")
    assert hung["status"] == 200  # the IdP answered, and spent the old refresh token
    assert "request abandoned" not in d.log()

    # The answer was saved: the restart refreshes with the new single-use token.
    emu.clear_requests()
    emu.settings(access_token_lifetime=3600)
    d2 = start(daemons, folder, one_merchant(emu))
    wait_for(lambda: any(r["status"] == 200 for r in emu.requests()), what="a refresh")
    first = emu.requests()[0]
    assert (first["grant_type"], first["status"], first["code"]) == ("refresh_token", 200, None)
    assert password_grants(emu) == []
    assert d2.stop() == 0
