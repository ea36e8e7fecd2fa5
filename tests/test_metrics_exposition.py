"""/metrics as the daemon serves it: ``Metrics.exposition()`` writes the per-token-set
families as text directly; it must say exactly what prometheus_client says from the same
registry, pass ``promtool check metrics``, and drop a removed token set's series.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import WALL0, KeeperEnv, grant, settle, transient, wrong_password
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tools import require_tool

from anybilld.keeper import TokenState
from anybilld.metrics import Metrics, TokenSetCollector


class Env(KeeperEnv):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, lambda: self.keepers)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with Env(tmp_path) as e:
        yield e


def parsed(text: str) -> dict[str, tuple[str, str, frozenset[Any]]]:
    """family name -> (type, help, every sample as (name, labels, value)); the values of
    the process_* families change between two reads, so only their names count."""
    return {
        f.name: (
            f.type,
            f.documentation,
            frozenset(
                (s.name, frozenset(s.labels.items()), None if f.name[:8] == "process_" else s.value)
                for s in f.samples
            ),
        )
        for f in text_string_to_metric_families(text)
    }


def anybilld_lines(text: str) -> list[str]:
    """The anybilld_* lines, sorted: the text itself, so label order and number format
    must match too (scrapers and tests read these lines as strings)."""
    return sorted(line for line in text.splitlines() if "anybilld_" in line)


def token_set_samples(text: str, merchant: str) -> list[str]:
    return [line for line in text.splitlines() if f'merchant="{merchant}"' in line]


async def test_exposition_says_what_prometheus_client_says(env: Env) -> None:
    keepers = {
        "ok": env.start_merchant("m-ok", grant("ok")),
        "pending": env.start_merchant("m-pending"),
        "retrying": env.start_merchant("m-retrying", transient()),
        "blocked": env.start_merchant("m-blocked", wrong_password()),
    }
    env.push("m-ok", grant("ok-store"))
    env.start_merchant("m-ok", scope="store")
    await settle()
    assert {k.state for k in keepers.values()} == set(TokenState)
    env.metrics.observe_request("refresh", "success", 0.3)

    fast = env.metrics.exposition().decode()
    reference = generate_latest(env.registry).decode()
    assert parsed(fast) == parsed(reference)
    assert anybilld_lines(fast) == anybilld_lines(reference)
    # Every token-set family is there, with a series for every token set it applies to.
    assert len(token_set_samples(fast, "m-ok")) == 2 * 6  # two scopes; not blocked
    assert 'anybilld_token_blocked{merchant="m-blocked",reason="credentials",scope="bill"}' in fast
    assert f"{WALL0 + 3600:.0f}" not in fast  # times in Go's float style, as promtool wants
    assert "e+09" in fast

    # A removed token set's series are gone from both.
    env.keepers.remove(keepers["ok"])
    await keepers["ok"].stop()
    fast = env.metrics.exposition().decode()
    assert token_set_samples(fast, "m-ok") != []  # m-ok/store is still there
    assert not any('scope="bill"' in line for line in token_set_samples(fast, "m-ok"))
    assert parsed(fast) == parsed(generate_latest(env.registry).decode())
    assert anybilld_lines(fast) == anybilld_lines(generate_latest(env.registry).decode())


async def test_exposition_passes_promtool(env: Env) -> None:
    promtool = require_tool("promtool")  # skipped without it, but a failure under CI
    env.start_merchant("m-ok", grant("ok"))
    env.start_merchant("m-blocked", wrong_password())
    await settle()
    done = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=env.metrics.exposition(),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_label_values_are_escaped() -> None:
    # Scope names from full URIs are free text; the exposition must stay parseable.
    odd = 'we"ird\\sc\nope'
    keeper = SimpleNamespace(
        spec=SimpleNamespace(merchant="m-1", scope=SimpleNamespace(name=odd)),
        state=TokenState.OK,
        published_expires_at=1.5,
        last_success_at=1.0,
        next_attempt_at=2.0,
        refresh_expires_at=None,
        consecutive_failures=0,
        block_reason=None,
        output_error=None,
        state_error=None,
    )
    collector = TokenSetCollector(lambda: [keeper])  # type: ignore[list-item]
    registry = CollectorRegistry()
    registry.register(collector)
    assert parsed(collector.exposition().decode()) == parsed(generate_latest(registry).decode())
    families = parsed(collector.exposition().decode())
    (sample,) = families["anybilld_token_expiry_timestamp_seconds"][2]
    assert dict(sample[1]) == {"merchant": "m-1", "scope": odd}
