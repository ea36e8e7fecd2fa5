"""``make bench``: anybilld with N token sets against the emulator, beside two baselines.

For every N (default 100, 1,000, 10,000) it starts the emulator in its own process and
anybilld against it, with the request-rate cap lifted, and measures:

1. start-up: the time from starting the daemon until every token file exists, and its CPU
   per grant (user + system, from /proc, from the first /healthz answer to the last file);
2. refresh cycles: with short access-token lifetimes every token set refreshes again and
   again; CPU per refresh (grant, state file, token file, fsyncs) and per whole cycle, and
   the resident memory after each cycle (a leak shows as growth);
3. idle: the emulator hands out long-lived tokens, every token set takes one, then nothing is
   due for a while and the daemon's CPU over that window is measured;
4. one /metrics scrape and one /status call (median of three), time and size;
5. a reload in which one merchant's password changed: SIGHUP to "config reloaded" in the
   log, to the new token in its file, and the logins it caused (from the emulator's record);
6. the emulator's own CPU, so that a saturated emulator is not taken for a slow daemon.

Then the baselines, against the same emulator: ``curl_baseline.sh`` (curl + jq + a plain
file write per token set, what a cron job does; sampled at large N and extrapolated, which
the table says) and ``sidecar.py`` (one small Python process per merchant, at N = 100 or
the smallest N asked for). Each baseline figure is printed with its ratio to anybilld's.

The table goes to stdout and, with every raw number, to ``bench/results/<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from anybilld import __version__
from anybilld.config import load_config
from anybilld.supervisor import diff

from .procs import (
    Daemon,
    Emulator,
    Http,
    cpu_seconds,
    free_port,
    rss_bytes,
    start_processes,
    wait_until,
)

HERE = Path(__file__).resolve().parent
SCOPES = ("bill", "category", "customer", "store", "user")
SCOPE_BASE = "https://ad.anybill.de/vendor/"
CLIENT_ID = "anybilld-bench-client"
PROBE = "m-probe"  # the merchant whose password the reload changes; it has one scope
RELOADS = 3


def probe_password(reloads: int) -> str:
    return f"probe-Pa55-{reloads}"


MB = 1024 * 1024
LONG_LIFETIME = 3600  # tokens of the idle phase: nothing is due for half an hour

Merchant = tuple[str, str, str, tuple[str, ...]]  # id, username, password, scopes


def merchants_for(n: int) -> list[Merchant]:
    """N token sets: the probe merchant with one scope, then merchants of five scopes."""
    out: list[Merchant] = [(PROBE, "svc-probe", probe_password(0), ("bill",))]
    left, i = n - 1, 0
    while left > 0:
        i += 1
        scopes = SCOPES[: min(5, left)]
        out.append((f"m{i:05d}", f"svc-{i:05d}", f"pw-{i:05d}-Pa55", scopes))
        left -= len(scopes)
    return out


def token_set_count(merchants: list[Merchant]) -> int:
    return sum(len(m[3]) for m in merchants)


def lifetime_for(n: int) -> int:
    """Access-token lifetime for the refresh cycles: long enough that one cycle of N
    refreshes fits into half of it on a small machine."""
    return max(6, round(n * 0.02))


# ------------------------------------------------------------------------------- anybilld


def daemon_config(emu: Emulator, port: int, merchants: list[Merchant]) -> dict[str, Any]:
    return {
        "version": 1,
        "identity": {
            "token_url": emu.token_url,
            "client_id": CLIENT_ID,
            "timeout": "30s",
            "max_concurrent_requests": 32,
            "max_requests_per_second": 5000,
        },
        "refresh": {"at": 0.5, "jitter": 0.1, "retry_initial": "1s", "retry_max": "30s"},
        "outputs": [{"path": "{merchant}/{scope}.json", "format": "json", "mode": "0640"}],
        "output_dir": "tokens",
        "state_dir": "state",
        "listen": f"127.0.0.1:{port}",
        "merchants": [
            {"id": m, "username": u, "password": p, "scopes": list(s)} for m, u, p, s in merchants
        ],
    }


def write_yaml(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)


def missing_files(root: Path, merchants: list[Merchant]) -> set[Path]:
    return {root / m / f"{s}.json" for m, _, _, scopes in merchants for s in scopes}


def wait_for_files(missing: set[Path], *, timeout: float, check: Any = None) -> float:
    def done() -> bool:
        if check is not None:
            check()
        for path in list(missing):
            if path.exists():
                missing.discard(path)
        return not missing

    interval = 0.05 if len(missing) < 2000 else 0.25
    return wait_until(done, timeout=timeout, what="every token file", interval=interval)


def token_lifetime(path: Path) -> float:
    """Seconds from obtained_at to expires_at of a JSON token file (0 if unreadable)."""
    try:
        doc = json.loads(path.read_bytes())
        obtained = datetime.datetime.fromisoformat(doc["obtained_at"].replace("Z", "+00:00"))
        return float(doc["expires_at_unix"]) - obtained.timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def ok_grants(records: list[dict[str, Any]], grant_type: str | None = None) -> int:
    return sum(
        1
        for r in records
        if r["status"] == 200 and (grant_type is None or r["grant_type"] == grant_type)
    )


def timed_gets(http: Http, path: str, times: int = 3) -> tuple[float, int]:
    seconds, size = [], 0
    for _ in range(times):
        status, body, took = http.call("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
        seconds.append(took)
        size = len(body)
    return statistics.median(seconds), size


def run_anybilld(
    n: int, emu: Emulator, folder: Path, merchants: list[Merchant], opts: argparse.Namespace
) -> dict[str, Any]:
    r: dict[str, Any] = {"token_sets": n, "merchants": len(merchants)}
    lifetime = opts.lifetime or lifetime_for(n)
    r["access_token_lifetime_s"] = lifetime
    emu.settings(access_token_lifetime=lifetime)
    emu.records()
    port = free_port()
    config = daemon_config(emu, port, merchants)
    config_path = folder / "config.yaml"
    write_yaml(config_path, config)

    # The config load and diff a reload pays, in this process (the daemon's code).
    loads = []
    for _ in range(3):
        t = time.perf_counter()
        loaded = load_config(config_path)
        loads.append(time.perf_counter() - t)
    r["config_load_s"] = statistics.median(loads)
    specs = {s.key: s for s in loaded.token_sets()}
    t = time.perf_counter()
    diff(specs, load_config(config_path).token_sets())
    r["load_and_diff_s"] = time.perf_counter() - t

    # 1. start-up
    missing = missing_files(folder / "tokens", merchants)
    emu_cpu0 = cpu_seconds(emu.pid)
    started = time.monotonic()
    d = Daemon(folder, config_path, port)
    try:
        wait_until(d.healthy, timeout=120, what="the daemon's listener", interval=0.02)
        cpu0 = cpu_seconds(d.pid)
        r["cpu_at_listening_s"] = cpu0
        done = wait_for_files(missing, timeout=max(300.0, n * 0.1), check=d.alive)
        cpu1, emu_cpu1 = cpu_seconds(d.pid), cpu_seconds(emu.pid)
        grants = ok_grants(emu.records())
        r["startup_s"] = done - started
        r["startup_grants"] = grants
        r["cpu_per_grant_ms"] = (cpu1 - cpu0) / max(grants, 1) * 1000
        r["rss_mb"] = rss_bytes(d.pid) / MB
        r["emulator_cpu_per_grant_ms"] = (emu_cpu1 - emu_cpu0) / max(grants, 1) * 1000
        r["emulator_busy_pct"] = (emu_cpu1 - emu_cpu0) / max(done - started, 1e-9) * 100

        # 2. refresh cycles
        refreshed, cycle_cpu, rss = 0, [], [r["rss_mb"]]
        cycle_started, cpu_before = time.monotonic(), cpu_seconds(d.pid)
        emu_before = cpu_seconds(emu.pid)
        for cycle in range(1, opts.cycles + 1):
            target = cycle * n

            def cycle_done(target: int = target) -> bool:
                nonlocal refreshed
                d.alive()
                refreshed += ok_grants(emu.records(), "refresh_token")
                return refreshed >= target

            limit = lifetime * 10 + 300
            wait_until(cycle_done, timeout=limit, what="a refresh cycle", interval=0.5)
            cpu_now = cpu_seconds(d.pid)
            cycle_cpu.append(cpu_now - cpu_before)
            cpu_before = cpu_now
            rss.append(rss_bytes(d.pid) / MB)
        cycles_wall = time.monotonic() - cycle_started
        r["refresh_cycles"] = opts.cycles
        r["refreshes"] = refreshed
        r["cpu_per_refresh_ms"] = sum(cycle_cpu) / max(refreshed, 1) * 1000
        r["cpu_per_cycle_s"] = statistics.mean(cycle_cpu)
        r["rss_per_cycle_mb"] = rss
        r["rss_growth_mb"] = rss[-1] - rss[1] if len(rss) > 2 else rss[-1] - rss[0]
        r["emulator_cpu_per_refresh_ms"] = (
            (cpu_seconds(emu.pid) - emu_before) / max(refreshed, 1) * 1000
        )
        r["refresh_cpu_pct"] = sum(cycle_cpu) / max(cycles_wall, 1e-9) * 100

        # 3. idle: long-lived tokens everywhere, then nothing is due. Read from the token
        # files: a grant answered just as the setting changed may hold either lifetime.
        emu.settings(access_token_lifetime=LONG_LIFETIME)
        short = missing_files(folder / "tokens", merchants)

        def all_long_lived() -> bool:
            d.alive()
            for path in list(short):
                if token_lifetime(path) > LONG_LIFETIME / 2:
                    short.discard(path)
            return not short

        limit = lifetime * 10 + 300
        wait_until(all_long_lived, timeout=limit, what="long tokens everywhere", interval=1.0)
        time.sleep(1.0)  # the last writes land
        emu.records()
        idle_cpu0, idle_t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(opts.idle_seconds)
        idle_cpu = cpu_seconds(d.pid) - idle_cpu0
        idle_wall = time.monotonic() - idle_t0
        r["idle_window_s"] = idle_wall
        r["idle_cpu_pct"] = idle_cpu / idle_wall * 100
        r["idle_requests"] = len(emu.records())
        r["rss_idle_mb"] = rss_bytes(d.pid) / MB

        # 4. /metrics and /status
        r["metrics_s"], r["metrics_bytes"] = timed_gets(d.http, "/metrics")
        r["status_s"], r["status_bytes"] = timed_gets(d.http, "/status")

        # 5. reloads in which one merchant changed its password (the median of RELOADS:
        # one sample on a shared machine says little)
        probe = next(m for m in merchants if m[0] == PROBE)
        probe_file = folder / "tokens" / PROBE / "bill.json"
        applied_s, token_s, logins, requests = [], [], [], []
        for i in range(1, RELOADS + 1):
            new_password = probe_password(i)
            emu.add_user(probe[1], new_password)  # the admin changed it at the IdP first
            config["merchants"][0]["password"] = new_password
            emu.records()
            old_token = json.loads(probe_file.read_bytes())["access_token"]
            # Timed from the config change: a file watcher may start the reload before the
            # signal does, and the first "config reloaded" is whichever came first.
            offset = d.log_size()
            t0 = time.monotonic()
            write_yaml(config_path, config)
            d.proc.send_signal(signal.SIGHUP)
            applied = wait_until(
                lambda offset=offset: "config reloaded" in d.log_since(offset),
                timeout=120,
                what="the reload",
                interval=0.01,
            )
            published = wait_until(
                lambda old=old_token: json.loads(probe_file.read_bytes())["access_token"] != old,
                timeout=120,
                what="the probe's new token",
                interval=0.01,
            )
            time.sleep(2.0)  # anything else the reload set off would have gone out by now
            after = emu.records()
            applied_s.append(applied - t0)
            token_s.append(published - t0)
            logins.append(sum(1 for x in after if x["grant_type"] == "password"))
            requests.append(len(after))
        r["reload_apply_s"] = statistics.median(applied_s)
        r["reload_apply_each_s"] = applied_s
        r["reload_token_s"] = statistics.median(token_s)
        r["reload_logins"] = max(logins)  # of every reload: exactly one is the target
        r["reload_logins_each"] = logins
        r["reload_requests"] = max(requests)
        r["rss_end_mb"] = rss_bytes(d.pid) / MB
        # Running: start-up, refresh cycles, idle, and after the scrapes and reloads
        # (what stays resident of their answers and of the YAML nodes of a whole config).
        r["rss_max_mb"] = max([*rss, r["rss_idle_mb"], r["rss_end_mb"]])
        r["emulator_cpu_s"] = cpu_seconds(emu.pid) - emu_cpu0
    finally:
        r["exit_code"] = d.stop()
    return r


# ------------------------------------------------------------------------------ baselines


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_curl(
    n: int, emu: Emulator, folder: Path, merchants: list[Merchant], sample: int
) -> dict[str, Any]:
    """The cron-job script over the first ``sample`` token sets: a password pass, then a
    refresh pass (refresh tokens kept in files), one token set after another."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for m, user, password, scopes in merchants:
        pwfile = folder / f"{m}.pw"
        pwfile.write_text(password)
        lines += [f"{m} {SCOPE_BASE}{s} {user} {pwfile}" for s in scopes]
    lines = lines[:sample]
    r: dict[str, Any] = {"token_sets": n, "sampled": len(lines), "extrapolated": len(lines) < n}
    emu.settings(access_token_lifetime=LONG_LIFETIME)
    script = [str(HERE / "curl_baseline.sh"), emu.token_url, CLIENT_ID]
    script += [str(folder / "tokens"), str(folder / "state")]
    emu.records()
    for label, grant in (("grant", "password"), ("refresh", "refresh_token")):
        cpu0, t0 = children_cpu(), time.monotonic()
        done = subprocess.run(
            script, input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
        )
        wall, cpu = time.monotonic() - t0, children_cpu() - cpu0
        grants = ok_grants(emu.records(), grant)
        if grants != len(lines):
            raise RuntimeError(f"curl baseline: {grants} of {len(lines)} grants: {done.stdout}")
        r[f"cpu_per_{label}_ms"] = cpu / grants * 1000
        r[f"wall_per_{label}_ms"] = wall / grants * 1000
    r["startup_s"] = r["wall_per_grant_ms"] / 1000 * n
    r["cpu_per_cycle_s"] = r["cpu_per_refresh_ms"] / 1000 * n
    return r


