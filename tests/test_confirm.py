"""Delivery confirmation through the Message Processing Log API (issue 13, part 2), against the emulator's
API host: COMPLETED confirms, a flow that fails inside is `flow_failed`, what has no final status in time is
`unconfirmed`; one shared poller paced below the limit per user; hostile answers; and the verdict in `once`,
`/probe` and the relay."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from senderd.clock import Clock
from senderd.config import config_from_dict, load_config
from senderd.daemon import Daemon
from senderd.emulator.mpl import MplStatus
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.metrics import CONFIRMATION_STATUSES, Metrics
from senderd.result import SendResult
from senderd.testing import StepClock
from tests.conftest import CapturedLogs
from tests.deploy_names import CONFIRMATION_METRICS
from tests.tools import senderd, serving

pytestmark = pytest.mark.anyio

TS = {"name": "ts", "path": "/http/GetTimestamp"}
ERROR_TEXT = "com.sap.it.rt.adapter.http.api.exception.HttpResponseException: no field 'Id'\n\tat step 3"


def inside(status: MplStatus = "FAILED", address: str = "/Inside") -> FlowSpec:
    """A flow that answers 200 at once and fails later, inside (the case an HTTP check misses)."""
    flow = FlowSpec(address, methods=frozenset({"GET", "POST"}), body="accepted")
    flow.mpl_status, flow.error_text = status, ERROR_TEXT
    return flow


@asynccontextmanager
async def confirming(stack: EmulatorStack, *flows: dict[str, Any], clock: Clock | None = None) -> AsyncIterator[Engine]:
    """An engine sending with the Certificate key and confirming with the tenant's plan-api key."""
    tenant = stack.tenant
    config = config_from_dict(
        {
            "credentials": {
                "send": {"service_key": str(stack.service_key_path), "ca_file": str(stack.ca_path)},
                "mpl": {"service_key": str(tenant.key_path("api")), "ca_file": str(stack.ca_path)},
            },
            "defaults": {"confirm": "mpl", "confirm_credentials": "mpl", "retries": 0},
            "flows": list(flows),
        },
        source="test.toml",
    )
    stepping = isinstance(clock, StepClock)
    async with Engine.open(config, metrics=Metrics(process=False), clock=clock, refresh=not stepping) as engine:
        yield engine


@pytest.fixture
async def stepped(tmp_path: Path) -> AsyncIterator[tuple[EmulatorStack, StepClock]]:
    """An emulator on a step clock's time: waits (the poller's backoff, PROCESSING) pass without sleeping."""
    clock = StepClock()
    async with EmulatorStack.started(tmp_path / "emu", now=clock.time) as stack:
        yield stack, clock


def sample(engine: Engine, name: str, labels: dict[str, str]) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def events(logs: CapturedLogs, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, logs.text.splitlines()) if e.get("event") == name]


async def test_a_completed_log_confirms_the_send(stack: EmulatorStack, logs: CapturedLogs) -> None:
    async with confirming(stack, TS) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.ok, result.last.error
    assert result.confirmation is not None
    assert (result.confirmation.status, result.confirmation.mpl_status) == ("completed", "COMPLETED")
    assert result.confirmation.mpl_id == result.mpl_id == stack.runtime.stats.messages[0].mpl_id
    assert stack.tenant.mpl_api.stats.paths == [f"/api/v1/MessageProcessingLogs('{result.mpl_id}')?$format=json"]
    assert sample(engine, "senderd_confirmations_total", {"flow": "ts", "status": "completed"}) == 1
    assert sample(engine, "senderd_confirmation_duration_seconds_count", {"flow": "ts"}) == 1
    assert sample(engine, "senderd_sends_total", {"flow": "ts", "outcome": "success"}) == 1
    (finished,) = events(logs, "send_finished")
    assert (finished["confirmation"], finished["mpl_status"]) == ("completed", "COMPLETED")
    assert finished["sap_messageprocessinglogid"] == result.mpl_id


