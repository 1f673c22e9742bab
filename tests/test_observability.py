"""Metrics, health, readiness and probe endpoints of a running daemon, checked with the real tools:
promtool, a Prometheus server scraping senderd, and a Pushgateway receiving `senderd once`."""

from __future__ import annotations

import json
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
from senderd.engine import Engine
from senderd.errors import TokenError
from senderd.result import SendResult
from tests.deploy_names import PUBLIC_METRICS
from tests.tools import Recorder, free_port, require_tool, senderd, wait_for_port

pytestmark = pytest.mark.anyio

FLOWS = (
    '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "200ms"\nstart = "now"\nprobe = true\n'
    '[[flows]]\nname = "failing"\npath = "/http/Failing"\nprobe = true\n'
    '[[flows]]\nname = "orders"\npath = "/http/Orders"\nmethod = "POST"\ncsrf = true\nbody = "<o/>"\nprobe = true\n'
)


@asynccontextmanager
async def running_daemon(stack: EmulatorStack, sends: int = 1) -> AsyncIterator[tuple[Daemon, str]]:
    """A daemon on the stack's config; yields once `sends` sends have finished."""
    daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
    finished = Recorder[SendResult]()

    async def hook(engine: Engine, _group: object) -> None:
        engine.listeners.append(finished)

    daemon.on_start = hook
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.serve)
        with anyio.fail_after(15):
            await daemon.started.wait()
        await finished.wait_for(sends)
        assert daemon.server is not None
        yield daemon, daemon.server.url
        daemon.stop()


@pytest.fixture
async def flows_stack(tmp_path: Path) -> AsyncIterator[EmulatorStack]:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS) as stack:
        yield stack


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def live_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            for suffix in ("_bucket", "_sum", "_count", "_created"):
                if name.endswith(suffix) and not name.endswith("_total_created"):
                    name = name.removesuffix(suffix)
            names.add(name.removesuffix("_created") if name.endswith("_total_created") else name)
    return names


