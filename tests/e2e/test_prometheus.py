"""anybilld as a Prometheus target, checked with promtool and a real Prometheus server.

The rule files and their unit tests run through ``promtool``; a running daemon's /metrics
passes ``promtool check metrics``; every metric the rules and the Grafana dashboard use is
in the daemon's output; and a real Prometheus on loopback scrapes a daemon that runs
against the emulator, serves every token set's expiry, and fires the expiry alert when the
emulator stops issuing tokens.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from daemon_process import REPO_ROOT, DaemonProcess, free_port, merchant, wait_for
from emulator_process import EmulatorProcess, emulator_factory  # noqa: F401
from tools import require_tool

PROMETHEUS_DIR = REPO_ROOT / "packaging" / "prometheus"
RULES = PROMETHEUS_DIR / "anybilld.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "anybilld.rules.test.yml"
SCRAPE_EXAMPLE = PROMETHEUS_DIR / "scrape.example.yml"
DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "anybilld.json"

USERS = [("berlin", "svc-berlin", "berlin-Pa55"), ("hamburg", "svc-hamburg", "hamburg-Pa55")]
TOKEN_SETS = {("berlin", "bill"), ("berlin", "store"), ("hamburg", "bill")}


@pytest.fixture
def emulator(
    emulator_factory: Callable[..., EmulatorProcess],  # noqa: F811
) -> Callable[..., EmulatorProcess]:
    def make(**settings: Any) -> EmulatorProcess:
        users = [{"username": u, "password": p} for _, u, p in USERS]
        return emulator_factory({"users": users, **settings})

    return make


def daemon_config(emu: EmulatorProcess, *extra_merchants: dict[str, Any]) -> dict[str, Any]:
    scopes = {"berlin": ["bill", "store"], "hamburg": ["bill"]}
    return {
        "identity": {
            "token_url": f"{emu.base_url}/ad.anybill.de/oauth2/v2.0/token",
            "client_id": "anybilld-demo-client",
            "timeout": "3",
        },
        "refresh": {"at": 0.5, "jitter": 0.1, "retry_initial": "0.2", "retry_max": "1"},
        "merchants": [merchant(m, u, p, scopes[m]) for m, u, p in USERS] + list(extra_merchants),
    }


# --------------------------------------------------------------------------- promtool


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool")
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_every_rule_file_passes_promtool_check_rules() -> None:
    files = sorted(PROMETHEUS_DIR.glob("*.rules.yml"))
    assert files
    done = promtool("check", "rules", *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert has a firing case and a quiet one in the tests.
    alerts = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
              if "alert" in r]  # fmt: skip
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for c in t["alert_rule_test"]]  # fmt: skip
    for alert in alerts:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} is never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} is never tested quiet"


MARGIN_RULE = """\
      - record: anybilld:token_expiry_margin_seconds
        expr: |
          0.25 * (
            anybilld_token_expiry_timestamp_seconds
              - anybilld_token_last_success_timestamp_seconds
          )