def run_sidecars(emu: Emulator, folder: Path, merchants: list[Merchant]) -> dict[str, Any]:
    """One sidecar process per merchant; start-up, then refreshes at half the lifetime."""
    folder.mkdir(parents=True, exist_ok=True)
    n = token_set_count(merchants)
    lifetime = lifetime_for(n)
    emu.settings(access_token_lifetime=lifetime)
    emu.records()
    procs = []
    t0 = time.monotonic()
    for m, user, password, scopes in merchants:
        pwfile = folder / f"{m}.pw"
        pwfile.write_text(password)
        argv = [sys.executable, str(HERE / "sidecar.py"), emu.token_url, CLIENT_ID, user]
        argv += [str(pwfile), str(folder / "tokens" / m), *(SCOPE_BASE + s for s in scopes)]
        procs.append(start_processes(argv))
    r: dict[str, Any] = {"token_sets": n, "processes": len(procs)}
    try:

        def cpu() -> float:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a sidecar exited with {p.returncode}")
            return sum(cpu_seconds(p.pid) for p in procs)

        done = wait_for_files(missing_files(folder / "tokens", merchants), timeout=120)
        cpu1 = cpu()
        grants = ok_grants(emu.records())
        r["startup_s"] = done - t0
        r["cpu_per_grant_ms"] = cpu1 / max(grants, 1) * 1000  # includes interpreter start
        refreshed = 0

        def cycle_done() -> bool:
            nonlocal refreshed
            cpu()
            refreshed += ok_grants(emu.records(), "refresh_token")
            return refreshed >= 2 * n

        cpu2 = cpu()
        wait_until(cycle_done, timeout=lifetime * 10 + 60, what="sidecar refreshes", interval=0.2)
        r["cpu_per_refresh_ms"] = (cpu() - cpu2) / max(refreshed, 1) * 1000
        r["rss_mb"] = sum(rss_bytes(p.pid) for p in procs) / MB
        r["rss_per_token_set_kb"] = r["rss_mb"] * 1024 / n
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
    return r


