"""The sidecar relay: durable acks, idempotency, bad requests, spool limits, dead letters and re-drive,
ordered flows, and no loss across a real SIGKILL. (The spool on its own: test_spool.)"""

from __future__ import annotations

import functools
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from senderd.clock import Clock, SystemClock
from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.relay.spool import Spool
from senderd.result import SendResult
from tests.tools import Recorder, all_blocked, senderd_run, serving

pytestmark = pytest.mark.anyio

FLOWS = """
[[flows]]
name = "orders"
path = "/http/Orders"
method = "POST"
csrf = true

[[flows]]
name = "failing"
path = "/http/Failing"
method = "POST"

[[flows]]
name = "down"
path = "/http/Down"
method = "POST"
retries = 0

[[flows]]
name = "ledger"
path = "/http/Ledger"
method = "POST"
ordered = true
retries = 0
"""


def relay_section(spool: Path, **extra: Any) -> str:
    lines = [
        'listen = "127.0.0.1:0"',
        f'spool_dir = "{spool}"',
        'redelivery_initial = "50ms"',
        'redelivery_max = "200ms"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n[relay]\n" + "\n".join(lines) + "\n"


@asynccontextmanager
async def relay_daemon(
    tmp_path: Path, *, spool: Path | None = None, clock: Clock | None = None, **relay: Any
) -> AsyncIterator[tuple[EmulatorStack, Daemon, str, Recorder[SendResult]]]:
    """A daemon with the relay on (its spool in `spool`, else tmp_path/spool), and a recorder of the sends
    (deliveries) its engine finishes."""
    extra = FLOWS + relay_section(spool or tmp_path / "spool", **relay)
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.runtime.add_flow(FlowSpec("/Down", unavailable=-1, retry_after=0))
        stack.runtime.add_flow(FlowSpec("/Ledger", kind="echo"))
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False, clock=clock)
        async with serving(daemon) as deliveries:
            assert daemon.relay is not None
            yield stack, daemon, daemon.relay.url, deliveries


