"""The daemon's side of watching: a saved file becomes one debounced reload request, and a
watcher thread that dies is started again, followed by a reload (events may have been
lost meanwhile). Real files and a real observer; the daemon's clock is a FakeClock."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.observers.api import BaseObserver, EventEmitter
from watchdog.observers.inotify import InotifyObserver

from anybilld.clock import FakeClock
from anybilld.config import load_config
from anybilld.daemon import DEBOUNCE_QUIET, WATCHER_RESTART_DELAY, WATCHER_RESTART_MAX, Daemon

CONFIG = """\
version: 1
identity:
  client_id: c
  token_url: https://idp.invalid/token
merchants: []
"""


class ExplodingEmitter(EventEmitter):
    def queue_events(self, timeout: float) -> None:
        raise RuntimeError("emitter broke")


async def eventually(predicate: object, rounds: int = 1000) -> None:
    for _ in range(rounds):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def watching_daemon(
    tmp_path: Path, make_inotify: Callable[[], BaseObserver] | None = None
) -> tuple[Daemon, Path, FakeClock]:
    """A daemon on a FakeClock watching ``tmp_path/config.yaml``; stop with _stop_watching."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    clock = FakeClock()
    d = Daemon(config_path=cfg, clock=clock, make_inotify=make_inotify)
    await d._start_watching(load_config(cfg), asyncio.get_running_loop())
    return d, cfg, clock


async def test_a_save_requests_one_reload_after_the_quiet_period(tmp_path: Path) -> None:
    d, cfg, clock = await watching_daemon(tmp_path)
    try:
        tmp = tmp_path / "config.yaml.tmp"
        tmp.write_text(CONFIG + "# edited\n")
        os.replace(tmp, cfg)
        await eventually(lambda: clock.sleeping)  # the debounce timer runs
        assert not d._reload.is_set()
        await clock.advance(DEBOUNCE_QUIET)
        assert d._reload.is_set()
    finally:
        await d._stop_watching()


async def test_a_dead_watcher_is_restarted_and_a_reload_follows(tmp_path: Path) -> None:
    made: list[str] = []

    def make() -> BaseObserver:
        if not made:
            made.append("broken")
            return BaseObserver(ExplodingEmitter, timeout=0.05)
        made.append("inotify")
        return InotifyObserver()

    d, cfg, clock = await watching_daemon(tmp_path, make)
    try:
        await eventually(lambda: d._restarting is not None and clock.sleeping)
        assert not d._reload.is_set()
        await clock.advance(WATCHER_RESTART_DELAY)
        await eventually(lambda: d._reload.is_set())
        assert made == ["broken", "inotify"]
        assert d.watcher is not None and d.watcher.using == "inotify"

        # The new observer sees the next save.
        d._reload.clear()
        cfg.write_text(CONFIG + "# again\n")
        await eventually(lambda: clock.sleeping)
        await clock.advance(DEBOUNCE_QUIET)
        assert d._reload.is_set()
    finally:
        await d._stop_watching()


async def test_a_watcher_that_cannot_start_is_tried_again(tmp_path: Path) -> None:
    calls: list[int] = []

    def make() -> BaseObserver:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("no observer today")
        return InotifyObserver()

    d, _, clock = await watching_daemon(tmp_path, make)
    try:
        assert len(calls) == 1 and d._restarting is not None
        await eventually(lambda: clock.sleeping)
        await clock.advance(WATCHER_RESTART_DELAY)  # second try fails too
        await eventually(lambda: len(calls) == 2 and clock.sleeping)
        assert not d._reload.is_set()
        await clock.advance(2 * WATCHER_RESTART_DELAY)  # backed off, third try works
        await eventually(lambda: d._reload.is_set())
        assert d.watcher is not None and d.watcher.using == "inotify"
    finally:
        await d._stop_watching()


class DiesWhileStarting(BaseObserver):
    """An observer whose emitter thread has died by the time ``start`` returns."""

    def __init__(self) -> None:
        super().__init__(ExplodingEmitter, timeout=0.05)

    def start(self) -> None:
        super().start()
        for emitter in list(self.emitters):
            emitter.join(5)


async def test_a_watcher_that_dies_again_while_restarting_is_restarted_again(
    tmp_path: Path,
) -> None:
    made: list[str] = []

    def make() -> BaseObserver:
        if len(made) < 2:
            made.append("broken")
            return DiesWhileStarting()
        made.append("inotify")
        return InotifyObserver()

    d, cfg, clock = await watching_daemon(tmp_path, make)
    try:
        await eventually(lambda: clock.sleeping)
        await clock.advance(WATCHER_RESTART_DELAY)  # the restart dies too
        await eventually(lambda: len(made) == 2 and clock.sleeping)
        await clock.advance(2 * WATCHER_RESTART_DELAY)
        await eventually(lambda: len(made) == 3)
        await eventually(lambda: d._reload.is_set())
        assert d.watcher is not None and d.watcher.using == "inotify"
        d._reload.clear()
        cfg.write_text(CONFIG + "# seen by the third observer\n")
        await eventually(lambda: clock.sleeping)
        await clock.advance(DEBOUNCE_QUIET)
        assert d._reload.is_set()
    finally:
        await d._stop_watching()


async def test_a_watcher_that_ran_a_long_while_restarts_after_the_first_delay(
    tmp_path: Path,
) -> None:
    """The backoff between restarts grows only while the watcher keeps dying."""
    explode = threading.Event()

    class ExplodesOnRequest(EventEmitter):
        def queue_events(self, timeout: float) -> None:
            if explode.wait(timeout):
                raise RuntimeError("emitter broke")

    made: list[BaseObserver] = []

    def make() -> BaseObserver:
        made.append(BaseObserver(ExplodesOnRequest, timeout=0.05))
        return made[-1]

    d, _, clock = await watching_daemon(tmp_path, make)
    try:
        for _ in range(3):  # dies three times in a row: 1 s, 2 s, 4 s
            explode.set()
            await eventually(lambda: clock.sleeping)
            explode.clear()
            await clock.advance(clock.sleeping[0])
            await eventually(lambda: not clock.sleeping and d._restarting.done())  # type: ignore[union-attr]
        assert len(made) == 4
        await clock.advance(WATCHER_RESTART_MAX + 1)  # then runs for a long while
        explode.set()
        await eventually(lambda: clock.sleeping)
        assert clock.sleeping == [WATCHER_RESTART_DELAY]
        explode.clear()
    finally:
        await d._stop_watching()
