"""The emulator's Message Processing Log API on the tenant's API host, over real TLS: OData V2 as SAP documents
it, logs written by the runtime's flows, the roles, the rate limit per user and the switches."""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from senderd.emulator.mpl import MplEntry
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack

pytestmark = pytest.mark.anyio


class Time:
    """The emulator's Unix time, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def time() -> Time:
    return Time()


@pytest.fixture
async def emulator(tmp_path: Path, time: Time) -> AsyncIterator[EmulatorStack]:
    async with EmulatorStack.started(tmp_path / "emu", now=time) as stack:
        late = FlowSpec("/Late", methods=frozenset({"POST"}), kind="async", status=202, processing_time=30)
        late.mpl_status, late.error_text = "FAILED", "Receiver down\n\tat x"
        stack.runtime.add_flow(late)
        yield stack


@pytest.fixture
async def http(emulator: EmulatorStack) -> AsyncIterator[aiohttp.ClientSession]:
    context = ssl.create_default_context(cafile=str(emulator.ca_path))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


def api_token(stack: EmulatorStack, *, scopes: list[str] | None = None, lifetime: float = 600) -> dict[str, str]:
    client_id = stack.tenant.credentials["api"].client_id
    return {"Authorization": f"Bearer {stack.token_server.mint(client_id, lifetime=lifetime, scopes=scopes)}"}


def send_token(stack: EmulatorStack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.token_server.mint(stack.client_id, lifetime=600)}"}


async def run_flow(http: aiohttp.ClientSession, stack: EmulatorStack, path: str, app_id: str) -> str:
    """Send one message to the runtime; the MPL id it answered with."""
    headers = {**send_token(stack), "SAP_ApplicationID": app_id}
    async with http.post(stack.runtime.url + path, data=b"<o/>", headers=headers) as answer:
        await answer.read()
        return answer.headers["SAP_MessageProcessingLogID"]


async def get_json(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, Any]:
    """Status and the JSON (or, when it is none, the text) of a GET asking for JSON."""
    async with http.get(url, headers={**headers, "Accept": "application/json"}) as answer:
        text = await answer.text()
        try:
            return answer.status, json.loads(text)
        except ValueError:
            return answer.status, text


async def test_a_log_in_odata_json_as_sap_documents_it(emulator: EmulatorStack, http: aiohttp.ClientSession) -> None:
    mpl_id = await run_flow(http, emulator, "/http/GetTimestamp", "order-1")
    api = emulator.tenant.api_url
    assert urllib.parse.urlsplit(api).port != urllib.parse.urlsplit(emulator.runtime.url).port
    status, body = await get_json(http, f"{api}/api/v1/MessageProcessingLogs('{mpl_id}')", api_token(emulator))
    assert status == 200
    log = body["d"]
    assert log["__metadata"]["type"] == "com.sap.hci.api.MessageProcessingLog"
    assert log["MessageGuid"] == mpl_id
    assert log["ApplicationMessageId"] == "order-1"
    assert log["Status"] == "COMPLETED"
    assert log["IntegrationFlowName"] == log["IntegrationArtifact"]["Id"] == "GetTimestamp"
    assert log["LogStart"] == log["LogEnd"] == "/Date(1800000000000)/"
    assert log["ErrorInformation"] == {"__deferred": {"uri": f"{log['__metadata']['uri']}/ErrorInformation"}}
    async with http.get(f"{api}/api/v1/MessageProcessingLogs('{mpl_id}')", headers=api_token(emulator)) as xml:
        assert xml.content_type == "application/atom+xml"  # SAP's default without $format=json
        assert f"<d:MessageGuid>{mpl_id}</d:MessageGuid>" in await xml.text()
    status, missing = await get_json(http, f"{api}/api/v1/MessageProcessingLogs('Anope')", api_token(emulator))
    assert status == 404
    assert missing["error"]["message"]["value"] == "Message processing log not found."
    async with http.get(emulator.runtime.url + "/api/v1/MessageProcessingLogs", headers=api_token(emulator)) as rt:
        assert rt.status == 404  # the runtime host serves no API


async def test_an_async_flow_is_processing_then_its_final_status_with_error_text(
    emulator: EmulatorStack, http: aiohttp.ClientSession, time: Time
) -> None:
    async with http.post(emulator.runtime.url + "/http/Late", data=b"x", headers=send_token(emulator)) as answer:
        assert answer.status == 202
        mpl_id = (await answer.json())["requestId"]
    url = f"{emulator.tenant.api_url}/api/v1/MessageProcessingLogs('{mpl_id}')"
    _, body = await get_json(http, url + "?$format=json", api_token(emulator))
    assert (body["d"]["Status"], body["d"]["LogEnd"]) == ("PROCESSING", None)
    async with http.get(url + "/ErrorInformation/$value", headers=api_token(emulator)) as early:
        assert early.status == 404  # no error (yet) while it is processing
    time.now += 30
    _, body = await get_json(http, url, api_token(emulator))
    assert body["d"]["Status"] == "FAILED"
    assert body["d"]["LogEnd"] == "/Date(1800000030000)/"
    async with http.get(url + "/ErrorInformation/$value", headers=api_token(emulator)) as error:
        assert error.status == 200
        assert await error.text() == "Receiver down\n\tat x"


async def test_a_failing_flow_is_failed(emulator: EmulatorStack, http: aiohttp.ClientSession) -> None:
    async with http.post(emulator.runtime.url + "/http/Failing", data=b"x", headers=send_token(emulator)) as answer:
        assert answer.status == 500
        mpl_id = answer.headers["SAP_MessageProcessingLogID"]
    _, body = await get_json(
        http, f"{emulator.tenant.api_url}/api/v1/MessageProcessingLogs('{mpl_id}')", api_token(emulator)
    )
    assert body["d"]["Status"] == "FAILED"


async def test_a_list_by_application_message_id_newest_first(
    emulator: EmulatorStack, http: aiohttp.ClientSession, time: Time
) -> None:
    first = await run_flow(http, emulator, "/http/GetTimestamp", "it's-1")
    time.now += 1
    second = await run_flow(http, emulator, "/http/GetTimestamp", "it's-1")
    await run_flow(http, emulator, "/http/GetTimestamp", "other")
    emulator.runtime.mpl.add(MplEntry("Adiscarded", "c", "GetTimestamp", "it's-1", time.now + 0.5, "DISCARDED"))
    time.now += 1
    query = urllib.parse.urlencode(
        {
            "$filter": "ApplicationMessageId eq 'it''s-1' and Status ne 'DISCARDED'",
            "$orderby": "LogStart desc",
            "$format": "json",
        },
        quote_via=urllib.parse.quote,
    )
    url = f"{emulator.tenant.api_url}/api/v1/MessageProcessingLogs?{query}"
    status, body = await get_json(http, url, api_token(emulator))
    assert status == 200
    assert [log["MessageGuid"] for log in body["d"]["results"]] == [second, first]
    _, top = await get_json(http, url + "&$top=1", api_token(emulator))
    assert [log["MessageGuid"] for log in top["d"]["results"]] == [second]
    piper = (  # as SAP's piper asks: url.QueryEscape writes spaces as '+'
        "$filter=IntegrationArtifact/Id+eq+'GetTimestamp'+and+Status+ne+'DISCARDED'&$orderby=LogEnd+desc&$top=1"
    )
    _, latest = await get_json(
        http, f"{emulator.tenant.api_url}/api/v1/MessageProcessingLogs?{piper}", api_token(emulator)
    )
    assert len(latest["d"]["results"]) == 1
    bad = f"{emulator.tenant.api_url}/api/v1/MessageProcessingLogs?$filter=substringof('x',Sender)"
    status, error = await get_json(http, bad, api_token(emulator))
    assert status == 400
    assert error["error"]["code"] == "Bad Request"


async def test_tokens_roles_and_the_rate_limit_per_user(
    emulator: EmulatorStack, http: aiohttp.ClientSession, time: Time
) -> None:
    mpl_id = await run_flow(http, emulator, "/http/GetTimestamp", "a")
    url = f"{emulator.tenant.api_url}/api/v1/MessageProcessingLogs('{mpl_id}')"
    assert (await get_json(http, url, {}))[0] == 401
    assert (await get_json(http, url, api_token(emulator, lifetime=-5)))[0] == 401
    assert (await get_json(http, url, send_token(emulator)))[0] == 403  # ESBMessaging.send is not MonitoringDataRead
    emulator.tenant.mpl_api.rate_limit = 5
    token = api_token(emulator)
    statuses = [(await get_json(http, url, token))[0] for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    async with http.get(url, headers=token) as limited:
        assert limited.headers["Retry-After"] == "1"
    time.now += 1.0
    assert (await get_json(http, url, token))[0] == 200  # a new second
    client_id = emulator.tenant.credentials["api"].client_id
    assert emulator.tenant.mpl_api.stats.peak_rate[client_id] == 5
    assert emulator.tenant.mpl_api.stats.rate_limited == 3


async def test_switches_late_logs_down_and_a_raw_answer(
    emulator: EmulatorStack, http: aiohttp.ClientSession, time: Time
) -> None:
    api = emulator.tenant.mpl_api
    api.faults.visible_after = 5.0  # SAP writes logs asynchronously: not found at first
    mpl_id = await run_flow(http, emulator, "/http/GetTimestamp", "a")
    url = f"{emulator.tenant.api_url}/api/v1/MessageProcessingLogs('{mpl_id}')"
    assert (await get_json(http, url, api_token(emulator)))[0] == 404
    time.now += 5
    assert (await get_json(http, url, api_token(emulator)))[0] == 200
    api.faults.answer = b"\x00" * 100
    async with http.get(url, headers=api_token(emulator)) as raw:
        assert await raw.read() == b"\x00" * 100
    api.faults.down = True
    assert (await get_json(http, url, api_token(emulator)))[0] == 503
