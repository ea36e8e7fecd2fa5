"""Helpers for the end-to-end fault tests (tests/e2e/test_faults_*.py).

``Gate`` is a TCP forwarder in front of the emulator that can refuse connections (nothing
listens on its port, as when the IdP's host is down) and accept them again on the same
port. ``daemon_config`` builds a fast test config; the readers below parse token and state
files strictly, as a consumer would, and say what is wrong with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emulator_process import EmulatorProcess

TEMP_SUFFIX = ".anybilld-tmp"
FAST_REFRESH = {
    "at": 0.5,
    "jitter": 0.1,
    "retry_initial": "0.1",
    "retry_max": "1",
    "blocked_retry": "1h",
}


def token_url(emu: EmulatorProcess, base: str | None = None) -> str:
    return f"{base or emu.base_url}/ad.anybill.de/oauth2/v2.0/token"


def daemon_config(
    emu: EmulatorProcess,
    merchants: list[dict[str, Any]],
    *,
    base: str | None = None,
    identity: dict[str, Any] | None = None,
    refresh: dict[str, Any] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "identity": {
            "token_url": token_url(emu, base),
            "client_id": "anybilld-demo-client",
            "timeout": "2",
            "max_requests_per_second": 200,
            "max_concurrent_requests": 16,
            **(identity or {}),
        },
        "refresh": {**FAST_REFRESH, **(refresh or {})},
        "outputs": outputs
        or [{"path": "{merchant}/{scope}.json", "format": "json", "mode": "0640"}],
        "merchants": merchants,
    }
    config.update(extra)
    return config


def users_of(merchants: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Emulator users for merchants configured with ``merchant(...)``."""
    return [{"username": m["username"], "password": m["password"]} for m in merchants]


# --------------------------------------------------------------------------- strict readers


def token_doc_problem(raw: bytes, merchant: str | None = None) -> str | None:
    """What is wrong with the bytes of a json token file, or None if it is complete."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return f"not JSON ({exc}): {len(raw)} bytes"
    if not isinstance(doc, dict):
        return "not an object"
    want = {
        "access_token",
        "token_type",
        "expires_at",
        "expires_at_unix",
        "obtained_at",
        "merchant",
        "scope",
    }
    if set(doc) != want:
        return f"keys {sorted(doc)}"
    if not isinstance(doc["access_token"], str) or not doc["access_token"].startswith("eyJ"):
        return "no access token"
    if not isinstance(doc["expires_at_unix"], int):
        return "expires_at_unix is not an integer"
    if merchant is not None and doc["merchant"] != merchant:
        return f"merchant {doc['merchant']!r}"
    return None


def state_doc_problem(raw: bytes) -> str | None:
    """What is wrong with the bytes of a state file, or None if it is complete."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return f"not JSON ({exc}): {len(raw)} bytes"
    if not isinstance(doc, dict) or doc.get("version") != 1 or "fingerprint" not in doc:
        return "not a version 1 state document"
    return None


def temp_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob(f"*{TEMP_SUFFIX}")]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- the gate


class Gate:
    """A TCP forwarder on a fixed loopback port; ``close()`` makes connecting fail with
    ECONNREFUSED and drops open connections, ``open()`` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(512)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def close(self) -> None:
        """Stop listening and drop every connection: the host is gone."""
        sock, self._listener = self._listener, None
        if sock is not None:
            # shutdown() wakes the accept() of the thread; close() alone may not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def environ_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"
