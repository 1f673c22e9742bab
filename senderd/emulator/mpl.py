"""Message processing logs: what the runtime writes for every message it processes, and the Cloud Integration
OData API that serves them on the tenant's API host (the `url` of a plan-`api` key).

`GET /api/v1/MessageProcessingLogs('<MessageGuid>')` gives one log; `GET /api/v1/MessageProcessingLogs` with
`$filter` (`Field eq 'value'` / `ne`, joined by `and`), `$orderby` (`LogStart` or `LogEnd`, `asc`/`desc`) and
`$top` a list; `.../ErrorInformation/$value` the error text of a failed message. OData V2: JSON (`{"d": ...}`)
when `$format=json` or `Accept: application/json` asks for it, else Atom XML, as SAP's API does. A token of the
tenant's token server with a `MonitoringDataRead` scope is required (401 without a valid one, 403 without the
role), and each user gets 100 requests per second (then 429), SAP's documented limit.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from xml.sax.saxutils import escape

import jwt
from aiohttp import web

from senderd.emulator.listener import TlsServer
from senderd.emulator.pki import Pki
from senderd.emulator.token_server import TokenServer

MplStatus = Literal["COMPLETED", "PROCESSING", "RETRY", "ESCALATED", "FAILED", "CANCELLED", "DISCARDED", "ABANDONED"]
"""The statuses a message processing log can have (SAP: Operations/message-status)."""
API_SCOPE_SUFFIX = "MonitoringDataRead"
USER_RATE_LIMIT = 100
"""Requests per second and user that the MPL API serves (SAP: rate limits on Cloud Integration)."""
MAX_TOP = 1000
_ENTITY = re.compile(r"^/api/v1/MessageProcessingLogs\('([^']*)'\)(/ErrorInformation(/\$value)?)?$")
_COLLECTION = "/api/v1/MessageProcessingLogs"
_CLAUSE = re.compile(r"^\s*([A-Za-z/]+)\s+(eq|ne)\s+'((?:[^']|'')*)'\s*$")
_FILTERABLE = {
    "ApplicationMessageId": "application_id",
    "MessageGuid": "guid",
    "CorrelationId": "correlation_id",
    "IntegrationFlowName": "iflow",
    "IntegrationArtifact/Id": "iflow",
}


@dataclass
class MplEntry:
    """One message's processing log. A message still being processed (`completes_at` in the future) shows
    PROCESSING with no `LogEnd`; then `final_status`."""

    guid: str
    correlation_id: str
    iflow: str
    application_id: str | None
    started: float
    final_status: MplStatus = "COMPLETED"
    completes_at: float | None = None
    error: str | None = None
    """The text `ErrorInformation/$value` gives (FAILED, ESCALATED and CANCELLED messages)."""

    def status_at(self, now: float) -> tuple[MplStatus, float | None]:
        """The status and `LogEnd` at Unix time `now`."""
        if self.completes_at is not None and now < self.completes_at:
            return "PROCESSING", None
        return self.final_status, self.completes_at if self.completes_at is not None else self.started


@dataclass
class MplStore:
    """Every message processing log the runtime wrote, by MessageGuid."""

    entries: dict[str, MplEntry] = field(default_factory=dict)

    def add(self, entry: MplEntry) -> MplEntry:
        """Record `entry` (replacing one with the same guid)."""
        self.entries[entry.guid] = entry
        return entry

    def by_application_id(self, application_id: str) -> list[MplEntry]:
        """The logs whose ApplicationMessageId is `application_id` (oldest first)."""
        return [e for e in self.entries.values() if e.application_id == application_id]


@dataclass
class MplApiFaults:
    """Faults of the MPL API; mutable at run time."""

    down: bool = False
    """Answer 503 to everything."""
    visible_after: float = 0.0
    """Seconds (emulator time) after a message started before its log is found (SAP writes logs asynchronously)."""
    answer: bytes | None = None
    """A raw 200 answer (any bytes, any size) instead of every log: a broken or hostile API."""
    answer_content_type: str = "application/json"


@dataclass
class MplApiStats:
    """What the MPL API was asked."""

    requests: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    paths: list[str] = field(default_factory=list)
    """Path and query of every request, as sent (for tests that check what a client asks)."""
    rate_limited: int = 0
    peak_rate: collections.Counter[str] = field(default_factory=collections.Counter)
    """The most requests each client id made within one second (what the rate limit counts)."""


class MplApi(TlsServer):
    """The tenant's OData API for message processing logs, over TLS, behind tokens with `MonitoringDataRead`."""

    what = "MPL API"

    def __init__(
        self,
        pki: Pki,
        token_server: TokenServer,
        store: MplStore,
        *,
        tenant: str = "emulator",
        rate_limit: int = USER_RATE_LIMIT,
    ) -> None:
        self.store = store
        self.faults = MplApiFaults()
        self.stats = MplApiStats()
        self.rate_limit = rate_limit
        self._pki = pki
        self._token_server = token_server
        self._tenant = tenant
        self._recent: dict[str, collections.deque[float]] = {}
        self._request_seen = asyncio.Event()

    def __repr__(self) -> str:
        url = self._listener.url if self._listener else None
        return f"MplApi(url={url!r}, logs={len(self.store.entries)})"

    @property
    def now(self) -> Callable[[], float]:
        """The emulator's Unix time (the token server's)."""
        return self._token_server.now

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen with TLS on host:port (0 = a free port)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        await self._listen(app, self._pki.server_ssl_context(), host, port)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self._started().port

    async def wait_for_requests(self, count: int) -> None:
        """Return once at least `count` requests have arrived."""
        while self.stats.requests < count:
            await self._request_seen.wait()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        self.stats.paths.append(request.raw_path)
        try:
            response = await self._respond(request)
        finally:
            self._request_seen.set()
            self._request_seen = asyncio.Event()
        self.stats.by_status[response.status] += 1
        return response

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        if self.faults.down:
            return web.Response(status=503, text="Service Unavailable")
        client_id = self._authorise(request)
        if isinstance(client_id, web.Response):
            return client_id
        if not self._within_rate(client_id):
            self.stats.rate_limited += 1
            return _odata_error(429, "Too Many Requests", "rate limit exceeded", headers={"Retry-After": "1"})
        if request.method not in ("GET", "HEAD"):
            return _odata_error(405, "Method Not Allowed", "only reading is emulated")
        json_wanted = request.query.get("$format") == "json" or "application/json" in request.headers.get("Accept", "")
        if self.faults.answer is not None:
            return web.Response(body=self.faults.answer, content_type=self.faults.answer_content_type)
        path = request.path
        if path == _COLLECTION:
            return self._collection(request, json_wanted)
        match = _ENTITY.match(path)
        if match is None:
            return _odata_error(404, "Not Found", f"Resource not found for the segment '{path.rsplit('/', 1)[-1]}'.")
        entry = self._visible(match.group(1))
        if entry is None:
            return _odata_error(404, "Not Found", "Message processing log not found.")
        if match.group(2):
            if entry.error is None or entry.status_at(self.now())[0] in ("PROCESSING", "COMPLETED"):
                return _odata_error(404, "Not Found", "No error information for this message processing log.")
            if match.group(3):
                return web.Response(text=entry.error, content_type="text/plain")
            return web.json_response({"d": {"MessageGuid": entry.guid, "Type": "MPL", "LastErrorModelStepId": None}})
        record = self._record(request, entry)
        if json_wanted:
            return web.json_response({"d": record})
        return web.Response(text=_atom_entry(record), content_type="application/atom+xml")

    def _authorise(self, request: web.Request) -> str | web.Response:
        """The client id of a valid token with the role, or the answer refusing the request."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return web.Response(status=401, text="Unauthorized", headers={"WWW-Authenticate": "Bearer"})
        try:
            claims = self._token_server.verify(token.strip())
        except jwt.InvalidTokenError:
            return web.Response(status=401, text="Unauthorized", headers={"WWW-Authenticate": "Bearer"})
        scopes = claims.get("scope", [])
        if not isinstance(scopes, list) or not any(isinstance(s, str) and s.endswith(API_SCOPE_SUFFIX) for s in scopes):
            return web.Response(status=403, text="Forbidden")
        client_id = claims.get("client_id")
        return client_id if isinstance(client_id, str) else ""

    def _within_rate(self, client_id: str) -> bool:
        now = self.now()
        recent = self._recent.setdefault(client_id, collections.deque())
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) >= self.rate_limit:
            return False
        recent.append(now)
        self.stats.peak_rate[client_id] = max(self.stats.peak_rate[client_id], len(recent))
        return True

    def _visible(self, guid: str) -> MplEntry | None:
        entry = self.store.entries.get(guid)
        if entry is None or entry.started + self.faults.visible_after > self.now():
            return None
        return entry

    def _collection(self, request: web.Request, json_wanted: bool) -> web.Response:
        try:
            clauses = _parse_filter(request.query.get("$filter", ""))
            order = _parse_orderby(request.query.get("$orderby", ""))
            top = int(request.query.get("$top", str(MAX_TOP)))
        except ValueError as exc:
            return _odata_error(400, "Bad Request", str(exc))
        if not 0 <= top <= MAX_TOP:
            return _odata_error(400, "Bad Request", f"$top must be between 0 and {MAX_TOP}")
        now = self.now()
        found = [e for e in self.store.entries.values() if self._visible(e.guid) and _matches(e, clauses, now)]
        if order is not None:
            name, descending = order

            def key(entry: MplEntry) -> float:
                if name == "LogStart":
                    return entry.started
                end = entry.status_at(now)[1]
                return end if end is not None else float("inf")

            found.sort(key=key, reverse=descending)
        records = [self._record(request, e) for e in found[:top]]
        if json_wanted:
            return web.json_response({"d": {"results": records}})
        return web.Response(text=_atom_feed(records), content_type="application/atom+xml")

    def _record(self, request: web.Request, entry: MplEntry) -> dict[str, Any]:
        """The log as the OData V2 JSON of `com.sap.hci.api.MessageProcessingLog`."""
        status, ended = entry.status_at(self.now())
        base = f"https://{request.host}/api/v1/MessageProcessingLogs('{entry.guid}')"
        component = f"CPI_{self._tenant}"
        weblink = urllib.parse.quote(json.dumps({"identifier": entry.guid}, separators=(",", ":")), safe="")
        return {
            "__metadata": {"id": base, "uri": base, "type": "com.sap.hci.api.MessageProcessingLog"},
            "MessageGuid": entry.guid,
            "CorrelationId": entry.correlation_id,
            "ApplicationMessageId": entry.application_id,
            "ApplicationMessageType": None,
            "LogStart": _odata_date(entry.started),
            "LogEnd": _odata_date(ended) if ended is not None else None,
            "Sender": None,
            "Receiver": None,
            "IntegrationFlowName": entry.iflow,
            "Status": status,
            "AlternateWebLink": f"https://{request.host}/itspaces/shell/monitoring/Messages/{weblink}",
            "LogLevel": "INFO",
            "CustomStatus": status,
            "TransactionId": secrets.token_hex(16),
            "PreviousComponentName": component,
            "LocalComponentName": component,
            "OriginComponentName": component,
            "IntegrationArtifact": {
                "__metadata": {"type": "com.sap.hci.api.IntegrationArtifact"},
                "Id": entry.iflow,
                "Name": entry.iflow,
                "Type": "INTEGRATION_FLOW",
                "PackageId": None,
                "PackageName": None,
            },
            **{
                name: {"__deferred": {"uri": f"{base}/{name}"}}
                for name in ("ErrorInformation", "AdapterAttributes", "CustomHeaderProperties", "Attachments", "Runs")
            },
        }


def _parse_filter(text: str) -> list[tuple[str, str, str]]:
    """`Field eq 'value' and Status ne 'X'` → [(field, op, value)]; ValueError for what is not emulated."""
    if not text.strip():
        return []
    clauses = []
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        match = _CLAUSE.match(part)
        if match is None or (match.group(1) not in _FILTERABLE and match.group(1) != "Status"):
            raise ValueError(f"Invalid filter expression: '{text[:200]}'")
        clauses.append((match.group(1), match.group(2), match.group(3).replace("''", "'")))
    return clauses


def _parse_orderby(text: str) -> tuple[str, bool] | None:
    if not text.strip():
        return None
    name, _, direction = text.strip().partition(" ")
    if name not in ("LogStart", "LogEnd") or direction.strip().lower() not in ("", "asc", "desc"):
        raise ValueError(f"Invalid $orderby: '{text[:100]}'")
    return name, direction.strip().lower() == "desc"


def _matches(entry: MplEntry, clauses: list[tuple[str, str, str]], now: float) -> bool:
    for name, op, value in clauses:
        actual = entry.status_at(now)[0] if name == "Status" else getattr(entry, _FILTERABLE[name])
        if (actual == value) != (op == "eq"):
            return False
    return True


def _odata_date(moment: float) -> str:
    return f"/Date({round(moment * 1000)})/"


def _odata_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": {"lang": "en", "value": message}}}
    return web.json_response(body, status=status, headers=headers)


def _properties(record: dict[str, Any]) -> str:
    cells = []
    for name, value in record.items():
        if isinstance(value, dict):
            continue
        text = "" if value is None else escape(str(value))
        null = ' m:null="true"' if value is None else ""
        cells.append(f"<d:{name}{null}>{text}</d:{name}>")
    return "<m:properties>" + "".join(cells) + "</m:properties>"


_ATOM = (
    'xmlns="http://www.w3.org/2005/Atom" '
    'xmlns:m="http://schemas.microsoft.com/ado/2007/08/dataservices/metadata" '
    'xmlns:d="http://schemas.microsoft.com/ado/2007/08/dataservices"'
)


def _atom_body(record: dict[str, Any]) -> str:
    uri = escape(record["__metadata"]["uri"])
    return f'<id>{uri}</id><content type="application/xml">{_properties(record)}</content>'


def _atom_entry(record: dict[str, Any]) -> str:
    return f'<?xml version="1.0" encoding="utf-8"?><entry {_ATOM}>{_atom_body(record)}</entry>'


def _atom_feed(records: list[dict[str, Any]]) -> str:
    entries = "".join(f"<entry>{_atom_body(r)}</entry>" for r in records)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f'<?xml version="1.0" encoding="utf-8"?><feed {_ATOM}><updated>{stamp}</updated>{entries}</feed>'
