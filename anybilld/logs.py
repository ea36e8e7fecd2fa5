"""Logging to stderr: one line per event, text or JSON, journald-aware.

Lines about a token set carry ``merchant=`` and ``scope=``; IdP errors carry ``code=`` and
``correlation_id=`` (passed as ``extra={"merchant":…, "scope":…, "fields": {…}}``). Under
systemd (``JOURNAL_STREAM`` set) the journal adds timestamps itself, so lines carry none
and start with a ``<N>`` syslog priority that journald turns into the entry's level.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_SYSLOG_LEVEL = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    for key in ("merchant", "scope"):
        value = getattr(record, key, None)
        if value is not None:
            ctx[key] = value
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        ctx.update(fields)
    return ctx


class TextFormatter(logging.Formatter):
    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={_quote(v)}" for k, v in _context(record).items())
        msg = record.getMessage()
        line = f"{msg} {ctx}" if ctx else msg
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.journal:
            return f"<{_SYSLOG_LEVEL.get(record.levelno, 6)}>{line}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {line}"


class JsonFormatter(logging.Formatter):
    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {}
        if not self.journal:
            doc["time"] = record.created
        doc["level"] = record.levelname.lower()
        doc["logger"] = record.name
        doc["message"] = record.getMessage()
        doc.update(_context(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "='):
        return json.dumps(text)
    return text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter(journal=journal) if fmt == "json" else TextFormatter(journal=journal)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO; the daemon logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # watchdog logs every inotify event at DEBUG, also of unrelated files in a watched
    # directory: a debug log written beside the config would feed itself without end.
    logging.getLogger("watchdog").setLevel(logging.INFO)
