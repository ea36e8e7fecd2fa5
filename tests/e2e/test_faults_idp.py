"""Faults of the identity provider, end to end: the daemon as a subprocess against the
emulator, with outages, throttling, garbage answers, dead grants and refused accounts.

Everything is read where a user would see it: token files, the emulator's record of the
requests it got (timestamps on its clock), its lockout counters, /metrics, /status and the
log. Timing properties (back-off cap, recovery, request rate) are checked on the emulator's
record with tolerance, never on the test's own clock. ``DaemonProcess.stop()`` scans every
text read for passwords and tokens.
"""

from __future__ import annotations

import base64
import itertools
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon_process import DaemonProcess, merchant, wait_for
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401
from fault_kit import Gate, daemon_config, temp_files, token_doc_problem, users_of


def start(daemons: list[DaemonProcess], folder: Path, config: dict[str, Any]) -> DaemonProcess:
    d = DaemonProcess(folder, config)
    daemons.append(d)
    return d


def successes(emu: EmulatorProcess, grant_type: str, username: str | None = None) -> list[Any]:
    return [
        r
        for r in emu.requests()
        if r["grant_type"] == grant_type
        and r["status"] == 200
        and r["fault"] is None
        and (username is None or r["username"] == username)
    ]


def passwords_sent(emu: EmulatorProcess, username: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in emu.requests()
        if r["grant_type"] == "password" and (username is None or r["username"] == username)
    ]


# --------------------------------------------------------------------------- outages