@pytest.mark.parametrize("status", ["FAILED", "ESCALATED", "CANCELLED"])
async def test_a_flow_that_fails_inside_is_flow_failed_with_its_error_text(
    stack: EmulatorStack, status: MplStatus, logs: CapturedLogs
) -> None:
    stack.runtime.add_flow(inside(status))
    async with confirming(stack, {"name": "inside", "path": "/http/Inside"}) as engine:
        result = await engine.send(engine.config.flow("inside"))
    assert result.status == 200  # what an HTTP check sees
    assert result.outcome == "flow_failed"
    assert result.last.error == (
        f"the runtime accepted the message, but its processing log (MPL {result.mpl_id}) says {status}: "
        "com.sap.it.rt.adapter.http.api.exception.HttpResponseException: no field 'Id' at step 3"
    )
    assert sample(engine, "senderd_sends_total", {"flow": "inside", "outcome": "flow_failed"}) == 1
    labels = {"flow": "inside", "status": status.lower()}
    assert sample(engine, "senderd_confirmations_total", labels) == 1
    (finished,) = events(logs, "send_finished")
    assert finished["outcome"] == "flow_failed"
    assert finished["level"] == "warning"


async def test_an_asynchronous_flow_is_confirmed_once_its_log_completes(
    stepped: tuple[EmulatorStack, StepClock],
) -> None:
    stack, clock = stepped
    flow = {"name": "async", "path": "/http/Async", "method": "POST", "body": "<o/>"}
    async with confirming(stack, flow, clock=clock) as engine:
        result = await engine.send(engine.config.flow("async"))
    assert result.status == 202
    assert result.ok, result.last.error
    confirmation = result.confirmation
    assert confirmation is not None
    assert confirmation.mpl_status == "COMPLETED"
    assert confirmation.duration >= 3.0  # PROCESSING for 3 s, then COMPLETED
    assert 2 <= confirmation.lookups <= 5  # backoff, not a busy loop


@pytest.mark.parametrize("case", ["processing", "not_found", "api_down"])
async def test_no_final_status_within_the_timeout_is_unconfirmed(
    stepped: tuple[EmulatorStack, StepClock], case: str
) -> None:
    stack, clock = stepped
    stack.runtime.add_flow(FlowSpec("/Slowly", kind="async", status=202, processing_time=600))
    if case == "not_found":
        stack.tenant.mpl_api.faults.visible_after = 600
    if case == "api_down":
        stack.tenant.mpl_api.faults.down = True
    flow = {"name": "slow", "path": "/http/Slowly", "confirm_timeout": "10s"}
    async with confirming(stack, flow, clock=clock) as engine:
        started = clock.monotonic()
        result = await engine.send(engine.config.flow("slow"))
        waited = clock.monotonic() - started
    assert result.outcome == "unconfirmed"
    assert result.confirmation is not None
    assert 10.0 <= waited < 11.0
    assert result.confirmation.lookups <= 8
    expected = {
        "processing": ("pending", f"not confirmed within 10s: the processing log (MPL {result.mpl_id}) still said "
                       "PROCESSING"),
        "not_found": ("not_found", "not confirmed within 10s: no processing log was found for the message"),
        "api_down": ("api_error", "not confirmed: the MPL API answered HTTP 503"),
    }[case]  # fmt: skip
    assert (result.confirmation.status, result.last.error) == expected
    assert sample(engine, "senderd_confirmations_total", {"flow": "slow", "status": expected[0]}) == 1


async def test_a_probe_deadline_bounds_the_confirmation(stepped: tuple[EmulatorStack, StepClock]) -> None:
    stack, clock = stepped
    stack.runtime.add_flow(FlowSpec("/Slowly", kind="async", status=202, processing_time=600))
    async with confirming(stack, {"name": "slow", "path": "/http/Slowly"}, clock=clock) as engine:
        started = clock.monotonic()
        result = await engine.send(engine.config.flow("slow"), deadline=2.0)
    assert result.outcome == "unconfirmed"
    assert clock.monotonic() - started <= 2.5  # not the 2 minutes of confirm_timeout


