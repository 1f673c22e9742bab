"""Faults between senderd and the runtime: each one is classified, retried as the policy says, counted,
and never hangs.

The retry policy (README, *Flows*): connection errors, timeouts, 429, 502, 503 and 504 are retried; other
4xx and 500 (a flow error in Cloud Integration) are not, nor is a TLS verification failure (a config
problem). Every send runs under `anyio.fail_after(BOUND)`, far below pytest's 60 s timeout, and prints one
figure line (`pytest -s` shows them).
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import pytest
from aiohttp import web

from senderd.clock import SystemClock
from senderd.emulator.pki import Pki
from senderd.emulator.runtime import FlowSpec, Runtime
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.result import SendResult
from senderd.testing import FakeClock, StepClock
from tests.faultproxy import Blackhole, CloseImmediately, FaultProxy, Pass, ResetAfterResponseBytes
from tests.tools import Recorder, all_blocked, engine_for

pytestmark = pytest.mark.anyio

BOUND = 10.0
"""No send may take longer than this (seconds): a hang fails fast instead of at pytest's 60 s timeout."""


async def send(engine: Engine, flow: str, fault: str) -> SendResult:
    """One send under the hang bound, with its figure line (and the retry waits a StepClock recorded)."""
    started = time.monotonic()
    with anyio.fail_after(BOUND):
        result = await engine.send(engine.config.flow(flow))
    elapsed = time.monotonic() - started
    waits = ", ".join(f"{s:g}" for s in engine.clock.sleeps) if isinstance(engine.clock, StepClock) else "real"
    print(
        f"\n{fault}: {result.outcome} after {result.attempts} attempt{'s' * (result.attempts != 1)} "
        f"in {elapsed:.2f} s (codes {','.join(result.attempt_codes)}; waits {waits or 'none'})"
    )
    return result


def assert_counted(engine: Engine, result: SendResult, codes: dict[str, int]) -> None:
    """`senderd_send_attempts_total` holds exactly `codes` for the flow, `senderd_sends_total` the outcome."""
    attempts: dict[str, float] = {}
    sends: dict[str, float] = {}
    for family in engine.metrics.registry.collect():
        for s in family.samples:
            if s.labels.get("flow") != result.flow:
                continue
            if s.name == "senderd_send_attempts_total" and s.value:
                attempts[s.labels["code"]] = s.value
            if s.name == "senderd_sends_total" and s.value:
                sends[s.labels["outcome"]] = s.value
    assert attempts == codes
    assert sum(codes.values()) == result.attempts
    assert sends == {result.outcome: 1}


