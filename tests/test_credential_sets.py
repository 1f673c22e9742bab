"""Several credentials sets in one daemon (tenants dev and prod, each with its own CA, token server and
runtime): each set is isolated, so one set's token server being down or hanging delays no other set."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from senderd.config import config_from_dict
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.errors import ConfigError
from senderd.metrics import Metrics
from tests.tools import serving

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two_tenants(tmp_path: Path, lifetime: float = 3600) -> AsyncIterator[dict[str, EmulatorStack]]:
    async with AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(EmulatorStack.started(tmp_path / name, token_lifetime=lifetime))
            for name in ("dev", "prod")
        }


def two_set_config(
    tenants: dict[str, EmulatorStack], flows: list[dict[str, Any]], **extra: object
) -> dict[str, object]:
    return {
        "credentials": {
            name: {"service_key": str(s.service_key_path), "ca_file": str(s.ca_path)} for name, s in tenants.items()
        },
        "server": {"listen": "127.0.0.1:0"},
        "token": {"startup_jitter": "0s", "timeout": "60s"},
        "pool": {"workers": 2},
        "flows": flows,
        **extra,
    }


async def test_each_flow_sends_with_its_own_set_to_its_own_tenant(tmp_path: Path) -> None:
    async with two_tenants(tmp_path) as tenants:
        flows = [{"name": f"{tenant}-ts", "path": "/http/GetTimestamp", "credentials": tenant} for tenant in tenants]
        config = config_from_dict(two_set_config(tenants, flows), source="test.toml")
        daemon = Daemon.create(config, handle_signals=False, metrics=Metrics(process=False))
        async with anyio.create_task_group() as group:
            group.start_soon(daemon.serve)
            await daemon.started.wait()
            assert daemon.engine is not None
            results = await daemon.engine.run_once(config.flows)
            assert daemon.server is not None
            async with aiohttp.ClientSession() as session, session.get(f"{daemon.server.url}/readyz/token") as answer:
                readiness = json.loads(await answer.text())
            daemon.stop()
    assert [r.ok for r in results] == [True, True]
    for tenant in tenants.values():
        assert tenant.runtime.stats.by_status[200] == 1  # dev to dev's runtime, prod to prod's
        assert tenant.token_server.stats.issued == 1
    assert set(readiness["credentials"]) == {"dev", "prod"} and readiness["ready"] is True


@pytest.mark.parametrize("fault", ["down", "hanging"])
async def test_one_sets_token_server_failing_delays_no_other_set(tmp_path: Path, fault: str) -> None:
    async with two_tenants(tmp_path, lifetime=3) as tenants:
        if fault == "down":
            tenants["dev"].token_server.faults.down = True
        else:
            tenants["dev"].token_server.faults.delay = 300  # takes the request, never answers in time
        flows = [
            {"name": f"dev-{n}", "path": "/http/GetTimestamp", "credentials": "dev", "every": "200ms",
             "start": "now", "retries": 0}
            for n in range(3)
        ] + [{"name": "prod-ts", "path": "/http/GetTimestamp", "credentials": "prod", "every": "200ms",
              "start": "now", "retries": 0}]  # fmt: skip
        config = config_from_dict(two_set_config(tenants, flows), source="test.toml")
        metrics = Metrics(process=False)
        daemon = Daemon.create(config, handle_signals=False, metrics=metrics)
        async with serving(daemon) as sends:
            await anyio.sleep(7)  # the span under test: more than two of prod's token lifetimes (3 s, refreshed at 2 s)
    prod = [r for r in sends.items if r.flow == "prod-ts"]
    assert len(prod) >= 30, f"prod sent {len(prod)} times in 7 s at 200 ms"
    assert all(r.ok for r in prod), [(r.outcome, r.last.error) for r in prod if not r.ok]
    lag = metrics.registry.get_sample_value("senderd_schedule_lag_seconds_sum", {"flow": "prod-ts"}) or 0.0
    count = metrics.registry.get_sample_value("senderd_schedule_lag_seconds_count", {"flow": "prod-ts"}) or 1.0
    assert lag / count < 0.05  # on time: dev's stuck sends hold none of prod's workers
    assert tenants["prod"].token_server.stats.issued >= 3  # prod's refreshes went on
    assert tenants["dev"].runtime.stats.requests == 0
    assert all(not r.ok for r in sends.items if r.flow.startswith("dev"))


def test_several_sets_need_each_flow_to_name_one() -> None:
    sets = {"dev": {"service_key": "a.json"}, "prod": {"service_key": "b.json"}}
    with pytest.raises(ConfigError, match=r"flows\[0\]\.credentials: there are several credentials sets \(dev, prod\)"):
        config_from_dict({"credentials": sets, "flows": [{"name": "x", "path": "/http/X"}]}, source="t.toml")
    with pytest.raises(ConfigError, match=r"flows\[0\]\.credentials: no credentials set named 'stage'"):
        config_from_dict(
            {"credentials": sets, "flows": [{"name": "x", "path": "/http/X", "credentials": "stage"}]}, source="t.toml"
        )
    with pytest.raises(ConfigError, match=r"\[credentials\] keys \(ca_file\) beside \[credentials.NAME\] tables"):
        config_from_dict({"credentials": {"ca_file": "ca.pem", "prod": {"service_key": "b.json"}}}, source="t.toml")
    config = config_from_dict(
        {"credentials": sets, "defaults": {"credentials": "prod"}, "flows": [{"name": "x", "path": "/http/X"}]},
        source="t.toml",
    )
    assert config.set_of(config.flows[0]) == "prod"