async def test_found_by_its_application_id_when_the_answer_names_no_mpl_id(stack: EmulatorStack) -> None:
    stack.runtime.correlation_headers = False  # a flow whose script strips the SAP_* answer headers
    async with confirming(stack, TS) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.ok, result.last.error
    (message,) = stack.runtime.stats.messages
    assert result.message_id is not None  # a confirmed GET gets an SAP_ApplicationID to be found by
    assert message.headers["sap_applicationid"] == result.message_id
    assert result.mpl_id == message.mpl_id  # found through the API
    assert stack.tenant.mpl_api.stats.paths == [
        "/api/v1/MessageProcessingLogs?$filter=ApplicationMessageId%20eq%20"
        f"'{result.message_id}'%20and%20Status%20ne%20'DISCARDED'&$orderby=LogStart%20desc&$top=1&$format=json"
    ]


async def test_nothing_to_look_a_message_up_by_is_unconfirmed_at_once(stack: EmulatorStack) -> None:
    stack.runtime.correlation_headers = False
    async with confirming(stack, {**TS, "application_id": False}) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.outcome == "unconfirmed"
    assert result.last.error == (
        "not confirmed: the answer named no MPL id and the message had no SAP_ApplicationID to look it up by"
    )
    assert stack.tenant.mpl_api.stats.requests == 0


async def test_a_key_of_the_wrong_plan_is_named_at_once(stack: EmulatorStack, logs: CapturedLogs) -> None:
    tenant = stack.tenant
    send_key = json.loads(tenant.key_path("clientsecret").read_text())
    tenant.key_path("api").write_text(json.dumps(send_key))  # a plan integration-flow key: the runtime's url
    async with confirming(stack, TS) as engine:
        wrong_host = await engine.send(engine.config.flow("ts"))
    assert wrong_host.outcome == "unconfirmed"
    assert wrong_host.last.error == (
        f"not confirmed: {tenant.runtime.url} has no Message Processing Log API (HTTP 404 without an OData error): "
        "credentials set 'mpl' needs a key of plan api, whose url is the tenant's host without -rt"
    )
    assert any("plan integration-flow" in e["note"] for e in events(logs, "credentials_note"))
    send_key["oauth"]["url"] = tenant.api_url  # the API host, but a key without MonitoringDataRead
    tenant.key_path("api").write_text(json.dumps(send_key))
    async with confirming(stack, TS) as engine:
        no_role = await engine.send(engine.config.flow("ts"))
    assert no_role.last.error == (
        "not confirmed: the MPL API refused credentials set 'mpl' (HTTP 403): its key needs plan api and the role "
        "MonitoringDataRead; role changes take up to an hour to apply"
    )
    assert tenant.mpl_api.stats.requests == 1  # no point in asking again


async def test_one_poller_for_every_send_paced_below_the_limit_per_user(stack: EmulatorStack) -> None:
    """On the real clock (pacing is about when requests arrive): 30 sends confirmed at once, paced at 20/s by
    the one poller, against an API that allows 30/s here."""
    api = stack.tenant.mpl_api
    api.rate_limit = 30
    results: list[SendResult] = []
    async with confirming(stack, TS) as engine:
        poller = engine.confirmers["mpl"]
        poller.rate = 20.0
        first = await engine.send(engine.config.flow("ts"))  # the tokens are fetched: what follows is pacing
        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            for _ in range(30):
                group.start_soon(lambda: _append(results, engine.send(engine.config.flow("ts"))))
        took = anyio.current_time() - started
    assert first.ok
    assert [r.outcome for r in results] == ["success"] * 30
    assert api.stats.rate_limited == 0
    assert poller.requests == api.stats.requests == 31  # one lookup each: no loop per send
    assert took >= 29 / 20 - 0.05  # 30 lookups, 1/20 s apart


