"""Metrics, health, readiness and probe endpoints of a running daemon, checked with the real tools:
promtool, a Prometheus server scraping senderd, and a Pushgateway receiving `senderd once`."""

from __future__ import annotations

import json
import time
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
from tests.deploy_names import ONCE_METRICS, PUBLIC_METRICS
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
        assert json.loads(body) == {  # no relay, no forwarder: ready once started
            "ready": True,
            "reason": "ok",
            "checks": {"daemon": {"ready": True, "reason": "ok"}},
        }
        status, _, body = await get(f"{url}/readyz/token")
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


async def test_readyz_token_is_503_with_a_reason_while_no_token_is_held(flows_stack: EmulatorStack) -> None:
    flows_stack.token_server.faults.down = True
    async with running_daemon(flows_stack, sends=0) as (daemon, url):
        assert daemon.engine is not None
        assert (await get(f"{url}/readyz"))[0] == 200  # ready all the same: the token is /readyz/token's question
        status, _, body = await get(f"{url}/readyz/token")
        assert status == 503
        expected = ("no valid token yet", f"no valid token: {daemon.engine.tokens.last_error}")
        assert json.loads(body)["reason"] in expected
        fetch_errors = Recorder[TokenError | None]()
        daemon.engine.tokens.listeners.append(lambda _duration, _token, error: fetch_errors(error))
        # the first fetch waits up to token.startup_jitter, then fails
        await fetch_errors.wait_until(lambda errors: any(errors), timeout=10)
        status, _, body = await get(f"{url}/readyz/token")
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


@asynccontextmanager
async def pushgateway() -> AsyncIterator[str]:
    """A real Pushgateway on 127.0.0.1 for the block; yields its URL."""
    program = require_tool("prometheus-pushgateway")
    port = free_port()
    # in memory only: Debian's build persists to /var/lib/prometheus/pushgateway.data, shared by every run
    process = await anyio.open_process([program, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="])
    async with process:
        try:
            await wait_for_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()


async def pushed_groups(gateway: str) -> list[dict[str, str]]:
    """The grouping keys of every group the gateway holds (its API v1)."""
    _, _, body = await get(f"{gateway}/api/v1/metrics")
    return [group["labels"] for group in json.loads(body)["data"]]


def pushed_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the pushed sample `name` whose labels include `labels` (None when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


async def test_once_pushes_to_one_stable_group_with_the_run_verdict(flows_stack: EmulatorStack) -> None:
    config = str(flows_stack.config_path)
    async with pushgateway() as gateway:
        before = time.time()
        code, out, err = await senderd("once", "-c", config, "--flow", "ts", "--push-gateway", gateway)
        after = time.time()
        assert code == 0, err
        assert f"pushed metrics to {gateway} (job senderd, instance default)" in out
        _, _, first = await get(f"{gateway}/metrics")
        code, out, err = await senderd("once", "-c", config, "--flow", "failing", "--push-gateway", gateway)
        assert code == 1, err
        assert "0 passed, 1 failed" in out
        _, _, second = await get(f"{gateway}/metrics")
        groups = await pushed_groups(gateway)
    group = {"job": "senderd", "instance": "default"}
    assert groups == [group]  # the second run replaced the first one's group: none left behind
    assert pushed_value(first, "senderd_sends_total", flow="ts", outcome="success", **group) == 1
    assert all(pushed_value(first, name, **group) is not None for name in ONCE_METRICS)
    assert pushed_value(first, "senderd_once_last_run_success", **group) == 1
    stamp = pushed_value(first, "senderd_once_last_run_timestamp_seconds", **group)
    assert stamp is not None and before <= stamp <= after
    assert pushed_value(first, "senderd_credentials_ready", credentials="default", **group) == 1
    assert pushed_value(second, "senderd_once_last_run_success", **group) == 0
    assert pushed_value(second, "senderd_sends_total", flow="ts", outcome="success", **group) is None  # replaced
    second_stamp = pushed_value(second, "senderd_once_last_run_timestamp_seconds", **group)
    assert second_stamp is not None and second_stamp > stamp


async def test_push_instance_comes_from_the_config_or_the_command_line(flows_stack: EmulatorStack) -> None:
    config = flows_stack.config_path.with_name("poller.toml")
    config.write_text(flows_stack.config_path.read_text() + '\n[push]\njob = "pollers"\ninstance = "orders"\n')
    async with pushgateway() as gateway:
        code, out, err = await senderd("once", "-c", str(config), "--flow", "ts", "--push-gateway", gateway)
        assert code == 0, err
        assert "(job pollers, instance orders)" in out
        code, out, err = await senderd(
            "once", "-c", str(config), "--flow", "ts", "--push-gateway", gateway, "--push-instance", "eu10"
        )
        assert code == 0, err
        groups = await pushed_groups(gateway)
    assert sorted(g["instance"] for g in groups) == ["eu10", "orders"]
    assert {g["job"] for g in groups} == {"pollers"}


async def test_a_failed_push_prints_the_summary_and_exits_3(flows_stack: EmulatorStack) -> None:
    gateway, config = f"http://127.0.0.1:{free_port()}", str(flows_stack.config_path)  # nobody listens there
    code, out, err = await senderd("once", "-c", config, "--flow", "ts", "--push-gateway", gateway)
    assert code == 3
    lines = out.splitlines()
    assert lines[0].split() == ["flow", "outcome", "status", "attempts", "latency", "mpl", "id"]
    assert lines[1].split()[:3] == ["ts", "success", "200"]
    assert lines[-1] == "1 passed, 0 failed"
    assert err.strip().splitlines()[-1].startswith(f"senderd: error: push to gateway {gateway} failed (")
    assert "Traceback" not in err  # above it: the JSON log lines of the run itself
    # a failed flow keeps its own code: with the push lost, the exit code is the run's only verdict
    code, out, _ = await senderd("once", "-c", config, "--flow", "failing", "--push-gateway", gateway)
    assert code == 1
    assert out.splitlines()[-1] == "0 passed, 1 failed"
