"""The processes a benchmark runs: the emulator and the daemon, with CPU and memory probes.

Self-contained (the test helpers under ``tests/`` are not imported), small and synchronous:
the benchmark is a driver that starts subprocesses and reads /proc.
"""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), e.get("PYTHONPATH")]))
    e.pop("NOTIFY_SOCKET", None)
    return e


class Http:
    """Timed GETs and JSON calls over one keep-alive connection."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def call(self, method: str, path: str, body: object = None) -> tuple[int, bytes, float]:
        """One request; a keep-alive connection the server closed meanwhile is opened
        anew once (the servers drop connections idle for 75 s)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                if attempt == 2:
                    raise
                continue
            except (OSError, http.client.HTTPException):
                self.conn.close()  # reconnect on the next call
                raise
            return resp.status, payload, time.perf_counter() - started
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: object = None) -> Any:
        status, payload, _ = self.call(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path}: {status} {payload[:200]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.conn.close()


class Emulator:
    """``anybilld emulator`` in its own process; ``grants_since`` reads its request record."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        cfg = folder / "emulator.yaml"
        cfg.write_text(yaml.safe_dump(settings, sort_keys=False))
        self.stderr = (folder / "emulator.stderr").open("wb")
        argv = [sys.executable, "-m", "anybilld.emulator", "--listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            [*argv, "--config", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env(),
        )
        first, second = _read_lines(self.proc, 2, 30.0)
        self.base_url = first.rpartition(" ")[2]
        self.token_url = second.partition("token URL: ")[2]
        hostport = self.base_url.removeprefix("http://")
        host, _, port = hostport.rpartition(":")
        self.api = Http(host, int(port))
        self.last_id = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """Token requests since the last call (the record is read incrementally)."""
        path = f"/_emulator/requests?since={self.last_id}"
        got: list[dict[str, Any]] = self.api.json("GET", path)
        if got:
            self.last_id = got[-1]["id"]
        return got

    def settings(self, **changes: Any) -> None:
        self.api.json("POST", "/_emulator/settings", changes)

    def add_user(self, username: str, password: str) -> None:
        self.api.json("POST", "/_emulator/users", {"username": username, "password": password})

    def stop(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.stderr.close()


def _read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float) -> list[str]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while buf.count(b"\n") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError("the emulator did not start")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the emulator exited with {proc.wait(5)}")
            buf += chunk
    return buf.decode().splitlines()[:count]


class Daemon:
    """anybilld on a config file, its log in ``folder/daemon.log``."""

    def __init__(self, folder: Path, config_path: Path, port: int) -> None:
        self.folder = folder
        self.config_path = config_path
        self.log_path = folder / "daemon.log"
        self.port = port
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anybilld", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env(),
            cwd=folder,
        )
        log.close()
        self.http = Http("127.0.0.1", port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"anybilld exited with {self.proc.returncode}: {self.log_tail()}")

    def healthy(self) -> bool:
        self.alive()
        try:
            return self.http.call("GET", "/healthz")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self) -> str:
        return self.log_since(max(0, self.log_size() - 3000))

    def stop(self) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def wait_until(predicate: Any, *, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until ``predicate()`` is truthy; returns the time.monotonic() it became so."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def start_processes(argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, env=env(), **kw)