async def _append(results: list[SendResult], send: Any) -> None:
    results.append(await send)


async def test_a_429_pauses_the_poller_and_every_send_is_still_confirmed(
    stepped: tuple[EmulatorStack, StepClock], logs: CapturedLogs
) -> None:
    stack, clock = stepped
    api = stack.tenant.mpl_api
    api.rate_limit = 3  # another tool spends this user's budget
    results: list[SendResult] = []
    async with confirming(stack, TS, clock=clock) as engine, anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(lambda: _append(results, engine.send(engine.config.flow("ts"))))
    assert [r.outcome for r in results] == ["success"] * 10
    assert api.stats.rate_limited >= 1
    assert events(logs, "mpl_api_rate_limited")


@pytest.mark.parametrize(
    "answer",
    [
        b"[" * 100_000,
        b"x" * (5 << 20),
        b'{"d": {"Status": 42}}',
        b'{"d": {"Status": "' + b"A" * 1000 + b'"}}',
        b'{"d": []}',
        b"null",
        b'{"d": {"results": "no"}}',
        b'{"d": {"Status": "COMPLETED\\u0000"}}',
    ],
    ids=["deep", "5MB", "number", "long-status", "list", "null", "results-string", "nul-in-status"],
)
async def test_hostile_api_answers_are_failed_lookups_never_a_crash(
    stepped: tuple[EmulatorStack, StepClock], answer: bytes
) -> None:
    stack, clock = stepped
    stack.tenant.mpl_api.faults.answer = answer
    flow = {**TS, "confirm_timeout": "5s"}
    async with confirming(stack, flow, clock=clock) as engine:
        result = await engine.send(engine.config.flow("ts"))
        stack.tenant.mpl_api.faults.answer = None
        after = await engine.send(engine.config.flow("ts"))  # the poller is unharmed
    assert result.outcome == "unconfirmed"
    assert result.last.error == (
        "not confirmed: the MPL API's answer " + ("has no readable Status" if b"Status" in answer else
                                                  "is not the JSON of a message processing log")
    )  # fmt: skip
    assert after.ok


async def test_a_huge_error_text_is_cut_short(stack: EmulatorStack) -> None:
    flow = inside()
    flow.error_text = "E" * 1_000_000
    stack.runtime.add_flow(flow)
    async with confirming(stack, {"name": "inside", "path": "/http/Inside"}) as engine:
        result = await engine.send(engine.config.flow("inside"))
    assert result.outcome == "flow_failed"
    assert result.confirmation is not None and result.confirmation.error == "E" * 500 + "..."