"""


@pytest.mark.parametrize(
    "margin",
    [
        # A fixed 30 minutes fires between the normal refreshes of a 1-hour token.
        "0 * anybilld_token_expiry_timestamp_seconds + 1800",
        # A fixed 10 minutes pages a 24-hour token only minutes before the tills fail.
        "0 * anybilld_token_expiry_timestamp_seconds + 600",
        # Half the lifetime fires in normal operation (refreshes leave 40-60 %).
        "0.5 * (anybilld_token_expiry_timestamp_seconds"
        " - anybilld_token_last_success_timestamp_seconds)",
    ],
)
def test_the_rule_tests_catch_a_wrong_expiry_margin(tmp_path: Path, margin: str) -> None:
    """promtool test rules fails when the expiry margin is not what the tests expect."""
    assert MARGIN_RULE in RULES.read_text()
    wrong = f"      - record: anybilld:token_expiry_margin_seconds\n        expr: {margin}\n"
    broken = RULES.read_text().replace(MARGIN_RULE, wrong)
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    done = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert done.returncode != 0
    assert "AnybilldTokenExpiringSoon" in done.stdout + done.stderr


def test_the_example_scrape_config_is_a_valid_prometheus_config() -> None:
    done = promtool("check", "config", str(SCRAPE_EXAMPLE))
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- live /metrics


def used_metric_names(exprs: list[str]) -> set[str]:
    """The metric names a set of PromQL expressions reads (anybilld_*, process_*)."""
    names: set[str] = set()
    for expr in exprs:
        # A name is not preceded by a name character or a colon (recording rules).
        names |= set(re.findall(r"(?<![\w:])((?:anybilld|process)_[a-z0-9_]+)", expr))
    return names


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


# What a query's values are, by its shape -> the Grafana units that show them right.
COUNTS = {"", "short", "none"}  # "": Grafana's default, a plain number
UNITS = [
    (r"_bytes\b", {"bytes"}),
    (r"rate\(process_cpu_seconds_total", {"percentunit"}),  # CPU seconds per second
    (r"time\(\)|histogram_quantile\(.*_seconds_bucket", {"s"}),
    (r"\brate\(", {"reqps", "ops"}),  # events per second
]


def expected_units(expr: str) -> set[str]:
    return next((units for pattern, units in UNITS if re.search(pattern, expr)), COUNTS)


def panel_units(panel: dict[str, Any]) -> dict[str, str]:
    """refId -> the unit Grafana shows that query in: the panel's, or an override's."""
    config = panel.get("fieldConfig", {})
    default = config.get("defaults", {}).get("unit", "")
    units = {t["refId"]: default for t in panel.get("targets", [])}
    for override in config.get("overrides", []):
        if override["matcher"]["id"] == "byFrameRefID":
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    units[override["matcher"]["options"]] = prop["value"]
    return units


def test_every_dashboard_query_is_shown_in_the_unit_of_its_values() -> None:
    """A panel mixing bytes and CPU, or counts and seconds, gives each query its own unit."""
    wrong = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        units = panel_units(panel)
        for target in panel.get("targets", []):
            if units[target["refId"]] not in expected_units(target["expr"]):
                wrong.append((panel["title"], target["refId"], units[target["refId"]]))
    assert wrong == []


def test_the_dashboard_uses_its_data_source_variable_and_declares_nothing_unused() -> None:
    text = DASHBOARD.read_text()
    doc = json.loads(text)
    for declared in doc.get("__inputs", []):
        assert "${" + declared["name"] + "}" in text, f"unused input {declared['name']}"
    sources = {
        json.dumps(x["datasource"])
        for p in doc["panels"]
        for x in [p, *p.get("targets", [])]
        if "datasource" in x
    }
    assert sources == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}


def exported_names(text: str) -> set[str]:
    """Every sample name in an exposition, e.g. ``x_bucket`` and ``x_total``."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_live_metrics_pass_promtool_and_carry_every_metric_the_rules_and_dashboard_use(
    tmp_path: Path, emulator: Callable[..., EmulatorProcess], daemons: list[DaemonProcess]
) -> None:
    emu = emulator()
    # A wrong password: the blocked series exists only while a token set is blocked.
    wrong = merchant("munich", "svc-berlin", "not-the-Pa55", ["bill"])
    d = DaemonProcess(tmp_path / "d", daemon_config(emu, wrong))
    daemons.append(d)

    def full() -> str | None:
        text = d.get("/metrics").text
        ok = "anybilld_token_blocked{" in text and text.count(
            "anybilld_token_expiry_timestamp_seconds{"
        ) == len(TOKEN_SETS)
        return text if ok else None

    text = wait_for(full, what="every token set's series")
    done = promtool("check", "metrics", stdin=text)
    # check metrics prints each lint problem; a clean exposition gets no output at all.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")

    exported = exported_names(text)
    from_rules, from_dashboard = (
        used_metric_names(rule_exprs()),
        used_metric_names(dashboard_exprs()),
    )
    assert len(from_rules) >= 5 and len(from_dashboard) >= 10  # the parse found them
    assert from_rules - exported == set()
    assert from_dashboard - exported == set()
    assert d.stop() == 0


def test_the_name_check_sees_a_metric_the_daemon_does_not_export() -> None:
    assert used_metric_names(['anybilld_token_expiry_seconds{job="a"} - time()']) == {
        "anybilld_token_expiry_seconds"
    }
    assert used_metric_names(["x < on() group_left() anybilld:token_expiry_margin"]) == set()


# --------------------------------------------------------------------------- a real Prometheus


