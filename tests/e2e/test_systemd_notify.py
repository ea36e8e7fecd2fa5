"""The sd_notify protocol as systemd receives it: a real datagram socket, a real daemon.

The daemon runs as a subprocess with ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``,
``CREDENTIALS_DIRECTORY``) set the way systemd sets them for ``Type=notify``; the test binds
the socket and checks what arrives, in order, and from which pid (``NotifyAccess=main``
accepts only the main process). The blocked-loop test runs the daemon in-process, because
only there can a test block its event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_process import DaemonProcess, free_port, merchant
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401
from notify_socket import Message, NotifySocket, lifecycle

from anybilld.daemon import Daemon
from anybilld.systemd import Notifier

FAST_REFRESH = {"at": 0.5, "jitter": 0.1, "retry_initial": "0.2", "retry_max": "1"}


def dead_identity_provider() -> str:
    """A token URL where nothing listens: every request fails with connection refused."""
    return f"http://127.0.0.1:{free_port()}/ad.anybill.de/oauth2/v2.0/token"


def counts(status: str | None) -> dict[str, int]:
    """``"1 ok, 2 pending, ..."`` -> ``{"ok": 1, "pending": 2, ...}``."""
    assert status, "a message without STATUS="
    out = {}
    for part in status.split(", "):
        n, _, state = part.partition(" ")
        out[state] = int(n)
    return out


def launch(d: DaemonProcess) -> None:
    """Start the daemon without waiting for its listener: READY=1 must say when it is up."""
    with d.log_path.open("ab") as log:
        d.proc = subprocess.Popen(
            d.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=d.env
        )


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_ready_reload_stop_in_order_on_a_path_socket_while_the_identity_provider_is_dead(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config: dict[str, Any] = {
        "identity": {"token_url": dead_identity_provider(), "client_id": "c", "timeout": "2"},
        "refresh": FAST_REFRESH,
        # The config watcher looks once a day: the reloads below come from SIGHUP alone.
        "reload": {"watch": "poll", "poll_interval": "1d"},
        "merchants": [merchant("berlin", "svc-berlin", "berlin-Pa55", ["bill", "store"])],
    }
    # The watchdog is meant for another process (WATCHDOG_PID): this one must not ping.
    env = {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    with NotifySocket() as ns:
        d = DaemonProcess(tmp_path / "d", config, env=env, notify_socket=ns.address, start=False)
        daemons.append(d)
        launch(d)
        assert d.proc is not None

        ready = ns.wait(lambda m: m.has("READY"), what="READY=1")
        # READY=1 means the listener answers now, not eventually; and it did not wait for
        # a token (the identity provider is dead, none can come).
        assert d.get("/healthz").status_code == 200
        assert counts(ns.messages()[ready].get("STATUS")) == {
            "ok": 0,
            "pending": 2,
            "retrying": 0,
            "blocked": 0,
        }
        assert not (d.output_dir / "berlin").exists()

        # A reload that adds a token set: RELOADING=1 (with the monotonic time systemd
        # compares with its own), then READY=1 with the new counts.
        config["merchants"].append(merchant("hamburg", "svc-hamburg", "hamburg-Pa55", ["bill"]))
        d.write_config(d.config | config)
        before = monotonic_usec()
        d.signal(signal.SIGHUP)
        reloading = ns.wait(lambda m: m.has("RELOADING"), after=ready + 1, what="RELOADING=1")
        after = monotonic_usec()
        assert before <= int(ns.messages()[reloading].get("MONOTONIC_USEC") or 0) <= after
        ready_again = ns.wait(lambda m: m.has("READY"), after=reloading + 1, what="READY=1")
        assert sum(counts(ns.messages()[ready_again].get("STATUS")).values()) == 3

        # A broken config: the same RELOADING=1 and READY=1, and STATUS= says so.
        d.config_path.write_text("version: 1\nmerchants: {\n")
        d.signal(signal.SIGHUP)
        failed = ns.wait(lambda m: m.has("RELOADING"), after=ready_again + 1, what="RELOADING=1")
        ready_3 = ns.wait(lambda m: m.has("READY"), after=failed + 1, what="READY=1")
        status = ns.messages()[ready_3].get("STATUS") or ""
        assert status.endswith("; last reload failed, running the previous config")
        assert sum(counts(status.partition(";")[0]).values()) == 3

        assert d.stop() == 0
        ns.wait(lambda m: m.has("STOPPING"), after=ready_3 + 1, what="STOPPING=1")
        msgs = ns.messages()

    assert lifecycle(msgs) == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    assert not [m for m in msgs if m.has("WATCHDOG")]
    assert {m.pid for m in msgs} == {d.proc.pid}


def test_watchdog_pings_status_counts_and_credentials_on_an_abstract_socket(
    tmp_path: Path,
    daemons: list[DaemonProcess],
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
) -> None:
    emu = emulator_factory({"users": [{"username": "svc-berlin", "password": "berlin-Pa55"}]})
    # The password comes the way LoadCredential=berlin:... hands it over.
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "berlin").write_text("berlin-Pa55\n")
    config: dict[str, Any] = {
        "identity": {
            "token_url": f"{emu.base_url}/ad.anybill.de/oauth2/v2.0/token",
            "client_id": "anybilld-demo-client",
        },
        "refresh": FAST_REFRESH,
        "merchants": [
            {
                "id": "berlin",
                "username": "svc-berlin",
                "password_credential": "berlin",
                "scopes": ["bill", "store"],
            }
        ],
    }
    env = {"WATCHDOG_USEC": "200000", "CREDENTIALS_DIRECTORY": str(creds)}
    with NotifySocket(abstract=True) as ns:
        d = DaemonProcess(
            tmp_path / "d",
            config,
            env=env,
            passwords={"berlin-Pa55"},
            notify_socket=ns.address,
            start=False,
        )
        daemons.append(d)
        launch(d)
        assert d.proc is not None
        ready = ns.wait(lambda m: m.has("READY"), what="READY=1")

        def pings(msgs: list[Message]) -> int:
            return sum(1 for m in msgs if m.has("WATCHDOG"))

        ns.wait(lambda m: pings(ns.messages()[ready:]) >= 3, what="three WATCHDOG=1")
        # The periodic STATUS= follows the token sets: both tokens arrive.
        ns.wait(
            lambda m: m.get("STATUS") is not None and counts(m.get("STATUS"))["ok"] == 2,
            after=ready + 1,
            what="STATUS= with 2 ok",
        )
        assert d.read_json("berlin", "bill") is not None
        assert d.stop() == 0
        stopping = ns.wait(lambda m: m.has("STOPPING"), what="STOPPING=1")
        msgs = ns.messages()

    assert lifecycle(msgs) == ["READY", "STOPPING"]
    # Pings come from the main loop: none before READY=1, none once it stopped.
    assert pings(msgs[:ready]) == 0
    assert pings(msgs[stopping:]) == 0
    assert {m.pid for m in msgs} == {d.proc.pid}


async def wait_async(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``predicate`` without blocking the event loop (the daemon runs on it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_watchdog_pings_stop_while_the_event_loop_is_blocked_and_resume_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "listen": f"127.0.0.1:{free_port()}",
                "output_dir": str(tmp_path / "tokens"),
                "state_dir": str(tmp_path / "state"),
                "identity": {"token_url": dead_identity_provider(), "client_id": "c"},
                "refresh": FAST_REFRESH,
                "merchants": [merchant("berlin", "svc-berlin", "berlin-Pa55", ["bill"])],
            }
        )
    )
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    def pings(msgs: list[Message]) -> int:
        return sum(1 for m in msgs if m.has("WATCHDOG"))

    def marker(msgs: list[Message], text: str) -> int:
        """Index of the marker ``text``; len(msgs) while it has not arrived yet."""
        return next((i for i, m in enumerate(msgs) if m.get("TEST_MARK") == text), len(msgs))

    with NotifySocket() as ns:
        daemon = Daemon(config_path=config_path, notifier=Notifier(ns.address))
        run = asyncio.ensure_future(daemon.run())
        await wait_async(lambda: pings(ns.messages()) >= 3, "watchdog pings")

        # Markers sent around the block are queued in order with the daemon's pings: any
        # ping sent while the loop is blocked would land between them.
        ns.send_marker("blocked")
        time.sleep(1.0)  # noqa: ASYNC251 -- the point: block the event loop, as a hang would
        ns.send_marker("unblocked")

        await wait_async(
            lambda: pings(ns.messages()[marker(ns.messages(), "unblocked") :]) >= 2,
            "pings after the loop runs again",
        )
        daemon.request_stop()
        assert await run == 0
        msgs = ns.messages()

    blocked, unblocked = marker(msgs, "blocked"), marker(msgs, "unblocked")
    assert blocked < unblocked < len(msgs)
    assert pings(msgs[blocked:unblocked]) == 0, [str(m) for m in msgs[blocked:unblocked]]
