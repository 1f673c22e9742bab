"""The dashboard and the alert rules query only what senderd exports: a real daemon against the embedded
emulator, with a scheduled flow, the relay (a delivered, confirmed message and a dead letter), the forwarder
and delivery confirmations exercised, and its live `/metrics` read.

Exempt: `up`, `push_time_seconds` and `process_*` (not senderd's names), the run verdict only `senderd once`
pushes (`PUSHED_METRICS`), and a metric the issue names before any module of senderd defines it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.forward import ForwardRecord
from senderd.result import SendResult
from tests.deploy_names import (
    DOCUMENTED_METRICS,
    PUSHED_METRICS,
    READINESS_METRICS,
    ROOT,
    metric_names,
    metric_names_in_alerts,
    metric_names_in_dashboard,
)
from tests.tools import Recorder, all_blocked, require_tool, serving

pytestmark = pytest.mark.anyio

MAX_SPOOL_BYTES = 1_000_000


def config(stack: EmulatorStack, spool: Path) -> Path:
    """Two credentials sets (send; mpl, of plan api) and every listener on a free port."""
    path = stack.directory / "live.toml"
    path.write_text(
        f"""
[credentials.send]
service_key = "{stack.service_key_path}"
ca_file = "{stack.ca_path}"
[credentials.mpl]
service_key = "{stack.tenant.key_path("api")}"
ca_file = "{stack.ca_path}"

[defaults]
credentials = "send"
retries = 0

[server]
listen = "127.0.0.1:0"

[relay]
listen = "127.0.0.1:0"
spool_dir = "{spool}"
max_spool_bytes = {MAX_SPOOL_BYTES}
redelivery_initial = "50ms"

[forward]
listen = "127.0.0.1:0"
credentials = "send"

[[flows]]
name = "ts"
path = "/http/GetTimestamp"
every = "1s"
start = "now"

[[flows]]
name = "orders"
path = "/http/Orders"
method = "POST"
csrf = true
confirm = "mpl"
confirm_credentials = "mpl"

[[flows]]
name = "failing"
path = "/http/Failing"
method = "POST"
""",
        encoding="utf-8",
    )
    return path


@asynccontextmanager
async def exercised(tmp_path: Path) -> AsyncIterator[tuple[Daemon, list[SendResult]]]:
    """A daemon that has sent a scheduled flow, delivered (and confirmed) one relay message, made another
    dead and forwarded one call."""
    async with EmulatorStack.started(tmp_path / "emu") as stack:
        daemon = Daemon.create(load_config(config(stack, tmp_path / "spool")), handle_signals=False)
        async with serving(daemon) as sends, aiohttp.ClientSession() as http:
            assert daemon.relay is not None and daemon.forwarder is not None
            forwarded: Recorder[ForwardRecord] = Recorder()
            daemon.forwarder.listeners.append(forwarded)  # told after the call is counted
            headers = {"Content-Type": "application/xml"}
            for flow, body in (("orders", b"<Order/>"), ("failing", b"<doomed/>")):
                url = f"{daemon.relay.url}/v1/flows/{flow}/messages"
                async with http.post(url, data=body, headers=headers) as answer:
                    assert answer.status == 202, await answer.text()
            async with http.get(f"{daemon.forwarder.url}/http/GetTimestamp") as answer:
                assert answer.status == 200, await answer.text()
            await sends.wait_until(lambda items: {"ts", "orders", "failing"} <= {item.flow for item in items})
            with anyio.fail_after(10):
                while daemon.relay.inflight:  # both deliveries recorded in the spool and counted
                    await all_blocked()
            await forwarded.wait_for(1)
            yield daemon, sends.items


def live_families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family name (histogram and counter suffixes as PromQL names them) -> labels -> value."""
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        for sample in family.samples:
            if family.type == "histogram" and not sample.name.endswith("_count"):
                continue
            families.setdefault(name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return families


def defined_in_senderd(name: str) -> bool:
    """Whether any module of senderd names the metric (the prometheus_client name, without `_total`)."""
    sources = (path.read_text(encoding="utf-8") for path in (ROOT / "senderd").rglob("*.py"))
    return any(f'"{name.removesuffix("_total")}"' in source for source in sources)


async def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    async with exercised(tmp_path) as (daemon, sends), aiohttp.ClientSession() as http:
        assert daemon.server is not None
        async with http.get(f"{daemon.server.url}/metrics") as answer:
            assert answer.status == 200
            text = await answer.text()
    families = live_families(text)
    live = set(families)
    result = await anyio.run_process([promtool, "check", "metrics"], input=text.encode(), check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()

    dashboard = metric_names_in_dashboard()
    assert len(dashboard) >= 25
    assert sorted(dashboard - live) == [], "panels query metrics that senderd does not export"
    alerts = metric_names_in_alerts()
    announced = {name for name in READINESS_METRICS if not defined_in_senderd(name)}
    assert sorted(alerts - live - PUSHED_METRICS - announced) == [], "alerts on metrics senderd does not export"
    assert alerts >= PUSHED_METRICS and not PUSHED_METRICS & live  # pushed by `senderd once`, never scraped
    assert sorted(metric_names(text) - DOCUMENTED_METRICS) == [], "exported, but not in tests/deploy_names.py"

    # the relay and spool panels and alerts have their series, with the values this run made
    assert {s.flow: s.outcome for s in sends if s.flow != "ts"} == {"orders": "success", "failing": "http_error"}
    assert families["senderd_spool_messages"][(("state", "dead"),)] == 1
    assert families["senderd_spool_messages"][(("state", "delivered"),)] == 1
    assert families["senderd_spool_bytes"][()] == len(b"<doomed/>")  # the dead letter's body is still held
    assert families["senderd_spool_capacity_bytes"][()] == MAX_SPOOL_BYTES
    assert families["senderd_spool_capacity_messages"][()] == 100_000
    assert families["senderd_relay_deliveries_total"][(("flow", "failing"), ("result", "dead"))] == 1
    assert families["senderd_relay_requests_total"][(("code", "202"),)] == 2
    assert families["senderd_confirmations_total"][(("flow", "orders"), ("status", "completed"))] == 1
    assert families["senderd_forward_requests_total"][(("code", "200"), ("method", "GET"), ("route", "/http/*"))] == 1
    assert families["senderd_forward_duration_seconds"][(("route", "/http/*"),)] == 1
    assert families["senderd_schedule_lag_seconds"][(("flow", "ts"),)] >= 1