async def post(
    url: str, body: bytes = b"<o/>", content_type: str | None = "application/xml", **headers: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as session,
        session.post(url, data=body, headers=all_headers) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_post_is_acked_durably_then_delivered_with_its_id(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path) as (stack, _, url, deliveries):
        status, answer, _ = await post(f"{url}/v1/flows/orders/messages", b"<Order id='1'/>")
        assert status == 202
        assert answer["status"] == "queued"
        await deliveries.wait_for(1)
        _, message = await get(f"{url}/v1/messages/{answer['id']}")
    received = stack.runtime.stats.messages[-1]
    assert received.body == b"<Order id='1'/>"
    assert received.headers["sap_applicationid"] == answer["id"]
    assert received.headers["content-type"] == "application/xml"
    assert message["status"] == "delivered"
    assert message["correlation_id"] == received.mpl_id
    assert message["attempts"] == 1


async def test_idempotency_key_returns_the_first_id_and_sends_once(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path) as (stack, _, url, deliveries):
        first = await post(f"{url}/v1/flows/orders/messages", Idempotency_Key="order-42")
        again = await post(f"{url}/v1/flows/orders/messages", Idempotency_Key="order-42")
        await deliveries.wait_for(1)
        other = await post(f"{url}/v1/flows/orders/messages", Idempotency_Key="order-43")
        await deliveries.wait_for(2)
    assert first[0] == 202
    assert again[0] == 200
    assert again[1]["id"] == first[1]["id"]
    assert again[1]["duplicate"] is True
    assert other[1]["id"] != first[1]["id"]
    assert len(stack.runtime.stats.messages) == 2


async def test_bad_requests(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, max_message_bytes=1000) as (_, daemon, url, _d):
        assert (await post(f"{url}/v1/flows/nope/messages"))[0] == 404
        status, answer, _ = await post(f"{url}/v1/flows/orders/messages", b"x" * 1001)
        assert status == 413
        assert "max_message_bytes" in answer["error"]
        assert (await post(f"{url}/v1/flows/orders/messages", content_type=None))[0] == 415
        assert (await post(f"{url}/v1/flows/orders/messages", Idempotency_Key="has space"))[0] == 400
        assert (await post(f"{url}/v1/flows/orders/messages", Idempotency_Key="x" * 256))[0] == 400
        assert (await get(f"{url}/v1/messages/unknown"))[0] == 404
        assert daemon.engine is not None
        registry = daemon.engine.metrics.registry
        assert registry.get_sample_value("senderd_relay_requests_total", {"code": "413"}) == 1
        assert registry.get_sample_value("senderd_relay_requests_total", {"code": "404"}) == 2


async def test_token_env_demands_the_bearer_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TOKEN", "app-to-sidecar-token")
    async with relay_daemon(tmp_path, token_env="RELAY_TOKEN") as (_, _d, url, _x):
        status, _, headers = await post(f"{url}/v1/flows/orders/messages")
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert (await post(f"{url}/v1/flows/orders/messages", Authorization="Bearer wrong"))[0] == 401
        status, _, _ = await post(f"{url}/v1/flows/orders/messages", Authorization="Bearer app-to-sidecar-token")
        assert status == 202


async def test_spool_full_is_503_with_retry_after(tmp_path: Path) -> None:
    limits = relay_daemon(tmp_path, max_spool_messages=2, max_spool_bytes=1000, max_deliveries=1000)
    async with limits as (_, daemon, url, _x):
        assert (await post(f"{url}/v1/flows/down/messages", b"<first/>"))[0] == 202
        assert (await post(f"{url}/v1/flows/down/messages", b"<second/>"))[0] == 202
        status, answer, headers = await post(f"{url}/v1/flows/down/messages")
        assert daemon.engine is not None
        registry = daemon.engine.metrics.registry
        fill = {
            name: registry.get_sample_value(f"senderd_spool_{name}")
            for name in ("bytes", "capacity_bytes", "capacity_messages")
        }
    assert status == 503
    assert headers["Retry-After"] == "10"
    assert "spool full" in answer["error"]
    assert fill == {"bytes": 8 + 9, "capacity_bytes": 1000, "capacity_messages": 2}  # what SenderdSpoolNearlyFull reads


async def test_dead_letters_are_kept_and_can_be_redriven(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path) as (stack, _, url, deliveries):
        _, answer, _ = await post(f"{url}/v1/flows/failing/messages", b"<doomed/>")
        await deliveries.wait_for(1)  # a 500 is a flow error: not retried, dead at once
        _, message = await get(f"{url}/v1/messages/{answer['id']}")
        assert message["status"] == "dead"
        assert "the iFlow failed to process the message (MPL ID " in message["last_error"]
        _, dead = await get(f"{url}/v1/dead")
        assert [m["id"] for m in dead["messages"]] == [answer["id"]]
        stack.runtime.flows["/failing"].error_rate = 0.0  # the flow is fixed
        async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/dead/{answer['id']}/retry") as response:
            assert response.status == 202
        await deliveries.wait_for(2)
        _, message = await get(f"{url}/v1/messages/{answer['id']}")
        _, dead = await get(f"{url}/v1/dead")
    assert message["status"] == "delivered"
    assert message["attempts"] == 2
    assert dead["messages"] == []


async def test_retryable_failures_are_redelivered_until_dead(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, max_deliveries=3) as (_, daemon, url, deliveries):
        _, answer, _ = await post(f"{url}/v1/flows/down/messages")
        await deliveries.wait_for(3)
        _, message = await get(f"{url}/v1/messages/{answer['id']}")
        assert daemon.engine is not None
        registry = daemon.engine.metrics.registry
        retries = registry.get_sample_value("senderd_relay_deliveries_total", {"flow": "down", "result": "retry"})
        dead = registry.get_sample_value("senderd_relay_deliveries_total", {"flow": "down", "result": "dead"})
    assert message["status"] == "dead"
    assert message["attempts"] == 3
    assert (retries, dead) == (2, 1)


async def test_ordered_flow_keeps_order_through_redeliveries(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path) as (stack, _, url, deliveries):
        stack.runtime.flows["/ledger"].unavailable = 3  # the first three calls fail: message 0 is redelivered
        ids = []
        for n in range(10):
            _, answer, _ = await post(f"{url}/v1/flows/ledger/messages", f"<entry n='{n}'/>".encode())
            ids.append(answer["id"])
        await deliveries.wait_for(13)
    received = [m.headers["sap_applicationid"] for m in stack.runtime.stats.messages]
    assert received == ids


async def test_stopping_relay_answers_503(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path) as (_, daemon, url, _d):
        assert daemon.relay is not None
        daemon.relay.stop_accepting()
        status, _, headers = await post(f"{url}/v1/flows/orders/messages")
    assert status == 503
    assert headers["Retry-After"] == "5"


@pytest.mark.timeout(150)
async def test_no_acked_message_is_lost_across_sigkill(tmp_path: Path) -> None:
    """Post under load to a `senderd run` subprocess, SIGKILL it mid-stream, restart it, and count unique
    deliveries at the runtime: every id that was acknowledged with 202 arrives (duplicates allowed)."""
    extra = FLOWS + relay_section(tmp_path / "spool")
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.runtime.flows["/orders"].latency = 0.05  # a backlog builds up behind the sends
        args = ("-c", str(stack.config_path))
        acked: set[str] = set()
        enough = anyio.Event()
        killed = anyio.Event()
        async with senderd_run(*args) as daemon:
            relay_url = (await daemon.wait_for("relay_listening", timeout=15))["url"]

            async def poster() -> None:
                async with aiohttp.ClientSession() as session:
                    for n in range(200):  # bounded load
                        if killed.is_set():
                            return
                        try:
                            async with session.post(
                                f"{relay_url}/v1/flows/orders/messages",
                                data=f"<m n='{n}'/>",
                                headers={"Content-Type": "application/xml"},
                            ) as response:
                                if response.status == 202:
                                    acked.add((await response.json())["id"])
                        except aiohttp.ClientError:
                            return  # the process is gone
                        if len(acked) >= 150:
                            enough.set()

            async with anyio.create_task_group() as posters:
                for _ in range(8):
                    posters.start_soon(poster)
                with anyio.fail_after(30):
                    await enough.wait()
                daemon.send_signal(signal.SIGKILL)
                killed.set()
            await daemon.wait()
        delivered_before = {m.headers["sap_applicationid"] for m in stack.runtime.stats.messages}
        assert len(delivered_before) < len(acked), "the kill came too late to test anything"
        async with senderd_run(*args) as restarted:
            with anyio.fail_after(60):
                while not acked <= {m.headers["sap_applicationid"] for m in stack.runtime.stats.messages}:
                    await stack.runtime.wait_for_messages(len(stack.runtime.stats.messages) + 1)
            restarted.send_signal(signal.SIGTERM)
            await restarted.wait()
    delivered = [m.headers["sap_applicationid"] for m in stack.runtime.stats.messages]
    print(
        f"\nSIGKILL: {len(acked)} acked, {len(delivered_before)} delivered before the kill, "
        f"{len(set(delivered))} unique after restart, {len(delivered) - len(set(delivered))} duplicates"
    )
    assert acked <= set(delivered)


async def test_a_slow_loris_gets_408_and_blocks_nobody(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, read_timeout="500ms") as (_, daemon, url, _d):
        assert daemon.relay is not None
        host, port = daemon.relay.api.site.host, daemon.relay.api.site.port
        async with await anyio.connect_tcp(host, port) as slow:
            await slow.send(
                b"POST /v1/flows/orders/messages HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 100\r\n\r\nabc"
            )  # and then nothing more
            status, _, _ = await post(f"{url}/v1/flows/orders/messages")  # others are served meanwhile
            assert status == 202
            answer = b""
            with anyio.fail_after(5):
                while b"\r\n\r\n" not in answer:
                    answer += await slow.receive()
    assert answer.startswith(b"HTTP/1.1 408")


async def test_sigterm_drains_relay_deliveries_in_flight(tmp_path: Path) -> None:
    extra = FLOWS + relay_section(tmp_path / "spool")
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.runtime.flows["/orders"].latency = 1.0
        async with senderd_run("-c", str(stack.config_path)) as daemon:
            with anyio.fail_after(30):
                relay_url = (await daemon.wait_for("relay_listening"))["url"]
                ids = [(await post(f"{relay_url}/v1/flows/orders/messages"))[1]["id"] for _ in range(4)]
                # the CSRF fetch and all four deliveries have reached the runtime (which holds each for 1 s): all
                # four are in flight. (Messages still queued at the stop are delivered by the drain too:
                # test_relay_drain.)
                await stack.runtime.wait_for_requests(5)
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait_for("stopping")
                late = await post(f"{relay_url}/v1/flows/orders/messages")
                code = await daemon.wait()
    delivered = {m.headers["sap_applicationid"] for m in stack.runtime.stats.messages}
    assert code == 0
    assert late[0] == 503
    assert set(ids) <= delivered  # everything in flight finished within the drain


async def test_a_blocked_backlog_neither_spins_nor_starves_other_flows(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path) as (stack, daemon, url, deliveries):
        assert daemon.relay is not None
        stack.runtime.flows["/ledger"].latency = 0.3  # an ordered flow: one at a time, 0.3 s each
        for n in range(20):
            await post(f"{url}/v1/flows/ledger/messages", f"<e n='{n}'/>".encode())
        await stack.runtime.wait_for_requests(1)
        rounds = daemon.relay.dispatcher.rounds
        _, other, _ = await post(f"{url}/v1/flows/orders/messages")  # an unordered flow behind the backlog
        with anyio.fail_after(3):  # well before the ledger's 6 s of backlog is through
            await deliveries.wait_until(lambda results: any(r.message_id == other["id"] for r in results))
        await deliveries.wait_for(4)
        spent = daemon.relay.dispatcher.rounds - rounds
    assert spent < 50, f"the dispatcher looped {spent} times while the ordered flow was blocked"


async def test_last_error_is_redacted_where_it_is_stored_and_served(tmp_path: Path) -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZW5kZXJkIn0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
    async with relay_daemon(tmp_path) as (stack, daemon, url, deliveries):
        failing = stack.runtime.flows["/failing"]
        failing.return_exception = True  # the iFlow answers its exception text, echoing the request's header
        failing.error_text = f"HttpResponseException: request had Authorization: Bearer {token} and failed"
        _, answer, _ = await post(f"{url}/v1/flows/failing/messages")
        await deliveries.wait_for(1)
        _, message = await get(f"{url}/v1/messages/{answer['id']}")
        _, dead = await get(f"{url}/v1/dead")
        assert daemon.relay is not None and isinstance(daemon.relay.spool, Spool)
        stored = daemon.relay.spool.db.execute("SELECT last_error FROM messages").fetchone()[0]
    for text in (message["last_error"], dead["messages"][0]["last_error"], stored):
        assert "HttpResponseException" in text
        assert token[:20] not in text, text
        assert "[REDACTED]" in text


@pytest.mark.parametrize("fault", ["runtime_401", "token_server_html"])
async def test_credential_problems_pause_delivery_and_kill_nothing(tmp_path: Path, fault: str) -> None:
    async with relay_daemon(tmp_path, max_deliveries=2) as (stack, daemon, url, deliveries):
        stack.runtime.refuse_tokens = True  # every token refused: a 401 (then a fresh token, refused too)
        if fault == "token_server_html":
            stack.token_server.faults.answer = b"<html><body>Sign in</body></html>"  # the fetch after the 401
        _, answer, _ = await post(f"{url}/v1/flows/orders/messages")
        await deliveries.wait_for(4)  # twice max_deliveries rounds
        _, during = await get(f"{url}/v1/messages/{answer['id']}")
        stack.runtime.refuse_tokens = False
        stack.token_server.faults.answer = None
        await deliveries.wait_until(lambda sends: any(s.ok for s in sends), timeout=30)
        _, after = await get(f"{url}/v1/messages/{answer['id']}")
        assert daemon.engine is not None
        registry = daemon.engine.metrics.registry
        paused = registry.get_sample_value("senderd_relay_deliveries_total", {"flow": "orders", "result": "paused"})
    assert during["status"] in ("queued", "in_flight")
    assert during["attempts"] == 0  # paused rounds are not counted against max_deliveries
    assert after["status"] == "delivered"
    assert paused is not None and paused >= 4


async def test_a_second_daemon_on_the_same_spool_is_refused_with_one_line(tmp_path: Path) -> None:
    extra = FLOWS + relay_section(tmp_path / "spool")
    async with (
        EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack,
        senderd_run("-c", str(stack.config_path)) as first,
    ):
        await first.wait_for("relay_listening", timeout=15)
        async with senderd_run("-c", str(stack.config_path)) as second:
            code = await second.wait()
        first.send_signal(signal.SIGTERM)
        assert await first.wait() == 0
    assert code == 2
    lines = [line for line in (second.stderr + second.text).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "is in use by another senderd (pid " in lines[0]


async def test_an_idempotency_key_reused_with_another_body_is_409(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path) as (stack, _, url, deliveries):
        first = await post(f"{url}/v1/flows/orders/messages", b"<o n='1'/>", Idempotency_Key="order-7")
        same = await post(f"{url}/v1/flows/orders/messages", b"<o n='1'/>", Idempotency_Key="order-7")
        other = await post(f"{url}/v1/flows/orders/messages", b"<o n='2'/>", Idempotency_Key="order-7")
        await deliveries.wait_for(1)
    assert (first[0], same[0]) == (202, 200)
    assert other[0] == 409
    assert "used for a different body" in other[1]["error"]
    assert first[1]["id"] in other[1]["error"]
    assert [m.body for m in stack.runtime.stats.messages] == [b"<o n='1'/>"]


async def test_the_requeued_count_at_a_stop_is_the_rows_left_in_flight(tmp_path: Path, logs: Any) -> None:
    async with relay_daemon(tmp_path) as (stack, daemon, url, _d):
        assert daemon.relay is not None
        stack.runtime.flows["/down"].latency = 30.0  # every delivery hangs: claimed ones run or wait for a worker
        for _ in range(24):
            await post(f"{url}/v1/flows/down/messages")
        await stack.runtime.wait_for_requests(8)  # each of the 8 workers is held by a delivery
        with anyio.fail_after(10):
            while daemon.relay.spool.counts["in_flight"] <= 8:  # more claimed, waiting for a worker
                await all_blocked()
        await all_blocked()
        claimed = daemon.relay.spool.counts["in_flight"]
        assert 8 < claimed <= 16  # no more claimed than twice the workers, nor while every worker is busy
        daemon.stop()
        daemon.stop()  # cut the drain short
    lines = [json.loads(line) for line in logs.text.splitlines() if '"relay_requeued"' in line]
    spool = Spool(tmp_path / "spool")
    await spool.open()
    counts = dict(spool.counts)
    await spool.close()
    assert counts["in_flight"] == 0  # the ones still waiting for a worker stayed in flight until a restart
    assert [line["messages"] for line in lines] == [claimed]
    assert counts["queued"] == 24


def delivered(message_id: str, sends: list[SendResult]) -> bool:
    """Whether `sends` holds a delivery of `message_id` (successful or not)."""
    return any(s.message_id == message_id for s in sends)


async def test_messages_of_a_flow_a_reload_dropped_stay_queued_and_are_counted(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, max_deliveries=2) as (stack, daemon, url, deliveries):
        assert daemon.relay is not None and daemon.engine is not None
        ids = [(await post(f"{url}/v1/flows/down/messages"))[1]["id"] for _ in range(3)]
        await deliveries.wait_for(3)  # each delivered once (refused): queued for a second round
        full = daemon.config
        daemon.loader = lambda: full.model_copy(update={"flows": [f for f in full.flows if f.name != "down"]})
        assert await daemon.reload()
        stack.runtime.flows["/down"].unavailable = 0
        for n in range(3):  # rounds of the dispatcher in which the dropped flow's messages came due
            _, other, _ = await post(f"{url}/v1/flows/orders/messages", f"<o n='{n}'/>".encode())
            await deliveries.wait_until(functools.partial(delivered, other["id"]))
        await daemon.relay.dispatcher.refresh_gauges()
        registry = daemon.engine.metrics.registry
        kept = registry.get_sample_value("senderd_spool_unconfigured_flow_messages")
        states = [(await get(f"{url}/v1/messages/{i}"))[1]["status"] for i in ids]
        daemon.loader = lambda: full
        assert await daemon.reload()  # the flow is back: its messages go out
        await deliveries.wait_until(lambda sends: set(ids) <= {s.message_id for s in sends if s.ok})
    assert kept == 3
    assert states == ["queued"] * 3


async def test_relay_workers_bound_the_deliveries_at_once(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, workers=2) as (stack, daemon, url, _d):
        assert daemon.engine is not None
        stack.runtime.flows["/down"].latency = 30.0  # every delivery hangs
        for _ in range(6):
            await post(f"{url}/v1/flows/down/messages")
        await stack.runtime.wait_for_requests(2)
        await all_blocked()
        running = daemon.engine.metrics.registry.get_sample_value("senderd_inflight_sends")
        daemon.stop()
        daemon.stop()  # no drain: the deliveries hang
    assert running == 2  # not pool.workers (8) more beside the pool's own


class SteppedClock(SystemClock):
    """The system's clocks, with the wall clock stepped by `offset` seconds (an NTP step, a VM resumed)."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


async def test_a_wall_clock_stepped_back_delays_no_redelivery(tmp_path: Path) -> None:
    clock = SteppedClock()
    async with relay_daemon(tmp_path, clock=clock, max_deliveries=3) as (_, daemon, url, deliveries):
        assert daemon.relay is not None
        spool = daemon.relay.spool
        finish = spool.finish

        async def finish_then_step(*args: Any, **kwargs: Any) -> None:
            await finish(*args, **kwargs)  # the redelivery is planned ...
            clock.offset = -3600.0  # ... and then the wall clock goes back an hour

        spool.finish = finish_then_step  # type: ignore[method-assign]
        await post(f"{url}/v1/flows/down/messages")
        await deliveries.wait_for(3, timeout=10)  # all three rounds, 50-200 ms apart, not an hour later


async def test_a_redelivery_planned_far_ahead_is_bounded_at_open(tmp_path: Path) -> None:
    from senderd.testing import FakeClock

    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        await spool.add("f", b"x", "text/plain")
        group.cancel_scope.cancel()
    (message,) = await spool.due(clock.time(), 1)
    await spool.finish(message, "queued", retry_at=clock.time() + 86_400)  # planned by a clock a day ahead
    await spool.close()
    reopened = Spool(tmp_path / "spool", clock=clock, max_delay=300)
    await reopened.open()
    due = await reopened.due(clock.time() + 300, 1)
    await reopened.close()
    assert [m.id for m in due] == [message.id]
