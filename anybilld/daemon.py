"""The daemon's lifecycle, in three phases like uvicorn's: startup, main loop, shutdown.

Startup loads the config (a broken config at start is fatal: exit 2 listing every
problem), prepares the directories, binds the listener and starts one keeper per token set,
then tells systemd READY=1 — before any token is fetched, so a dead identity provider never
makes a start time out. The main loop waits on events that signal handlers set: stop and
reload. Shutdown is ordered and bounded: STOPPING=1, keepers stopped (a token being saved
finishes), listener closed, HTTP client closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from .clock import Clock, SystemClock
from .config import Config, load_config
from .errors import ConfigError, OutputError
from .files import remove_stale_temp_files
from .identity import IdentityClient
from .keeper import Runtime, TokenState
from .listener import Listener
from .metrics import Metrics
from .state import StateStore
from .supervisor import Supervisor
from .systemd import Notifier, watchdog_interval

log = logging.getLogger("anybilld")

SHUTDOWN_TIMEOUT = 3.0
STATUS_INTERVAL = 5.0


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

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    # ------------------------------------------------------------------ phases

    async def run(self, *, once: bool = False) -> int:
        try:
            config = load_config(self.config_path, environ=self.environ)
        except ConfigError as err:
            log_config_error(err, what=f"cannot start with {self.config_path}")
            self.started.set()
            return 2
        self.config = config
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
            await self._main_loop()
            return 0
        finally:
            self.started.set()
            self.notifier.stopping()
            log.info("stopping")
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
        config.output_dir.mkdir(parents=True, exist_ok=True)
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
        """Load the config anew and apply the difference; a bad config changes nothing."""
        assert self.supervisor is not None and self.config is not None
        self.notifier.reloading()
        try:
            config = await asyncio.to_thread(load_config, self.config_path, environ=self.environ)
        except ConfigError as err:
            log_config_error(err, what="reload failed, keeping the running config")
            self._metrics.config_loaded(False, self.clock.time())
            self._last_reload_ok = False
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
                self._metrics.config_loaded(False, self.clock.time())
                self._last_reload_ok = False
                self.notifier.ready(self._status_line())
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
            self.config = config
            diff = await self.supervisor.apply(config)
            self._metrics.config_loaded(True, self.clock.time())
            self._reloaded_at = self.clock.time()
            self._last_reload_ok = True
            log.info("config reloaded: %s", diff.summary())
        self.notifier.ready(self._status_line())

    # ------------------------------------------------------------------ reporting

    def _status_line(self) -> str:
        if self.supervisor is None:
            return "starting"
        counts = self.supervisor.counts()
        return ", ".join(f"{counts.get(s, 0)} {s.value}" for s in TokenState)

    def _config_info(self) -> dict[str, Any]:
        return {
            "path": str(self.config_path),
            "last_reload_successful": self._last_reload_ok,
            "last_reload_success_at": self._reloaded_at,
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


def run_daemon(config_path: Path, *, once: bool = False) -> int:
    async def main() -> int:
        return await Daemon(config_path=config_path).run(once=once)

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main())
    return 130
