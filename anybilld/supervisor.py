"""The set of keepers: start them from a config, apply config differences, stop them.

``diff(old, new)`` is pure: it compares token-set specs and says which token sets were
added, removed, changed or left alone. ``Supervisor.apply`` carries a diff out: unchanged
keepers are not touched at all, changed ones get their new spec (the keeper decides whether
that means a new login, a file rewrite or a new schedule), removed ones are stopped and
their files and state removed per ``on_remove``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .config import Config, OnRemove, TokenSetSpec
from .files import remove_output
from .keeper import Account, Keeper, Runtime, TokenState

log = logging.getLogger("anybilld.supervisor")

# Shutdown, in seconds. Requests under way get 0.7 of the stop timeout to land, and longer
# while answers keep landing, one at least every LANDING_STEP, up to LANDING_LIMIT; saves
# under way then get up to SAVE_TIMEOUT. All of it within the unit's TimeoutStopSec=15s.
LANDING_STEP = 0.25
LANDING_LIMIT = 6.0
SAVE_TIMEOUT = 5.0

Key = tuple[str, str]


@dataclass(frozen=True, kw_only=True)
class Diff:
    added: tuple[TokenSetSpec, ...]
    changed: tuple[TokenSetSpec, ...]  # the new specs
    removed: tuple[Key, ...]
    unchanged: int

    def summary(self) -> str:
        return (
            f"added={len(self.added)} changed={len(self.changed)} "
            f"removed={len(self.removed)} unchanged={self.unchanged}"
        )


def diff(old: Mapping[Key, TokenSetSpec], new: Sequence[TokenSetSpec]) -> Diff:
    """What it takes to go from the running token sets ``old`` to the config's ``new``."""
    added, changed = [], []
    unchanged = 0
    new_keys = set()
    for spec in new:
        new_keys.add(spec.key)
        current = old.get(spec.key)
        if current is None:
            added.append(spec)
        elif current != spec:
            changed.append(spec)
        else:
            unchanged += 1
    removed = tuple(k for k in old if k not in new_keys)
    return Diff(added=tuple(added), changed=tuple(changed), removed=removed, unchanged=unchanged)


