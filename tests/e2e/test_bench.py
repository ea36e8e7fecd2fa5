"""``make bench`` keeps working: the benchmark at a tiny N, in quick mode.

It runs the real thing (emulator, daemon, the curl + jq script, the sidecars) and checks
that the table and the JSON carry every measure, every baseline ratio and every target.
It asserts no timing: the numbers of a tiny run on a busy machine mean nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from bench.run import ROWS, TARGETS  # noqa: E402


@pytest.mark.timeout(300)
def test_the_benchmark_runs_and_reports_every_measure(tmp_path: Path) -> None:
    args = ["--n", "5", "--quick", "--idle-seconds", "1", "--lifetime", "6"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (saved,) = tmp_path.glob("bench-*.json")
    results = json.loads(saved.read_text())

    for n in ("5",):
        run = results["anybilld"][n]
        assert run["token_sets"] == int(n)
        for key, _, _ in ROWS:
            assert isinstance(run[key], int | float) and math.isfinite(run[key]), key
        # What the run did, not how fast: every token set was published, refreshed in
        # whole cycles, nothing was requested while idle, the reload logged in once.
        assert run["startup_grants"] >= int(n)
        assert run["refreshes"] >= int(n)
        assert run["idle_requests"] == 0
        assert run["reload_logins_each"] == [1, 1, 1]  # every reload logged in once
        assert run["exit_code"] == 0
        curl = results["curl"][n]
        for key in ("cpu_per_grant_ms", "cpu_per_refresh_ms", "startup_s", "cpu_per_cycle_s"):
            assert math.isfinite(curl[key]) and curl[key] >= 0, key
        assert curl["sampled"] == int(n) and curl["extrapolated"] is False
    side = results["sidecar"]
    # N = 5: the probe merchant with one scope, one merchant with four.
    assert side["processes"] == 2 and side["token_sets"] == 5
    for key in ("cpu_per_grant_ms", "cpu_per_refresh_ms", "rss_per_token_set_kb", "startup_s"):
        assert math.isfinite(side[key]) and side[key] >= 0, key

    assert [t["key"] for t in results["targets"]] == [key for key, *_ in TARGETS]
    assert all(t["n"] == 5 and isinstance(t["met"], bool) for t in results["targets"])

    table = done.stdout
    assert table.strip().startswith(results["table"].splitlines()[0])
    for _, label, _ in ROWS:
        assert label in table
    for _, text, _, _ in TARGETS:
        assert text in table
    # Every baseline figure is printed with its ratio to anybilld's.
    baseline_lines = [line for line in table.splitlines() if line.rstrip().endswith("x)")]
    assert len(baseline_lines) == 4 + 4  # curl: four measures; sidecar: four
    assert "N=5" in table
    assert "machine" in results and results["machine"]["cores"] >= 1