def test_a_long_outage_of_every_kind_keeps_the_file_caps_the_backoff_and_recovers(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    merchants = [merchant("berlin", "svc-berlin", "berlin-Pa55", ["bill", "store"])]
    emu = emulator_factory({"users": users_of(merchants), "access_token_lifetime": 3})
    gate = Gate(int(emu.base_url.rsplit(":", 1)[1]))
    retry_max = 1.0
    config = daemon_config(
        emu,
        merchants,
        base=gate.url,
        identity={"timeout": "1"},
        refresh={"retry_max": str(retry_max)},
    )
    d = start(daemons, tmp_path / "d", config)
    keys = [("berlin", "bill"), ("berlin", "store")]
    wait_for(lambda: all(d.read_json(*k) for k in keys), what="both token files")
    published = {k: d.token_file(*k).read_bytes() for k in keys}

    # 1. The host is gone: connections are refused, through at least one refresh.
    gate.close()
    wait_for(lambda: d.log().count("network error (ConnectError)") >= 4, what="refused retries")
    assert {k: d.token_file(*k).read_bytes() for k in keys} == published
    gate.open()
    # 2. It answers, badly: resets, hangs past the timeout, answers that trickle in a byte
    #    at a time (each read well within the timeout, the whole far beyond it), 5xx pages;
    #    then a 5xx outage of a fixed duration, on the emulator's own timer.
    emu.add_faults(
        {"kind": "reset", "times": 3},
        {"kind": "hang", "seconds": 3, "times": 2},
        {"kind": "trickle", "interval": 0.2, "times": 2},
        {"kind": "server_error", "status": 502, "times": 2},
        {"kind": "server_error", "status": 503, "times": None, "for_seconds": 4},
    )
    outage_from = emu.now()
    outage_until = outage_from + 4
    wait_for(lambda: not emu.faults(), timeout=60, what="the end of the outage")
    wait_for(
        lambda: all(
            d.read_json(*k)["access_token"] != json.loads(published[k])["access_token"]  # type: ignore[index]
            for k in keys
        ),
        what="fresh tokens after the outage",
    )

    record = emu.requests()
    # A transient failure never leads to a password login: one per token set, at start.
    assert [r["grant_type"] for r in record].count("password") == 2
    refreshes = [r for r in record if r["grant_type"] == "refresh_token"]
    failed = [r for r in refreshes if r["fault"] is not None]
    assert {r["fault"] for r in failed} == {"reset", "hang", "trickle", "server_error"}
    # Back-off capped at retry_max: between two failed attempts of a token set there is
    # at most retry_max (plus the timeout for a hang or a trickle, and slack for a busy
    # machine).
    by_scope: dict[str, list[dict[str, Any]]] = {}
    for r in refreshes:
        by_scope.setdefault(r["scope"], []).append(r)
    for attempts in by_scope.values():
        in_outage = [r for r in attempts if outage_from <= r["at"] <= outage_until]
        assert len(in_outage) >= 3, "kept trying during the outage"
        for a, b in itertools.pairwise(in_outage):
            limit = retry_max + (1.0 if a["fault"] in ("hang", "trickle") else 0) + 1.0
            assert b["at"] - a["at"] <= limit, (a, b)
        # Recovered within one back-off period after the outage ended.
        first_ok = next(r for r in attempts if r["at"] > outage_from and r["fault"] is None)
        assert first_ok["status"] == 200
        assert first_ok["at"] <= outage_until + retry_max + 1.0
    for k in keys:
        assert token_doc_problem(d.token_file(*k).read_bytes(), "berlin") is None
        assert d.token_sets()[k]["state"] == "ok"
    assert "Traceback" not in d.log()
    assert d.stop() == 0
    gate.close()


def test_a_lost_answer_to_a_password_login_never_counts_twice_against_the_account(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    """The IdP checked a wrong password but the answer was lost (reset, time-out): the
    daemon retries (it cannot know), and the retry costs the account nothing more."""
    emu = emulator_factory(
        {"users": [{"username": "svc-berlin", "password": "berlin-Pa55"}], "lockout_threshold": 3}
    )
    wrong = merchant("berlin", "svc-berlin", "wrong-Pa55", ["bill", "store"])
    emu.add_faults(
        {"kind": "reset", "times": 2, "processed": True},
        {"kind": "hang", "seconds": 3, "times": 1, "processed": True},
    )
    d = start(daemons, tmp_path / "d", daemon_config(emu, [wrong], identity={"timeout": "1"}))
    d.passwords.add("berlin-Pa55")
    wait_for(lambda: all(t["state"] == "blocked" for t in d.token_sets().values()))
    sent = passwords_sent(emu)
    assert [r["fault"] for r in sent] == ["reset", "reset", "hang", None]
    user = next(u for u in emu.users() if u["username"] == "svc-berlin")
    assert user["failed_attempts"] == 1 and user["locked_until"] is None
    assert d.stop() == 0


# --------------------------------------------------------------------------- throttling


def test_a_few_hundred_token_sets_under_throttling_stay_under_the_cap_and_all_get_tokens(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    scopes = ["bill", "category", "customer", "store", "user"]
    merchants = [
        merchant(f"m{i:02d}", f"svc-{i:02d}", f"pw-{i:02d}-Pa55", scopes) for i in range(50)
    ]
    cap = 60
    # The IdP's own limit is below the daemon's cap: its 429s (Retry-After: 1) pause the
    # whole client. On top come throttles of every shape.
    emu = emulator_factory(
        {"users": users_of(merchants), "access_token_lifetime": 3600, "rate_limit_per_second": 45}
    )
    emu.add_faults(
        {"kind": "throttle", "times": 10, "body": "text"},
        {"kind": "throttle", "times": 10, "body": "json"},
        # Each of these pauses the whole client for a second, as the IdP asks.
        {"kind": "throttle", "times": 2, "body": "text", "retry_after": 1},
        {"kind": "throttle", "times": 2, "body": "json", "retry_after": 1},
    )
    config = daemon_config(
        emu,
        merchants,
        identity={"max_requests_per_second": cap, "max_concurrent_requests": 16},
        refresh={"retry_max": "2"},
    )
    d = start(daemons, tmp_path / "d", config)
    keys = [(m["id"], s) for m in merchants for s in scopes]
    wait_for(lambda: all(d.read_json(*k) for k in keys), timeout=120, what="200 token files")
    record = emu.requests()
    assert sum(r["status"] == 429 for r in record) >= 24
    # Exactly one successful login per token set, nothing blocked, every file valid.
    assert len(successes(emu, "password")) == len(keys)
    assert {t["state"] for t in d.token_sets().values()} == {"ok"}
    for m, s in keys:
        assert token_doc_problem(d.token_file(m, s).read_bytes(), m) is None
    # The daemon's own rate: in no window of two seconds more than twice its cap (plus
    # slack for arrival jitter), as the emulator saw it.
    times = sorted(r["at"] for r in record)
    window, worst = 2.0, 0
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        worst = max(worst, i - j + 1)
    assert worst <= cap * window + 4, f"{worst} requests within {window}s"
    assert d.stop() == 0


# --------------------------------------------------------------------------- garbage


def b64(body: bytes) -> str:
    return base64.b64encode(body).decode()


MALFORMED: list[dict[str, Any]] = [
    {"kind": "raw", "body": '{"access_token": "eyJhbGciOi'},  # truncated JSON
    {"kind": "raw", "body": ""},  # empty 200
    {"kind": "raw", "body": "null"},
    {"kind": "raw", "body": "[]"},
    {"kind": "raw", "body": '{"token_type": "Bearer", "expires_in": "3600"}'},  # no token
    {"kind": "raw", "body": '{"access_token": 12345, "expires_in": 3600}'},  # wrong type
    {"kind": "raw", "body": '{"access_token": "eyJabc.def.ghi", "expires_in": "soon"}'},
    {"kind": "raw", "body": '{"access_token": "eyJabc.def.ghi", "expires_in": -5}'},
    {"kind": "raw", "body": '{"access_token": "eyJabc.def.ghi"}'},  # no expires_in
    {"kind": "raw", "body": '{"access_token": "eyJ a b", "expires_in": 3600}'},
    {"kind": "raw", "body": '{"access_token": "eyJabc", "expires_in": true}'},
    {"kind": "raw", "body": '{"access_token": "eyJabc", "expires_in": 1e400}'},
    {"kind": "raw", "body": "x" * 1024, "repeat": 2048},  # 2 MiB
    {"kind": "raw", "body": '{"a": "' + "y" * 1000, "repeat": 1024},  # huge, unterminated
    {"kind": "raw", "status": 400, "body": "<html>Bad Request</html>", "content_type": "text/html"},
    {"kind": "raw", "status": 400, "body": '{"error": "invalid_grant", "error_description": 5}'},
    {"kind": "raw", "status": 400, "body": '{"error_description": "AADB2C"}'},
    {"kind": "raw", "body": "\xff\xfe garbage \x00"},
    {"kind": "raw", "body": "[", "repeat": 100_000},  # nested deeper than any stack
    {"kind": "raw", "body": '{"a": [', "repeat": 30_000},
    {"kind": "raw", "status": 400, "body": '{"error_description": [', "repeat": 10_000},
    # Bytes that are no UTF-8, in a token, in an error, and alone.
    {"kind": "raw", "body_base64": b64(b'{"access_token": "eyJ\xff", "expires_in": 3600}')},
    {"kind": "raw", "status": 400, "body_base64": b64(b'{"error_description": "\xc3\x28"}')},
    {"kind": "raw", "body_base64": b64(b"\xff\xfe\x00\xd8garbage")},
    {"kind": "raw", "body": '{"access_token": "eyJabc", "expires_in": "' + "9" * 5000 + '"}'},
    {"kind": "html200"},
]


def test_malformed_answers_of_every_kind_are_retried_and_never_crash(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    merchants = [merchant("berlin", "svc-berlin", "berlin-Pa55", ["bill"])]
    emu = emulator_factory({"users": users_of(merchants), "access_token_lifetime": 3})
    emu.add_faults(*({**f, "match": {"grant_type": "password"}} for f in MALFORMED))
    config = daemon_config(emu, merchants, refresh={"retry_initial": "0.05", "retry_max": "0.2"})
    d = start(daemons, tmp_path / "d", config)
    wait_for(lambda: d.read_json("berlin", "bill"), timeout=60, what="the token file")
    first = d.read_json("berlin", "bill")
    assert first is not None and emu.introspect(first["access_token"])["active"]
    assert [r["fault"] for r in passwords_sent(emu)] == ["raw"] * (len(MALFORMED) - 1) + [
        "html200",
        None,
    ]
    # The same garbage on refresh: retried as an outage, never answered with a password.
    emu.add_faults(*({**f, "match": {"grant_type": "refresh_token"}} for f in MALFORMED))
    wait_for(lambda: not emu.faults(), timeout=60, what="every malformed refresh answer")
    wait_for(lambda: successes(emu, "refresh_token"), what="a good refresh")
    assert len(passwords_sent(emu)) == len(MALFORMED) + 1
    doc = d.read_json("berlin", "bill")
    assert (
        doc is not None and token_doc_problem(d.token_file("berlin", "bill").read_bytes()) is None
    )
    log = d.log()
    assert "malformed answer" in log and "answer too large" in log
    assert "Traceback" not in log and "failed unexpectedly" not in log
    assert d.metrics()['anybilld_token_requests_total{grant="refresh",outcome="transient"}'] >= len(
        MALFORMED
    )
    assert d.stop() == 0


# --------------------------------------------------------------------------- dead grants


def test_every_kind_of_dead_grant_gets_exactly_one_password_login(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    cases = {
        "expired": "AADB2C90080",
        "policy": "AADB2C90088",  # a grant of another policy
        "client": "AADB2C90279",  # a grant of another client
        "spent": "AADB2C90129",  # a single-use token used twice
        "revoked": None,  # really revoked at the emulator
        "refused": None,  # revoked, and the password changed meanwhile: blocked
    }
    merchants = [merchant(m, f"svc-{m}", f"{m}-Pa55", ["bill"]) for m in cases]
    emu = emulator_factory({"users": users_of(merchants), "access_token_lifetime": 3})
    d = start(daemons, tmp_path / "d", daemon_config(emu, merchants))
    d.passwords.add("changed-Pa55")
    wait_for(lambda: all(d.read_json(m, "bill") for m in cases), what="every token file")
    first = {m: d.read_json(m, "bill") for m in cases}
    for m, code in cases.items():
        if code is not None:
            emu.add_faults(
                {
                    "kind": "error",
                    "code": code,
                    "match": {"grant_type": "refresh_token", "username": f"svc-{m}"},
                }
            )
    emu.revoke("svc-revoked")
    emu.revoke("svc-refused")
    emu.add_user("svc-refused", "changed-Pa55")

    def recovered() -> bool:
        return all(
            (doc := d.read_json(m, "bill")) is not None
            and doc["access_token"] != first[m]["access_token"]  # type: ignore[index]
            for m in cases
            if m != "refused"
        )

    wait_for(recovered, what="new tokens after the dead grants")
    wait_for(lambda: d.token_sets()[("refused", "bill")]["state"] == "blocked")
    for m in cases:
        sent = passwords_sent(emu, f"svc-{m}")
        if m == "refused":
            assert [r["status"] for r in sent] == [200, 400]
            assert sent[1]["code"] == "AADB2C90225"
        else:
            assert [r["status"] for r in sent] == [200, 200], m
    ts = d.token_sets()[("refused", "bill")]
    assert ts["blocked_reason"] == "credentials" and ts["last_error_code"] == "AADB2C90225"
    # The last good token stays published while the merchant is blocked.
    assert d.read_json("refused", "bill") == first["refused"]
    assert d.stop() == 0


# --------------------------------------------------------------------------- account safety


def test_refused_accounts_are_never_locked_out_and_a_fixed_secret_lifts_the_block_at_once(
    tmp_path: Path,
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
    daemons: list[DaemonProcess],
) -> None:
    good = merchant("good", "svc-good", "good-Pa55", ["bill"])
    wrong = merchant("wrong", "svc-wrong", "wrong-Pa55", ["bill", "store"])
    locked = merchant("locked", "svc-locked", "locked-Pa55", ["bill"])
    client = merchant("client", "svc-client", "client-Pa55", ["bill"], client_id="no-such-client")
    scope = merchant(
        "scope", "svc-scope", "scope-Pa55", ["https://ad.anybill.de/vendor/nonexistent"]
    )
    merchants = [good, wrong, locked, client, scope]
    users = users_of(merchants)
    users[1]["password"] = "right-Pa55"
    users[2]["disabled"] = True
    threshold = 3
    emu = emulator_factory(
        {"users": users, "access_token_lifetime": 2, "lockout_threshold": threshold}
    )
    blocked_retry = 1.0
    config = daemon_config(emu, merchants, refresh={"blocked_retry": str(blocked_retry)})
    d = start(daemons, tmp_path / "d", config)
    d.passwords.add("right-Pa55")
    expected = {
        ("wrong", "bill"): "credentials",
        ("wrong", "store"): "credentials",
        ("locked", "bill"): "locked",
        ("client", "bill"): "client",
        ("scope", "nonexistent"): "scope",
    }

    # A long run, compressed: blocked_retry is 1 s, so each refused account is tried again
    # about every second; the good merchant refreshes every second meanwhile.
    wait_for(lambda: len(passwords_sent(emu, "svc-wrong")) >= 6, timeout=60, what="six retries")
    for (m, s), reason in expected.items():
        ts = d.token_sets()[(m, s)]
        assert ts["state"] == "blocked" and ts["blocked_reason"] == reason, (m, s, ts)
    metrics = d.metrics()
    for (m, s), reason in expected.items():
        key = f'anybilld_token_blocked{{merchant="{m}",reason="{reason}",scope="{s}"}}'
        assert metrics[key] == 1
    assert d.token_sets()[("good", "bill")]["state"] == "ok"
    assert len(successes(emu, "refresh_token", "svc-good")) >= 3  # unaffected

    for user in ("svc-wrong", "svc-locked", "svc-client", "svc-scope"):
        sent = passwords_sent(emu, user)
        # Never more often than blocked_retry allows, one login at a time for the
        # merchant's two scopes. A causal bound, not a timing: the next attempt cannot
        # arrive before the refusal reached the daemon plus blocked_retry (the record's
        # timestamps are rounded to 1 ms).
        gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(sent)]
        assert all(g >= blocked_retry - 0.002 for g in gaps), (user, gaps)
    # B2C's smart lockout counts distinct wrong passwords (the emulator too): retrying the
    # one configured password, however slowly, never locks the account.
    counters = {u["username"]: u for u in emu.users()}
    assert len(passwords_sent(emu, "svc-wrong")) > threshold
    assert counters["svc-wrong"]["locked_until"] is None

    # The operator fixes the password, and sets blocked_retry back to an hour: the block is
    # lifted at once by the changed secret, not by the timer.
    d.config["refresh"]["blocked_retry"] = "1h"
    d.config["merchants"][1]["password"] = "right-Pa55"
    d.write_config(d.config)
    d.signal(signal.SIGHUP)
    wait_for(
        lambda: d.read_json("wrong", "bill") and d.read_json("wrong", "store"),
        what="the fixed merchant's tokens",
    )
    assert d.token_sets()[("wrong", "bill")]["state"] == "ok"
    assert (
        'anybilld_token_blocked{merchant="wrong",reason="credentials",scope="bill"}'
        not in d.metrics()
    )
    check = d.run("--check")
    assert check.returncode == 0, check.stderr
    assert d.stop() == 0
    assert not temp_files(d.output_dir, d.state_dir)
