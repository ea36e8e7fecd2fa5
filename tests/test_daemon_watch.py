"""The daemon's side of watching: a saved file becomes one debounced reload request, and a
watcher thread that dies is started again, followed by a reload (events may have been
lost meanwhile). Real files and a real observer; the daemon's clock is a FakeClock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from watchdog.observers.api import BaseObserver, EventEmitter
from watchdog.observers.inotify import InotifyObserver

from anybilld.clock import FakeClock
from anybilld.config import load_config
from anybilld.daemon import DEBOUNCE_QUIET, WATCHER_RESTART_DELAY, Daemon

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


async def test_a_save_requests_one_reload_after_the_quiet_period(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    clock = FakeClock()
    d = Daemon(config_path=cfg, clock=clock)
    await d._start_watching(load_config(cfg), asyncio.get_running_loop())
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
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    clock = FakeClock()
    made: list[str] = []

    def make() -> BaseObserver:
        if not made:
            made.append("broken")
            return BaseObserver(ExplodingEmitter, timeout=0.05)
        made.append("inotify")
        return InotifyObserver()

    d = Daemon(config_path=cfg, clock=clock, make_inotify=make)
    await d._start_watching(load_config(cfg), asyncio.get_running_loop())
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
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    clock = FakeClock()
    calls: list[int] = []

    def make() -> BaseObserver:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("no observer today")
        return InotifyObserver()

    d = Daemon(config_path=cfg, clock=clock, make_inotify=make)
    await d._start_watching(load_config(cfg), asyncio.get_running_loop())
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
