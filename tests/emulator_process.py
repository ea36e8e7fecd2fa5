"""The B2C emulator as a real subprocess, for tests that need one (e2e, CLI, benchmarks).

``EmulatorProcess`` runs ``python -m anybilld.emulator --listen 127.0.0.1:0 --config
<tmp yaml>``, learns the port from the listening line and drives the control API with a
sync httpx client. The fixtures at the bottom start emulators and stop them (asserting a
clean exit 0) at teardown; import them into a test module to use them (conftest.py is
not this module's to edit)::

    from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401

Caveat: ``stop()`` asserts exit status 0, so a crashed emulator fails the test that owns
it, at teardown; ``stderr_text()`` has what it printed.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTENING_PREFIX = "anybill emulator listening on "

#: Users of the default config; the passwords are test data, not secrets.
DEFAULT_USERS: tuple[dict[str, Any], ...] = (
    {"username": "merchant-a@example.com", "password": "alpha-Pa55word"},
    {"username": "merchant-b@example.com", "password": "bravo-Pa55word"},
    {"username": "disabled@example.com", "password": "delta-Pa55word", "disabled": True},
)


class EmulatorProcess:
    """One emulator subprocess; it is running once the constructor returns.

    ``config`` is the emulator YAML as a mapping (default: ``DEFAULT_USERS`` and default
    lifetimes); ``extra_args`` are further command-line flags, which override the file.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        tmp_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 15.0,
    ) -> None:
        self._own_tmp = tmp_dir is None
        self.tmp_dir = (
            Path(tempfile.mkdtemp(prefix="anybilld-emulator-")) if tmp_dir is None else tmp_dir
        )
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = (
            {"users": [dict(u) for u in DEFAULT_USERS]} if config is None else dict(config)
        )
        self.config_path = self.tmp_dir / "emulator.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.stderr_path = self.tmp_dir / "emulator.stderr"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "anybilld.emulator",
                "--listen",
                "127.0.0.1:0",
                "--config",
                str(self.config_path),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self._stopped = False
        try:
            first, second = self._read_lines(2, start_timeout)
        except BaseException:
            self._kill()
            raise
        if not first.startswith(LISTENING_PREFIX):
            self._kill()
            raise RuntimeError(f"unexpected first line from the emulator: {first!r}")
        self.base_url = first[len(LISTENING_PREFIX) :]
        self.token_url = second.partition("token URL: ")[2] or (
            f"{self.base_url}/{self.config.get('tenant', 'ad.anybill.de')}/oauth2/v2.0/token"
            f"?p={self.config.get('policy', 'b2c_1_ropc_vendor')}"
        )
        self.client = httpx.Client(base_url=self.base_url, timeout=10.0, trust_env=False)

    def _read_lines(self, count: int, timeout: float) -> list[str]:
        """The first ``count`` stdout lines, waiting at most ``timeout`` seconds in all."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while buf.count(b"\n") < count:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"the emulator did not start: {self.stderr_text()}")
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(5)
                    raise RuntimeError(
                        f"the emulator exited with {self.proc.returncode}: {self.stderr_text()}"
                    )
                buf += chunk
        return buf.decode().splitlines()[:count]

    # --- control API ------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: object = None) -> Any:
        response = self.client.request(method, f"/_emulator/{path}", json=body)
        response.raise_for_status()
        return response.json()

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "health")
        return result

    def requests(self, since: int | None = None) -> list[dict[str, Any]]:
        """Every token request so far (or after request id ``since``): no secrets in them."""
        path = "requests" if since is None else f"requests?since={since}"
        result: list[dict[str, Any]] = self._call("GET", path)
        return result

    def clear_requests(self) -> None:
        self._call("DELETE", "requests")

    def users(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "users")
        return result

    def add_user(self, username: str, password: str, *, disabled: bool = False) -> dict[str, Any]:
        """Add a user, or replace one (a password change: clears its lockout)."""
        body = {"username": username, "password": password, "disabled": disabled}
        result: dict[str, Any] = self._call("POST", "users", body)
        return result

    def revoke(self, username: str) -> dict[str, Any]:
        """Kill every grant of ``username`` issued so far."""
        result: dict[str, Any] = self._call("POST", "revoke", {"username": username})
        return result

    def add_faults(self, *faults: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Append faults to the queue (see the emulator module); returns the whole queue."""
        result: list[dict[str, Any]] = self._call("POST", "faults", {"faults": list(faults)})
        return result

    def faults(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "faults")
        return result

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    def advance_clock(self, seconds: float) -> float:
        """Move the emulator clock (negative: back); returns its new ``now``."""
        return float(self._call("POST", "clock", {"advance": seconds})["now"])

    def now(self) -> float:
        return float(self._call("GET", "clock")["now"])

    def settings(self, **changes: Any) -> dict[str, Any]:
        """The settings; with keyword arguments, change those first (runtime ones only)."""
        result: dict[str, Any] = (
            self._call("POST", "settings", changes) if changes else self._call("GET", "settings")
        )
        return result

    def introspect(self, access_token: str) -> dict[str, Any]:
        """Whether the emulator issued ``access_token`` and it is unexpired, and for whom."""
        result: dict[str, Any] = self._call("POST", "introspect", {"access_token": access_token})
        return result

    # --- lifecycle --------------------------------------------------------------------------

    def stderr_text(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, and assert a clean exit 0. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.client.close()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise AssertionError(
                    f"the emulator ignored SIGTERM for {timeout}s: {self.stderr_text()}"
                ) from None
            assert code == 0, f"the emulator exited with {code}: {self.stderr_text()}"
        finally:
            self._cleanup()

    def _kill(self) -> None:
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        if self._own_tmp:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
        else:  # do not hide the test's own failure behind an exit-status assertion
            self._kill()


@pytest.fixture
def emulator_factory(tmp_path: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    """Start emulators with ``make(config=None, **kwargs)``; all stop (exit 0) at teardown."""
    started: list[EmulatorProcess] = []

    def make(config: Mapping[str, Any] | None = None, **kwargs: Any) -> EmulatorProcess:
        kwargs.setdefault("tmp_dir", tmp_path / f"emulator-{len(started)}")
        emulator = EmulatorProcess(config, **kwargs)
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[EmulatorProcess]:
    """An emulator subprocess with ``DEFAULT_USERS`` and default settings."""
    emulator = EmulatorProcess(tmp_dir=tmp_path / "emulator")
    yield emulator
    emulator.stop()