@asynccontextmanager
async def tls_server(
    context: ssl.SSLContext, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> AsyncIterator[str]:
    """A tiny HTTPS server on 127.0.0.1 answering every path with `handler`; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def runtime_port(stack: EmulatorStack) -> int:
    port = urlsplit(stack.runtime.url).port
    assert port is not None
    return port


async def test_a_503_storm_is_http_error_after_every_retry(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Storm", unavailable=-1, retry_after=0))
    clock = StepClock()
    async with engine_for(stack, {"name": "storm", "path": "/http/Storm", "retries": 3}, clock=clock) as engine:
        result = await send(engine, "storm", "runtime 503 storm")
    assert result.outcome == "http_error"
    assert result.status == 503
    assert result.attempt_codes == ("503",) * 4
    assert clock.sleeps == [0.0, 0.0, 0.0]  # Retry-After: 0, honoured
    assert stack.runtime.stats.by_address["/storm"] == 4
    assert_counted(engine, result, {"503": 4})


async def test_answers_slower_than_the_timeout_are_timeouts_retried_and_counted(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Slow", latency=1.0, body="late"))
    clock = StepClock()
    flow = {"name": "slow", "path": "/http/Slow", "timeout": "250ms", "retries": 2}
    async with engine_for(stack, flow, clock=clock) as engine:
        result = await send(engine, "slow", "answers slower than the timeout")
    assert result.outcome == "timeout"
    assert result.attempts == 3
    assert result.status is None
    assert "no answer within 0.25s" in (result.last.error or "")
    assert len(clock.sleeps) == 2
    assert stack.runtime.stats.by_address["/slow"] == 3  # each attempt reached the flow
    assert_counted(engine, result, {"none": 3})


async def test_on_the_system_clock_the_deadline_rides_on_the_request_and_still_ends_it(stack: EmulatorStack) -> None:
    # the system clock takes the request's own (aiohttp) timeout, not a scope around the attempt: the same verdict
    stack.runtime.add_flow(FlowSpec("/Slow", latency=2.0, body="late"))
    flow = {"name": "slow", "path": "/http/Slow", "timeout": "300ms", "retries": 1, "backoff_initial": "10ms"}
    async with engine_for(stack, flow) as engine:
        assert isinstance(engine.clock, SystemClock)
        started = time.monotonic()
        result = await send(engine, "slow", "answers slower than the timeout, real clock")
    assert result.outcome == "timeout" and result.attempt_codes == ("none", "none")
    assert "no answer within 0.3s" in (result.last.error or "")
    assert 0.6 <= time.monotonic() - started < 1.9  # two attempts cut at 0.3 s each, not the 2 s answers
    assert_counted(engine, result, {"none": 2})


async def test_a_reset_mid_response_is_a_connection_error_and_retried(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Big", body="x" * 256 * 1024))
    clock = StepClock()
    async with FaultProxy.running("127.0.0.1", runtime_port(stack), ResetAfterResponseBytes(64 * 1024)) as proxy:
        flow = {"name": "big", "path": f"{proxy.url}/http/Big", "retries": 3}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "big", "reset mid-response")
    assert result.outcome == "connection_error"
    assert result.attempts == 4
    assert len(clock.sleeps) == 3
    assert [(c.reset, c.response_bytes) for c in proxy.connections] == [(True, 64 * 1024)] * 4
    assert stack.runtime.stats.by_address["/big"] == 4  # the flow answered: the reset came mid-response
    assert_counted(engine, result, {"none": 4})


async def test_one_reset_then_a_good_answer_is_success_on_the_retry(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Big", body="x" * 256 * 1024))
    clock = StepClock()
    async with FaultProxy.running("127.0.0.1", runtime_port(stack), Pass()) as proxy:
        proxy.plan.append(ResetAfterResponseBytes(64 * 1024))
        flow = {"name": "big", "path": f"{proxy.url}/http/Big", "retries": 3}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "big", "one reset, then a good answer")
    assert result.ok, result.last.error
    assert result.attempt_codes == ("none", "200")
    assert len(result.body) == 256 * 1024
    assert [c.reset for c in proxy.connections] == [True, False]
    assert_counted(engine, result, {"none": 1, "200": 1})


async def test_a_blackhole_is_a_timeout_not_a_hang(stack: EmulatorStack) -> None:
    clock = StepClock()
    async with FaultProxy.running("127.0.0.1", runtime_port(stack), Blackhole()) as proxy:
        flow = {"name": "hole", "path": f"{proxy.url}/http/GetTimestamp", "timeout": "200ms", "retries": 1}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "hole", "proxy blackhole")
    assert result.outcome == "timeout"
    assert result.attempts == 2
    assert len(proxy.connections) == 2
    assert all(c.request_bytes > 0 and c.response_bytes == 0 for c in proxy.connections)  # a ClientHello, no answer
    assert stack.runtime.stats.requests == 0
    assert_counted(engine, result, {"none": 2})


async def test_a_blackhole_send_ends_by_its_deadline(stack: EmulatorStack) -> None:
    """Attempts of 400 ms into a blackhole under a 500 ms deadline, on a fake clock moved in 10 ms steps:
    the second attempt gets only what is left of the deadline, and the send ends with it."""
    deadline, step = 0.5, 0.01
    clock = FakeClock()
    async with FaultProxy.running("127.0.0.1", runtime_port(stack), Blackhole()) as proxy:
        flow = {
            "name": "hole",
            "path": f"{proxy.url}/http/GetTimestamp",
            "timeout": "400ms",
            "retries": 5,
            "backoff_initial": "1ms",
            "deadline": f"{deadline * 1000:g}ms",
        }
        async with engine_for(stack, flow, clock=clock) as engine:
            await engine.tokens.get()  # the token fetch is not what is being timed
            finished = Recorder[tuple[float, SendResult]]()
            engine.listeners.append(lambda result: finished((clock.monotonic(), result)))
            started = clock.monotonic()
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as group:
                    group.start_soon(engine.send, engine.config.flow("hole"))
                    while not finished.items:
                        # Time moves only once the attempt under way has its (real) connection: the first from
                        # the start, the second once the first has timed out (0.4 s) and the retry wait woke it.
                        await proxy.wait_for_connections(1 if clock.monotonic() - started < 0.4 + 1.5 * step else 2)
                        await all_blocked()  # the attempt under way is waiting for an answer that never comes
                        clock.advance(step)
    ended_at, result = finished.items[0]
    print(
        f"\nproxy blackhole, deadline {deadline:g} s: {result.outcome} after {result.attempts} attempts "
        f"in {ended_at - started:.2f} s of fake time ({result.last.error})"
    )
    assert result.outcome == "timeout"
    assert ended_at - started <= deadline + step + 1e-6  # README: deadline is the "total time of one send"
    assert result.attempt_codes == ("none", "none")  # 400 ms, a wait under 1 ms, then what was left
    error = result.last.error or ""
    assert error.startswith("no answer within ") and error.endswith("s"), error
    second = float(error.removeprefix("no answer within ").removesuffix("s"))
    assert deadline - 0.4 - 2 * step - 1e-6 <= second <= deadline - 0.4  # the rest, after a step or two


async def test_a_connection_closed_at_once_is_a_connection_error_and_retried(stack: EmulatorStack) -> None:
    clock = StepClock()
    async with FaultProxy.running("127.0.0.1", runtime_port(stack), CloseImmediately()) as proxy:
        flow = {"name": "closed", "path": f"{proxy.url}/http/GetTimestamp", "retries": 2}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "closed", "proxy closes at once")
    assert result.outcome == "connection_error"
    assert result.attempts == 3
    assert len(proxy.connections) == 3
    assert_counted(engine, result, {"none": 3})


async def test_an_unresolvable_host_is_a_connection_error(stack: EmulatorStack) -> None:
    host = "unresolvable.invalid"  # RFC 6761: never resolves
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(socket.gaierror):
        await anyio.getaddrinfo(host, 443)
    assert time.monotonic() - started < 2, "name resolution is slow here: this test would be slow"
    clock = StepClock()
    flow = {"name": "nowhere", "path": f"https://{host}/http/GetTimestamp", "retries": 2}
    async with engine_for(stack, flow, clock=clock) as engine:
        result = await send(engine, "nowhere", "unresolvable host")
    assert result.outcome == "connection_error"
    assert result.attempts == 3  # connection errors are retried (a resolver may fail transiently)
    assert host in (result.last.error or "")
    assert_counted(engine, result, {"none": 3})


async def test_an_untrusted_runtime_certificate_is_not_retried_and_says_what_to_set(
    stack: EmulatorStack, pki: Pki
) -> None:
    assert pki.root.cert != stack.pki.root.cert  # the session PKI: senderd trusts only the stack's CA
    other = Runtime(pki, stack.token_server)
    await other.start()
    try:
        clock = StepClock()
        flow = {"name": "stranger", "path": f"{other.url}/http/GetTimestamp", "retries": 3}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "stranger", "TLS trust failure")
    finally:
        await other.stop()
    assert result.outcome == "connection_error"
    assert result.attempts == 1
    assert clock.sleeps == []
    error = result.last.error or ""
    assert "runtime.ca_file" in error and "credentials.ca_file" in error
    assert other.stats.requests == 0
    assert_counted(engine, result, {"none": 1})


@asynccontextmanager
async def expired_runtime(stack: EmulatorStack) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """An HTTPS server presenting an expired certificate from the trusted PKI; yields its URL and requests."""
    expired = stack.pki.issue_server(["127.0.0.1", "localhost"], not_after=datetime.now(UTC) - timedelta(days=2))
    context = dataclasses.replace(stack.pki, server=expired).server_ssl_context(client_ca=False)
    requests: list[web.Request] = []

    async def answer(request: web.Request) -> web.Response:
        requests.append(request)
        return web.Response(text="should not be reached")

    async with tls_server(context, answer) as url:
        yield url, requests


async def test_an_expired_runtime_certificate_is_not_retried(stack: EmulatorStack) -> None:
    clock = StepClock()
    async with expired_runtime(stack) as (url, requests):
        flow = {"name": "expired", "path": f"{url}/http/GetTimestamp", "retries": 3}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "expired", "expired server certificate")
    assert result.outcome == "connection_error"
    assert result.attempts == 1
    assert clock.sleeps == []
    assert requests == []
    assert_counted(engine, result, {"none": 1})


async def test_an_expired_runtime_certificate_is_reported_as_expired(stack: EmulatorStack) -> None:
    clock = StepClock()
    async with expired_runtime(stack) as (url, _):
        flow = {"name": "expired", "path": f"{url}/http/GetTimestamp", "retries": 3}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "expired", "expired server certificate (message)")
    error = result.last.error or ""
    assert "certificate has expired" in error
    assert "ca_file" not in error  # another CA bundle cannot help: the runtime must renew (or the clock is off)


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_client_errors_and_flow_errors_are_not_retried(stack: EmulatorStack, status: int) -> None:
    stack.runtime.add_flow(FlowSpec(f"/Status{status}", status=status, body=f"answer {status}"))
    clock = StepClock()
    flow = {"name": "plain", "path": f"/http/Status{status}", "retries": 3}
    async with engine_for(stack, flow, clock=clock) as engine:
        result = await send(engine, "plain", f"HTTP {status}")
    assert result.outcome == "http_error"
    assert result.attempt_codes == (str(status),)
    assert clock.sleeps == []
    assert f"HTTP {status}: answer {status}" in (result.last.error or "")
    assert_counted(engine, result, {str(status): 1})


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retryable_statuses_without_retry_after_back_off(stack: EmulatorStack, status: int) -> None:
    stack.runtime.add_flow(FlowSpec(f"/Status{status}", status=status))
    clock = StepClock()
    flow = {"name": "busy", "path": f"/http/Status{status}", "retries": 2, "backoff_initial": "1s"}
    async with engine_for(stack, flow, clock=clock) as engine:
        result = await send(engine, "busy", f"HTTP {status} without Retry-After")
    assert result.outcome == "http_error"
    assert result.attempt_codes == (str(status),) * 3
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] <= 1 and 0 <= clock.sleeps[1] <= 2  # full jitter under 1 s, then 2 s
    assert_counted(engine, result, {str(status): 3})


async def test_a_429_with_retry_after_is_retried_and_honoured(stack: EmulatorStack) -> None:
    calls = 0

    async def limited(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        assert request.headers.get("Authorization", "").startswith("Bearer ")
        if calls <= 2:
            return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": "7"})
        return web.Response(text="OK")

    clock = StepClock()
    async with tls_server(stack.pki.server_ssl_context(client_ca=False), limited) as url:
        flow = {"name": "limited", "path": f"{url}/http/Limited", "retries": 3}
        async with engine_for(stack, flow, clock=clock) as engine:
            result = await send(engine, "limited", "429 with Retry-After: 7")
    assert result.ok, result.last.error
    assert result.attempt_codes == ("429", "429", "200")
    assert clock.sleeps == [7.0, 7.0]  # as the runtime said, not the (shorter) backoff
    assert_counted(engine, result, {"429": 2, "200": 1})
