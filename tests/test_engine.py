"""One send end to end against the emulated runtime: token, CSRF, retries, checks, classification."""

from __future__ import annotations

import anyio
import pytest

from senderd.client import Client
from senderd.config import config_from_dict
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.testing import StepClock
from tests.tools import engine_for

pytestmark = pytest.mark.anyio


def sample(engine: Engine, name: str, labels: dict[str, str] | None = None) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def test_get_timestamp_like_the_tutorial(stack: EmulatorStack) -> None:
    flow = {"name": "ts", "path": "/http/GetTimestamp", "expect_body": r"Current time \(UTC\): \d{4}-"}
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.ok, result.last.error
    assert result.status == 200
    assert result.body.startswith(b"Current time (UTC): ")
    assert result.correlation_id == stack.runtime.stats.messages[0].mpl_id
    assert sample(engine, "senderd_sends_total", {"flow": "ts", "outcome": "success"}) == 1
    assert sample(engine, "senderd_send_attempts_total", {"flow": "ts", "code": "200"}) == 1
    assert sample(engine, "senderd_last_success_timestamp_seconds", {"flow": "ts"}) > 0


async def test_csrf_fetch_then_post_and_recovery_after_expiry(stack: EmulatorStack) -> None:
    flow = {
        "name": "orders",
        "path": "/http/Orders",
        "method": "POST",
        "csrf": True,
        "body": "<Order/>",
        "content_type": "application/xml",
        "application_id": "auto",
    }
    async with engine_for(stack, flow) as engine:
        first = await engine.send(engine.config.flow("orders"))
        stack.runtime.expire_csrf_tokens()
        second = await engine.send(engine.config.flow("orders"))
    assert first.ok and second.ok, (first.last.error, second.last.error)
    assert second.body == b"<Order/>"
    stats = stack.runtime.stats
    assert stats.csrf_fetches == 2  # the first, and one refetch after the expiry
    assert stats.csrf_rejections == 1
    received = stats.messages[-1]
    assert received.headers["sap_applicationid"] == second.message_id
    assert received.headers["content-type"] == "application/xml"
    assert sample(engine, "senderd_send_attempts_total", {"flow": "orders", "code": "403"}) == 1


async def test_csrf_auto_fetches_only_when_required(stack: EmulatorStack) -> None:
    flow = {"name": "orders", "path": "/http/Orders", "method": "POST", "body": "x"}  # csrf = "auto"
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("orders"))
        again = await engine.send(engine.config.flow("orders"))
    assert result.ok and again.ok
    assert stack.runtime.stats.csrf_rejections == 1  # learnt once, then reused
    assert stack.runtime.stats.csrf_fetches == 1


async def test_503_with_retry_after_is_retried_and_honoured(stack: EmulatorStack) -> None:
    stack.runtime.flows["/flaky"].retry_after = 3
    clock = StepClock()
    async with engine_for(stack, {"name": "flaky", "path": "/http/Flaky"}, clock=clock) as engine:
        result = await engine.send(engine.config.flow("flaky"))
    assert result.ok
    assert result.attempt_codes == ("503", "503", "200")
    assert clock.sleeps == [3.0, 3.0]  # as told by Retry-After, not the backoff


@pytest.mark.parametrize(("setting", "cap"), [({}, 60.0), ({"retry_after_max": "5s"}, 5.0)], ids=["default", "5s"])
async def test_a_runtime_retry_after_is_capped_by_retry_after_max(
    stack: EmulatorStack, setting: dict[str, str], cap: float
) -> None:
    stack.runtime.add_flow(FlowSpec("/Busy", unavailable=1, retry_after=100_000))
    clock = StepClock()
    async with engine_for(stack, {"name": "busy", "path": "/http/Busy", **setting}, clock=clock) as engine:
        result = await engine.send(engine.config.flow("busy"))
    assert result.ok
    assert result.attempt_codes == ("503", "200")
    assert clock.sleeps == [cap]  # not the 100000 s the runtime asked for


@pytest.mark.parametrize(("status", "outcome"), [(400, "http_error"), (500, "http_error"), (404, "http_error")])
async def test_client_and_flow_errors_are_not_retried(stack: EmulatorStack, status: int, outcome: str) -> None:
    if status == 400:
        stack.runtime.add_flow(FlowSpec("/BadRequest", status=400, body="bad"))
        path = "/http/BadRequest"
    else:
        path = "/http/Failing" if status == 500 else "/http/NotDeployed"
    async with engine_for(stack, {"name": "f", "path": path}, clock=StepClock()) as engine:
        result = await engine.send(engine.config.flow("f"))
    assert result.outcome == outcome
    assert result.attempts == 1
    assert result.status == status
    if status == 500:
        assert f"the iFlow failed to process the message (MPL ID {result.mpl_id})" in (result.last.error or "")