# ---------------------------------------------------------------------------------- table

ROWS: list[tuple[str, str, str]] = [
    # key, label, format
    ("startup_s", "start until every token file exists (s)", "{:.1f}"),
    ("cpu_per_grant_ms", "CPU per grant at start-up (ms)", "{:.2f}"),
    ("cpu_per_refresh_ms", "CPU per refresh incl. file writes (ms)", "{:.2f}"),
    ("cpu_per_cycle_s", "CPU per refresh cycle of all N (s)", "{:.2f}"),
    ("rss_mb", "resident memory after start-up (MB)", "{:.1f}"),
    ("rss_max_mb", "resident memory, highest while running (MB)", "{:.1f}"),
    ("rss_growth_mb", "memory growth over the refresh cycles (MB)", "{:+.1f}"),
    ("rss_end_mb", "resident memory after scrapes and reloads (MB)", "{:.1f}"),
    ("idle_cpu_pct", "idle CPU, nothing due (% of a core)", "{:.2f}"),
    ("metrics_s", "/metrics scrape (s)", "{:.3f}"),
    ("metrics_bytes", "/metrics size (KB)", "{:.0f}"),
    ("status_s", "/status call (s)", "{:.3f}"),
    ("status_bytes", "/status size (KB)", "{:.0f}"),
    ("config_load_s", "config load (s)", "{:.3f}"),
    ("reload_apply_s", "reload of one changed merchant: applied (s)", "{:.3f}"),
    ("reload_token_s", "  ... its new token in the file (s)", "{:.3f}"),
    ("reload_logins", "  ... logins it caused", "{}"),
    ("emulator_cpu_per_grant_ms", "emulator CPU per grant (ms)", "{:.2f}"),
    ("emulator_busy_pct", "emulator busy during start-up (% of a core)", "{:.0f}"),
]
KB_KEYS = {"metrics_bytes", "status_bytes"}

