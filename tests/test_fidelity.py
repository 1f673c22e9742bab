"""senderd behaves as a real Cloud Integration tenant expects (issue 13, part 1), each point against the
emulator in each of its modes: the CSRF rule, the documented 500 text, old tenants' 500 for an expired token,
asynchronous 202 flows, message ids across retries, External Certificate keys, body sizes and stalls."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import anyio
import pytest

from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.emulator.tenant import TenantSpec
from senderd.engine import Engine
from senderd.sender import mpl_id_in_body
from senderd.testing import StepClock
from tests.conftest import CapturedLogs
from tests.tools import engine_for

pytestmark = pytest.mark.anyio

ORDERS = {"name": "orders", "path": "/http/Orders", "method": "POST", "body": "<Order/>", "retries": 0}


def events(logs: CapturedLogs, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, logs.text.splitlines()) if e.get("event") == name]


def sample(engine: Engine, name: str, labels: dict[str, str]) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(params=[False, True], ids=["403-alone", "403-with-X-CSRF-Token-Required"])
def required(request: pytest.FixtureRequest) -> bool:
    """Both kinds of CSRF 403: whether Cloud Integration says `X-CSRF-Token: Required` is unconfirmed."""
    return bool(request.param)


# -- CSRF ------------------------------------------------------------------------------------------------


async def test_any_403_to_a_modifying_request_fetches_a_token_with_head_once(
    stack: EmulatorStack, required: bool
) -> None:
    stack.runtime.csrf_required_header = required
    async with engine_for(stack, ORDERS) as engine:  # csrf = "auto"
        first = await engine.send(engine.config.flow("orders"))
        second = await engine.send(engine.config.flow("orders"))  # the token and its cookies are reused
        stack.runtime.expire_csrf_tokens()  # a runtime restart or a session timeout
        third = await engine.send(engine.config.flow("orders"))
    assert [r.outcome for r in (first, second, third)] == ["success"] * 3
    stats = stack.runtime.stats
    assert stats.csrf_fetch_methods == {"HEAD": 2}  # as SAP Cloud SDK fetches
    assert stats.csrf_rejections == 2
    assert stats.by_status == {403: 2, 200: 5}
    ids = stats.application_ids
    assert ids[:3] == [first.message_id, None, first.message_id]  # the 403 and its retry carry one id
    assert ids[-3:] == [third.message_id, None, third.message_id]


async def test_head_refused_then_get_and_a_token_from_an_error_answer_is_taken(
    stack: EmulatorStack, required: bool
) -> None:
    stack.runtime.csrf_required_header = required
    stack.runtime.csrf_head_fetch = False  # HEAD is answered 405
    stack.runtime.csrf_fetch_status = 405  # and GET too, yet with the token in its header
    async with engine_for(stack, ORDERS) as engine:
        result = await engine.send(engine.config.flow("orders"))
    assert result.ok, result.last.error
    assert stack.runtime.stats.csrf_fetch_methods == {"GET": 1}
    assert stack.runtime.stats.by_status == {403: 1, 405: 2, 200: 1}


async def test_csrf_true_fetches_before_the_first_send(stack: EmulatorStack, required: bool) -> None:
    stack.runtime.csrf_required_header = required
    async with engine_for(stack, {**ORDERS, "csrf": True}) as engine:
        result = await engine.send(engine.config.flow("orders"))
    assert result.ok
    assert stack.runtime.stats.by_status == {200: 2}  # the HEAD fetch, then the POST: no 403 at all
    assert stack.runtime.stats.csrf_fetch_methods == {"HEAD": 1}


async def test_a_403_that_persists_with_a_fresh_token_is_reported_as_the_role_it_is(
    stack: EmulatorStack, required: bool
) -> None:
    stack.runtime.csrf_required_header = required
    stack.runtime.flows["/orders"].user_role = "OrdersSender"  # the flow's own User Role, which the key lacks
    async with engine_for(stack, ORDERS) as engine:
        result = await engine.send(engine.config.flow("orders"))
    assert result.outcome == "auth_error"
    assert result.status == 403
    assert result.attempts == 1
    error = result.last.error or ""
    assert error.startswith("HTTP 403 again with a freshly fetched CSRF token and its session cookies: not CSRF")
    assert "ESBMessaging.send" in error and "User Role" in error and "up to an hour" in error
    assert stack.runtime.stats.requests == 3  # POST, HEAD, POST: one fetch, one retry, no more
    labels = {"credentials": "default", "stage": "runtime", "reason": "forbidden"}
    assert sample(engine, "senderd_auth_failures_total", labels) == 1


async def test_a_403_without_any_token_to_fetch_is_a_missing_role(stack: EmulatorStack) -> None:
    stack.token_server.add_certificate_client(stack.client_id, stack.client.cert, ["it-rt-emulator!b1.Other"])
    async with engine_for(stack, ORDERS) as engine:
        result = await engine.send(engine.config.flow("orders"))
    assert result.outcome == "auth_error"
    assert (result.last.error or "").startswith("HTTP 403, and the runtime handed out no CSRF token: the client")
    assert stack.runtime.stats.requests == 2  # POST, HEAD (refused as well): GET would be refused too


async def test_csrf_false_never_fetches(stack: EmulatorStack) -> None:
    async with engine_for(stack, {**ORDERS, "csrf": False}) as engine:
        result = await engine.send(engine.config.flow("orders"))
    assert result.status == 403
    assert (result.last.error or "").startswith("HTTP 403: the client needs the role ESBMessaging.send")
    assert stack.runtime.stats.requests == 1
    assert stack.runtime.stats.csrf_fetches == 0


# -- the 500 text and the MPL id -------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [True, False], ids=["SAP-headers", "headers-stripped"])
async def test_a_500_names_its_mpl_id_from_a_header_or_from_the_documented_text(
    stack: EmulatorStack, headers: bool, logs: CapturedLogs
) -> None:
    stack.runtime.correlation_headers = headers
    async with engine_for(stack, {"name": "failing", "path": "/http/Failing"}) as engine:
        result = await engine.send(engine.config.flow("failing"))
    (entry,) = stack.runtime.mpl.entries.values()
    assert entry.final_status == "FAILED"
    assert result.outcome == "http_error"
    assert result.attempts == 1  # a 500 is the flow's own error: never retried
    assert result.mpl_id == entry.guid
    assert result.last.error == (
        f"HTTP 500: the iFlow failed to process the message (MPL ID {entry.guid}): its message processing log in "
        "Cloud Integration monitoring says why"
    )
    (finished,) = events(logs, "send_finished")
    assert finished["sap_messageprocessinglogid"] == entry.guid  # logged like the header id
    assert ("sap_mplcorrelationid" in finished) is headers


async def test_return_exception_to_sender_shows_the_exception_text(stack: EmulatorStack) -> None:
    stack.runtime.correlation_headers = False
    stack.runtime.flows["/failing"].return_exception = True
    stack.runtime.flows["/failing"].error_text = "java.lang.IllegalStateException: no order number"
    async with engine_for(stack, {"name": "failing", "path": "/http/Failing"}) as engine:
        result = await engine.send(engine.config.flow("failing"))
    assert result.last.error == "HTTP 500: java.lang.IllegalStateException: no order number"
    assert result.mpl_id is None


@pytest.mark.parametrize(
    ("status", "body", "found"),
    [
        (
            500,
            b"An internal server error occured: The MPL ID for the failed message is : AGO_s9LD-x\nFor more",
            "AGO_s9LD-x",
        ),
        (500, b"The MPL ID for the failed message is :Abcd-1234-Xyz", "Abcd-1234-Xyz"),
        (500, b"java.lang.Exception: boom", None),
        (202, b'{"info": "saved", "requestId": "AGO_s9LDIZCVYPn25Ir6mqBK7EJw"}', "AGO_s9LDIZCVYPn25Ir6mqBK7EJw"),
        (
            202,
            b"<response><requestId>AGO_s9LDIZCVYPn25Ir6mqBK7EJw</requestId></response>",
            "AGO_s9LDIZCVYPn25Ir6mqBK7EJw",
        ),
        (202, b"requestId = AGO_s9LDIZCVYPn25Ir6mqBK7EJw", "AGO_s9LDIZCVYPn25Ir6mqBK7EJw"),
        (202, b"  AGO_s9LDIZCVYPn25Ir6mqBK7EJw\n", "AGO_s9LDIZCVYPn25Ir6mqBK7EJw"),
        (202, b"<response><info>passed on</info></response>", None),
        (202, b"requestId" * 100_000, None),
        (200, b'{"requestId": "AGO_s9LDIZCVYPn25Ir6mqBK7EJw"}', None),
    ],
)
def test_mpl_ids_in_answer_bodies(status: int, body: bytes, found: str | None) -> None:
    assert mpl_id_in_body(status, body) == found


# -- old tenants: an expired token got a 500 -------------------------------------------------------------


@pytest.mark.parametrize("expired_status", [401, 500], ids=["tenant-401", "tenant-before-6.76.44-500"])
async def test_an_expired_token_costs_one_refresh_whether_401_or_an_old_tenants_500(
    tmp_path: Path, expired_status: int, logs: CapturedLogs
) -> None:
    clock = StepClock()
    skew = [0.0]
    async with EmulatorStack.started(tmp_path / "emu", now=lambda: clock.time() + skew[0]) as stack:
        stack.runtime.expired_token_status = expired_status
        flows: list[dict[str, Any]] = [
            {"name": "ts", "path": "/http/GetTimestamp", "retries": 0},
            {"name": "failing", "path": "/http/Failing"},
        ]
        async with engine_for(stack, *flows, clock=clock) as engine:
            assert (await engine.send(engine.config.flow("ts"))).ok
            token = engine.tokens.current
            assert token is not None
            clock.advance(token.remaining(clock.monotonic()) - 3)  # 3 s left as senderd counts: still usable
            skew[0] = 5.0  # the tenant's clock runs ahead: for it, the token has expired
            result = await engine.send(engine.config.flow("ts"))
            failing = await engine.send(engine.config.flow("failing"))  # a 500 with a fresh token: the flow's
    assert result.ok, result.last.error
    assert result.attempt_codes == ("200",)  # the refresh happened inside the one attempt
    stats = stack.runtime.stats
    assert stats.expired_tokens == 1
    assert stats.by_status[expired_status] == (2 if expired_status == 500 else 1)  # 500: the failing flow's too
    assert stack.token_server.stats.issued == 2  # one refresh
    assert len(set(stats.application_ids)) == 1  # GET: no id at all, the same on each request
    assert failing.outcome == "http_error"
    assert failing.attempts == 1
    assert stats.by_address["/failing"] == 1  # not retried, no refresh
    assert stack.token_server.stats.issued == 2
    assert len(events(logs, "expired_token_500")) == (1 if expired_status == 500 else 0)


# -- asynchronous flows: 202 -----------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [True, False], ids=["SAP-headers", "headers-stripped"])
async def test_an_asynchronous_flow_answers_202_a_success_whose_id_is_logged(
    stack: EmulatorStack, headers: bool, logs: CapturedLogs
) -> None:
    stack.runtime.correlation_headers = headers
    async with engine_for(stack, {"name": "async", "path": "/http/Async", "method": "POST", "body": "<o/>"}) as engine:
        result = await engine.send(engine.config.flow("async"))
    (entry,) = stack.runtime.mpl.entries.values()
    assert result.ok
    assert result.status == 202
    assert json.loads(result.body)["requestId"] == entry.guid
    assert result.mpl_id == entry.guid  # from the header, else from the body
    assert result.last.body_mpl_id == entry.guid
    (finished,) = events(logs, "send_finished")
    assert finished["sap_messageprocessinglogid"] == entry.guid
    assert entry.status_at(stack.token_server.now())[0] == "PROCESSING"  # accepted, not yet processed


# -- message ids ---------------------------------------------------------------------------------------


async def test_a_message_keeps_its_id_across_retries(stack: EmulatorStack) -> None:
    flow = {"name": "flaky", "path": "/http/Flaky", "method": "POST", "body": "x", "retries": 3}
    async with engine_for(stack, flow, clock=StepClock()) as engine:
        result = await engine.send(engine.config.flow("flaky"))
        again = await engine.send(engine.config.flow("flaky"))
    assert result.attempt_codes == ("503", "503", "200")
    assert result.message_id is not None and len(result.message_id) <= 120  # a generated id fits
    assert stack.runtime.stats.application_ids[:3] == [result.message_id] * 3
    assert again.message_id != result.message_id  # a new message, a new id


# -- service keys as SAP writes them ---------------------------------------------------------------------


@pytest.mark.parametrize("pinned", [True, False], ids=["pin-on", "pin-off"])
@pytest.mark.parametrize("auth", ["oauth", "client-certificate"])
async def test_an_external_certificate_key_with_one_certificate_sends(tmp_path: Path, pinned: bool, auth: str) -> None:
    spec = TenantSpec("ext", pin_external_certificate=pinned)
    async with EmulatorStack.started(tmp_path / "emu", tenants=[spec]) as stack:
        tenant = stack.tenant
        key = json.loads(tenant.key_path("external-certificate").read_text())["oauth"]
        assert key["certificatedetails"]["serialnumber"].startswith("0x")
        assert key["certificate"].count("BEGIN CERTIFICATE") == 1  # no chain
        credentials = {
            "service_key": str(tenant.key_path("external-certificate")),
            "key_file": str(tenant.external_key_path("pem")),
            "auth": auth,
        }
        async with engine_for(stack, {"name": "ts", "path": "/http/GetTimestamp"}, credentials=credentials) as engine:
            assert engine.only_set.key.notes == ()  # the 0x serial matches the certificate: nothing to say
            result = await engine.send(engine.config.flow("ts"))
    assert result.ok, result.last.error
    assert tenant.runtime.stats.auth_modes == {"bearer" if auth == "oauth" else "client_certificate": 1}


# -- sizes and stalls ------------------------------------------------------------------------------------


async def test_a_stalled_body_is_cut_and_senderd_never_stalls_one(stack: EmulatorStack, logs: CapturedLogs) -> None:
    stack.runtime.body_stall_limit = 0.5
    token = stack.token_server.mint(stack.client_id, lifetime=60)
    context = ssl.create_default_context(cafile=str(stack.ca_path))
    port = int(stack.runtime.url.rsplit(":", 1)[1])
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port, ssl_context=context, tls_standard_compatible=False) as s:
            head = (
                f"POST /http/GetTimestamp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                "Content-Length: 100\r\n\r\n"
            )
            await s.send(head.encode() + b"only ten b")  # and then nothing: a sender whose source stalled
            answer = await s.receive()
    assert answer.startswith(b"HTTP/1.1 408")
    assert stack.runtime.stats.stalled_bodies == 1

    stack.runtime.body_stall_limit = 2.0
    stack.runtime.add_flow(FlowSpec("/Upload", methods=frozenset({"POST"}), body="stored"))
    big = 41 * 1024 * 1024  # over SAP's recommended 40 MB: sent, with a warning
    flow = {"name": "upload", "path": "/http/Upload", "method": "POST", "timeout": "60s"}
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("upload"), body=b"x" * big)
    assert result.ok, result.last.error
    assert stack.runtime.stats.messages[-1].body == b"x" * big
    assert stack.runtime.stats.stalled_bodies == 1  # senderd's body came whole, never stalling
    assert stack.runtime.stats.largest_body_gap < 2.0
    (warning,) = events(logs, "large_body")
    assert warning["flow"] == "upload"
    assert warning["body_mb"] == 41
