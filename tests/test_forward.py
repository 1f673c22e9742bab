"""Request-reply through the sidecar (`senderd.forward`): real sockets, real TLS to the emulated runtime.

Credentials injected (and the app's own never passed on), CSRF as flows do it, 401 replay, 100 MB each way
with flat memory, an app that goes away mid-stream, a slow runtime and the timeout, safe retries, bounds,
paths outside `allow`, the errors the forwarder answers itself, and the refusal to listen openly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import yaml
from multidict import CIMultiDictProxy
from yarl import URL

from senderd.config import ForwardConfig, config_from_dict, load_config
from senderd.daemon import Daemon
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.errors import ConfigError
from senderd.forward import Forwarder, ForwardRecord
from tests.conftest import CapturedLogs
from tests.tools import Recorder, engine_for, senderd

pytestmark = pytest.mark.anyio
MB = 1024 * 1024
BIG = 100 * MB
APP_TOKEN = "app-to-sidecar-token"


def rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def deploy(stack: EmulatorStack) -> None:
    runtime = stack.runtime
    runtime.add_flow(FlowSpec("/Echo", kind="echo"))
    runtime.add_flow(FlowSpec("/Big", kind="large", answer_bytes=BIG, content_type="application/octet-stream"))
    runtime.add_flow(FlowSpec("/Count", kind="count"))
    runtime.add_flow(FlowSpec("/Slow", kind="echo", latency=0.3))
    runtime.add_flow(FlowSpec("/Stuck", kind="echo", latency=30))
    runtime.add_flow(FlowSpec("/Busy", kind="echo", unavailable=1, retry_after=0))


@asynccontextmanager
async def forwarding(
    stack: EmulatorStack, credentials: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[tuple[Forwarder, Engine, Recorder[ForwardRecord]]]:
    """A forwarder on a free port over an engine of the stack's one credentials set (with `credentials`
    added to it); its finished requests recorded."""
    deploy(stack)
    async with engine_for(stack, credentials=credentials) as engine:
        config = ForwardConfig.model_validate({"listen": "127.0.0.1:0", **options})
        async with Forwarder.open(config, engine) as forwarder:
            records = Recorder[ForwardRecord]()
            forwarder.listeners.append(records)
            yield forwarder, engine, records


async def call(
    url: str, method: str = "GET", body: bytes | io.BytesIO | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, URL(url, encoded=True), data=body, headers=headers) as response,
    ):
        return response.status, await response.read(), response.headers


def sample(engine: Engine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("auth", "key_type", "seen_as"),
    [("client-certificate", "certificate", "client_certificate"), ("basic", "clientsecret", "basic")],
)
async def test_a_set_without_tokens_forwards_with_its_own_authentication(
    stack: EmulatorStack, auth: str, key_type: Any, seen_as: str
) -> None:
    key = str(stack.tenant.key_path(key_type))
    async with forwarding(stack, credentials={"auth": auth, "service_key": key}) as (forwarder, _, _records):
        get = await call(f"{forwarder.url}/http/GetTimestamp")
        posted = await call(f"{forwarder.url}/http/Orders", "POST", b"<Order/>", {"Content-Type": "application/xml"})
    assert get[0] == 200 and posted[0] == 200 and posted[1] == b"<Order/>"
    assert stack.token_server.stats.requests == 0  # no token at all, in either mode
    assert set(stack.runtime.stats.auth_modes) == {seen_as}  # every exchange, the CSRF fetch included


async def test_get_goes_out_with_the_sets_token_and_comes_back_whole(stack: EmulatorStack, logs: CapturedLogs) -> None:
    async with forwarding(stack) as (forwarder, engine, records):
        status, body, headers = await call(f"{forwarder.url}/http/GetTimestamp?x=1&y=two")
    assert status == 200
    assert body.startswith(b"Current time (UTC): ")
    received = stack.runtime.stats.messages[-1]
    assert (received.auth, received.client_id, received.method) == ("bearer", stack.client_id, "GET")
    assert received.query == {"x": "1", "y": "two"}
    assert headers["SAP_MessageProcessingLogID"] == received.mpl_id
    record = records.items[-1]
    assert (record.route, record.status, record.outcome) == ("/http/*", 200, "ok")
    assert record.correlation["messageprocessinglogid"] == received.mpl_id
    labels = {"route": "/http/*", "method": "GET", "code": "200"}
    assert sample(engine, "senderd_forward_requests_total", **labels) == 1
    assert sample(engine, "senderd_forward_duration_seconds_count", route="/http/*") == 1
    assert sample(engine, "senderd_forward_inflight_requests") == 0
    (line,) = [json.loads(text) for text in logs.text.splitlines() if '"forwarded"' in text]
    assert (line["method"], line["path"], line["status"], line["route"]) == (
        "GET",
        "/http/GetTimestamp",
        200,
        "/http/*",
    )
    assert line["messageprocessinglogid"] == received.mpl_id
    assert "x=1" not in logs.text  # the query can carry the app's data: not logged


async def test_post_fetches_one_csrf_token_for_all_and_refetches_on_a_csrf_403(stack: EmulatorStack) -> None:
    stats = stack.runtime.stats
    async with forwarding(stack) as (forwarder, _, _records):
        first = await call(f"{forwarder.url}/http/Orders", "POST", b"<o n='1'/>", {"Content-Type": "application/xml"})
        second = await call(f"{forwarder.url}/http/Orders", "POST", b"<o n='2'/>", {"Content-Type": "application/xml"})
        assert (stats.csrf_fetches, stats.csrf_rejections) == (1, 1)  # the first 403, one fetch, shared
        stack.runtime.expire_csrf_tokens()
        third = await call(f"{forwarder.url}/http/Orders", "POST", b"<o n='3'/>", {"Content-Type": "application/xml"})
    assert [first[0], second[0], third[0]] == [200, 200, 200]
    assert [first[1], second[1], third[1]] == [b"<o n='1'/>", b"<o n='2'/>", b"<o n='3'/>"]
    assert (stats.csrf_fetches, stats.csrf_rejections) == (2, 2)
    assert stats.messages[-1].headers["content-type"] == "application/xml"
    for _, _, headers in (first, second, third):
        assert "Set-Cookie" not in headers and "X-CSRF-Token" not in headers


async def test_a_401_refreshes_the_token_once_and_replays_the_body(stack: EmulatorStack) -> None:
    async with forwarding(stack) as (forwarder, engine, _records):
        await call(f"{forwarder.url}/http/GetTimestamp")
        fetched = stack.token_server.stats.issued
        stack.token_server.revoke_issued()
        status, body, _ = await call(f"{forwarder.url}/http/Echo", "PUT", b"replayed")
        assert status == 200 and body == b"replayed"
        assert stack.token_server.stats.issued == fetched + 1
        assert stack.runtime.stats.revoked_tokens == 1
        assert sample(engine, "senderd_auth_failures_total", credentials="default", stage="runtime",
                      reason="unauthorized") == 1  # fmt: skip


async def test_the_app_cannot_inject_credentials_cookies_or_hop_by_hop_headers(stack: EmulatorStack) -> None:
    sneaky = {
        "Authorization": "Bearer forged-by-the-app",
        "Cookie": "JSESSIONID=STOLEN; __VCAP_ID__=x",
        "X-CSRF-Token": "forged-csrf",
        "Host": "evil.example",
        "Connection": "X-Hidden",
        "X-Hidden": "named by Connection",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "TE": "trailers",
        "SAP_ApplicationID": "order-4711",
        "X-Custom": "kept",
    }
    async with forwarding(stack) as (forwarder, _, _records):
        status, _, answer = await call(f"{forwarder.url}/http/Echo", "POST", b"x", sneaky)
        fetch = await call(f"{forwarder.url}/http/Orders", "GET", None, {"X-CSRF-Token": "Fetch"})
    assert status == 200
    received = stack.runtime.stats.messages[-1]  # the GET to the POST-only flow is a 405, not a message
    assert (received.auth, received.client_id) == ("bearer", stack.client_id)  # the set's token, not the app's
    seen = received.headers
    for name in ("cookie", "x-csrf-token", "x-hidden", "keep-alive", "proxy-authorization", "te"):
        assert name not in seen, name
    assert seen["host"] == stack.runtime.url.removeprefix("https://")
    assert seen["sap_applicationid"] == "order-4711"
    assert seen["x-custom"] == "kept"
    assert "Set-Cookie" not in answer
    # the app cannot fetch the runtime's CSRF token either: its Fetch never arrives
    assert stack.runtime.stats.csrf_fetches == 0
    assert "X-CSRF-Token" not in fetch[2] and "Set-Cookie" not in fetch[2]


async def test_an_application_id_is_generated_when_asked_for(stack: EmulatorStack) -> None:
    async with forwarding(stack, application_id="auto") as (forwarder, _, _records):
        await call(f"{forwarder.url}/http/Echo", "POST", b"x")
        await call(f"{forwarder.url}/http/Echo", "POST", b"x", {"SAP_ApplicationID": "mine"})
        await call(f"{forwarder.url}/http/Echo", "GET")
    generated, own, get = (m.headers.get("sap_applicationid") for m in stack.runtime.stats.messages[-3:])
    assert generated is not None and len(generated) == 32
    assert (own, get) == ("mine", None)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/MessageProcessingLogs",
        "/http/../api/v1/MessageProcessingLogs",
        "/http/%2e%2e/api/v1",
        "/http/x%2F..%2Fapi",
        "/http//x",
        "/HTTPS/x",
        "/metrics",
    ],
)
async def test_paths_outside_allow_are_404_and_never_reach_the_runtime(stack: EmulatorStack, path: str) -> None:
    async with forwarding(stack) as (forwarder, engine, _records):
        status, body, _ = await call(f"{forwarder.url}{path}")
    assert status == 404
    assert b'"reason": "not_allowed"' in body
    assert stack.runtime.stats.requests == 0
    assert sample(engine, "senderd_forward_requests_total", route="none", method="GET", code="404") == 1


async def test_an_exact_pattern_allows_that_path_only_case_insensitively(stack: EmulatorStack) -> None:
    async with forwarding(stack, allow=["/http/Echo"]) as (forwarder, _, _records):
        assert (await call(f"{forwarder.url}/http/echo"))[0] == 200
        assert (await call(f"{forwarder.url}/http/GetTimestamp"))[0] == 404
        assert (await call(f"{forwarder.url}/http/Echo/more"))[0] == 404
    assert stack.runtime.stats.requests == 1


async def test_a_100_mb_answer_streams_through_with_flat_memory(stack: EmulatorStack) -> None:
    async with (
        forwarding(stack) as (forwarder, _, records),
        aiohttp.ClientSession() as session,
        session.get(f"{forwarder.url}/http/Big") as response,
    ):
        before, peak, size = rss(), 0, 0
        async for chunk in response.content.iter_chunked(256 * 1024):
            size += len(chunk)
            peak = max(peak, rss())
        assert response.status == 200
        assert response.content_length == BIG
        await records.wait_for(1)
    assert size == BIG
    assert peak - before < 40 * MB, f"memory grew by {(peak - before) / MB:.0f} MB"
    assert records.items[0].bytes_out == BIG


async def test_a_100_mb_upload_streams_through_with_flat_memory(stack: EmulatorStack) -> None:
    digest = hashlib.sha256()
    peak = 0

    async def upload() -> AsyncIterator[bytes]:
        nonlocal peak
        piece = os.urandom(MB)
        for _ in range(BIG // MB):
            digest.update(piece)
            peak = max(peak, rss())
            yield piece

    async with forwarding(stack) as (forwarder, _, records), aiohttp.ClientSession() as session:
        before = rss()
        async with session.post(f"{forwarder.url}/http/Count", data=upload()) as response:
            answer = await response.json()
    assert response.status == 200
    assert answer == {"bytes": BIG, "sha256": digest.hexdigest()}
    assert peak - before < 40 * MB, f"memory grew by {(peak - before) / MB:.0f} MB"
    assert records.items[-1].bytes_in == BIG


async def test_an_app_that_goes_away_mid_stream_ends_the_exchange_and_nothing_else(stack: EmulatorStack) -> None:
    async with forwarding(stack) as (forwarder, engine, records):
        async with aiohttp.ClientSession() as session:
            response = await session.get(f"{forwarder.url}/http/Big")
            await response.content.readexactly(MB)
            response.close()  # the app hangs up with 99 MB to go
        (record,) = await records.wait_for(1)
        assert record.outcome == "client_disconnected"
        assert record.bytes_out < BIG
        assert sample(engine, "senderd_forward_inflight_requests") == 0
        status, _, _ = await call(f"{forwarder.url}/http/GetTimestamp")
        assert status == 200


async def test_a_slow_runtime_is_waited_for_and_a_stuck_one_is_a_504(stack: EmulatorStack) -> None:
    async with forwarding(stack, timeout="1s") as (forwarder, engine, records):
        slow = await call(f"{forwarder.url}/http/Slow", "POST", b"late")
        with anyio.fail_after(5):
            stuck = await call(f"{forwarder.url}/http/Stuck", "POST", b"never")
    assert (slow[0], slow[1]) == (200, b"late")
    assert stuck[0] == 504
    assert b'"reason": "timeout"' in stuck[1]
    assert records.items[-1].outcome == "timeout"
    assert sample(engine, "senderd_forward_requests_total", route="/http/*", method="POST", code="504") == 1


async def test_safe_methods_retry_a_503_with_retry_after_and_modifying_ones_do_not(stack: EmulatorStack) -> None:
    async with forwarding(stack) as (forwarder, _, records):
        post = await call(f"{forwarder.url}/http/Busy", "POST", b"once")
        stack.runtime.flows["/busy"].unavailable = 1
        get = await call(f"{forwarder.url}/http/Busy")
    assert post[0] == 503 and post[2]["Retry-After"] == "0"
    assert get[0] == 200
    assert [r.attempts for r in records.items] == [1, 2]


async def test_an_unreachable_runtime_is_a_502_after_the_safe_retries(stack: EmulatorStack) -> None:
    async with forwarding(stack) as (forwarder, _, records):
        await stack.runtime.stop()
        status, body, _ = await call(f"{forwarder.url}/http/GetTimestamp")
    assert status == 502
    assert b'"reason": "unreachable"' in body
    assert records.items[-1].attempts == 3


async def test_no_token_is_a_503_with_retry_after(stack: EmulatorStack) -> None:
    stack.token_server.faults.down = True
    async with forwarding(stack) as (forwarder, _, _records):
        status, body, headers = await call(f"{forwarder.url}/http/GetTimestamp")
    assert status == 503
    assert b'"reason": "no_token"' in body
    assert int(headers["Retry-After"]) >= 1
    assert stack.runtime.stats.requests == 0


async def test_a_body_over_max_body_bytes_is_a_413_declared_or_streamed(stack: EmulatorStack) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * MB

    async with forwarding(stack, max_body_bytes=2 * MB) as (forwarder, _, _records):
        declared = await call(f"{forwarder.url}/http/Count", "POST", io.BytesIO(b"x" * (2 * MB + 1)))
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{forwarder.url}/http/Count", data=chunks()) as response,
        ):
            streamed = response.status, await response.read()
        fits = await call(f"{forwarder.url}/http/Count", "POST", io.BytesIO(b"x" * (2 * MB)))
    assert declared[0] == 413 and b"forward.max_body_bytes" in declared[1]
    assert streamed[0] == 413
    assert fits[0] == 200


async def test_with_token_env_the_app_must_present_it_and_it_goes_no_further(
    stack: EmulatorStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORWARD_TOKEN", APP_TOKEN)
    async with forwarding(stack, token_env="FORWARD_TOKEN") as (forwarder, _, _records):
        missing = await call(f"{forwarder.url}/http/Echo")
        wrong = await call(f"{forwarder.url}/http/Echo", headers={"Authorization": "Bearer nope"})
        right = await call(f"{forwarder.url}/http/Echo", headers={"Authorization": f"Bearer {APP_TOKEN}"})
    assert (missing[0], wrong[0], right[0]) == (401, 401, 200)
    received = stack.runtime.stats.messages[-1]
    assert (received.auth, received.client_id) == ("bearer", stack.client_id)
    assert stack.runtime.stats.requests == 1


async def test_listening_beyond_localhost_without_a_token_is_refused_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "open.toml"
    config.write_text('[credentials]\nservice_key = "key.json"\n[forward]\nlisten = "0.0.0.0:8788"\n')
    code, _, err = await senderd("check", "-c", str(config))
    assert code == 2
    assert err.strip().splitlines() == [
        f"senderd: error: {config}: forward: listen = '0.0.0.0:8788' is beyond localhost: set token_env (the bearer "
        "token the app must present) or listen on 127.0.0.1"
    ]


async def test_the_daemon_serves_forward_beside_its_flows(tmp_path: Path) -> None:
    extra = '\n[forward]\nlisten = "127.0.0.1:0"\n'
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        async with anyio.create_task_group() as group:
            group.start_soon(daemon.serve)
            with anyio.fail_after(10):
                await daemon.started.wait()
            assert daemon.forwarder is not None
            status, _, _ = await call(f"{daemon.forwarder.url}/http/GetTimestamp")
            daemon.stop()
    assert status == 200


async def test_a_body_too_large_to_replay_gets_its_csrf_token_first(stack: EmulatorStack) -> None:
    body = os.urandom(3 * MB)
    async with forwarding(stack) as (forwarder, _, _records):
        status, echoed, _ = await call(f"{forwarder.url}/http/Orders", "POST", io.BytesIO(body))
    assert status == 200 and echoed == body
    assert (stack.runtime.stats.csrf_fetches, stack.runtime.stats.csrf_rejections) == (1, 0)


async def test_a_401_to_a_body_too_large_to_replay_is_passed_through_as_it_is(stack: EmulatorStack) -> None:
    async with forwarding(stack) as (forwarder, _, records):
        await call(f"{forwarder.url}/http/GetTimestamp")
        stack.token_server.revoke_issued()
        status, _, headers = await call(f"{forwarder.url}/http/Count", "POST", io.BytesIO(b"z" * (3 * MB)))
        assert status == 401 and "WWW-Authenticate" in headers
        assert records.items[-1].attempts == 1
        again = await call(f"{forwarder.url}/http/Count", "POST", b"small")
    assert again[0] == 200
    assert records.items[-1].attempts == 1  # the refused token was dropped: the next request had a fresh one


async def test_a_runtime_that_breaks_off_mid_answer_cuts_the_apps_answer_too(stack: EmulatorStack) -> None:
    async with forwarding(stack) as (forwarder, _, records), aiohttp.ClientSession() as session:
        async with session.get(f"{forwarder.url}/http/Big") as response:
            await response.content.readexactly(MB)
            await stack.runtime.stop()  # the runtime goes away with 99 MB unsent
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # a cut answer must not look complete
        (record,) = await records.wait_for(1)
    assert record.outcome == "runtime_broke_off"


async def test_head_and_unusual_methods_pass_through(stack: EmulatorStack) -> None:
    async with forwarding(stack) as (forwarder, engine, _records):
        head = await call(f"{forwarder.url}/http/Echo", "HEAD")
        other = await call(f"{forwarder.url}/http/Echo", "PROPFIND")
    assert head[0] == 200 and head[1] == b""
    assert other[0] == 405  # the runtime's own answer: the flow takes the usual methods
    assert sample(engine, "senderd_forward_requests_total", route="/http/*", method="other", code="405") == 1


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        (
            {"allow": ["http/*"]},
            "forward.allow: 'http/*': a pattern is a path starting with / with at most one * at its end, e.g. /http/*",
        ),
        (
            {"allow": ["/http/*/x"]},
            "forward.allow: '/http/*/x': a pattern is a path starting with / "
            "with at most one * at its end, e.g. /http/*",
        ),
        ({"allow": []}, 'forward.allow: give at least one path pattern, e.g. ["/http/*"]'),
        ({"credentials": "other"}, "forward.credentials: no sending credentials set named 'other' (sets: default)"),
        (
            {"listen": "[::]:8788"},
            "forward: listen = '[::]:8788' is beyond localhost: set token_env "
            "(the bearer token the app must present) or listen on 127.0.0.1",
        ),
        ({"timeout": "0s"}, "forward.timeout"),
        ({"allowed": ["/http/*"]}, "forward.allowed"),
    ],
)
def test_bad_forward_sections_are_refused_with_the_key_named(forward: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"forward": forward}, source="t.toml")
    assert str(caught.value).startswith(f"t.toml: {message}")


def test_a_forward_listener_on_loopback_or_with_a_token_is_accepted() -> None:
    for forward in (
        {},
        {"listen": "[::1]:8788"},
        {"listen": "localhost:1"},
        {"listen": "0.0.0.0:8788", "token_env": "T"},
    ):
        config = config_from_dict({"forward": forward}, source="t.toml")
        assert config.forward is not None and config.forward.allow == ["/http/*"]


def test_the_sidecar_examples_forward_beside_the_relay_on_loopback() -> None:
    root = Path(__file__).parent.parent
    configmap = yaml.safe_load((root / "deploy/kubernetes/configmap.yaml").read_text())
    texts = {"config/sidecar.toml": (root / "config/sidecar.toml").read_text(),
             "configmap.yaml": configmap["data"]["senderd.toml"]}  # fmt: skip
    for source, text in texts.items():
        config = config_from_dict(tomllib.loads(text), source=source)
        assert config.relay is not None and config.forward is not None, source
        assert (config.forward.listen, config.forward.allow) == ("127.0.0.1:8788", ["/http/*"])
    pods = [d for d in yaml.safe_load_all((root / "deploy/kubernetes/sidecar-deployment.yaml").read_text())]
    app = pods[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "SENDERD_FORWARD_URL", "value": "http://127.0.0.1:8788"} in app["env"]


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET http://evil.example/http/GetTimestamp HTTP/1.1", b"404"),  # absolute form: no other host
        (b"CONNECT evil.example:443 HTTP/1.1", b"404"),
        (b"GET /http/\xe2\x82\xac HTTP/1.1", b"400"),
        (b"GET * HTTP/1.1", b"400"),
    ],
)
async def test_hostile_request_lines_are_4xx_and_reach_nothing(
    stack: EmulatorStack, request_line: bytes, status: bytes
) -> None:
    async with forwarding(stack) as (forwarder, _, _records):
        connection = await anyio.connect_tcp("127.0.0.1", forwarder.site.port)
        await connection.send(request_line + b"\r\nHost: x\r\n\r\n")
        answer = b""
        with anyio.fail_after(5):
            while b"\r\n" not in answer:
                answer += await connection.receive()
        await connection.aclose()
        assert answer.split(b" ")[1] == status
        assert (await call(f"{forwarder.url}/http/GetTimestamp"))[0] == 200  # and the forwarder goes on
    assert stack.runtime.stats.requests == 1
