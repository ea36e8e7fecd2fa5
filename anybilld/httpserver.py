"""A minimal asyncio HTTP/1.1 server for the daemon's listener and the emulator.

Both need only small request/response exchanges on loopback, so a few dozen lines over
``asyncio.start_server`` serve them without a web framework: request line, headers,
``Content-Length`` bodies (no chunked uploads), keep-alive. A handler may raise
``AbortConnection`` to reset the connection, which the emulator uses to inject faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
IDLE_TIMEOUT = 75.0


@dataclass(frozen=True, kw_only=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def form(self) -> dict[str, str]:
        """The body as application/x-www-form-urlencoded (first value of each field)."""
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass(kw_only=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Seconds between the bytes of the body, after the head (the emulator's slow-answer
    # fault); 0 sends the whole answer at once.
    trickle: float = 0.0

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status=status, body=text.encode())


class AbortConnection(Exception):
    """Raised by a handler to drop the connection without an answer (a reset)."""


Handler = Callable[[Request], Awaitable[Response]]


class Server:
    """A running server; ``close()`` also drops open keep-alive connections."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()


async def serve(handler: Handler, host: str, port: int) -> Server:
    """Start serving ``handler`` on host:port (port 0 picks a free one)."""
    srv = Server()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv.writers.add(writer)
        try:
            await _guarded(reader, writer)
        except asyncio.CancelledError:
            # The loop is shutting down. This task is the top of its connection: ending it
            # quietly keeps asyncio's stream callback from logging a traceback (3.11).
            writer.transport.abort()
        finally:
            srv.writers.discard(writer)

    async def _guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_connection(handler, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except AbortConnection:
            writer.transport.abort()
            return
        except Exception:  # a handler bug must not kill the server
            log.exception("HTTP handler failed")
        with contextlib.suppress(Exception):
            writer.close()

    srv.server = await asyncio.start_server(on_connection, host, port, limit=MAX_HEADER_BYTES)
    return srv


async def _serve_connection(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while True:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
        except asyncio.LimitOverrunError:
            await _write(writer, Response.text(431, "header too large\n"), keep_alive=False)
            return
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            await _write(writer, Response.text(400, "bad request line\n"), keep_alive=False)
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            await _write(writer, Response.text(413, "body too large\n"), keep_alive=False)
            return
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        request = Request(
            method=method.upper(),
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers=headers,
            body=body,
        )
        response = await handler(request)
        keep_alive = (
            version.upper() == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        )
        await _write(writer, response, keep_alive=keep_alive, head_only=method == "HEAD")
        if not keep_alive:
            return


async def _write(
    writer: asyncio.StreamWriter, r: Response, *, keep_alive: bool, head_only: bool = False
) -> None:
    try:
        reason = HTTPStatus(r.status).phrase
    except ValueError:
        reason = "Status"
    out = [f"HTTP/1.1 {r.status} {reason}"]
    out.append(f"Content-Type: {r.content_type}")
    out.append(f"Content-Length: {len(r.body)}")
    out.extend(f"{k}: {v}" for k, v in r.headers)
    if not keep_alive:
        out.append("Connection: close")
    head = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
    if r.trickle > 0 and not head_only:
        writer.write(head)
        await writer.drain()
        for i in range(len(r.body)):
            await asyncio.sleep(r.trickle)
            if writer.transport.is_closing():  # the client left, or the server closes
                raise ConnectionResetError("closed while the answer trickled")
            writer.write(r.body[i : i + 1])
            await writer.drain()
        return
    # One write: two would cost a second send() system call per answer.
    writer.write(head if head_only else head + r.body)
    await writer.drain()
