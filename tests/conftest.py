"""Shared by every test directory: makes ``tests/`` importable (emulator_process,
daemon_process) for the end-to-end tests below it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
