"""The daemon's lifecycle, in three phases like uvicorn's: startup, main loop, shutdown.

Startup loads the config (a broken config at start is fatal: exit 2 listing every
problem), prepares the directories, binds the listener and starts one keeper per token set,
then tells systemd READY=1 — before any token is fetched, so a dead identity provider never
makes a start time out, and starts watching the config's directories. The main loop waits
on events that signal handlers and the watcher set: stop and reload. Reloads run one at a
time; whatever asks for a reload while one runs (SIGHUP, a file change) gets exactly one
more afterwards, so the running config ends up equal to what is on disk. Shutdown is
ordered and bounded: STOPPING=1, watcher stopped, keepers stopped (a token being saved
finishes), listener closed, HTTP client closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from watchdog.observers.api import BaseObserver

from .clock import Clock, SystemClock
from .config import Config, load_config
from .errors import ConfigError, OutputError
from .files import prepare_output_dir, remove_stale_temp_files
from .identity import IdentityClient
from .keeper import Runtime, TokenState
from .listener import Listener
from .metrics import Metrics
from .state import StateStore
from .supervisor import Supervisor
from .systemd import Notifier, watchdog_interval
from .watcher import ConfigWatcher, Debouncer, WatchSet, files_signature, watch_set

log = logging.getLogger("anybilld")

SHUTDOWN_TIMEOUT = 3.0
STATUS_INTERVAL = 5.0
# A save is usually a burst of events (truncate, write, close; or create, write, rename):
# reload once it has been quiet this long, and at the latest this long after it began.
DEBOUNCE_QUIET = 0.3
DEBOUNCE_MAX_WAIT = 3.0
# A watcher that died is started again after this long (doubling while it keeps dying).
WATCHER_RESTART_DELAY = 1.0
WATCHER_RESTART_MAX = 60.0


def log_config_error(err: ConfigError, *, what: str) -> None:
    log.error("%s: %d problem(s) in the config", what, len(err.problems))
    for problem in err.problems:
        log.error("  %s", problem)


@dataclass(kw_only=True)
class Daemon:
    config_path: Path
    clock: Clock = field(default_factory=SystemClock)
    environ: Mapping[str, str] | None = None
    notifier: Notifier = field(default_factory=Notifier)

    config: Config | None = None
    supervisor: Supervisor | None = None
    listen_address: tuple[str, int] | None = None
    # Set once the listener is bound and keepers run (READY=1), or when start-up failed.
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _reload: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: ConfigWatcher | None = None
    # The inotify observer's factory; tests inject a failing one.
    make_inotify: Callable[[], BaseObserver] | None = None
    _debouncer: Debouncer | None = None
    _watching: WatchSet | None = None
    _watcher_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _watcher_deaths: int = 0  # in a row, for the restart backoff
    _watcher_started_at: float = 0.0  # clock.monotonic()
    _died_while_restarting: bool = False
    _restarting: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        # Events from inotify name absolute paths, whatever directory we were started in.
        self.config_path = Path(os.path.abspath(self.config_path))

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def config_changed(self, path: str = "") -> None:
        """A watched file changed: reload once the burst of events is over."""
        if path:
            log.debug("config change: %s", path)
        if self._debouncer is not None and not self._stop.is_set():
            self._debouncer.poke()

    # ------------------------------------------------------------------ phases

    async def run(self, *, once: bool = False) -> int:
        try:
            config = load_config(self.config_path, environ=self.environ)
        except ConfigError as err:
            log_config_error(err, what=f"cannot start with {self.config_path}")
            self.started.set()
            return 2
        self.config = config
        # Changes between this load and the watch being set up are found by comparing.
        loaded = files_signature(config.files, config.include, base=self.config_path.parent)
        try:
            store = self._prepare_directories(config)
        except (OSError, OutputError) as exc:
            log.error("cannot prepare directories: %s", exc)
            self.started.set()
            return 1

        registry = CollectorRegistry()
        metrics = Metrics(registry, lambda: self.supervisor or ())
        client = IdentityClient(
            clock=self.clock,
            max_concurrent=config.identity.max_concurrent_requests,
            max_per_second=config.identity.max_requests_per_second,
            ca_bundle=config.identity.ca_bundle,
            observer=metrics.observe_request,
        )
        rt = Runtime(
            client=client,
            store=store,
            clock=self.clock,
            output_root=config.output_dir,
            on_file_write=metrics.observe_file_write,
        )
        self.supervisor = supervisor = Supervisor(rt, on_remove=config.on_remove)
        listener = Listener(
            registry, lambda: supervisor, self._config_info, exposition=metrics.exposition
        )
        self._metrics = metrics
        self._reloaded_at = self.clock.time()
        self._last_reload_ok = True
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ):
            loop.add_signal_handler(sig, handler)
        try:
            if once:
                return await self._run_once(config, supervisor)
            try:
                self.listen_address = await listener.start(config.listen_host, config.listen_port)
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", config.listen_host, config.listen_port, exc)
                return 1
            diff = await supervisor.apply(config)
            metrics.config_loaded(True, self.clock.time(), reload=False)
            log.info(
                "anybilld started: %d token sets, listening on http://%s:%d",
                len(diff.added),
                *self.listen_address,
            )
            self.notifier.ready(self._status_line())
            self.started.set()
            await self._start_watching(config, loop)
            if loaded != await asyncio.to_thread(
                files_signature, config.files, config.include, base=self.config_path.parent
            ):
                self.config_changed()
            await self._main_loop()
            return 0
        finally:
            self.started.set()
            self.notifier.stopping()
            log.info("stopping")
            await self._stop_watching()
            client.stop_sending()
            await supervisor.stop(SHUTDOWN_TIMEOUT)
            await listener.stop()
            await client.aclose()
            self.notifier.close()
            # Only now: a second SIGTERM during shutdown must not kill a half-done write.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _run_once(self, config: Config, supervisor: Supervisor) -> int:
        await supervisor.apply(config, once=True)
        waiting = asyncio.ensure_future(supervisor.wait_all())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not waiting.done():
            waiting.cancel()
            return 1
        failed = [k for k in supervisor if not k.has_valid_token or k.output_error]
        for k in failed:
            log.error(
                "no valid token published (%s)",
                k.state.value,
                extra={"merchant": k.spec.merchant, "scope": k.spec.scope.name},
            )
        return 1 if failed else 0

    def _prepare_directories(self, config: Config) -> StateStore:
        # Created at start only: at run time a vanished output_dir may be an unmounted
        # filesystem, and writing into the bare mount point would hide the tokens.
        prepare_output_dir(config.output_dir)
        store = StateStore(config.state_dir)
        store.prepare()
        for directory in (config.output_dir, config.state_dir):
            removed = remove_stale_temp_files(directory)
            if removed:
                log.info("removed %d temp files left by an earlier crash in %s", removed, directory)
        return store

    async def _main_loop(self) -> None:
        tickers = [asyncio.ensure_future(self._status_ticker())]
        interval = watchdog_interval()
        if interval:
            tickers.append(asyncio.ensure_future(self._watchdog(interval)))
        try:
            while not self._stop.is_set():
                stop = asyncio.ensure_future(self._stop.wait())
                reload = asyncio.ensure_future(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    await self.reload()
        finally:
            for t in tickers:
                t.cancel()

    async def reload(self) -> None:
        """Load the config anew and apply the difference; a bad config changes nothing.

        RELOADING=1 is always answered by READY=1, and a bug met while applying a config
        is logged and counted as a failed reload: it must not take down the token sets
        that run, nor leave ``systemctl reload`` waiting.
        """
        self.notifier.reloading()
        try:
            await self._load_and_apply()
        except Exception:
            log.critical(
                "reload failed unexpectedly; the running token sets carry on", exc_info=True
            )
            self._metrics.config_loaded(False, self.clock.time())
            self._last_reload_ok = False
        finally:
            self.notifier.ready(self._status_line())

    async def _load_and_apply(self) -> None:
        assert self.supervisor is not None and self.config is not None
        running = self.config

        def load() -> Config:
            return load_config(self.config_path, environ=self.environ).reusing(running)

        try:
            config = await asyncio.to_thread(load)
        except ConfigError as err:
            log_config_error(err, what="reload failed, keeping the running config")
            self._metrics.config_loaded(False, self.clock.time())
            self._last_reload_ok = False
            # Keep watching what the running config needs, and what the broken one read:
            # the fix may land in any of those files.
            await self._rewatch(err.files, err.include, keep=True)
        else:
            moved = [
                key
                for key in ("output_dir", "state_dir")
                if getattr(config, key) != getattr(self.config, key)
            ]
            if moved:
                # Moving every token file and grant at once is a migration, not a reload:
                # half-applied, consumers would read stale files from the old place.
                log.error(
                    "reload refused, keeping the running config: a new %s takes effect "
                    "only after a restart",
                    " and ".join(moved),
                )
                await self._rewatch(config.files, config.include, keep=True)
                self._metrics.config_loaded(False, self.clock.time())
                self._last_reload_ok = False
                return
            if (config.listen_host, config.listen_port) != (
                self.config.listen_host,
                self.config.listen_port,
            ):
                log.warning("a new listen address takes effect only after a restart")
            if config.identity != self.config.identity:
                log.warning(
                    "identity connection settings (caps, timeout, CA bundle) take effect "
                    "only after a restart; token URL, policy and client are applied now"
                )
            await self._rewatch(config.files, config.include, keep=False)
            if config.reload != self.config.reload:
                await self._change_watch_mode(config)
            self.config = config
            diff = await self.supervisor.apply(config)
            self._metrics.config_loaded(True, self.clock.time())
            self._reloaded_at = self.clock.time()
            self._last_reload_ok = True
            log.info("config reloaded: %s", diff.summary())

    # ------------------------------------------------------------------ watching

    def _watch_set(self, files: tuple[Path, ...], include: tuple[str, ...]) -> WatchSet:
        return watch_set(files or (self.config_path,), include, base=self.config_path.parent)

    async def _start_watching(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self._debouncer = Debouncer(
            self.clock, self.request_reload, quiet=DEBOUNCE_QUIET, max_wait=DEBOUNCE_MAX_WAIT
        )

        def on_event(path: str) -> None:  # an observer thread
            loop.call_soon_threadsafe(self.config_changed, path)

        def on_death(what: str, error: BaseException | None) -> None:  # an observer thread
            loop.call_soon_threadsafe(self._watcher_died, what, error)

        self.watcher = ConfigWatcher(
            mode=config.reload.watch,
            poll_interval=config.reload.poll_interval,
            on_event=on_event,
            on_death=on_death,
            make_inotify=self.make_inotify,
        )
        self._watching = await asyncio.to_thread(self._watch_set, config.files, config.include)
        async with self._watcher_lock:
            try:
                await asyncio.to_thread(self.watcher.start, self._watching)
            except Exception as exc:
                log.error("cannot watch the config (%s); trying again; SIGHUP reloads", exc)
                self._schedule_watcher_restart()
                return
        self._watcher_started_at = self.clock.monotonic()
        log.info(
            "watching %d directories for config changes (%s)",
            len(self._watching.dirs),
            self.watcher.using,
        )

    async def _rewatch(
        self, files: tuple[Path, ...], include: tuple[str, ...], *, keep: bool
    ) -> None:
        """Watch what the config just loaded needs. A directory new to the watch may have
        changed between the load and now, so it earns one more (debounced) reload.

        Runs even when the set is unchanged: a watched directory swapped for another of
        the same name (a deploy renaming ``merchants.d.new`` over ``merchants.d``) has
        the same path but needs a new watch; ``update`` notices by the inode."""
        if self.watcher is None or self._watching is None:
            return
        ws = await asyncio.to_thread(self._watch_set, files, include)
        if keep:
            ws = ws | self._watching
        self._watching = ws
        async with self._watcher_lock:
            try:
                added = await asyncio.to_thread(self.watcher.update, ws)
            except Exception as exc:
                log.error("cannot update the config watch (%s); reload with SIGHUP", exc)
                return
        if added:
            self.config_changed()

    async def _change_watch_mode(self, config: Config) -> None:
        """A new reload.watch or poll_interval: the same watch set on a new observer."""
        if self.watcher is None or self._watching is None:
            return
        self.watcher.mode = config.reload.watch
        self.watcher.poll_interval = config.reload.poll_interval
        async with self._watcher_lock:
            try:
                await asyncio.to_thread(self.watcher.start, self._watching)
            except Exception as exc:
                log.error("cannot watch the config (%s); reload with SIGHUP", exc)
                return
        log.info("now watching the config with %s", self.watcher.using)

    def _watcher_died(self, what: str, error: BaseException | None) -> None:
        if self._stop.is_set():
            return
        if self._restarting and not self._restarting.done():
            self._died_while_restarting = True  # the restart sees it and tries again
            return
        if self.clock.monotonic() - self._watcher_started_at > WATCHER_RESTART_MAX:
            self._watcher_deaths = 0  # it ran a long while: start over at the first delay
        log.error(
            "the config watcher's %s thread died (%s); starting it again",
            what,
            f"{type(error).__name__}: {error}" if error is not None else "ended",
        )
        self._schedule_watcher_restart()

    def _schedule_watcher_restart(self) -> None:
        if self._restarting is None or self._restarting.done():
            self._restarting = asyncio.ensure_future(self._restart_watcher())

    async def _restart_watcher(self) -> None:
        """Start the watcher again after a backoff, until it runs; then reload."""
        while not self._stop.is_set():
            self._watcher_deaths += 1
            exp = min(self._watcher_deaths - 1, 16)
            await self.clock.sleep(min(WATCHER_RESTART_MAX, WATCHER_RESTART_DELAY * 2**exp))
            if self.watcher is None or self._watching is None or self._stop.is_set():
                return
            async with self._watcher_lock:
                self._died_while_restarting = False
                try:
                    await asyncio.to_thread(self.watcher.start, self._watching)
                except Exception as exc:
                    log.error("cannot restart the config watcher (%s); trying again", exc)
                    continue
            if self._died_while_restarting:
                log.error("the config watcher died again while starting; trying again")
                continue
            self._watcher_started_at = self.clock.monotonic()
            log.info("config watcher running again (%s)", self.watcher.using)
            # Whatever changed while nobody watched is picked up now.
            self.request_reload()
            return

    async def _stop_watching(self) -> None:
        if self._debouncer is not None:
            self._debouncer.cancel()
        if self._restarting is not None:
            self._restarting.cancel()
        if self.watcher is not None:
            async with self._watcher_lock:
                await asyncio.to_thread(self.watcher.stop)

    # ------------------------------------------------------------------ reporting

    def _status_line(self) -> str:
        if self.supervisor is None:
            return "starting"
        counts = self.supervisor.counts()
        line = ", ".join(f"{counts.get(s, 0)} {s.value}" for s in TokenState)
        # `systemctl status` is where an operator looks after `systemctl reload`.
        if not getattr(self, "_last_reload_ok", True):
            line += "; last reload failed, running the previous config"
        return line

    def _config_info(self) -> dict[str, Any]:
        return {
            "path": str(self.config_path),
            "last_reload_successful": self._last_reload_ok,
            "last_reload_success_at": self._reloaded_at,
            "watch": self.watcher.using if self.watcher is not None else "none",
        }

    async def _status_ticker(self) -> None:
        if not self.notifier.enabled:
            return
        last = ""
        while True:
            await self.clock.sleep(STATUS_INTERVAL)
            line = self._status_line()
            if line != last:
                self.notifier.status(line)
                last = line

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the loop itself: a blocked loop stops the pings, and systemd acts.
        while True:
            self.notifier.watchdog()
            await self.clock.sleep(interval)


def give_large_blocks_back() -> bool:
    """Have glibc's malloc return every freed block of 128 KiB or more to the system.

    /metrics and /status at 10,000 token sets are answers of several MB. By default glibc
    raises its mmap threshold to the largest block freed so far, so from the second scrape
    on such answers come from the heap, whose freed space stays resident: at 10,000 token
    sets about 16 MB more after the first scrapes and a reload (bench). A fixed threshold
    (which also fixes the trim threshold) keeps them in mmap, unmapped when freed. Returns
    whether the setting took; elsewhere than glibc it changes nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 128 * 1024))


def run_daemon(config_path: Path, *, once: bool = False) -> int:
    give_large_blocks_back()

    async def main() -> int:
        return await Daemon(config_path=config_path).run(once=once)

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main())
    return 130
