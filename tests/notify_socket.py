"""The receiving end of the sd_notify protocol, as systemd has it: a datagram socket.

``NotifySocket`` binds a real ``AF_UNIX``/``SOCK_DGRAM`` socket — a path socket in a short
temporary directory, or an abstract one (``@name``) — with ``SO_PASSCRED`` on, so every
message comes with the sender's pid, as systemd checks it for ``NotifyAccess=main``. A
background thread receives, so that a test can look at what arrived while the sender's
event loop is blocked. ``address`` is the value for ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from daemon_process import wait_for

_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Message:
    """One datagram: its ``KEY=value`` lines, in order, and the sender's pid."""

    fields: tuple[tuple[str, str], ...]
    pid: int | None

    @classmethod
    def parse(cls, data: bytes, pid: int | None) -> Message:
        fields = []
        for line in data.decode().split("\n"):
            if line:
                key, _, value = line.partition("=")
                fields.append((key, value))
        return cls(tuple(fields), pid)

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.fields if k == key), None)

    def has(self, key: str, value: str = "1") -> bool:
        return self.get(key) == value

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.fields)


class NotifySocket:
    def __init__(self, *, abstract: bool = False) -> None:
        self._dir: Path | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"anybilld-test-{secrets.token_hex(8)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # sun_path holds 107 bytes: pytest's tmp_path can be longer than that.
            self._dir = Path(tempfile.mkdtemp(prefix="sdn-"))
            path = self._dir / "notify"
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.1)
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        space = socket.CMSG_SPACE(_UCRED.size)
        while not self._closed.is_set():
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(65536, space)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            with self._lock:
                self._messages.append(Message.parse(data, pid))

    # ------------------------------------------------------------------ reading

    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    def wait(self, predicate: Callable[[Message], bool], *, after: int = 0, what: str = "") -> int:
        """Index of the first message from index ``after`` on that satisfies ``predicate``."""

        def find() -> int | None:
            for i, m in enumerate(self.messages()[after:], start=after):
                if predicate(m):
                    return i + 1  # truthy even for index 0
            return None

        found = wait_for(find, timeout=30, what=what or "a notify message")
        return found - 1

    def send_marker(self, text: str) -> None:
        """A datagram from the test itself, to mark a point in the received order."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            s.sendto(f"TEST_MARK={text}".encode(), target)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def lifecycle(messages: list[Message]) -> list[str]:
    """The state changes in order: READY, RELOADING, STOPPING (pings and STATUS left out)."""
    out = []
    for m in messages:
        for key in ("READY", "RELOADING", "STOPPING"):
            if m.has(key):
                out.append(key)
    return out
