"""The ``anybilld`` command: the daemon, --check, --once, status, demo, emulator."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .config import TokenSetSpec

DEFAULT_CONFIG = "/etc/anybilld/config.yaml"
DEFAULT_STATUS_URL = "http://127.0.0.1:9464"


def _daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anybilld",
        description="Keeps anybill OAuth tokens fresh for many merchants and publishes them "
        "atomically to files.",
        epilog="other commands: anybilld status [--url URL] | anybilld demo | "
        "anybilld emulator [--listen ADDR] [--config FILE]",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="config file (YAML)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="validate config and secrets; exit 0, or 2"
    )
    mode.add_argument(
        "--once", action="store_true", help="fetch every token once, write files, exit 0 / 1"
    )
    p.add_argument("--version", action="version", version=f"anybilld {__version__}")
    return p


def check(config_path: Path) -> int:
    """Print every problem of the config (never a secret); 0 if valid, 2 if not."""
    from .config import load_config
    from .errors import ConfigError

    try:
        config = load_config(config_path)
    except ConfigError as err:
        print(f"{config_path}: {len(err.problems)} problem(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    sets = config.token_sets()
    print(
        f"{config_path}: OK, {len(config.merchants)} merchants, {len(sets)} token sets, "
        f"{sum(len(s.outputs) for s in sets)} token files"
    )
    # Not a config error (the group may be created later, and only those files wait for
    # it), but what an operator checking before the start wants to know.
    for name, users in sorted(_missing_groups(sets).items()):
        print(
            f"warning: group {name!r} does not exist on this host; the token files of "
            f"{', '.join(users)} cannot be written until it does",
            file=sys.stderr,
        )
    return 0


def _missing_groups(sets: Iterable[TokenSetSpec]) -> dict[str, list[str]]:
    import grp

    missing: dict[str, list[str]] = {}
    for spec in sets:
        for out in spec.outputs:
            if not isinstance(out.group, str):
                continue  # none, or a numeric id: any id is valid
            try:
                grp.getgrnam(out.group)
            except KeyError:
                users = missing.setdefault(out.group, [])
                if spec.merchant not in users:
                    users.append(spec.merchant)
    return missing


def status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="anybilld status", description="Show the token sets of a running anybilld."
    )
    p.add_argument("--url", default=DEFAULT_STATUS_URL, help="the daemon's listener URL")
    p.add_argument("--json", action="store_true", help="print the raw /status JSON")
    args = p.parse_args(argv)
    import httpx

    url = args.url.rstrip("/") + "/status"
    try:
        resp = httpx.get(url, timeout=10, trust_env=False)
        resp.raise_for_status()
        doc = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"anybilld status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(render_status_table(doc))
    return 0


def render_status_table(doc: dict[str, object]) -> str:
    rows = [("MERCHANT", "SCOPE", "STATE", "EXPIRES", "NEXT REFRESH", "FAILS", "LAST ERROR")]
    sets = doc.get("token_sets")
    for ts in sets if isinstance(sets, list) else []:
        # The code when the IdP sent one (what support asks for), else what went wrong.
        error = ts.get("last_error_code") or ts.get("last_error") or ""
        if ts.get("blocked_reason"):
            error = f"{error} ({ts['blocked_reason']})".strip()
        for kind in ("output_error", "state_error"):
            if ts.get(kind):
                error = f"{error} {kind.split('_')[0]}: {ts[kind]}".strip()
        rows.append(
            (
                str(ts.get("merchant")),
                str(ts.get("scope")),
                str(ts.get("state")),
                str(ts.get("expires_at") or "-"),
                str(ts.get("next_refresh_at") or "-"),
                str(ts.get("consecutive_failures", 0)),
                error or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return status(argv[1:])
    if argv and argv[0] == "emulator":
        from .emulator import emulator_main

        return emulator_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo import demo_main

        return demo_main(argv[1:])

    args = _daemon_parser().parse_args(argv)
    if args.check:
        return check(args.config)
    from .daemon import run_daemon
    from .logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    if not args.config.exists() and str(args.config) == DEFAULT_CONFIG:
        print(
            f"anybilld: no config at {DEFAULT_CONFIG}; pass --config PATH (or try 'anybilld demo')",
            file=sys.stderr,
        )
        return 2
    return run_daemon(args.config, once=args.once)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
