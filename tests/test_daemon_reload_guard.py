"""A bug met while applying a reloaded config is a failed reload, not a dead daemon.

The daemon runs in-process (the fault is injected into its supervisor) with a real notify
socket and its real listener; the identity provider is dead, so nothing depends on tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from daemon_process import free_port, merchant
from notify_socket import NotifySocket

from anybilld.config import Config
from anybilld.daemon import Daemon
from anybilld.supervisor import Diff
from anybilld.systemd import Notifier


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def write_config(path: Path, tmp_path: Path, listen: str, merchant_ids: list[str]) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "listen": listen,
                "output_dir": str(tmp_path / "tokens"),
                "state_dir": str(tmp_path / "state"),
                "identity": {
                    "token_url": f"http://127.0.0.1:{free_port()}/t/oauth2/v2.0/token",
                    "client_id": "c",
                },
                "reload": {"watch": "poll", "poll_interval": "1h"},  # SIGHUP-style only
                "merchants": [merchant(m, f"svc-{m}", f"{m}-Pa55", ["bill"]) for m in merchant_ids],
            }
        )
    )


async def test_a_reload_that_hits_a_bug_answers_ready_and_keeps_the_daemon_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_path = tmp_path / "config.yaml"
    listen = f"127.0.0.1:{free_port()}"
    write_config(config_path, tmp_path, listen, ["berlin"])
    with NotifySocket() as ns:
        daemon = Daemon(config_path=config_path, notifier=Notifier(ns.address))
        run = asyncio.ensure_future(daemon.run())
        await eventually(lambda: any(m.has("READY") for m in ns.messages()), "READY=1")
        assert daemon.supervisor is not None
        real_apply = daemon.supervisor.apply

        async def broken_apply(config: Config, **kw: Any) -> Diff:
            raise RuntimeError("a bug in applying")

        daemon.supervisor.apply = broken_apply  # type: ignore[method-assign]
        write_config(config_path, tmp_path, listen, ["berlin", "munich"])
        daemon.request_reload()

        def after_first_ready() -> list[str]:
            msgs = [str(m) for m in ns.messages()]
            return msgs[next(i for i, m in enumerate(msgs) if "READY=1" in m) + 1 :]

        await eventually(
            lambda: any("READY=1" in m for m in after_first_ready()), "READY=1 after the reload"
        )
        assert any("RELOADING=1" in m for m in after_first_ready())
        assert not run.done(), "the daemon went down with the reload"
        assert "reload failed unexpectedly" in caplog.text
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://{listen}/metrics")).text
        assert "anybilld_config_last_reload_successful 0.0" in metrics
        assert sorted(k.spec.merchant for k in daemon.supervisor) == ["berlin"]

        # With the bug gone, the next reload applies the file that is on disk.
        daemon.supervisor.apply = real_apply  # type: ignore[method-assign]
        daemon.request_reload()
        await eventually(
            lambda: (
                sorted(k.spec.merchant for k in daemon.supervisor or ()) == ["berlin", "munich"]
            ),
            "the new merchant",
        )
        daemon.request_stop()
        assert await run == 0