async def test_metrics_are_all_there_with_sensible_values_and_pass_promtool(flows_stack: EmulatorStack) -> None:
    promtool = require_tool("promtool")
    async with running_daemon(flows_stack, sends=3) as (_, url):
        status, content_type, text = await get(f"{url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    names = live_names(text)
    missing = sorted(PUBLIC_METRICS - names)
    assert not missing, f"not in /metrics: {missing}"
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert values[("senderd_sends_total", (("flow", "ts"), ("outcome", "success")))] >= 3
    assert values[("senderd_sends_total", (("flow", "failing"), ("outcome", "http_error")))] == 0
    assert values[("senderd_inflight_sends", ())] >= 0
    assert values[("senderd_flow_interval_seconds", (("flow", "ts"),))] == 0.2
    assert values[("senderd_token_fetches_total", (("credentials", "default"), ("result", "success")))] == 1
    token_expiry = values[("senderd_token_expiry_timestamp_seconds", (("credentials", "default"),))]
    cert_expiry = values[("senderd_client_certificate_expiry_timestamp_seconds", (("credentials", "default"),))]
    assert 3500 < token_expiry - values[("senderd_last_success_timestamp_seconds", (("flow", "ts"),))] <= 3600
    assert cert_expiry > token_expiry + 300 * 86400  # the emulator's client certificate lives a year
    result = await anyio.run_process([promtool, "check", "metrics"], input=text.encode(), check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    # that the dashboard's and the alerts' metrics are all exported: test_live_metrics (relay, forwarder and
    # confirmations on)


async def test_health_readiness_and_probe(flows_stack: EmulatorStack) -> None:
    async with running_daemon(flows_stack) as (_, url):
        assert (await get(f"{url}/healthz"))[0] == 200
        status, _, body = await get(f"{url}/readyz")
        assert status == 200
        assert json.loads(body) == {
            "ready": True,
            "reason": "ok",
            "credentials": {"default": {"ready": True, "auth": "oauth", "reason": "ok"}},
        }
        status, _, body = await get(f"{url}/probe?flow=orders")
        assert status == 200
        assert "probe_success 1.0" in body
        assert "probe_http_status_code 200.0" in body
        status, _, body = await get(f"{url}/probe?flow=failing")
        assert "probe_success 0.0" in body
        assert "probe_http_status_code 500.0" in body
        assert (await get(f"{url}/probe?flow=nope"))[0] == 400
        assert (await get(f"{url}/probe"))[0] == 400
        fetches_before = flows_stack.token_server.stats.requests
        for _ in range(5):
            await get(f"{url}/probe?flow=ts")
        assert flows_stack.token_server.stats.requests == fetches_before  # the cached token serves probes


async def test_readyz_is_503_with_a_reason_while_no_token_is_held(flows_stack: EmulatorStack) -> None:
    flows_stack.token_server.faults.down = True
    async with running_daemon(flows_stack, sends=0) as (daemon, url):
        assert daemon.engine is not None
        status, _, body = await get(f"{url}/readyz")
        assert status == 503
        expected = ("no valid token yet", f"no valid token: {daemon.engine.tokens.last_error}")
        assert json.loads(body)["reason"] in expected
        fetch_errors = Recorder[TokenError | None]()
        daemon.engine.tokens.listeners.append(lambda _duration, _token, error: fetch_errors(error))
        # the first fetch waits up to token.startup_jitter, then fails
        await fetch_errors.wait_until(lambda errors: any(errors), timeout=10)
        status, _, body = await get(f"{url}/readyz")
        assert status == 503
        reason = json.loads(body)
        assert reason["ready"] is False
        assert "no valid token" in reason["reason"] and "server error (503)" in reason["reason"]
        assert (await get(f"{url}/healthz"))[0] == 200  # alive, just not ready


async def test_a_real_prometheus_scrapes_senderd(flows_stack: EmulatorStack, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    async with running_daemon(flows_stack) as (_, url):
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [" + json.dumps(str(Path(__file__).parent.parent / "deploy/prometheus/alerts.yaml")) + "]\n"
            "scrape_configs:\n"
            f"  - job_name: senderd\n    static_configs: [{{targets: ['{url.removeprefix('http://')}']}}]\n"
        )
        process = await anyio.open_process(
            [
                prometheus,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            ]
        )
        async with process:
            try:
                query = f"http://127.0.0.1:{port}/api/v1/query?query="
                found: list[dict[str, object]] = []
                with anyio.fail_after(45):
                    while not found:  # Prometheus is another process: poll its API until the first scrapes land
                        await anyio.sleep(0.5)
                        try:
                            status, _, body = await get(query + 'senderd_sends_total{flow="ts",outcome="success"}')
                        except aiohttp.ClientError:
                            continue
                        if status == 200:
                            found = json.loads(body)["data"]["result"]
                    _, _, up = await get(query + 'up{job="senderd"}')
                    _, _, rules = await get(f"http://127.0.0.1:{port}/api/v1/rules")
            finally:
                process.terminate()
    assert float(found[0]["value"][1]) >= 1  # type: ignore[index]
    assert json.loads(up)["data"]["result"][0]["value"][1] == "1"
    groups = json.loads(rules)["data"]["groups"]
    assert all(rule["health"] == "ok" for group in groups for rule in group["rules"]), groups


async def test_once_pushes_to_a_real_pushgateway(flows_stack: EmulatorStack, tmp_path: Path) -> None:
    pushgateway = require_tool("prometheus-pushgateway")
    port = free_port()
    process = await anyio.open_process(
        [pushgateway, f"--web.listen-address=127.0.0.1:{port}", "--persistence.interval=1h"]
    )
    async with process:
        try:
            await wait_for_port(port)
            code, out, err = await senderd(
                "once", "-c", str(flows_stack.config_path), "--flow", "ts", "--push-gateway", f"http://127.0.0.1:{port}"
            )
            assert code == 0, err
            assert f"pushed metrics to http://127.0.0.1:{port} (job senderd, instance " in out
            _, _, text = await get(f"http://127.0.0.1:{port}/metrics")
        finally:
            process.terminate()
    pushed = [line for line in text.splitlines() if line.startswith("senderd_sends_total{")]
    assert any(
        'flow="ts"' in line
        and 'job="senderd"' in line
        and 'outcome="success"' in line
        and 'instance="' in line
        and line.endswith(" 1")
        for line in pushed
    ), pushed


async def test_push_failure_is_exit_1_with_one_line(flows_stack: EmulatorStack) -> None:
    code, _, err = await senderd(
        "once", "-c", str(flows_stack.config_path), "--flow", "ts", "--push-gateway", f"http://127.0.0.1:{free_port()}"
    )
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("senderd: error: push to gateway http://127.0.0.1:")
    assert "Traceback" not in err  # above it: the JSON log lines of the run itself
