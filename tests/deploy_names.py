"""The metric names the deployment artifacts depend on: the Grafana dashboard and the Prometheus alerts.

Metric names are a public interface. `tests/test_deploy.py` checks these sets against the documented
names (`PUBLIC_METRICS`); a live test can check them against a running daemon's `/metrics`.
Histogram series are reduced to their family name (`_bucket`, `_sum` and `_count` stripped).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "senderd-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

PUBLIC_METRICS: frozenset[str] = frozenset(
    {
        "senderd_send_duration_seconds",
        "senderd_sends_total",
        "senderd_send_attempts_total",
        "senderd_auth_failures_total",
        "senderd_token_fetches_total",
        "senderd_token_fetch_duration_seconds",
        "senderd_token_expiry_timestamp_seconds",
        "senderd_client_certificate_expiry_timestamp_seconds",
        "senderd_last_success_timestamp_seconds",
        "senderd_inflight_sends",
        "senderd_schedule_lag_seconds",
        "senderd_skipped_ticks_total",
        "senderd_build_info",
        "senderd_flow_interval_seconds",
        "senderd_config_last_reload_successful",
        "senderd_credentials_ready",
        "senderd_credentials_rotations_total",
        "senderd_internal_errors_total",
    }
)
"""The metric families every running daemon exports from its first scrape."""
CONFIRMATION_METRICS: frozenset[str] = frozenset(
    {"senderd_confirmations_total", "senderd_confirmation_duration_seconds"}
)
"""Public too, and exposed as soon as a flow has `confirm = "mpl"` (their series are that flow's)."""
RELAY_METRICS: frozenset[str] = frozenset(
    {
        "senderd_relay_requests_total",
        "senderd_relay_deliveries_total",
        "senderd_spool_messages",
        "senderd_spool_oldest_message_age_seconds",
        "senderd_spool_bytes",
        "senderd_spool_capacity_bytes",
        "senderd_spool_capacity_messages",
        "senderd_spool_unconfigured_flow_messages",
    }
)
"""Public, with a `[relay]` section (the counters' series once the relay has answered and delivered)."""
FORWARD_METRICS: frozenset[str] = frozenset(
    {"senderd_forward_requests_total", "senderd_forward_duration_seconds", "senderd_forward_inflight_requests"}
)
"""Public, with a `[forward]` section (the requests' series once a call was forwarded)."""
PUSHED_METRICS: frozenset[str] = frozenset({"senderd_once_last_run_timestamp_seconds", "senderd_once_last_run_success"})
"""The run verdict `senderd once --push-gateway` pushes (never on a daemon's /metrics)."""
PROBE_METRICS: frozenset[str] = frozenset({"senderd_probe_sends_total"})
"""Public, once `/probe` has sent a flow."""
READINESS_METRICS: frozenset[str] = frozenset({"senderd_credentials_ready"})
"""Public: whether each credentials set holds a usable token (issue 16's readiness split exports it)."""
DOCUMENTED_METRICS: frozenset[str] = (
    PUBLIC_METRICS
    | CONFIRMATION_METRICS
    | RELAY_METRICS
    | FORWARD_METRICS
    | PROBE_METRICS
    | PUSHED_METRICS
    | READINESS_METRICS
)
ONCE_METRICS = PUSHED_METRICS
"""The CronJob's run verdict, by the name the readiness/CronJob work used."""
"""Every senderd metric family (without the histogram suffixes) that dashboards and alerts may use."""

_NAME = re.compile(r"(?<![A-Za-z0-9_:])senderd_[a-z_]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(text: str) -> set[str]:
    """The senderd metric families named in `text` (a PromQL expression or prose)."""
    names = set()
    for match in _NAME.finditer(text):
        name = match.group()
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels folded into a row


def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    dashboard = load_dashboard()
    expressions = [
        target["expr"]
        for panel in _panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        expressions.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
        expressions.append(str(variable.get("definition", "")))
    return [expression for expression in expressions if expression]


def load_alert_rules() -> list[dict[str, Any]]:
    """Every rule (alerting or recording) of the alerts file, across its groups."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names_in_dashboard() -> set[str]:
    """The senderd metric families the dashboard's PromQL refers to."""
    return {name for expression in dashboard_expressions() for name in metric_names(expression)}


def metric_names_in_alerts() -> set[str]:
    """The senderd metric families the alert rules' expressions refer to."""
    return {name for rule in load_alert_rules() for name in metric_names(str(rule["expr"]))}
