"""Prometheus metrics: a collector over the keepers' live state, and process-wide counters.

Per-token-set series come from ``TokenSetCollector``, which reads the keepers at scrape
time: a removed token set leaves no stale series behind, and nothing has to be cleaned up.
Counters and the histogram live in ``Metrics``, registered on an injected registry (never
the global one), so tests use a fresh registry and read sample values.

The daemon's /metrics is ``Metrics.exposition()``: the process-wide metrics through
prometheus_client, the per-token-set families written as text directly. At 10,000 token
sets that is seven families of 10,000 series each; building a sample object per series
and formatting it again took over half a second of the event loop, the direct text a
tenth of that. Both paths give the same text (a test compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .identity import UNEXPECTED
from .keeper import Keeper, TokenState

GRANTS = ("password", "refresh")
# "error": the request ended in an unexpected exception (a bug), not in an answer.
OUTCOMES = ("success", "transient", "dead_grant", "permanent", UNEXPECTED)


class _Family(NamedTuple):
    name: str
    help: str


_EXPIRY = _Family(
    "anybilld_token_expiry_timestamp_seconds",
    "Expiry of the published access token (Unix time).",
)
_SUCCESS = _Family(
    "anybilld_token_last_success_timestamp_seconds",
    "Time of the last successful grant (Unix time).",
)
_NEXT = _Family(
    "anybilld_token_next_refresh_timestamp_seconds",
    "When the next grant attempt is due (Unix time).",
)
_REFRESH_EXPIRY = _Family(
    "anybilld_refresh_token_expiry_timestamp_seconds",
    "Expiry of the refresh token, when known (Unix time).",
)
_FAILURES = _Family(
    "anybilld_token_consecutive_failures",
    "Failed attempts since the last success.",
)
_BLOCKED = _Family(
    "anybilld_token_blocked",
    "1 while the token set is blocked after a permanent error.",
)
_OUTPUT_FAILING = _Family(
    "anybilld_token_output_failing",
    "1 while writing one of the token set's token or state files fails.",
)
# prometheus_client's own float formatting (Go style: 1.7e+09), so both paths agree.
_num = cast(Callable[[float], str], floatToGoString)
_SETS = _Family("anybilld_token_sets", "Token sets per state.")


def _label_value(value: str) -> str:
    """A label value escaped as the text format wants (backslash, quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _header(f: _Family) -> str:
    # HELP text escapes backslash and newline only (prometheus_client does the same).
    text = f.help.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {f.name} {text}\n# TYPE {f.name} gauge\n"


class TokenSetCollector(Collector):
    """Reads every keeper at scrape time; never raises (a scrape must not fail).

    ``collect()`` serves the registry API (``get_sample_value``, ``generate_latest``);
    ``exposition()`` writes the same families as text without a sample object per series.
    """

    def __init__(self, keepers: Callable[[], Iterable[Keeper]]) -> None:
        self._keepers = keepers

    def collect(self) -> Iterator[Metric]:
        labels = ["merchant", "scope"]
        fams = {
            f: GaugeMetricFamily(f.name, f.help, labels=labels)
            for f in (_EXPIRY, _SUCCESS, _NEXT, _REFRESH_EXPIRY, _FAILURES)
        }
        blocked = GaugeMetricFamily(_BLOCKED.name, _BLOCKED.help, labels=[*labels, "reason"])
        output_failing = GaugeMetricFamily(
            _OUTPUT_FAILING.name, _OUTPUT_FAILING.help, labels=labels
        )
        states = dict.fromkeys(TokenState, 0)
        for k in list(self._keepers()):
            ls = [k.spec.merchant, k.spec.scope.name]
            states[k.state] += 1
            # What consumers really have: a token that could not be written is not counted.
            if k.published_expires_at is not None:
                fams[_EXPIRY].add_metric(ls, k.published_expires_at)
            if k.last_success_at is not None:
                fams[_SUCCESS].add_metric(ls, k.last_success_at)
            fams[_NEXT].add_metric(ls, k.next_attempt_at)
            if k.refresh_expires_at is not None:
                fams[_REFRESH_EXPIRY].add_metric(ls, k.refresh_expires_at)
            fams[_FAILURES].add_metric(ls, k.consecutive_failures)
            reason = k.block_reason
            if k.state == TokenState.BLOCKED and reason is not None:
                blocked.add_metric([*ls, reason.value], 1)
            output_failing.add_metric(ls, 1 if k.output_error or k.state_error else 0)
        yield from fams.values()
        yield blocked
        yield output_failing
        sets = GaugeMetricFamily(_SETS.name, _SETS.help, labels=["state"])
        for state, n in states.items():
            sets.add_metric([state.value], n)
        yield sets

    def exposition(self) -> bytes:
        """The families of ``collect()`` in the Prometheus text format, series for series."""
        expiry: list[str] = [_header(_EXPIRY)]
        success: list[str] = [_header(_SUCCESS)]
        next_refresh: list[str] = [_header(_NEXT)]
        refresh_expiry: list[str] = [_header(_REFRESH_EXPIRY)]
        failures: list[str] = [_header(_FAILURES)]
        blocked: list[str] = [_header(_BLOCKED)]
        output_failing: list[str] = [_header(_OUTPUT_FAILING)]
        states = dict.fromkeys(TokenState, 0)
        num = _num
        for k in list(self._keepers()):
            state = k.state
            states[state] += 1
            merchant, scope = _label_value(k.spec.merchant), _label_value(k.spec.scope.name)
            ls = f'{{merchant="{merchant}",scope="{scope}"'
            if k.published_expires_at is not None:
                expiry.append(f"{_EXPIRY.name}{ls}}} {num(k.published_expires_at)}\n")
            if k.last_success_at is not None:
                success.append(f"{_SUCCESS.name}{ls}}} {num(k.last_success_at)}\n")
            next_refresh.append(f"{_NEXT.name}{ls}}} {num(k.next_attempt_at)}\n")
            if k.refresh_expires_at is not None:
                value = num(k.refresh_expires_at)
                refresh_expiry.append(f"{_REFRESH_EXPIRY.name}{ls}}} {value}\n")
            failures.append(f"{_FAILURES.name}{ls}}} {num(k.consecutive_failures)}\n")
            reason = k.block_reason
            if state == TokenState.BLOCKED and reason is not None:
                # Label names in sorted order, as prometheus_client writes them.
                labels = f'merchant="{merchant}",reason="{reason.value}",scope="{scope}"'
                blocked.append(f"{_BLOCKED.name}{{{labels}}} 1.0\n")
            failing = "1.0" if k.output_error or k.state_error else "0.0"
            output_failing.append(f"{_OUTPUT_FAILING.name}{ls}}} {failing}\n")
        sets = [_header(_SETS)]
        sets += [f'{_SETS.name}{{state="{s.value}"}} {num(n)}\n' for s, n in states.items()]
        parts = (expiry, success, next_refresh, refresh_expiry, failures, blocked)
        text = "".join("".join(p) for p in (*parts, output_failing, sets))
        return text.encode()


class Metrics:
    """Every metric of the daemon, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, keepers: Callable[[], Iterable[Keeper]]):
        self.registry = registry
        # Everything but the token sets is also on a registry of its own, which
        # exposition() renders with prometheus_client before the token sets' own text.
        self._process_wide = CollectorRegistry()
        registry = self._process_wide
        self.requests = Counter(
            "anybilld_token_requests",
            "Token requests by grant and outcome.",
            ["grant", "outcome"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "anybilld_token_request_duration_seconds",
            "Duration of token requests.",
            ["grant"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.file_writes = Counter(
            "anybilld_token_file_writes",
            "Token file writes by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.reload_ok = Gauge(
            "anybilld_config_last_reload_successful",
            "1 if the last config load succeeded.",
            registry=registry,
        )
        self.reload_ok_time = Gauge(
            "anybilld_config_last_reload_success_timestamp_seconds",
            "Time of the last successful config load (Unix time).",
            registry=registry,
        )
        self.reloads = Counter(
            "anybilld_config_reloads",
            "Config reloads by outcome.",
            ["outcome"],
            registry=registry,
        )
        build = Gauge(
            "anybilld_build_info", "Build information; always 1.", ["version"], registry=registry
        )
        build.labels(version=__version__).set(1)
        # Series exist from the start at 0, so rate() and alerts see the first increment.
        for grant in GRANTS:
            self.request_duration.labels(grant=grant)
            for outcome in OUTCOMES:
                self.requests.labels(grant=grant, outcome=outcome)
        for outcome in ("success", "error"):
            self.file_writes.labels(outcome=outcome)
        for outcome in ("success", "failure"):
            self.reloads.labels(outcome=outcome)
        process = ProcessCollector(registry=registry)
        shared = (self.requests, self.request_duration, self.file_writes, self.reload_ok)
        for collector in (*shared, self.reload_ok_time, self.reloads, build, process):
            self.registry.register(collector)
        self.token_sets = TokenSetCollector(keepers)
        self.registry.register(self.token_sets)

    def exposition(self) -> bytes:
        """The /metrics page: the same series as ``generate_latest(registry)``."""
        return generate_latest(self._process_wide) + self.token_sets.exposition()

    def observe_request(self, grant: str, outcome: str, seconds: float) -> None:
        self.requests.labels(grant=grant, outcome=outcome).inc()
        self.request_duration.labels(grant=grant).observe(seconds)

    def observe_file_write(self, ok: bool) -> None:
        self.file_writes.labels(outcome="success" if ok else "error").inc()

    def config_loaded(self, ok: bool, now: float, *, reload: bool = True) -> None:
        """Record a config load; the one at start-up is not counted as a reload."""
        self.reload_ok.set(1 if ok else 0)
        if reload:
            self.reloads.labels(outcome="success" if ok else "failure").inc()
        if ok:
            self.reload_ok_time.set(now)
