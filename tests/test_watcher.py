"""The watcher: what it watches (pure, over real directories), the debouncer (fake clock),
and the observer on a real file system (inotify and polling), including a dying thread."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from watchdog.events import DirModifiedEvent, EventsLostEvent
from watchdog.observers.api import BaseObserver, EventEmitter

from anybilld.clock import FakeClock
from anybilld.watcher import (
    ConfigWatcher,
    Debouncer,
    WatchSet,
    _Handler,
    files_signature,
    watch_set,
)

# --------------------------------------------------------------------------- watch_set


def test_a_plain_file_watches_its_directory_and_only_it_matters(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("x")
    secret = tmp_path / "secrets" / "berlin"
    secret.parent.mkdir()
    secret.write_text("pw")
    ws = watch_set([cfg, secret], base=tmp_path)
    assert ws.dirs == {(str(tmp_path), False), (str(secret.parent), False)}
    assert ws.relevant(str(cfg)) and ws.relevant(str(secret))
    for other in ("config.yaml~", ".config.yaml.swp", "hosts", "secrets"):
        assert not ws.relevant(str(tmp_path / other)), other


def test_a_configmap_layout_watches_the_link_and_its_target(tmp_path: Path) -> None:
    data = tmp_path / "..2026_12_03_10_00_00.1"
    data.mkdir()
    (data / "config.yaml").write_text("x")
    (tmp_path / "..data").symlink_to(data.name)
    cfg = tmp_path / "config.yaml"
    cfg.symlink_to("..data/config.yaml")
    ws = watch_set([cfg], base=tmp_path)
    assert (str(tmp_path), False) in ws.dirs
    assert (str(data), False) in ws.dirs
    # The kubelet's rename of ..data_tmp over ..data names ..data.
    assert ws.relevant(str(tmp_path / "..data"))
    assert ws.relevant(str(data / "config.yaml"))
    assert not ws.relevant(str(tmp_path / "..data_tmp"))
    assert not ws.relevant(str(data / "other.yaml"))


def test_a_symlinked_config_directory_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "opt" / "conf"
    real.mkdir(parents=True)
    (real / "config.yaml").write_text("x")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "anybilld").symlink_to(real)
    ws = watch_set([etc / "anybilld" / "config.yaml"], base=etc / "anybilld")
    assert (str(real), False) in ws.dirs and (str(etc), False) in ws.dirs
    assert ws.relevant(str(real / "config.yaml"))
    assert ws.relevant(str(etc / "anybilld"))  # the link itself replaced


def test_an_include_glob_matches_new_files_and_a_missing_directory_is_awaited(
    tmp_path: Path,
) -> None:
    ws = watch_set([tmp_path / "config.yaml"], ["merchants.d/*.yaml"], base=tmp_path)
    # merchants.d does not exist yet: its creation in tmp_path counts.
    assert ws.dirs == {(str(tmp_path), False)}
    assert ws.relevant(str(tmp_path / "merchants.d"))

    (tmp_path / "merchants.d").mkdir()
    ws = watch_set([tmp_path / "config.yaml"], ["merchants.d/*.yaml"], base=tmp_path)
    assert (str(tmp_path / "merchants.d"), False) in ws.dirs
    assert ws.relevant(str(tmp_path / "merchants.d" / "new-store.yaml"))
    assert not ws.relevant(str(tmp_path / "merchants.d" / "README"))
    assert not ws.relevant(str(tmp_path / "merchants.d" / "new-store.yaml.swp"))


def test_a_relative_config_path_watches_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``anybilld --config config.yaml``: inotify names absolute paths, so must the set."""
    (tmp_path / "merchants.d").mkdir()
    monkeypatch.chdir(tmp_path)
    ws = watch_set([Path("config.yaml")], ["merchants.d/*.yaml", "stores.yaml"], base=Path("."))
    assert (str(tmp_path / "merchants.d"), False) in ws.dirs
    assert ws.relevant(str(tmp_path / "config.yaml"))
    assert ws.relevant(str(tmp_path / "merchants.d" / "new-store.yaml"))
    assert ws.relevant(str(tmp_path / "stores.yaml"))  # an include not yet created


