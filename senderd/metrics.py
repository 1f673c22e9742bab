"""senderd's Prometheus metrics, defined on an injected registry (never the global one at import).

The metric names are a public interface: dashboards and alert rules depend on them.
"""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from senderd import __version__

SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_FAILURE_REASONS = ("bad_credentials", "client_certificate", "bad_request", "rate_limited", "server_error",
                         "unreachable", "tls_trust", "timeout", "bad_response")
RUNTIME_FAILURE_REASONS = ("unauthorized", "forbidden")
OUTCOMES = ("success", "http_error", "check_failed", "timeout", "connection_error", "auth_error")


class Metrics:
    """Every senderd metric, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._flow_series: dict[str, tuple[dict[str, Any], Any, Any]] = {}
        self._attempts: dict[tuple[str, int | None], Any] = {}
        r = self.registry
        self.send_duration = Histogram(
            "senderd_send_duration_seconds", "Time of a whole send, retries included.", ["flow"],
            buckets=SEND_BUCKETS, registry=r)
        self.sends = Counter("senderd_sends", "Finished sends by outcome.", ["flow", "outcome"], registry=r)
        self.attempts = Counter("senderd_send_attempts", "HTTP attempts, retries included, by status code.",
                                ["flow", "code"], registry=r)
        self.auth_failures = Counter("senderd_auth_failures", "Authentication failures by stage and reason.",
                                     ["stage", "reason"], registry=r)
        self.token_fetches = Counter("senderd_token_fetches", "Token requests by result.", ["result"],
                                     registry=r)
        self.token_fetch_duration = Histogram(
            "senderd_token_fetch_duration_seconds", "Time of one token request.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=r)
        self.token_expiry = Gauge("senderd_token_expiry_timestamp_seconds",
                                  "Unix time at which the current token expires.", registry=r)
        self.certificate_expiry = Gauge("senderd_client_certificate_expiry_timestamp_seconds",
                                        "Unix time at which the client certificate expires.", registry=r)
        self.last_success = Gauge("senderd_last_success_timestamp_seconds",
                                  "Unix time of the flow's last successful send.", ["flow"], registry=r)
        self.inflight = Gauge("senderd_inflight_sends", "Sends under way now.", registry=r)
        self.schedule_lag = Histogram("senderd_schedule_lag_seconds", "Start time minus scheduled time.",
                                      ["flow"], buckets=LAG_BUCKETS, registry=r)
        self.skipped_ticks = Counter("senderd_skipped_ticks", "Scheduled ticks not run, by reason.",
                                     ["flow", "reason"], registry=r)
        self.flow_interval = Gauge("senderd_flow_interval_seconds",
                                   "Configured interval of a flow scheduled with `every`.", ["flow"], registry=r)
        self.config_reload_ok = Gauge("senderd_config_last_reload_successful",
                                      "1 if the last configuration (re)load succeeded.", registry=r)
        self.build_info = Gauge("senderd_build_info", "senderd's version and Python's.", ["version", "python"],
                                registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        if process:
            ProcessCollector(registry=r)  # process_* (memory, CPU, fds, start time) on Linux
        self.config_reload_ok.set(1)
        for result in ("success", "failure"):
            self.token_fetches.labels(result)
        for reason in TOKEN_FAILURE_REASONS:
            self.auth_failures.labels("token", reason)
        for reason in RUNTIME_FAILURE_REASONS:
            self.auth_failures.labels("runtime", reason)

    def attempt(self, flow: str, status: int | None) -> None:
        """Count one HTTP attempt (`code` = the status, or "none" without an answer)."""
        child = self._attempts.get((flow, status))
        if child is None:
            child = self.attempts.labels(flow, str(status) if status is not None else "none")
            self._attempts[(flow, status)] = child
        child.inc()

    def flow_series(self, flow: str) -> tuple[dict[str, Any], Any, Any]:
        """The flow's sends-by-outcome counters, duration histogram and last-success gauge (cached: the
        label lookups are a measurable part of a send)."""
        series = self._flow_series.get(flow)
        if series is None:
            series = ({outcome: self.sends.labels(flow, outcome) for outcome in OUTCOMES},
                      self.send_duration.labels(flow), self.last_success.labels(flow))
            self._flow_series[flow] = series
        return series

    def declare_flow(self, flow: str, every: float | None) -> None:
        """Create the flow's series at zero so that rates and absent() work from the first scrape."""
        for outcome in OUTCOMES:
            self.sends.labels(flow, outcome)
        for reason in ("overlap", "queue_full"):
            self.skipped_ticks.labels(flow, reason)
        if every is not None:
            self.flow_interval.labels(flow).set(every)