async def test_stopping_ends_the_confirmations_under_way(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Slowly", kind="async", status=202, processing_time=600))
    results: list[SendResult] = []
    async with (
        confirming(stack, {"name": "slow", "path": "/http/Slowly"}) as engine,
        anyio.create_task_group() as group,
    ):
        group.start_soon(lambda: _append(results, engine.send(engine.config.flow("slow"))))
        with anyio.fail_after(10):
            await stack.tenant.mpl_api.wait_for_requests(1)
        engine.stop_waiting()
    (result,) = results
    assert result.outcome == "unconfirmed"
    assert result.last.error == "not confirmed: senderd is stopping"


def test_confirmation_series_exist_at_zero() -> None:
    metrics = Metrics(process=False)
    metrics.declare_flow("uptime", 60.0, confirms=True)
    for status in CONFIRMATION_STATUSES:
        labels = {"flow": "uptime", "status": status}
        assert metrics.registry.get_sample_value("senderd_confirmations_total", labels) == 0
    assert metrics.registry.get_sample_value("senderd_confirmation_duration_seconds_count", {"flow": "uptime"}) == 0


# -- the verdict where users see it -----------------------------------------------------------------------


def config_file(stack: EmulatorStack, extra: str) -> Path:
    """A config in the tenant's folder: two sets (send, and mpl of plan api) and `extra`."""
    path = stack.directory / "confirm.toml"
    path.write_text(
        '[credentials.send]\nservice_key = "service-key.json"\nca_file = "ca.pem"\n'
        '[credentials.mpl]\nservice_key = "api-key.json"\nca_file = "ca.pem"\n'
        '[defaults]\nconfirm = "mpl"\nconfirm_credentials = "mpl"\nconfirm_timeout = "20s"\nretries = 0\n' + extra
    )
    return path


FLOWS = (
    '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nprobe = true\n'
    '[[flows]]\nname = "inside"\npath = "/http/Inside"\nprobe = true\n'
)


async def test_once_reports_the_confirmed_verdict(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(inside())
    code, out, err = await senderd("once", "-c", str(config_file(stack, FLOWS)))
    assert code == 1, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert rows["ts"][1:3] == ["success", "200"]
    assert rows["inside"][1:3] == ["flow_failed", "200"]
    assert "inside: the runtime accepted the message, but its processing log (MPL " in err
    assert "1 passed, 1 failed" in out


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon.create(load_config(path), handle_signals=False)
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.serve)
        with anyio.fail_after(10):
            await daemon.started.wait()
        yield daemon
        daemon.stop()


async def test_probe_reports_the_confirmed_verdict(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(inside())
    path = config_file(stack, '[server]\nlisten = "127.0.0.1:0"\n' + FLOWS)
    async with running(path) as daemon, aiohttp.ClientSession() as http:
        assert daemon.server is not None
        verdicts = {}
        for flow in ("ts", "inside"):
            async with http.get(f"{daemon.server.url}/probe?flow={flow}") as answer:
                text = await answer.text()
            verdicts[flow] = [line for line in text.splitlines() if line.startswith(("probe_success ", "probe_http"))]
        async with http.get(f"{daemon.server.url}/metrics") as answer:
            exposed = await answer.text()
    assert verdicts == {
        "ts": ["probe_success 1.0", "probe_http_status_code 200.0"],
        "inside": ["probe_success 0.0", "probe_http_status_code 200.0"],  # the HTTP answer alone would pass
    }
    for name in CONFIRMATION_METRICS:  # the dashboard's panels have series to show
        assert f"\n{name.removesuffix('_total')}" in exposed
    assert 'senderd_confirmations_total{flow="inside",status="failed"} 1.0' in exposed


async def test_the_relay_marks_a_message_delivered_only_once_confirmed(stack: EmulatorStack, tmp_path: Path) -> None:
    stack.runtime.add_flow(inside())
    relay = f'[relay]\nlisten = "127.0.0.1:0"\nspool_dir = "{tmp_path / "spool"}"\n'
    flows = (
        '[[flows]]\nname = "orders"\npath = "/http/Orders"\nmethod = "POST"\n'
        '[[flows]]\nname = "inside"\npath = "/http/Inside"\nmethod = "POST"\n'
    )
    daemon = Daemon.create(load_config(config_file(stack, relay + flows)), handle_signals=False)
    async with serving(daemon) as deliveries:
        assert daemon.relay is not None
        url = daemon.relay.url
        states = {}
        async with aiohttp.ClientSession() as http:
            for flow in ("orders", "inside"):
                headers = {"Content-Type": "application/xml"}
                async with http.post(f"{url}/v1/flows/{flow}/messages", data=b"<o/>", headers=headers) as answer:
                    assert answer.status == 202
            await deliveries.wait_for(2)
            for result in deliveries.items:
                async with http.get(f"{url}/v1/messages/{result.message_id}") as answer:
                    states[result.flow] = await answer.json()
    assert states["orders"]["status"] == "delivered"
    assert states["inside"]["status"] == "dead"  # accepted with 200, failed inside: kept for a re-drive
    assert "its processing log" in states["inside"]["last_error"]