def test_a_secret_in_a_missing_directory_watches_the_nearest_ancestor(tmp_path: Path) -> None:
    secret = tmp_path / "a" / "b" / "pw"
    ws = watch_set([secret], base=tmp_path)
    assert ws.dirs == {(str(tmp_path), False)}
    assert ws.relevant(str(tmp_path / "a"))
    assert ws.relevant(str(tmp_path / "a" / "b"))


def test_watch_sets_combine() -> None:
    a = WatchSet(dirs=frozenset({("/a", False)}), paths=frozenset({"/a/x"}), patterns=("/p/*",))
    b = WatchSet(dirs=frozenset({("/b", False)}), paths=frozenset({"/b/y"}))
    both = a | b
    assert both.relevant("/a/x") and both.relevant("/b/y") and both.relevant("/p/q")
    assert both.dirs == {("/a", False), ("/b", False)}


# --------------------------------------------------------------------------- Debouncer


async def test_a_burst_fires_once_after_the_quiet_period() -> None:
    clock = FakeClock()
    fired: list[float] = []
    d = Debouncer(clock, lambda: fired.append(clock.monotonic()), quiet=0.5, max_wait=10)
    start = clock.monotonic()
    for _ in range(5):
        d.poke()
        await clock.advance(0.25)
    assert fired == []
    await clock.advance(0.25)
    assert fired == [start + 1.0 + 0.5]  # the last poke at +1.0, then quiet for 0.5
    await clock.advance(5)
    assert len(fired) == 1

    d.poke()  # a new burst fires again
    await clock.advance(0.5)
    assert len(fired) == 2
    assert not d.pending


async def test_a_burst_that_never_stops_fires_by_max_wait() -> None:
    clock = FakeClock()
    fired: list[float] = []
    d = Debouncer(clock, lambda: fired.append(clock.monotonic()), quiet=0.5, max_wait=2)
    start = clock.monotonic()
    for _ in range(12):
        d.poke()
        await clock.advance(0.25)
    assert fired[0] == start + 2
    assert len(fired) == 1  # the pokes after it started a new burst
    assert d.pending


async def test_a_timer_not_a_poll() -> None:
    clock = FakeClock()
    d = Debouncer(clock, lambda: None, quiet=0.5, max_wait=2)
    d.poke()
    await asyncio.sleep(0)
    assert clock.sleeping == [0.5]
    d.cancel()
    await asyncio.sleep(0)
    assert clock.sleeping == []


# --------------------------------------------------------------------------- ConfigWatcher


class Events:
    def __init__(self) -> None:
        self.changed = threading.Event()
        self.died = threading.Event()
        self.deaths: list[tuple[str, BaseException | None]] = []

    def on_event(self, path: str) -> None:
        self.changed.set()

    def on_death(self, what: str, error: BaseException | None) -> None:
        self.deaths.append((what, error))
        self.died.set()


