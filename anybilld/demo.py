"""``anybilld demo``: the embedded emulator and the daemon in one process, in the foreground.

Everything lands in one folder of the current directory (default ``./anybilld-demo``):
the config, the merchants' password files, the token files and the state. The emulator
issues 60-second tokens, so a refresh of every token set is visible within a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import sys
from importlib import resources
from pathlib import Path

from .daemon import Daemon
from .emulator import EmulatorSettings, EmulatorUser, start_emulator
from .logs import setup_logging
from .secret import Secret

DEMO_USERS = ("svc-berlin-01", "svc-hamburg-02", "svc-munich-03")
ACCESS_LIFETIME = 60


def demo_template() -> str:
    """The demo config: from the source tree when run from a checkout, else the wheel."""
    source = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    if source.is_file():
        return source.read_text()
    return resources.files("anybilld").joinpath("configs/demo.yaml").read_text()


def prepare_secrets(folder: Path) -> dict[str, str]:
    """The demo users' passwords, generated once per demo folder; username -> password.

    Handed to the emulator as well, so the demo config and the emulator always agree
    without a password in the repository.
    """
    secrets_dir = folder / "secrets"
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    passwords = {}
    for user in DEMO_USERS:
        path = secrets_dir / user.removeprefix("svc-")
        if not path.exists():
            path.write_text(secrets.token_urlsafe(18) + "\n")
            path.chmod(0o600)
        passwords[user] = path.read_text().removesuffix("\n")
    return passwords


def write_config(folder: Path, token_url: str) -> Path:
    """The demo config, pointing at this run's emulator."""
    # The embedded emulator forgets its grants when it stops, and listens on a new port
    # each time: state from an earlier demo run could never be reused.
    shutil.rmtree(folder / "state", ignore_errors=True)
    config = folder / "config.yaml"
    config.write_text(demo_template().replace("@TOKEN_URL@", token_url))
    return config


async def run_demo(folder: Path) -> int:
    passwords = prepare_secrets(folder)
    settings = EmulatorSettings(
        users=tuple(EmulatorUser(username=u, password=Secret(p)) for u, p in passwords.items()),
        access_token_lifetime=ACCESS_LIFETIME,
        refresh_token_lifetime=3600,
    )
    _emulator, server = await start_emulator(settings, "127.0.0.1", 0)
    host, port = server.address
    token_url = f"http://{host}:{port}/{settings.tenant}/oauth2/v2.0/token"
    config_path = write_config(folder, token_url)
    daemon = Daemon(config_path=config_path)
    task = asyncio.ensure_future(daemon.run())
    await daemon.started.wait()
    if daemon.listen_address is not None:
        lhost, lport = daemon.listen_address
        command = _own_command()
        print(
            f"""
anybilld demo is running (Ctrl-C stops it).
  emulator (token endpoint): {token_url}
  config:                    {config_path}
  token files:               {folder / "tokens"}/<merchant>/<scope>.json|.env|.header
  metrics:                   http://{lhost}:{lport}/metrics
  status:                    {command} status --url http://{lhost}:{lport}
                             (or: curl http://{lhost}:{lport}/status)
Tokens live {ACCESS_LIFETIME} s and are refreshed at about half their lifetime.
""",
            flush=True,
        )
    try:
        return await task
    finally:
        await server.close()


def _own_command() -> str:
    """How this very command was called: .venv/bin/anybilld after `make demo`."""
    return os.path.relpath(sys.argv[0]) if sys.argv[0].endswith("anybilld") else "anybilld"


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="anybilld demo",
        description="Run the daemon against the embedded emulator with a sample config.",
    )
    p.add_argument("--dir", default="anybilld-demo", type=Path, help="the demo folder")
    args = p.parse_args(argv)
    setup_logging("info", "text")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_demo(args.dir.resolve()))
    print("demo stopped", file=sys.stderr)
    return 0
