"""The three health questions of a sidecar, asked of a running daemon with the relay and the forwarder: alive
(`/healthz`), ready to take requests (`/readyz`, what the sidecar's readiness probe gates on) and holding a
token (`/readyz/token`, `senderd_credentials_ready`). A token-server outage must not make the sidecar unready:
the relay exists to absorb it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from senderd.auth.token import Token
from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.errors import TokenError
from tests.tools import Recorder, serving

pytestmark = pytest.mark.anyio

EXTRA = (
    '[token]\nstartup_jitter = "0s"\nbackoff_initial = "100ms"\nbackoff_max = "200ms"\n'
    '[pool]\ndrain_timeout = "30s"\n'
    '[forward]\nlisten = "127.0.0.1:0"\n'
    '[[flows]]\nname = "orders"\npath = "/http/Orders"\nmethod = "POST"\n'
)


def relay(spool: Path) -> str:
    return f'[relay]\nlisten = "127.0.0.1:0"\nspool_dir = "{spool}"\n'


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
        return response.status, json.loads(text) if response.content_type == "application/json" else text


async def post(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, data=b"<o/>") as response:
        return response.status, await response.json()


async def credentials_ready(url: str) -> float | None:
    """`senderd_credentials_ready{credentials="default"}` from the daemon's /metrics."""
    _, text = await get(f"{url}/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "senderd_credentials_ready" and sample.labels == {"credentials": "default"}:
                return float(sample.value)
    return None


async def test_a_token_outage_keeps_the_sidecar_ready_and_the_relay_taking_posts(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=EXTRA + relay(tmp_path / "spool")) as stack:
        stack.token_server.faults.down = True
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        async with serving(daemon) as deliveries:
            assert daemon.engine is not None and daemon.server is not None and daemon.relay is not None
            url = daemon.server.url
            fetches = Recorder[tuple[Token | None, TokenError | None]]()
            daemon.engine.tokens.listeners.append(lambda _duration, token, error: fetches((token, error)))
            await fetches.wait_until(lambda items: any(error for _, error in items))  # a fetch has failed

            status, ready = await get(f"{url}/readyz")
            assert (status, ready["ready"], ready["reason"]) == (200, True, "ok")
            assert ready["checks"] == {
                "daemon": {"ready": True, "reason": "ok"},
                "relay": {"ready": True, "reason": "ok"},
                "forward": {"ready": True, "reason": "ok"},
            }
            status, answer = await post(f"{daemon.relay.url}/v1/flows/orders/messages")
            assert status == 202  # spooled while no token can be had
            message_id = answer["id"]
            status, token = await get(f"{url}/readyz/token")
            assert status == 503 and token["ready"] is False
            assert token["reason"].startswith("no valid token")
            assert token["credentials"]["default"]["ready"] is False
            assert await credentials_ready(url) == 0
            assert (await get(f"{url}/healthz"))[0] == 200

            stack.token_server.faults.down = False
            await fetches.wait_until(lambda items: any(token for token, _ in items))
            status, token = await get(f"{url}/readyz/token")
            assert (status, token["ready"], token["reason"]) == (200, True, "ok")
            assert await credentials_ready(url) == 1
            await deliveries.wait_until(lambda results: any(r.message_id == message_id and r.ok for r in results))
            assert (await get(f"{url}/readyz"))[0] == 200


async def test_readyz_is_503_once_the_stop_begins_while_healthz_stays_200(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=EXTRA + relay(tmp_path / "spool")) as stack:
        stack.runtime.flows["/orders"].latency = 1.0  # a delivery stays in flight: the drain keeps the daemon up
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        async with anyio.create_task_group() as group:
            group.start_soon(daemon.serve)
            await daemon.started.wait()
            assert daemon.server is not None and daemon.relay is not None
            url = daemon.server.url
            assert (await post(f"{daemon.relay.url}/v1/flows/orders/messages"))[0] == 202
            await stack.runtime.wait_for_requests(1)  # the delivery is under way (the runtime holds it a second)
            daemon.stop()
            status, ready = await get(f"{url}/readyz")
            assert (await get(f"{url}/healthz"))[0] == 200
    assert status == 503 and ready["ready"] is False
    assert ready["reason"] == "daemon: stopping"
    assert ready["checks"]["relay"] == {"ready": False, "reason": "stopping"}
    assert ready["checks"]["forward"] == {"ready": False, "reason": "stopping"}