class Supervisor:
    """Owns every keeper and the merchants' shared accounts."""

    def __init__(self, rt: Runtime, *, on_remove: OnRemove = "delete") -> None:
        self.rt = rt
        self.on_remove: OnRemove = on_remove
        self.keepers: dict[Key, Keeper] = {}
        # Keyed by the account, not the merchant id: two merchant entries sharing one
        # service account share its lockout counter at the IdP, so they share a lock too.
        self._accounts: dict[tuple[str, str], Account] = {}
        self._once = False
        # The config whose token sets the keepers run, once applied in full.
        self._applied: Config | None = None

    def __iter__(self) -> Iterator[Keeper]:
        return iter(list(self.keepers.values()))

    def counts(self) -> Counter[TokenState]:
        return Counter(k.state for k in self.keepers.values())

    async def apply(self, config: Config, *, once: bool = False) -> Diff:
        """Make the running keepers match ``config``; returns what changed."""
        self._once = once
        self.on_remove = config.on_remove
        self.rt.output_root = config.output_dir
        previous, self._applied = self._applied, None  # unknown again should this fail
        d = self._diff(previous, config)
        for key in d.removed:
            await self._remove(self.keepers.pop(key))
        for spec in d.changed:
            keeper = self.keepers[spec.key]
            if _account_key(keeper.spec) != _account_key(spec):
                # A new username or IdP: the keeper now shares another account's lock.
                keeper.account = self._accounts.setdefault(_account_key(spec), Account())
            stale = {t.path for t in keeper.spec.outputs} - {t.path for t in spec.outputs}
            if stale and self.on_remove == "delete":
                # Outputs a token set no longer has go away like a removed token set's.
                await self.rt.run_io(self._remove_files, keeper.spec, stale)
            keeper.update(spec)
        for spec in d.added:
            account = self._accounts.setdefault(_account_key(spec), Account())
            keeper = Keeper(spec, account, self.rt)
            self.keepers[spec.key] = keeper
            keeper.start(once=once)
        live = {_account_key(k.spec) for k in self.keepers.values()}
        for key in list(self._accounts):
            if key not in live:
                del self._accounts[key]
        self._applied = config
        return d

    def _diff(self, previous: Config | None, config: Config) -> Diff:
        """``diff`` of the running token sets and ``config``'s, merchant by merchant.

        A merchant entry equal to the one last applied, under the same defaults, yields
        specs equal to those its keepers run: with one merchant of thousands edited, only
        that one is built and compared, which keeps a reload of a large config short.
        """
        running = {k: kp.spec for k, kp in self.keepers.items()}
        if previous is None or previous.token_set_defaults() != config.token_set_defaults():
            return diff(running, config.token_sets())
        before = {m.id: m for m in previous.merchants}
        edited = [m for m in config.merchants if before.get(m.id) != m]
        touched = {m.id for m in edited} | (before.keys() - {m.id for m in config.merchants})
        d = diff({k: s for k, s in running.items() if k[0] in touched}, config.token_sets(edited))
        untouched = sum(1 for k in running if k[0] not in touched)
        return replace(d, unchanged=d.unchanged + untouched)

    async def wait_all(self) -> None:
        """Wait until every keeper's task has ended (a --once run)."""
        await asyncio.gather(*(k.wait() for k in self.keepers.values()))

    async def stop(self, timeout: float) -> None:
        """Stop every keeper: requests under way get most of ``timeout`` to land, longer
        while answers keep landing (a cancelled refresh may have spent a single-use
        refresh token), then are cancelled; saves under way finish."""
        keepers = list(self.keepers.values())
        if not keepers:
            return
        for k in keepers:
            k.begin_stop()
        await self._let_answers_land(keepers, grace=timeout * 0.7)
        stopping = asyncio.gather(*(k.stop(at_shutdown=True) for k in keepers))
        try:
            await asyncio.wait_for(stopping, timeout)
        except TimeoutError:
            log.warning("%d token sets did not stop within %.0fs", len(keepers), timeout)
        # A token the IdP handed out is saved and published even past the timeout: a
        # single-use refresh token is spent once answered. These are a few small writes
        # each; only a stuck disk holds them for long, and not past SAVE_TIMEOUT (within
        # the unit's TimeoutStopSec=15s).
        saving = {s for k in keepers if (s := k.saving) is not None}
        if saving:
            log.warning("finishing %d token saves under way before exiting", len(saving))
            _, left = await asyncio.wait(saving, timeout=SAVE_TIMEOUT)
            if left:
                log.error(
                    "%d token saves did not finish; their state or files may lag, and the "
                    "next start publishes what the state holds",
                    len(left),
                )

    async def _let_answers_land(self, keepers: Sequence[Keeper], *, grace: float) -> None:
        """Wait for the requests under way: ``grace`` seconds, and on while answers land.

        Under load the event loop reads hundreds of answers late; a fixed grace measured
        while it is busy cut off answers already in the socket. Progress, not the time
        alone, says whether more are coming. On the injected clock, so tests drive it.
        """
        clock = self.rt.clock
        pending = {t for k in keepers if k.in_request and (t := k.task) is not None}
        start = last = clock.monotonic()
        while pending:
            now = clock.monotonic()
            if now - start >= LANDING_LIMIT or (
                now - start >= grace and now - last >= LANDING_STEP
            ):
                return
            step = asyncio.ensure_future(clock.sleep(LANDING_STEP))
            try:
                done, _ = await asyncio.wait(pending | {step}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                step.cancel()
            landed = done - {step}
            if landed:
                pending -= landed
                last = clock.monotonic()

    async def _remove(self, keeper: Keeper) -> None:
        await keeper.stop()
        spec = keeper.spec
        if self.on_remove == "keep":
            log.info("token set removed; files and state kept", extra=_fields(spec))
            return
        await self.rt.run_io(self._delete_files, spec, [t.path for t in spec.outputs])
        log.info("token set removed with its files and state", extra=_fields(spec))

    def _delete_files(self, spec: TokenSetSpec, paths: Iterable[Path]) -> None:
        self._remove_files(spec, paths)
        try:
            self.rt.store.remove(spec.merchant, spec.scope.name)
        except Exception as exc:  # an undeletable file must not stop a reload
            log.error("could not remove state: %s", exc, extra=_fields(spec))

    def _remove_files(self, spec: TokenSetSpec, paths: Iterable[Path]) -> None:
        for path in paths:
            try:
                remove_output(path, root=self.rt.output_root)
            except Exception as exc:
                log.error("could not remove %s: %s", path, exc, extra=_fields(spec))


def _account_key(spec: TokenSetSpec) -> tuple[str, str]:
    return (spec.token_url, spec.username.casefold())


def _fields(spec: TokenSetSpec) -> dict[str, object]:
    return {"merchant": spec.merchant, "scope": spec.scope.name}
