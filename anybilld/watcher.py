"""Watching the config for changes: which directories to watch, debouncing, the observer.

Three parts, the first two pure:

1. ``watch_set(files, patterns)`` works out what to watch from the files a load read (main
   file, includes, secret files) and the include globs. Directories, never files, are
   watched (non-recursively), so every way of replacing a file is seen: written in place,
   renamed over from anywhere, deleted and created again, an editor's backup dance. Symbolic
   links are followed link by link, and the directory of each link and of its target is
   watched. A Kubernetes ConfigMap volume looks like this::

       /etc/anybilld/config.yaml -> ..data/config.yaml
       /etc/anybilld/..data      -> ..2026_12_03_10_00_00.123
       /etc/anybilld/..2026_12_03_10_00_00.123/config.yaml

   and an update writes a new timestamped directory, points a new ``..data_tmp`` link at
   it and renames that over ``..data``: the rename lands in ``/etc/anybilld``, named
   ``..data``, which is a link on the way to the config, so it counts. Everything else that
   happens in a watched directory (other files in /etc, our own reads) is ignored. A path
   whose directory does not exist yet is covered by watching its nearest existing ancestor
   for the missing directory's creation. The set is computed anew after every reload.

2. ``Debouncer`` turns a burst of events into one call: it fires once nothing has happened
   for ``quiet`` seconds, or ``max_wait`` after the first event of a burst that never stops,
   on the injected clock, with one timer task (no polling).

3. ``ConfigWatcher`` runs a watchdog observer (inotify, or polling every ``poll_interval``)
   over a ``WatchSet`` and hands relevant events to the event loop thread-safely. ``auto``
   falls back to polling when inotify cannot be set up (no inotify, the watch limit
   reached). A thread of the observer that dies (an exception) reports it to the loop, which
   starts a new observer; since events may have been lost meanwhile, a reload follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    EVENT_TYPE_ATTRIB,
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_EVENTS_LOST,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from .clock import Clock
from .config import WatchMode

log = logging.getLogger("anybilld.watcher")


class _QuietEndedEmitter(logging.Filter):
    """watchdog logs an ERROR when the emitter of a deleted directory reads once more
    after stopping itself (a ConfigMap's old data directory going, say): harmless, and
    handled here by renewing the watch, so it must not alarm anyone reading the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietEndedEmitter())

# Opening, reading and closing a file unchanged (our own loads!) are not changes; only
# these are. A new mode or owner is one: `chmod 0640 secret` fixes a secret the last load
# could not read.
_CHANGES = frozenset(
    {
        EVENT_TYPE_CREATED,
        EVENT_TYPE_DELETED,
        EVENT_TYPE_MODIFIED,
        EVENT_TYPE_MOVED,
        EVENT_TYPE_CLOSED,  # closed after writing
        EVENT_TYPE_ATTRIB,
    }
)
_MAX_LINKS = 40  # like the kernel's limit on symlinks in one lookup (ELOOP)


# --------------------------------------------------------------------------- what to watch


@dataclass(frozen=True, kw_only=True)
class WatchSet:
    """Directories to watch and the paths in them that matter."""

    dirs: frozenset[tuple[str, bool]]  # (directory, recursive)
    paths: frozenset[str]  # an event naming one of these is a change
    patterns: tuple[str, ...] = ()  # ... and so is one matching an include glob

    def relevant(self, path: str) -> bool:
        return path in self.paths or any(fnmatch.fnmatchcase(path, p) for p in self.patterns)

    def __or__(self, other: WatchSet) -> WatchSet:
        return WatchSet(
            dirs=self.dirs | other.dirs,
            paths=self.paths | other.paths,
            patterns=tuple(dict.fromkeys(self.patterns + other.patterns)),
        )


def _link_chain(path: str) -> set[str]:
    """``path`` and every path met resolving it: each symlink on the way and what it
    points to, component by component (a link's target may itself hold links)."""
    out: set[str] = set()
    todo = [os.path.normpath(path)]
    steps = 0
    while todo and steps < _MAX_LINKS:
        steps += 1
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        parts = Path(p).parts
        for i in range(2, len(parts) + 1):
            prefix = os.path.join(*parts[:i])
            if os.path.islink(prefix):
                try:
                    target = os.readlink(prefix)
                except OSError:
                    break
                out.add(prefix)
                resolved = os.path.normpath(os.path.join(os.path.dirname(prefix), target))
                todo.append(os.path.join(resolved, *parts[i:]) if parts[i:] else resolved)
                break
    return out


def _existing_dir(path: str, paths: set[str]) -> str:
    """The directory to watch for ``path``: its parent, or the nearest ancestor that exists
    (then the missing directories on the way become relevant, to notice them appear)."""
    d = os.path.dirname(path)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        paths.add(d)
        d = os.path.dirname(d)
    return os.path.realpath(d)


