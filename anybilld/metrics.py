"""Prometheus metrics: a collector over the keepers' live state, and process-wide counters.

Per-token-set series come from ``TokenSetCollector.collect()``, which reads the keepers at
scrape time: a removed token set leaves no stale series behind, and nothing has to be
cleaned up. Counters and the histogram live in ``Metrics``, registered on an injected
registry (never the global one), so tests use a fresh registry and read sample values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from .keeper import Keeper, TokenState

GRANTS = ("password", "refresh")
OUTCOMES = ("success", "transient", "dead_grant", "permanent")


class TokenSetCollector(Collector):
    """Reads every keeper at scrape time; never raises (a scrape must not fail)."""

    def __init__(self, keepers: Callable[[], Iterable[Keeper]]) -> None:
        self._keepers = keepers

    def collect(self) -> Iterator[Metric]:
        labels = ["merchant", "scope"]
        expiry = GaugeMetricFamily(
            "anybilld_token_expiry_timestamp_seconds",
            "Expiry of the published access token (Unix time).",
            labels=labels,
        )
        success = GaugeMetricFamily(
            "anybilld_token_last_success_timestamp_seconds",
            "Time of the last successful grant (Unix time).",
            labels=labels,
        )
        next_refresh = GaugeMetricFamily(
            "anybilld_token_next_refresh_timestamp_seconds",
            "When the next grant attempt is due (Unix time).",
            labels=labels,
        )
        refresh_expiry = GaugeMetricFamily(
            "anybilld_refresh_token_expiry_timestamp_seconds",
            "Expiry of the refresh token, when known (Unix time).",
            labels=labels,
        )
        failures = GaugeMetricFamily(
            "anybilld_token_consecutive_failures",
            "Failed attempts since the last success.",
            labels=labels,
        )
        blocked = GaugeMetricFamily(
            "anybilld_token_blocked",
            "1 while the token set is blocked after a permanent error.",
            labels=[*labels, "reason"],
        )
        output_failing = GaugeMetricFamily(
            "anybilld_token_output_failing",
            "1 while writing one of the token set's token or state files fails.",
            labels=labels,
        )
        states = dict.fromkeys(TokenState, 0)
        for k in list(self._keepers()):
            ls = [k.spec.merchant, k.spec.scope.name]
            states[k.state] += 1
            # What consumers really have: a token that could not be written is not counted.
            if k.published_expires_at is not None:
                expiry.add_metric(ls, k.published_expires_at)
            if k.last_success_at is not None:
                success.add_metric(ls, k.last_success_at)
            next_refresh.add_metric(ls, k.next_attempt_at)
            if k.refresh_expires_at is not None:
                refresh_expiry.add_metric(ls, k.refresh_expires_at)
            failures.add_metric(ls, k.consecutive_failures)
            reason = k.block_reason
            if k.state == TokenState.BLOCKED and reason is not None:
                blocked.add_metric([*ls, reason.value], 1)
            output_failing.add_metric(ls, 1 if k.output_error or k.state_error else 0)
        yield from (expiry, success, next_refresh, refresh_expiry, failures, blocked)
        yield output_failing
        sets = GaugeMetricFamily("anybilld_token_sets", "Token sets per state.", labels=["state"])
        for state, n in states.items():
            sets.add_metric([state.value], n)
        yield sets


class Metrics:
    """Every metric of the daemon, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, keepers: Callable[[], Iterable[Keeper]]):
        self.registry = registry
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
        registry.register(TokenSetCollector(keepers))
        ProcessCollector(registry=registry)

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