async def test_backoff_is_bounded_by_attempts(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Down", unavailable=-1, retry_after=0))
    stack.runtime.flows["/down"].retry_after = 0
    clock = StepClock()
    flow = {"name": "down", "path": "/http/Down", "retries": 4, "retry_after_max": "0s"}
    async with engine_for(stack, flow, clock=clock) as engine:
        result = await engine.send(engine.config.flow("down"))
    assert result.outcome == "http_error"
    assert result.attempts == 5
    assert sample(engine, "senderd_send_attempts_total", {"flow": "down", "code": "503"}) == 5


async def test_timeouts_are_counted_and_retried(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Slow", latency=5.0))
    flow = {"name": "slow", "path": "/http/Slow", "timeout": "200ms", "retries": 1, "backoff_initial": "1ms"}
    async with engine_for(stack, flow) as engine:
        with anyio.fail_after(5):
            result = await engine.send(engine.config.flow("slow"))
    assert result.outcome == "timeout"
    assert result.attempts == 2
    assert sample(engine, "senderd_send_attempts_total", {"flow": "slow", "code": "none"}) == 2
    assert sample(engine, "senderd_sends_total", {"flow": "slow", "outcome": "timeout"}) == 1


async def test_expect_body_mismatch_is_check_failed(stack: EmulatorStack) -> None:
    flow = {"name": "ts", "path": "/http/GetTimestamp", "expect_body": "^Nope"}
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.outcome == "check_failed"
    assert result.attempts == 1


async def test_a_401_invalidates_that_token_and_retries_once(stack: EmulatorStack) -> None:
    async with engine_for(stack, {"name": "ts", "path": "/http/GetTimestamp"}) as engine:
        revoked = await engine.tokens.get()
        assert stack.token_server.revoke_issued() == 1  # valid for an hour, yet the runtime refuses it now
        result = await engine.send(engine.config.flow("ts"))
        assert engine.tokens.current is not revoked
    assert result.ok
    assert result.attempt_codes == ("200",)  # the 401 was handled inside the attempt
    assert stack.runtime.stats.revoked_tokens == 1
    assert stack.token_server.stats.issued == 2  # the refused token and the one fetched after the 401
    assert sample(engine, "senderd_send_attempts_total", {"flow": "ts", "code": "401"}) == 1
    assert (
        sample(
            engine,
            "senderd_auth_failures_total",
            {"credentials": "default", "stage": "runtime", "reason": "unauthorized"},
        )
        == 1
    )


async def test_a_runtime_refusing_every_token_costs_one_refresh_not_one_per_send(stack: EmulatorStack) -> None:
    stack.runtime.refuse_tokens = True
    async with engine_for(stack, {"name": "ts", "path": "/http/GetTimestamp", "retries": 0}) as engine:
        results = [await engine.send(engine.config.flow("ts")) for _ in range(5)]
    assert [r.outcome for r in results] == ["auth_error"] * 5
    assert stack.token_server.stats.issued == 2  # the first token, and one fetched after its 401: no more
    assert (
        sample(
            engine,
            "senderd_auth_failures_total",
            {"credentials": "default", "stage": "runtime", "reason": "unauthorized"},
        )
        == 5
    )
    assert sample(engine, "senderd_send_attempts_total", {"flow": "ts", "code": "401"}) == 6  # 2 + 1 + 1 + 1 + 1


async def test_missing_role_is_auth_error(stack: EmulatorStack) -> None:
    stack.token_server.add_certificate_client(stack.client_id, stack.client.cert, ["it-rt-x!b1.Other"])
    async with engine_for(stack, {"name": "ts", "path": "/http/GetTimestamp"}) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.outcome == "auth_error"
    assert result.status == 403


async def test_token_server_down_is_auth_error_without_runtime_call(stack: EmulatorStack) -> None:
    stack.token_server.faults.down = True
    clock = StepClock()
    async with engine_for(stack, {"name": "ts", "path": "/http/GetTimestamp"}, clock=clock) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.outcome == "auth_error"
    assert "no token" in (result.last.error or "")
    assert result.attempts == 4  # a 5xx from the token server is transient: retried after its backoff
    assert clock.sleeps == [pytest.approx(d, rel=0.11) for d in (1, 2, 4)]
    assert stack.runtime.stats.requests == 0
    assert (
        sample(
            engine,
            "senderd_auth_failures_total",
            {"credentials": "default", "stage": "token", "reason": "server_error"},
        )
        == 4
    )


async def test_runtime_unreachable_is_connection_error(stack: EmulatorStack) -> None:
    flow = {"name": "x", "path": "https://127.0.0.1:1/http/X", "retries": 1, "backoff_initial": "1ms"}
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("x"))
    assert result.outcome == "connection_error"
    assert result.attempts == 2


async def test_library_client_five_lines(stack: EmulatorStack) -> None:
    async with Client.connect(stack.service_key_path, ca_file=stack.ca_path) as client:
        result = await client.send("/http/GetTimestamp", method="GET")
        posted = await client.send("/http/Orders", body="<a/>", csrf=True, content_type="application/xml")
    assert result.status == 200
    assert result.correlation_id
    assert result.body.decode().startswith("Current time (UTC):")
    assert posted.ok
    assert posted.body == b"<a/>"


async def test_a_token_fetch_outlives_the_send_that_started_it(stack: EmulatorStack) -> None:
    stack.token_server.faults.delay = 0.5
    flow = {"name": "ts", "path": "/http/GetTimestamp", "timeout": "100ms", "retries": 0}
    async with engine_for(stack, flow) as engine:
        first = await engine.send(engine.config.flow("ts"))
        stack.token_server.faults.delay = 0
        await engine.tokens.wait_fetch()  # the fetch goes on in the background after the send gave up
        second = await engine.send(engine.config.flow("ts"))
    assert first.outcome == "timeout"
    assert first.duration < 0.4  # the send kept to its own timeout; it did not wait for the slow fetch
    assert second.ok
    assert stack.token_server.stats.requests == 1  # the shared fetch finished and its token was kept


async def test_transient_token_failures_are_retried_after_the_token_backoff(stack: EmulatorStack) -> None:
    stack.token_server.faults.rate_limited = 1
    stack.token_server.faults.retry_after = 2
    clock = StepClock()
    async with engine_for(stack, {"name": "ts", "path": "/http/GetTimestamp"}, clock=clock) as engine:
        result = await engine.send(engine.config.flow("ts"))
    assert result.ok
    assert result.attempt_codes == ("none", "200")
    assert clock.sleeps == [pytest.approx(2.0)]


async def test_the_deadline_gives_up_rather_than_ignore_retry_after(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Busy", unavailable=-1, retry_after=50))
    clock = StepClock()
    flow = {"name": "busy", "path": "/http/Busy", "retries": 5, "deadline": "60s", "retry_after_max": "5m"}
    async with engine_for(stack, flow, clock=clock) as engine:
        result = await engine.send(engine.config.flow("busy"))
    assert result.attempt_codes == ("503", "503")  # at 0 s and 50 s; a third would have to come at 100 s
    assert clock.sleeps == [50.0]


async def test_client_lets_the_callers_own_errors_through(stack: EmulatorStack) -> None:
    from senderd.errors import ConfigError

    with pytest.raises(KeyError):
        async with Client.connect(stack.service_key_path, ca_file=stack.ca_path):
            raise KeyError("mine")
    async with Client.connect(stack.service_key_path, ca_file=stack.ca_path) as client:
        with pytest.raises(ConfigError, match=r"Client.send: path: must start with /"):
            await client.send("http/x")


async def test_a_reloaded_flow_goes_where_its_new_settings_say(stack: EmulatorStack) -> None:
    """The sender keeps each flow's URL and fixed headers: a reload that changes them is followed at once."""
    first = {"name": "f", "path": "/http/GetTimestamp", "headers": {"X-Version": "1"}}
    async with engine_for(stack, first) as engine:
        before = await engine.send(engine.config.flow("f"))
        changed = {"name": "f", "path": "/http/Orders", "method": "POST", "body": "<o/>", "csrf": True,
                   "headers": {"X-Version": "2"}, "content_type": "application/xml"}  # fmt: skip
        engine.holder.swap(config_from_dict({**_data_of(stack), "flows": [changed]}, source="test.toml"))
        after = await engine.send(engine.config.flow("f"))
    assert before.ok and after.ok, (before.last.error, after.last.error)
    old, new = stack.runtime.stats.messages[-2:]
    assert (old.address, old.headers["x-version"]) == ("/gettimestamp", "1")
    assert (new.address, new.headers["x-version"], new.headers["content-type"]) == ("/orders", "2", "application/xml")


def _data_of(stack: EmulatorStack) -> dict[str, object]:
    return {"credentials": {"service_key": str(stack.service_key_path), "ca_file": str(stack.ca_path)}}