def watch_set(files: Iterable[Path], patterns: Iterable[str] = (), *, base: Path) -> WatchSet:
    """What to watch for the config read from ``files`` with include ``patterns``
    (relative to ``base``, the main file's directory). Touches only the file system's
    metadata (lstat, readlink)."""
    paths: set[str] = set()
    dirs: set[tuple[str, bool]] = set()
    base = Path(os.path.abspath(base))  # `--config config.yaml`; events name absolute paths
    for f in files:
        paths |= _link_chain(os.path.abspath(f))
    globs: list[str] = []
    for pattern in patterns:
        full = os.path.normpath(os.path.join(base, pattern))
        if not glob.has_magic(full):
            paths |= _link_chain(full)
            continue
        head = Path(full)
        while glob.has_magic(str(head)):
            head = head.parent
        rest = os.path.relpath(full, head)
        recursive = glob.has_magic(os.path.dirname(rest)) or "**" in rest
        # The directory (and links on the way to it) as written and as resolved: events
        # from inotify name the resolved directory.
        paths |= _link_chain(str(head))
        for d in {str(head), os.path.realpath(head)}:
            globs.append(os.path.join(d, rest))
        if os.path.isdir(head):
            dirs.add((os.path.realpath(head), recursive))
    for p in list(paths):
        dirs.add((_existing_dir(p, paths), False))
    # A recursive watch covers the plain one of the same directory.
    dirs = {(d, r) for d, r in dirs if r or (d, True) not in dirs}
    return WatchSet(dirs=frozenset(dirs), paths=frozenset(paths), patterns=tuple(globs))


