"""`/probe` is a real send: only for flows marked `probe = true`, within the scrape's timeout, never beside
a send of the same flow, counted apart, and behind `server.token_env`'s bearer token when one is set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest

from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack

pytestmark = pytest.mark.anyio

FLOWS = (
    '[server]\nlisten = "127.0.0.1:0"\ntoken_env = "SENDERD_TEST_SCRAPE_TOKEN"\n'
    '[[flows]]\nname = "probed"\npath = "/http/GetTimestamp"\nprobe = true\n'
    '[[flows]]\nname = "slow"\npath = "/http/Slow"\nprobe = true\ntimeout = "30s"\nretries = 0\n'
    '[[flows]]\nname = "orders"\npath = "/http/Orders"\nmethod = "POST"\ncsrf = true\nbody = "<o/>"\n'
)
TOKEN = "scrape-token-value-1"


@asynccontextmanager
async def probing_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[EmulatorStack, str]]:
    monkeypatch.setenv("SENDERD_TEST_SCRAPE_TOKEN", TOKEN)
    async with EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS) as stack:
        text = stack.config_path.read_text().replace(
            '[server]\nlisten = "127.0.0.1:0"   # a free port; senderd logs the one it got\n', ""
        )
        stack.config_path.write_text(text)
        stack.runtime.add_flow(FlowSpec("/Slow", latency=3.0, body="late"))
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        async with anyio.create_task_group() as group:
            group.start_soon(daemon.serve)
            await daemon.started.wait()
            assert daemon.server is not None
            yield stack, daemon.server.url
            daemon.stop()


async def get(url: str, token: str | None = TOKEN, scheme: str = "Bearer", **headers: str) -> tuple[int, str]:
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.text()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the answer")


async def test_only_flows_marked_probe_can_be_probed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with probing_daemon(tmp_path, monkeypatch) as (stack, url):
        status, body = await get(f"{url}/probe?flow=orders")
        assert status == 403 and "not marked probe = true" in body
        assert stack.runtime.stats.requests == 0  # nothing was posted to the iFlow
        status, body = await get(f"{url}/probe?flow=probed")
        assert status == 200 and sample(body, "probe_success") == 1.0


async def test_probe_sends_are_counted_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with probing_daemon(tmp_path, monkeypatch) as (_, url):
        await get(f"{url}/probe?flow=probed")
        _, metrics = await get(f"{url}/metrics")
    assert 'senderd_probe_sends_total{flow="probed",outcome="success"} 1.0' in metrics
    assert 'senderd_sends_total{flow="probed",outcome="success"} 0.0' in metrics


async def test_the_scrape_timeout_bounds_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with probing_daemon(tmp_path, monkeypatch) as (_, url):
        with anyio.fail_after(2.5):  # the flow answers after 3 s; its own timeout would wait 30 s
            status, body = await get(f"{url}/probe?flow=slow", **{"X-Prometheus-Scrape-Timeout-Seconds": "1"})
    assert status == 200
    assert sample(body, "probe_success") == 0.0
    assert sample(body, "probe_duration_seconds") < 1.0


async def test_a_flow_is_never_probed_beside_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with probing_daemon(tmp_path, monkeypatch) as (stack, url), anyio.create_task_group() as group:
        group.start_soon(get, f"{url}/probe?flow=slow")
        await stack.runtime.wait_for_requests(1)  # the first probe's send is on the wire
        status, body = await get(f"{url}/probe?flow=slow")
        group.cancel_scope.cancel()
    assert status == 429 and "overlap" in body
    assert stack.runtime.stats.requests == 1


async def test_metrics_and_probe_take_the_bearer_token_and_health_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with probing_daemon(tmp_path, monkeypatch) as (stack, url):
        for path in ("/metrics", "/probe?flow=probed"):
            assert (await get(url + path, token=None))[0] == 401
            assert (await get(url + path, token="wrong"))[0] == 401
        assert (await get(f"{url}/metrics", scheme="bearer"))[0] == 200  # RFC 6750: the scheme is case-blind
        assert (await get(f"{url}/healthz", token=None))[0] == 200
        assert stack.runtime.stats.requests == 0  # no unauthorised probe reached the iFlow
