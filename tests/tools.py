"""The operator tools that packaging tests run for real: find them, or skip (fail on CI).

Outside CI a missing tool skips the test with a reason naming the tool and the Debian
package that has it. Under ``CI=true`` a missing tool fails the test: CI installs them
(``.ci/run``), and a test that silently skipped there would prove nothing.
"""

from __future__ import annotations

import os
import shutil

import pytest

#: tool -> the Debian package that provides it
PACKAGES = {
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
    "systemd-tmpfiles": "systemd",
    "promtool": "prometheus",
    "prometheus": "prometheus",
}


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """The absolute path of ``name``; skip (outside CI) or fail (CI) when it is missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    package = PACKAGES.get(name, name)
    reason = f"{name} is not installed (apt-get install {package})"
    if on_ci():
        pytest.fail(f"{reason}; CI must run this test", pytrace=False)
    pytest.skip(reason)
