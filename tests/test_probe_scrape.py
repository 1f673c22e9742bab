"""The shipped uptime probe, scraped by a real Prometheus with the shipped scrape jobs: the ConfigMap's
senderd.toml (its key and listen address swapped for the emulator's) and deploy/prometheus/probe-scrape.yml
(the Service address swapped for the daemon's, the intervals shortened), so the multi-target relabeling is
checked by Prometheus itself, not by reading the YAML."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import yaml

from senderd.config import config_from_dict
from senderd.daemon import Daemon
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from tests.deploy_names import ALERTS, ROOT
from tests.tools import free_port, require_tool, serving

pytestmark = pytest.mark.anyio

PROBE_SCRAPE = ROOT / "deploy" / "prometheus" / "probe-scrape.yml"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "uptime-probe" / "configmap.yaml"
SERVICE_ADDRESS = "senderd-uptime-probe.senderd-uptime.svc:9464"


def probe_config(stack: EmulatorStack) -> dict[str, Any]:
    """The ConfigMap's senderd.toml with the emulator's key and CA, listening on a free local port."""
    config = tomllib.loads(yaml.safe_load(CONFIGMAP.read_text(encoding="utf-8"))["data"]["senderd.toml"])
    config["credentials"] = {"service_key": str(stack.service_key_path), "ca_file": str(stack.ca_path)}
    config["server"]["listen"] = "127.0.0.1:0"
    return config


def prometheus_config(address: str) -> str:
    """probe-scrape.yml aimed at `address`, every job scraped each second."""
    text = PROBE_SCRAPE.read_text(encoding="utf-8")
    assert text.count(SERVICE_ADDRESS) == 2, "both jobs name the Service"
    config = yaml.safe_load(text.replace(SERVICE_ADDRESS, address))
    for job in config["scrape_configs"]:
        job["scrape_interval"] = job["scrape_timeout"] = "1s"
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    return yaml.safe_dump(config)


async def query(http: aiohttp.ClientSession, api: str, promql: str) -> list[dict[str, Any]]:
    async with http.get(f"{api}/query", params={"query": promql}) as answer:
        body = await answer.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_probes_each_flow_marked_probe_with_the_shipped_scrape_jobs(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    async with EmulatorStack.started(tmp_path / "emu") as stack:
        stack.runtime.add_flow(FlowSpec("/orders/health", error_rate=1.0))  # probed, and failing
        stack.runtime.add_flow(FlowSpec("/heartbeat"))
        daemon = Daemon.create(config_from_dict(probe_config(stack), source="configmap.yaml"), handle_signals=False)
        async with serving(daemon):
            assert daemon.server is not None
            config = tmp_path / "prometheus.yml"
            config.write_text(prometheus_config(daemon.server.url.removeprefix("http://")), encoding="utf-8")
            port = free_port()
            command = [
                prometheus,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            ]
            api = f"http://127.0.0.1:{port}/api/v1"
            async with await anyio.open_process(command) as process, aiohttp.ClientSession() as http:
                try:
                    probes: list[dict[str, Any]] = []
                    interval: list[dict[str, Any]] = []
                    with anyio.fail_after(45):
                        # another process: poll its API until both flows were probed and /metrics scraped
                        while len(probes) < 2 or not interval:
                            await anyio.sleep(0.5)
                            try:
                                probes = await query(http, api, 'probe_success{job="senderd-probe"}')
                                interval = await query(http, api, "senderd_flow_interval_seconds")
                            except aiohttp.ClientError:
                                continue
                    up = await query(http, api, "up")
                    async with http.get(f"{api}/rules") as answer:
                        groups = (await answer.json())["data"]["groups"]
                finally:
                    process.terminate()
            registry = daemon.engine.metrics.registry if daemon.engine else None
            assert registry is not None
            probe_sends = {
                flow: registry.get_sample_value("senderd_probe_sends_total", {"flow": flow, "outcome": outcome})
                for flow, outcome in (("timestamp", "success"), ("orders-health", "http_error"))
            }
    verdicts = {(p["metric"]["instance"], p["metric"]["flow"], p["metric"]["job"]): p["value"][1] for p in probes}
    assert verdicts == {
        ("timestamp", "timestamp", "senderd-probe"): "1",
        ("orders-health", "orders-health", "senderd-probe"): "0",
    }
    assert {u["metric"]["job"]: u["value"][1] for u in up} == {"senderd-probe": "1", "senderd-uptime-probe": "1"}
    assert [(i["metric"]["flow"], i["value"][1]) for i in interval] == [("heartbeat", "60")]  # not probed
    assert all(count and count >= 1 for count in probe_sends.values()), probe_sends
    assert all(rule["health"] == "ok" for group in groups for rule in group["rules"]), json.dumps(groups)
