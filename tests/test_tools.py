"""The helper that finds operator tools: a skip outside CI, a failure under CI=true."""

from __future__ import annotations

import pytest
from tools import require_tool


def test_a_missing_tool_skips_outside_ci_with_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"promtool .*apt-get install prometheus"):
        require_tool("promtool")


def test_a_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"systemd-analyze .*CI must run this test"):
        require_tool("systemd-analyze")


def test_a_present_tool_is_found_by_absolute_path() -> None:
    assert require_tool("sh").startswith("/")
