"""The daemon as a real subprocess, for end-to-end tests.

``DaemonProcess`` writes a config (and the merchants' password files) into a folder, runs
``python -m anybilld --config …`` with stderr going to a log file, and waits until the
listener answers. Every text it reads from the daemon (log, /metrics, /status, command
output) is kept, and ``stop()`` scans all of it for leaked secrets: any known password, or
anything shaped like a token the emulator issued (they all start with ``eyJ``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], *, timeout: float = 30.0, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    The timeout is a safety net against a hang, never a measurement: tests assert what
    happened, not how fast.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def assert_no_secrets(texts: Iterable[str], passwords: Iterable[str]) -> None:
    pw = [p for p in passwords if p]
    for text in texts:
        found = TOKEN_SHAPE.search(text)
        assert found is None, (
            f"a token leaked: ...{text[max(0, found.start() - 80) : found.start()]}"
        )
        for p in pw:
            assert p not in text, "a password leaked"


def merchant(
    mid: str, username: str, password: str, scopes: list[str], **extra: Any
) -> dict[str, Any]:
    return {"id": mid, "username": username, "password": password, "scopes": scopes, **extra}


class DaemonProcess:
    """One anybilld subprocess on a config built from ``config`` (a mapping).

    ``config`` gets defaults for everything a test rarely cares about: listen (a free
    port), output_dir and state_dir inside ``folder``, fast retries.
    """

    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        *,
        passwords: Iterable[str] = (),
        env: dict[str, str] | None = None,
        start: bool = True,
        notify_socket: str | None = None,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cfg = {"version": 1, "output_dir": "tokens", "state_dir": "state"}
        cfg["listen"] = f"127.0.0.1:{self.port}"
        cfg.update(config)
        self.config = cfg
        self.config_path = folder / "config.yaml"
        self.write_config(cfg)
        self.passwords = set(passwords) | {
            m["password"] for m in cfg.get("merchants", []) if "password" in m
        }
        self.output_dir = folder / "tokens"
        self.state_dir = folder / "state"
        self.log_path = folder / "daemon.log"
        self.seen: list[str] = []  # every text read from the daemon, scanned at stop()
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")])
        )
        self.env.pop("NOTIFY_SOCKET", None)
        if notify_socket is not None:  # sd_notify tests: a socket the test listens on
            self.env["NOTIFY_SOCKET"] = notify_socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        if start:
            self.start()

    def write_config(self, cfg: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tmp.replace(self.config_path)

    # ------------------------------------------------------------------ process

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "anybilld", "--config", str(self.config_path), *args]

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
        )
        log.close()
        wait_for(self._listening, timeout=30, what="the daemon's listener")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a one-shot command (``--check``, ``--once``) on this config."""
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, env=self.env, timeout=timeout
        )
        self.seen += [done.stdout, done.stderr]
        return done

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, *, timeout: float = 10) -> int:
        """SIGTERM; return the exit code, after scanning everything seen for secrets."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        self.http.close()
        self.check_no_secrets()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.http.close()

    def check_no_secrets(self) -> None:
        assert_no_secrets([self.log(), *self.seen], self.passwords)
        # Pieces of the tokens held at the end too, not only whole ones: a signature or a
        # refresh token's tail in a log line would escape the shape above.
        texts = [self.log(), *self.seen]
        for piece in self._token_pieces():
            assert all(piece not in t for t in texts), "a piece of a token leaked"

    def _token_pieces(self) -> set[str]:
        pieces: set[str] = set()
        for path in [*self.state_dir.rglob("*.json"), *self.output_dir.rglob("*.json")]:
            try:
                doc = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            for key in ("access_token", "refresh_token"):
                value = doc.get(key) if isinstance(doc, dict) else None
                if isinstance(value, str) and len(value) >= 40:
                    pieces.add(value[-24:])
        return pieces

    # ------------------------------------------------------------------ reading

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> httpx.Response:
        resp = self.http.get(path)
        self.seen.append(resp.text)
        return resp

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.get("/status").json()
        return doc

    def token_sets(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(t["merchant"], t["scope"]): t for t in self.status()["token_sets"]}

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` → value of every sample on /metrics."""
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def token_file(self, merchant: str, scope: str, name: str = "{merchant}/{scope}.json") -> Path:
        return self.output_dir / name.format(merchant=merchant, scope=scope)

    def read_json(self, merchant: str, scope: str) -> dict[str, Any] | None:
        path = self.token_file(merchant, scope)
        try:
            doc: dict[str, Any] = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        return doc