def files_signature(files: Iterable[Path], patterns: Iterable[str], *, base: Path) -> object:
    """What the files look like now (identity, size, mtime, through symlinks) and which
    files the include globs match: compared before and after the watch is set up, it shows
    a change that no watcher could have seen."""
    sig: list[object] = []
    for f in files:
        try:
            st = os.stat(f)
            sig.append((str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((str(f), None))
    for pattern in patterns:
        full = os.path.join(base, pattern)
        sig.append(tuple(sorted(glob.glob(full, recursive=True))))
    return tuple(sig)


# --------------------------------------------------------------------------- debouncing


class Debouncer:
    """Calls ``fire`` once a burst of ``poke()`` calls has been quiet for ``quiet`` seconds
    (or ``max_wait`` after the burst began, so a file rewritten non-stop still reloads).

    One timer task per burst, on the injected clock. Caveat: ``fire`` runs in that task;
    it should only set an event or schedule work.
    """

    def __init__(
        self, clock: Clock, fire: Callable[[], None], *, quiet: float, max_wait: float
    ) -> None:
        self.clock = clock
        self.fire = fire
        self.quiet = quiet
        self.max_wait = max_wait
        self._first: float | None = None
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        return self._first is not None

    def poke(self) -> None:
        now = self.clock.monotonic()
        self._last = now
        if self._first is None:
            self._first = now
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self._first is not None:
            now = self.clock.monotonic()
            due = min(self._last + self.quiet, self._first + self.max_wait)
            if now >= due:
                self._first = None
                self.fire()
                return
            # Sleeps at most once per poke that arrived meanwhile: a timer, not a poll.
            await self.clock.sleep(due - now)

    def cancel(self) -> None:
        self._first = None
        if self._task is not None:
            self._task.cancel()


# --------------------------------------------------------------------------- the observer


OnEvent = Callable[[str], None]  # the path that changed
OnDeath = Callable[[str, BaseException | None], None]


def _guarded(cls: Any, on_death: OnDeath, what: str) -> Any:
    """A subclass of a watchdog thread class whose ``run`` reports an unexpected end."""

    class Guarded(cls):  # type: ignore[misc]
        def run(self) -> None:
            error: BaseException | None = None
            try:
                super().run()
            except BaseException as exc:  # the thread is ending either way; tell the loop
                error = exc
            finally:
                if self.should_keep_running():  # ended without stop(): it died
                    on_death(what, error)

    Guarded.__name__ = f"Guarded{cls.__name__}"
    return Guarded


class _Handler(FileSystemEventHandler):
    def __init__(self, relevant: Callable[[str], bool], on_event: OnEvent) -> None:
        self._relevant = relevant
        self._on_event = on_event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == EVENT_TYPE_EVENTS_LOST:
            # The kernel's queue overflowed: any change may be among the lost events.
            self._on_event(os.fsdecode(event.src_path) or "(events lost)")
            return
        if event.event_type not in _CHANGES:
            return
        if event.event_type == EVENT_TYPE_MODIFIED and event.is_directory:
            # A directory "modified" is an entry created, deleted or renamed in it, and
            # that entry has an event of its own: a README beside merchants.d/*.yaml
            # must not reload.
            return
        for p in (event.src_path, event.dest_path):
            path = os.fsdecode(p) if p else ""
            if path and self._relevant(path):
                self._on_event(path)
                return


class ConfigWatcher:
    """A watchdog observer over a ``WatchSet``; blocking methods, run them off the loop.

    ``on_event`` and ``on_death`` are called from the observer's threads; wrap them with
    ``loop.call_soon_threadsafe``.
    """

    def __init__(
        self,
        *,
        mode: WatchMode,
        poll_interval: float,
        on_event: OnEvent,
        on_death: OnDeath,
        make_inotify: Callable[[], BaseObserver] | None = None,
    ) -> None:
        self.mode = mode
        self.poll_interval = poll_interval
        self.on_event = on_event
        self.on_death = on_death
        self._make_inotify = make_inotify or _inotify_observer
        self._lock = threading.Lock()
        self._set = WatchSet(dirs=frozenset(), paths=frozenset())
        self._observer: BaseObserver | None = None
        self._watches: dict[tuple[str, bool], ObservedWatch] = {}
        self._inodes: dict[tuple[str, bool], tuple[int, int] | None] = {}
        self._generation = 0
        self.using: str = "none"  # inotify | poll, once started

    def start(self, ws: WatchSet) -> None:
        """(Re)start the observer on ``ws``; a failing inotify in ``auto`` mode polls."""
        with self._lock:
            self._stop_observer()
            self._set = ws
            self._generation += 1
            if self.mode != "poll":
                try:
                    self._start("inotify", ws)
                    return
                except OSError as exc:
                    self._stop_observer()
                    level = logging.WARNING if self.mode == "auto" else logging.ERROR
                    log.log(
                        level,
                        "cannot watch the config with inotify (%s); polling every %gs instead",
                        exc.strerror or exc,
                        self.poll_interval,
                    )
            self._start("poll", ws)

    def update(self, ws: WatchSet) -> bool:
        """Watch ``ws`` from now on; returns whether a directory was added.

        A directory that was deleted and created again counts as added: its old watch
        ended with the deletion (watchdog stops that emitter), so it is set up anew.
        """
        with self._lock:
            observer = self._observer
            if observer is None:
                return False
            old, self._set = self._set, ws
            ended = {key for key in ws.dirs & old.dirs if not self._watching(observer, key)}
            added = (ws.dirs - old.dirs) | ended
            for key in (old.dirs - ws.dirs) | ended:
                watch = self._watches.pop(key, None)
                if watch is not None:
                    with contextlib.suppress(KeyError, OSError):
                        observer.unschedule(watch)
            scheduled = False
            try:
                for key in added:
                    scheduled |= self._schedule(observer, key)
            except OSError as exc:
                if self.using == "poll":
                    raise
                log.warning(
                    "cannot add an inotify watch (%s); polling every %gs instead",
                    exc.strerror or exc,
                    self.poll_interval,
                )
                self._stop_observer()
                self._generation += 1
                self._start("poll", ws)
                return True
            # Only a directory really watched now is news: one that is still missing would
            # ask for a reload on every reload that fails for its absence (an endless loop
            # while `secrets/` is gone). Its ancestor's watch reports its return.
            return scheduled

    def stop(self) -> None:
        with self._lock:
            self._generation += 1
            self._stop_observer()

    # ----------------------------------------------------------------- internals

    def _start(self, kind: str, ws: WatchSet) -> None:
        generation = self._generation

        def died(what: str, error: BaseException | None) -> None:
            if generation == self._generation:  # not an observer replaced meanwhile
                self.on_death(what, error)

        base = (
            self._make_inotify()
            if kind == "inotify"
            else PollingObserver(timeout=self.poll_interval)
        )
        emitter_class = base._emitter_class
        observer: BaseObserver = base
        observer.__class__ = _guarded(type(base), died, f"{kind} observer")
        observer._emitter_class = _guarded(emitter_class, died, f"{kind} emitter")
        self._observer = observer
        self._watches = {}
        for key in ws.dirs:
            self._schedule(observer, key)
        observer.start()
        self.using = kind

    def _schedule(self, observer: BaseObserver, key: tuple[str, bool]) -> bool:
        """Watch ``key``'s directory; False when it does not exist (its nearest existing
        ancestor is watched for it coming back)."""
        directory, recursive = key
        if not os.path.isdir(directory):
            return False
        handler = _Handler(self._relevant, self.on_event)
        self._inodes[key] = _inode(directory)
        self._watches[key] = observer.schedule(handler, directory, recursive=recursive)
        return True

    def _watching(self, observer: BaseObserver, key: tuple[str, bool]) -> bool:
        """Whether the watch of ``key`` still covers the directory there now: its emitter
        runs, and the directory is the one (inode) it was set up on."""
        watch = self._watches.get(key)
        emitter = None if watch is None else observer._emitter_for_watch.get(watch)
        return (
            emitter is not None
            and emitter.is_alive()
            and emitter.should_keep_running()  # watchdog stops it when its directory goes
            and self._inodes.get(key) == _inode(key[0])
        )

    def _relevant(self, path: str) -> bool:
        return self._set.relevant(path)

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        self._watches = {}
        if observer is None:
            return
        try:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=5)
        except Exception as exc:  # a dead observer may not stop cleanly; it is gone anyway
            log.debug("stopping the observer: %s", exc)


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _inotify_observer() -> BaseObserver:
    from watchdog.observers.inotify import InotifyObserver

    return InotifyObserver()
