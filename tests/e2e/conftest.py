"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from daemon_process import DaemonProcess


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started; whatever the test left running is killed after it."""
    running: list[DaemonProcess] = []
    yield running
    for d in running:
        d.kill()