TARGETS: list[tuple[str, str, float, str]] = [
    # key, description, limit, direction
    ("rss_max_mb", "resident memory <= 150 MB", 150, "<="),
    ("idle_cpu_pct", "idle CPU <= 1% of a core", 1.0, "<="),
    ("metrics_s", "/metrics scrape <= 300 ms", 0.3, "<="),
    ("reload_apply_s", "one-merchant reload <= 1 s", 1.0, "<="),
    ("reload_logins", "... with exactly one login", 1, "=="),
    ("curl_cpu_ratio", "CPU per grant >= 5x lower than curl's", 5.0, ">="),
]


def fmt(key: str, value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if key in KB_KEYS:
        value = value / 1024
    return spec.format(value)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ns = sorted(int(n) for n in results["anybilld"])
    n = max(ns)
    r = dict(results["anybilld"][str(n)])
    r["curl_cpu_ratio"] = results["curl"][str(n)]["cpu_per_grant_ms"] / r["cpu_per_grant_ms"]
    out = []
    for key, text, limit, op in TARGETS:
        value = r[key]
        met = {"<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]
        out.append({"target": text, "n": n, "key": key, "value": value, "met": met})
    return out


def table(results: dict[str, Any]) -> str:
    ns = sorted(results["anybilld"], key=int)
    width = 46
    lines = [f"anybilld {results['version']} on {results['machine']['summary']}", ""]
    head = f"{'anybilld':<{width}}" + "".join(f"{'N=' + format(int(n), ','):>12}" for n in ns)
    lines += [head, "-" * len(head)]
    for key, label, spec in ROWS:
        cells = [fmt(key, results["anybilld"][n].get(key), spec) for n in ns]
        lines.append(f"{label:<{width}}" + "".join(f"{c:>12}" for c in cells))

    lines += ["", "baselines (ratio = baseline / anybilld at the same N; > 1: anybilld is better)"]
    head = f"{'curl + jq + file write, per token set':<{width}}" + "".join(
        f"{'N=' + format(int(n), ','):>20}" for n in ns
    )
    lines += [head, "-" * len(head)]
    for key, label in (
        ("cpu_per_grant_ms", "CPU per grant (ms)"),
        ("cpu_per_refresh_ms", "CPU per refresh (ms)"),
        ("startup_s", "start until every file exists (s)"),
        ("cpu_per_cycle_s", "CPU per refresh cycle of all N (s)"),
    ):
        cells = []
        for n in ns:
            c, a = results["curl"][n], results["anybilld"][n]
            mark = "*" if c["extrapolated"] and key in ("startup_s", "cpu_per_cycle_s") else ""
            cells.append(f"{c[key]:.2f}{mark} ({c[key] / a[key]:.1f}x)")
        lines.append(f"{label:<{width}}" + "".join(f"{c:>20}" for c in cells))
    sampled = [f"N={int(n):,}: {results['curl'][n]['sampled']:,}" for n in ns]
    lines.append(f"  token sets run: {', '.join(sampled)}; * = extrapolated per grant")

    s = results["sidecar"]
    a = results["anybilld"][str(s["compared_with_n"])]
    lines += [
        "",
        f"one Python sidecar per merchant: {s['processes']} processes, {s['token_sets']} token "
        f"sets, vs anybilld at N={s['compared_with_n']:,}",
        "-" * 70,
    ]
    a_rss_kb = a["rss_mb"] * 1024 / a["token_sets"]
    for label, value, mine in (
        ("CPU per grant incl. process start (ms)", s["cpu_per_grant_ms"], a["cpu_per_grant_ms"]),
        ("CPU per refresh (ms)", s["cpu_per_refresh_ms"], a["cpu_per_refresh_ms"]),
        ("resident memory per token set (KB)", s["rss_per_token_set_kb"], a_rss_kb),
        ("start until every file exists (s)", s["startup_s"], a["startup_s"]),
    ):
        lines.append(f"{label:<{width}}{value:>12.2f} ({value / mine:.1f}x)")

    lines += ["", "targets (at the largest N)"]
    for t in results["targets"]:
        flag = "met   " if t["met"] else "MISSED"
        lines.append(f"  {flag} {t['target']:<42} N={t['n']:,}: {t['value']:.3g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": cores,
        "memory_gb": round(mem, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_before": os.getloadavg(),
        "summary": f"{cores} cores ({model or 'unknown CPU'}), {mem:.0f} GB, "
        f"Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}",
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--n",
        default="100,1000,10000",
        help="comma-separated numbers of token sets (default 100,1000,10000)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one refresh cycle and a 5 s idle window instead of three and a minute",
    )
    p.add_argument("--idle-seconds", type=float, help="idle window (default 60, quick 5)")
    p.add_argument("--cycles", type=int, help="refresh cycles (default 3, quick 1)")
    p.add_argument("--lifetime", type=int, help="access-token lifetime for the cycles (s)")
    p.add_argument(
        "--curl-sample", type=int, default=200, help="curl baseline: most token sets run"
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON")
    p.add_argument("--keep", action="store_true", help="keep the work folder (files, logs)")
    opts = p.parse_args(argv)
    opts.ns = sorted({int(x) for x in opts.n.split(",") if x.strip()})
    if not opts.ns or min(opts.ns) < 2:
        p.error("--n: every N must be at least 2")
    if opts.lifetime is not None and not 2 <= opts.lifetime <= LONG_LIFETIME // 4:
        p.error(f"--lifetime: from 2 to {LONG_LIFETIME // 4} seconds")
    if opts.idle_seconds is None:
        opts.idle_seconds = 5.0 if opts.quick else 60.0
    if opts.cycles is None:
        opts.cycles = 1 if opts.quick else 3
    return opts


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    for tool in ("curl", "jq"):
        if shutil.which(tool) is None:
            print(f"bench: the curl baseline needs {tool} (apt-get install {tool})")
            return 2
    work = Path(tempfile.mkdtemp(prefix="anybilld-bench-"))
    results: dict[str, Any] = {
        "version": __version__,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {
            "n": opts.ns,
            "quick": opts.quick,
            "idle_seconds": opts.idle_seconds,
            "cycles": opts.cycles,
            "curl_sample": opts.curl_sample,
        },
        "anybilld": {},
        "curl": {},
    }
    sidecar_n = min(100, min(opts.ns))
    try:
        for n in opts.ns:
            merchants = merchants_for(n)
            users = [{"username": u, "password": p} for _, u, p, _ in merchants]
            emu = Emulator(
                work / f"emulator-{n}",
                {"client_id": CLIENT_ID, "users": users, "request_log_limit": 10_000_000},
            )
            try:
                print(f"bench: N={n:,}: anybilld ...", file=sys.stderr, flush=True)
                folder = work / f"anybilld-{n}"
                folder.mkdir()
                results["anybilld"][str(n)] = run_anybilld(n, emu, folder, merchants, opts)
                print(f"bench: N={n:,}: curl baseline ...", file=sys.stderr, flush=True)
                # The probe's password changed in the reloads.
                probe = (PROBE, "svc-probe", probe_password(RELOADS), ("bill",))
                current = [probe, *merchants[1:]]
                results["curl"][str(n)] = run_curl(
                    n, emu, work / f"curl-{n}", current, min(n, opts.curl_sample)
                )
                if n == min(opts.ns):
                    print(f"bench: sidecars ({sidecar_n} token sets) ...", file=sys.stderr)
                    side = merchants_for(sidecar_n)
                    side[0] = current[0]
                    results["sidecar"] = run_sidecars(emu, work / "sidecar", side)
                    results["sidecar"]["compared_with_n"] = n
            finally:
                emu.stop()
        results["targets"] = evaluate_targets(results)
    finally:
        if opts.keep:
            print(f"bench: work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = table(results)
    results["table"] = text
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = opts.out / f"bench-{stamp}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"\nsaved: {out}")
    return 0
