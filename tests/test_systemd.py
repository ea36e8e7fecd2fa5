"""The sd_notify sender against a real datagram socket, path and abstract, in-process."""

from __future__ import annotations

import os
import time

import pytest
from notify_socket import NotifySocket

from anybilld.systemd import Notifier, watchdog_interval


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_every_message_arrives_with_its_fields_on_both_kinds_of_socket(abstract: bool) -> None:
    with NotifySocket(abstract=abstract) as ns:
        n = Notifier(ns.address)
        assert n.enabled
        n.ready("0 ok, 2 pending")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.status("2 ok")
        n.watchdog()
        n.stopping()
        n.close()
        ns.wait(lambda m: m.has("STOPPING"))
        msgs = ns.messages()
    assert [str(m) for m in msgs] == [
        "READY=1 STATUS=0 ok, 2 pending",
        f"RELOADING=1 MONOTONIC_USEC={msgs[1].get('MONOTONIC_USEC')}",
        "STATUS=2 ok",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading.
    assert before <= int(msgs[1].get("MONOTONIC_USEC") or 0) <= after
    assert {m.pid for m in msgs} == {os.getpid()}


def test_without_notify_socket_nothing_is_set_up_and_nothing_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready("x")
    n.reloading()
    n.watchdog()
    n.stopping()
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not Notifier().enabled


def test_the_environment_names_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    with NotifySocket(abstract=True) as ns:
        monkeypatch.setenv("NOTIFY_SOCKET", ns.address)
        Notifier().ready()
        ns.wait(lambda m: m.has("READY"))


def test_a_vanished_supervisor_socket_never_raises() -> None:
    ns = NotifySocket()
    n = Notifier(ns.address)
    ns.close()  # the path is gone: sendto fails with ENOENT
    n.ready("x")
    n.watchdog()
    n.close()
    n.stopping()  # after close: a no-op


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # WatchdogSec=30s: ping every 15 s
        ("200000", "self", 0.1),
        ("30000000", "1", None),  # the watchdog is meant for another process
        (None, None, None),
        ("", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert watchdog_interval() == expected