def rename_over(path: Path, text: str) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_a_relevant_change_is_reported_and_an_unrelated_one_is_not(
    tmp_path: Path, mode: str
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    ev = Events()
    w = ConfigWatcher(mode=mode, poll_interval=0.05, on_event=ev.on_event, on_death=ev.on_death)  # type: ignore[arg-type]
    w.start(watch_set([cfg], base=tmp_path))
    try:
        assert w.using == mode
        # Reading the config, as every reload does, is no change.
        cfg.read_text()
        (tmp_path / "unrelated").write_text("x")
        rename_over(cfg, "b")
        assert ev.changed.wait(10)
    finally:
        w.stop()
    assert ev.deaths == []


def test_reading_the_config_and_unrelated_files_report_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    marker = tmp_path / "marker"
    seen: list[str] = []
    arrived = threading.Event()

    def on_event(path: str) -> None:
        seen.append(path)
        if path == str(marker):
            arrived.set()

    w = ConfigWatcher(mode="inotify", poll_interval=1, on_event=on_event, on_death=print)
    w.start(watch_set([cfg, marker], base=tmp_path))
    try:
        cfg.read_text()
        (tmp_path / "unrelated").write_text("x")
        os.replace(tmp_path / "unrelated", tmp_path / "unrelated2")
        os.chmod(tmp_path / "unrelated2", 0o600)
        # A relevant event after them, through the same queue: once it arrived, the
        # earlier ones have been dispatched too, and none of them counted.
        marker.write_text("m")
        assert arrived.wait(10)
    finally:
        w.stop()
    assert set(seen) == {str(marker)}


def test_a_new_mode_counts_and_a_file_the_include_glob_does_not_match_does_not(
    tmp_path: Path,
) -> None:
    """``chmod`` fixes a secret the last load could not read; a README written into
    merchants.d (its directory "modified") is not a change."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    secret = tmp_path / "secret"
    secret.write_text("pw")
    (tmp_path / "merchants.d").mkdir()
    seen: list[str] = []
    arrived = threading.Event()

    def on_event(path: str) -> None:
        seen.append(path)
        if path == str(secret):
            arrived.set()

    ws = watch_set([cfg, secret], ["merchants.d/*.yaml"], base=tmp_path)
    w = ConfigWatcher(mode="inotify", poll_interval=1, on_event=on_event, on_death=print)
    w.start(ws)
    try:
        (tmp_path / "merchants.d" / "README").write_text("one file per store")
        os.chmod(secret, 0o640)
        assert arrived.wait(10)
    finally:
        w.stop()
    assert seen == [str(secret)]


def test_lost_events_count_as_a_change() -> None:
    """An inotify queue overflow may have swallowed any change: reload."""
    seen: list[str] = []
    handler = _Handler(lambda path: False, seen.append)
    handler.dispatch(EventsLostEvent("/etc/anybilld", is_directory=True))
    handler.dispatch(DirModifiedEvent("/etc/anybilld"))
    assert seen == ["/etc/anybilld"]


def test_auto_falls_back_to_polling_when_inotify_cannot_be_set_up(tmp_path: Path) -> None:
    def no_inotify() -> BaseObserver:
        raise OSError(errno.EMFILE, "inotify instance limit reached")

    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    ev = Events()
    w = ConfigWatcher(
        mode="auto",
        poll_interval=0.05,
        on_event=ev.on_event,
        on_death=ev.on_death,
        make_inotify=no_inotify,
    )
    w.start(watch_set([cfg], base=tmp_path))
    try:
        assert w.using == "poll"
        rename_over(cfg, "b")
        assert ev.changed.wait(10)
    finally:
        w.stop()


class ExplodingEmitter(EventEmitter):
    """An emitter whose thread fails, as a bug or an odd file system might make it."""

    def queue_events(self, timeout: float) -> None:
        raise RuntimeError("emitter broke")


def test_a_dying_thread_is_reported_and_a_restart_watches_again(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    ev = Events()
    broken = True

    def make() -> BaseObserver:
        if broken:
            return BaseObserver(ExplodingEmitter, timeout=0.05)
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver()

    w = ConfigWatcher(
        mode="inotify",
        poll_interval=1,
        on_event=ev.on_event,
        on_death=ev.on_death,
        make_inotify=make,
    )
    ws = watch_set([cfg], base=tmp_path)
    w.start(ws)
    try:
        assert ev.died.wait(10)
        what, error = ev.deaths[0]
        assert what == "inotify emitter" and isinstance(error, RuntimeError)
        broken = False
        w.start(ws)  # what the daemon does on the loop after a report
        rename_over(cfg, "b")
        assert ev.changed.wait(10)
    finally:
        w.stop()
    assert len(ev.deaths) == 1  # a stopped observer is not a dead one


def test_update_adds_and_drops_directories(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    other = tmp_path / "other"
    other.mkdir()
    ev = Events()
    w = ConfigWatcher(mode="inotify", poll_interval=1, on_event=ev.on_event, on_death=ev.on_death)
    w.start(watch_set([cfg], base=tmp_path))
    try:
        assert w.update(watch_set([cfg, other / "pw"], base=tmp_path)) is True
        assert w.update(watch_set([cfg, other / "pw"], base=tmp_path)) is False
        (other / "pw").write_text("secret")
        assert ev.changed.wait(10)
    finally:
        w.stop()


def test_a_directory_still_missing_is_no_news_until_it_returns(tmp_path: Path) -> None:
    """``rm -rf secrets``: every reload fails for its absence and keeps the old watch set;
    an update must not ask for yet another reload each time, only once it is back."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    ws = watch_set([cfg, secrets / "pw"], base=tmp_path)
    ev = Events()
    w = ConfigWatcher(mode="inotify", poll_interval=1, on_event=ev.on_event, on_death=ev.on_death)
    w.start(ws)
    try:
        (secrets / "pw").write_text("x")
        (secrets / "pw").unlink()
        secrets.rmdir()
        assert ev.changed.wait(10)
        # The failed reloads keep the set (with secrets/ in it) and add the missing path's.
        gone = ws | watch_set([cfg, secrets / "pw"], base=tmp_path)
        assert w.update(gone) is False
        assert w.update(gone) is False
        secrets.mkdir()
        assert w.update(gone) is True  # back: watched anew, worth one reload
        assert w.update(gone) is False
    finally:
        w.stop()


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_a_directory_deleted_and_created_again_is_watched_again(tmp_path: Path, mode: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    merchants = tmp_path / "merchants.d"
    merchants.mkdir()
    seen: list[str] = []
    gone = threading.Event()
    back = threading.Event()

    def on_event(path: str) -> None:
        seen.append(path)
        # Reported twice: by the parent's watch, and by its own as that watch ends.
        if seen.count(str(merchants)) >= 2:
            gone.set()
        if path == str(merchants / "store.yaml"):
            back.set()

    w = ConfigWatcher(mode=mode, poll_interval=0.05, on_event=on_event, on_death=print)  # type: ignore[arg-type]
    ws = watch_set([cfg], ["merchants.d/*.yaml"], base=tmp_path)
    w.start(ws)
    try:
        merchants.rmdir()
        assert gone.wait(10)
        merchants.mkdir()
        # The reload that follows computes the same watch set; the ended watch is renewed.
        assert w.update(watch_set([cfg], ["merchants.d/*.yaml"], base=tmp_path)) is True
        (merchants / "store.yaml").write_text("merchants: []")
        assert back.wait(10)
    finally:
        w.stop()


def test_the_files_signature_shows_a_change_no_watcher_saw(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a")
    (tmp_path / "merchants.d").mkdir()

    def sig() -> object:
        return files_signature([cfg], ["merchants.d/*.yaml"], base=tmp_path)

    first = sig()
    cfg.read_text()
    (tmp_path / "merchants.d" / "README").write_text("x")
    assert sig() == first
    rename_over(cfg, "a")  # same content, another file
    second = sig()
    assert second != first
    (tmp_path / "merchants.d" / "store.yaml").write_text("merchants: []")
    assert sig() != second


def test_debug_logging_says_nothing_of_unrelated_files(tmp_path: Path) -> None:
    """``--log-level debug`` with the log written beside the config: watchdog's own debug
    lines about that file would make events of their own, without end."""
    script = f"""
import logging, pathlib, time
from anybilld.logs import setup_logging
from anybilld.watcher import ConfigWatcher, watch_set
setup_logging("debug")
d = pathlib.Path({str(tmp_path)!r})
cfg = d / "config.yaml"
cfg.write_text("a")
w = ConfigWatcher(mode="inotify", poll_interval=1, on_event=print, on_death=print)
w.start(watch_set([cfg], base=d))
for i in range(20):
    (d / "daemon.log").write_text(str(i))
time.sleep(0.3)
w.stop()
logging.getLogger("anybilld").debug("done")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "done" in done.stderr  # debug logging was on
    assert "daemon.log" not in done.stderr and done.stdout == ""