class Prometheus:
    """A Prometheus server on a free loopback port with its own storage, in ``folder``."""

    def __init__(self, folder: Path, target: str, rules: Path) -> None:
        binary = require_tool("prometheus")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "anybilld",
                    "scrape_interval": "1s",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = folder / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", timeout=10, trust_env=False
        )
        wait_for(self._ready, timeout=60, what="Prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()}")
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def alerts(self, name: str) -> list[dict[str, Any]]:
        doc = self.http.get("/api/v1/alerts").json()
        return [a for a in doc["data"]["alerts"] if a["labels"]["alertname"] == name]

    def rule_health(self) -> list[tuple[str, str]]:
        doc = self.http.get("/api/v1/rules").json()
        return [(r["name"], r["health"]) for g in doc["data"]["groups"] for r in g["rules"]]

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus_servers() -> Iterator[list[Prometheus]]:
    running: list[Prometheus] = []
    yield running
    for p in running:
        p.stop()


def rules_without_waiting(folder: Path) -> Path:
    """The shipped rules, margin and all, with no waiting (``for``) for the token alerts."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in ("AnybilldTokenExpiringSoon", "AnybilldTokenSetWithoutToken"):
                rule["for"] = "0s"
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_prometheus_scrapes_every_expiry_and_fires_the_expiry_alert_when_tokens_stop(
    tmp_path: Path,
    emulator: Callable[..., EmulatorProcess],
    daemons: list[DaemonProcess],
    prometheus_servers: list[Prometheus],
) -> None:
    # 30-second tokens are refreshed at 12-18 s, so at least 12 s are always left; the
    # shipped margin, a quarter of the lifetime (7.5 s), stays quiet while refreshes work.
    emu = emulator(access_token_lifetime=30)
    # munich is new and every attempt of it fails: retrying, never pending, never a token.
    emu.add_faults({"kind": "server_error", "times": None, "match": {"username": "svc-munich"}})
    munich = merchant("munich", "svc-munich", "munich-Pa55", ["bill"])
    d = DaemonProcess(tmp_path / "d", daemon_config(emu, munich))
    daemons.append(d)
    prom = Prometheus(
        tmp_path / "prometheus", f"127.0.0.1:{d.port}", rules_without_waiting(tmp_path)
    )
    prometheus_servers.append(prom)

    def expiry_series() -> dict[tuple[str, str], float] | None:
        got = {
            (s["metric"]["merchant"], s["metric"]["scope"]): float(s["value"][1])
            for s in prom.query('anybilld_token_expiry_timestamp_seconds{job="anybilld"}')
        }
        return got if set(got) == TOKEN_SETS else None

    # Every token set's expiry, through Prometheus's HTTP API, matching the token files.
    def matching_files() -> bool:
        series = expiry_series()
        if series is None:
            return False
        files = {(m, s): d.read_json(m, s) for m, s in TOKEN_SETS}
        return all(
            doc is not None and int(series[key]) == doc["expires_at_unix"]
            for key, doc in files.items()
        )

    wait_for(matching_files, what="every token set's expiry in Prometheus")
    assert all(h == "ok" for _, h in prom.rule_health()), prom.rule_health()
    # Every dashboard query is valid PromQL to this Prometheus (Grafana's variables filled
    # in), and the expiry panel shows every token set.
    for expr in dashboard_exprs():
        filled = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
        if filled.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        prom.query(filled)
    panel = next(e for e in dashboard_exprs() if e.startswith("anybilld_token_expiry_"))
    expiry_panel = prom.query(panel.replace("$instance", ".*"))
    assert {(s["metric"]["merchant"], s["metric"]["scope"]) for s in expiry_panel} == TOKEN_SETS
    assert prom.alerts("AnybilldTokenExpiringSoon") == []
    assert [s["value"][1] for s in prom.query('up{job="anybilld"}')] == ["1"]

    # The token set without a token is alerted on, and only that one.
    def without_token() -> set[tuple[str, str]] | None:
        got = {
            (a["labels"]["merchant"], a["labels"]["scope"])
            for a in prom.alerts("AnybilldTokenSetWithoutToken")
            if a["state"] == "firing"
        }
        return got or None

    assert wait_for(without_token, what="AnybilldTokenSetWithoutToken") == {("munich", "bill")}

    # The identity provider stops issuing tokens: every refresh fails from now on.
    emu.add_faults({"kind": "server_error", "status": 503, "times": None})

    def firing() -> set[tuple[str, str]] | None:
        got = {
            (a["labels"]["merchant"], a["labels"]["scope"])
            for a in prom.alerts("AnybilldTokenExpiringSoon")
            if a["state"] == "firing"
        }
        return got if got == TOKEN_SETS else None

    wait_for(firing, timeout=90, what="AnybilldTokenExpiringSoon firing for every token set")
    alert = prom.alerts("AnybilldTokenExpiringSoon")[0]
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["job"] == "anybilld"
    emu.clear_faults()
    assert d.stop() == 0
