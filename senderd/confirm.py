"""Delivery confirmation through Cloud Integration's Message Processing Log API.

A 200 says that the runtime accepted a message; a 202 (asynchronous flows) not even that it will succeed. A
flow with `confirm = "mpl"` has its message looked up after a successful send: by the MPL id of the answer
(`GET /api/v1/MessageProcessingLogs('<id>')`), else by its `SAP_ApplicationID`
(`$filter=ApplicationMessageId eq '<id>'`), until the log shows a final status or `confirm_timeout` passes.
COMPLETED confirms the send; FAILED, ESCALATED and CANCELLED make it `flow_failed` (with the log's
ErrorInformation text); PROCESSING, RETRY, ABANDONED and what is not found yet are looked up again with
backoff, and at the timeout the send is `unconfirmed`.

One `MplPoller` per credentials set of plan `api` (one API user) does every lookup of every send, paced below
SAP's limit of 100 requests per second and user, pausing as a 429 asks; a send only waits for its verdict.
Answers are read up to a small cap and checked field by field: an API answer of any size or shape is a
failed lookup, never a crash.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import random
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import anyio.abc

from senderd.auth.runtime import RuntimeAuth
from senderd.bounded import read_bounded
from senderd.clock import Clock
from senderd.durations import parse_retry_after
from senderd.errors import TokenError
from senderd.logs import get_logger
from senderd.metrics import ConfirmationStatus, Outcome
from senderd.retry import backoff

log = get_logger("confirm")
REQUESTS_PER_SECOND = 50.0
"""The poller's pace per API user: half of SAP's limit of 100 requests per second and user, leaving the rest
to a second replica or a monitoring tool on the same key (a 429 pauses the poller anyway)."""
LOOKUPS_AT_ONCE = 8
"""MPL API requests in flight at once, per poller."""
REQUEST_TIMEOUT = 10.0
"""Seconds one MPL API request may take."""
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
"""Lookups of one message: the first at once, then after 0.5 s doubling to 10 s (±10 %)."""
PAUSE_MAX = 60.0
"""The longest pause a 429's Retry-After can impose on the poller."""
ANSWER_BYTES = 64 * 1024
"""An MPL answer ($top=1) is a few KiB; a longer one is refused unread beyond this."""
ERROR_TEXT_BYTES = 16 * 1024
ERROR_TEXT_CHARS = 500
"""How much of a log's ErrorInformation is read, and kept (on one line) for the log and the error."""
FAILED_STATUSES: dict[str, ConfirmationStatus] = {
    "FAILED": "failed",
    "ESCALATED": "escalated",
    "CANCELLED": "cancelled",
}
"""The final statuses of a message that the iFlow did not process successfully."""
_MPL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STATUS = re.compile(r"^[A-Z_]{1,32}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_QUERY_SAFE = "'()/,:$"
_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What the Message Processing Log API said about one delivered message."""

    status: ConfirmationStatus
    mpl_id: str | None = None
    """The log's MessageGuid (from the answer, or found by the message's `SAP_ApplicationID`)."""
    mpl_status: str | None = None
    """The last status the log showed (e.g. PROCESSING), if one was seen."""
    error: str | None = None
    """The log's ErrorInformation text (failed), or why there is no final status (not confirmed)."""
    duration: float = 0.0
    lookups: int = 0

    @property
    def outcome(self) -> Outcome:
        """The send's outcome: `success`, `flow_failed` or `unconfirmed`."""
        if self.status == "completed":
            return "success"
        return "flow_failed" if self.status in FAILED_STATUSES.values() else "unconfirmed"

    def describe(self, timeout: float) -> str:
        """One line for the send's error (a send that was not confirmed, or failed inside the iFlow)."""
        where = f"MPL {self.mpl_id}" if self.mpl_id else "the message"
        if self.outcome == "flow_failed":
            text = f": {self.error}" if self.error else " (no error text in its log)"
            return f"the runtime accepted the message, but its processing log ({where}) says {self.mpl_status}{text}"
        if self.status == "pending":
            return f"not confirmed within {timeout:g}s: the processing log ({where}) still said {self.mpl_status}"
        if self.status == "api_error" or self.error is not None:
            return f"not confirmed: {self.error}"
        return f"not confirmed within {timeout:g}s: no processing log was found for the message"


@dataclass(eq=False)
class _Pending:
    """One message being confirmed."""

    flow: str
    mpl_id: str | None
    application_id: str | None
    started: float
    deadline: float
    done: anyio.Event = field(default_factory=anyio.Event)
    finished: bool = False
    lookups: int = 0
    refused_once: bool = False
    last: ConfirmationStatus = "not_found"
    """What the lookups found so far: `pending` (a status that is not final), `not_found` or `api_error`."""
    mpl_status: str | None = None
    problem: str | None = None
    result: Confirmation | None = None

    def finish(self, status: ConfirmationStatus, error: str | None, now: float) -> None:
        if not self.finished:
            self.finished = True
            self.result = Confirmation(status, self.mpl_id, self.mpl_status, error, now - self.started, self.lookups)
            self.done.set()

    def verdict(self, now: float) -> Confirmation:
        """The result, or (at the timeout) what was last found."""
        if self.result is None:
            self.finish(self.last, self.problem, now)
        assert self.result is not None
        return self.result


class MplPoller:
    """Confirms the messages of every send that asks, through one API user's Message Processing Log API."""

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        auth: RuntimeAuth,
        api_url: str,
        clock: Clock,
        *,
        rate: float = REQUESTS_PER_SECOND,
        lookups_at_once: int = LOOKUPS_AT_ONCE,
    ) -> None:
        """`name` is the credentials set (of plan `api`); `api_url` its key's `url`, the tenant's API host."""
        self.name = name
        self.session = session
        self.auth = auth
        self.base = api_url.rstrip("/") + "/api/v1/MessageProcessingLogs"
        self.clock = clock
        self.rate = rate
        self._slots = anyio.Semaphore(lookups_at_once)
        self._due: list[tuple[float, int, _Pending]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._pace = anyio.Lock()
        self._next_slot = float("-inf")
        self._paused_until = float("-inf")
        self._stopping = False
        self._live: set[_Pending] = set()
        self.requests = 0
        """MPL API requests made (lookups and error texts)."""

    @property
    def pending(self) -> int:
        """Messages being confirmed now."""
        return len(self._live)

    async def confirm(
        self, flow: str, *, mpl_id: str | None, application_id: str | None, timeout: float
    ) -> Confirmation:
        """Wait for the verdict on one delivered message (at most `timeout` seconds); never raises."""
        now = self.clock.monotonic()
        usable_id = mpl_id if mpl_id is not None and _MPL_ID.match(mpl_id) else None
        entry = _Pending(flow, usable_id, application_id, now, now + max(0.0, timeout))
        if usable_id is None and not application_id:
            entry.finish("not_found", "the answer named no MPL id and the message had no SAP_ApplicationID to "
                         "look it up by", now)  # fmt: skip
            return entry.verdict(now)
        if self._stopping:
            entry.finish("api_error", "senderd is stopping", now)
            return entry.verdict(now)
        self._live.add(entry)
        self._push(entry, now)
        try:
            with contextlib.suppress(TimeoutError):
                async with self.clock.fail_after(max(0.001, timeout)):
                    await entry.done.wait()
        finally:
            self._live.discard(entry)
            result = entry.verdict(self.clock.monotonic())  # also ends the lookups of a send that gave up
        return result

    def stop(self) -> None:
        """Senderd is stopping: every confirmation under way ends now (unconfirmed), later ones at once."""
        self._stopping = True
        now = self.clock.monotonic()
        for entry in list(self._live):
            entry.finish("api_error", "senderd is stopping", now)
        self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Look up what is due, paced, until cancelled."""
        async with anyio.create_task_group() as lookups:
            task_status.started()
            while True:
                entry = await self._next_due()
                await self._slots.acquire()
                lookups.start_soon(self._lookup_then_release, entry)

    # -- scheduling ---------------------------------------------------------------------------------

    def _push(self, entry: _Pending, due: float) -> None:
        heapq.heappush(self._due, (min(due, entry.deadline), next(self._seq), entry))
        self._wake.set()

    async def _next_due(self) -> _Pending:
        while True:
            while self._due and self._due[0][2].finished:
                heapq.heappop(self._due)
            now = self.clock.monotonic()
            if self._due and self._due[0][0] <= now:
                entry = heapq.heappop(self._due)[2]
                if now >= entry.deadline:
                    entry.finish(entry.last, entry.problem, now)
                    continue
                return entry
            delay = self._due[0][0] - now if self._due else None
            self._wake = anyio.Event()
            await self._sleep_or_wake(delay)

    async def _sleep_or_wake(self, delay: float | None) -> None:
        """Until `delay` has passed on the clock (None: forever) or something new is due."""
        if delay is None:
            await self._wake.wait()
            return
        async with anyio.create_task_group() as race:

            async def woken() -> None:
                await self._wake.wait()
                race.cancel_scope.cancel()

            race.start_soon(woken)
            await self.clock.sleep(delay)
            race.cancel_scope.cancel()

    async def _lookup_then_release(self, entry: _Pending) -> None:
        try:
            await self._lookup(entry)
        except Exception:  # a bug: this message goes unconfirmed, the poller goes on
            log.exception("confirmation_crashed", flow=entry.flow, credentials=self.name)
            entry.finish("api_error", "internal error while confirming", self.clock.monotonic())
        finally:
            self._slots.release()
        if not entry.finished:
            now = self.clock.monotonic()
            delay = backoff(entry.lookups, initial=BACKOFF_INITIAL, maximum=BACKOFF_MAX, jitter=0.1, rng=_RNG)
            self._push(entry, now + delay)

    # -- one lookup ---------------------------------------------------------------------------------

    async def _lookup(self, entry: _Pending) -> None:
        entry.lookups += 1
        try:
            async with self.clock.fail_after(REQUEST_TIMEOUT):
                await self._look_up(entry)
        except TimeoutError:
            self._problem(entry, f"the MPL API did not answer within {REQUEST_TIMEOUT:g}s")
        except TokenError as exc:
            self._problem(entry, f"no token for the MPL API (credentials {self.name}): {exc}")
        except (aiohttp.ClientError, OSError) as exc:
            self._problem(entry, f"the MPL API is unreachable: {type(exc).__name__}: {str(exc)[:160]}")

    def _problem(self, entry: _Pending, text: str) -> None:
        if entry.last != "pending":
            entry.last = "api_error"
        entry.problem = text

    async def _look_up(self, entry: _Pending) -> None:
        if entry.mpl_id is not None:
            url = f"{self.base}('{entry.mpl_id}')?$format=json"
        else:
            assert entry.application_id is not None
            quoted = entry.application_id.replace("'", "''")
            query = {
                "$filter": f"ApplicationMessageId eq '{quoted}' and Status ne 'DISCARDED'",
                "$orderby": "LogStart desc",
                "$top": "1",
                "$format": "json",
            }
            url = self.base + "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe=_QUERY_SAFE)
        status, headers, body = await self._get(url)
        now = self.clock.monotonic()
        if status == 200:
            record = _record(body, single=entry.mpl_id is not None)
            if record is None:
                self._problem(entry, "the MPL API's answer is not the JSON of a message processing log")
            elif record:
                await self._judge(entry, record, now)
            else:
                entry.problem = None  # not (yet) written: look again
        elif status == 404 and not _odata_error(body):  # Tomcat's page, say: no MPL API on this host
            entry.finish(
                "api_error",
                f"{self.base.split('/api/', 1)[0]} has no Message Processing Log API (HTTP 404 without an OData "
                f"error): credentials set {self.name!r} needs a key of plan api, whose url is the tenant's host "
                "without -rt",
                now,
            )
        elif status == 404:
            entry.problem = None  # not written yet (SAP writes logs asynchronously)
        elif status == 401 and not entry.refused_once:
            entry.refused_once = True  # the token was dropped: the next lookup fetches another
            self._problem(entry, "the MPL API refused the token (401)")
        elif status == 429:
            wait = parse_retry_after(headers.get("Retry-After"), now=self.clock.time())
            self._paused_until = max(self._paused_until, now + min(PAUSE_MAX, wait if wait is not None else 1.0))
            log.warning("mpl_api_rate_limited", credentials=self.name, pause_s=round(self._paused_until - now, 3))
            self._problem(entry, "the MPL API is rate limiting (429)")
        elif status in (401, 403):
            entry.finish(
                "api_error",
                f"the MPL API refused credentials set {self.name!r} (HTTP {status}): its key needs plan api and the "
                "role MonitoringDataRead; role changes take up to an hour to apply",
                now,
            )
        elif 400 <= status < 500:
            entry.finish("api_error", f"the MPL API refused the lookup (HTTP {status})", now)
        else:
            self._problem(entry, f"the MPL API answered HTTP {status}")

    async def _judge(self, entry: _Pending, record: dict[str, Any], now: float) -> None:
        status, guid = record.get("Status"), record.get("MessageGuid")
        if isinstance(guid, str) and _MPL_ID.match(guid) and entry.mpl_id is None:
            entry.mpl_id = guid  # found by its application id: look it up by its guid from now on
        if not isinstance(status, str) or not _STATUS.match(status):
            self._problem(entry, "the MPL API's answer has no readable Status")
            return
        entry.mpl_status, entry.problem, entry.last = status, None, "pending"
        failed = FAILED_STATUSES.get(status)
        if status == "COMPLETED":
            entry.finish("completed", None, now)
        elif failed is not None:
            text = await self._error_text(entry.mpl_id) if entry.mpl_id is not None else None
            entry.finish(failed, text, self.clock.monotonic())
        # else PROCESSING, RETRY, ABANDONED, DISCARDED or a status still to come: not final, look again

    async def _error_text(self, mpl_id: str) -> str | None:
        """The log's ErrorInformation, on one line and cut short (None if the API has none to give)."""
        try:
            status, _, body = await self._get(f"{self.base}('{mpl_id}')/ErrorInformation/$value", ERROR_TEXT_BYTES)
        except (aiohttp.ClientError, OSError, TokenError):
            return None
        if status != 200:
            return None
        text = " ".join(_CONTROL.sub(" ", body.decode("utf-8", errors="replace")).split())
        return (text[:ERROR_TEXT_CHARS] + ("..." if len(text) > ERROR_TEXT_CHARS else "")) or None

    async def _get(self, url: str, limit: int = ANSWER_BYTES) -> tuple[int, Any, bytes]:
        """One paced GET with the set's token: status, headers and the body (at most `limit` bytes of it; a
        longer answer of the API itself comes back empty, which no reader takes for a log)."""
        async with self._pace:
            now = self.clock.monotonic()
            start = max(now, self._next_slot, self._paused_until)
            if start > now:
                await self.clock.sleep(start - now)
            self._next_slot = start + 1.0 / self.rate
        credential = await self.auth.credential()
        headers = {"Accept": "application/json"}
        if credential.header is not None:
            headers["Authorization"] = credential.header
        self.requests += 1
        async with self.session.get(url, headers=headers, allow_redirects=False) as response:
            answer = await read_bounded(response, limit)
            status = response.status
            if status == 401:
                self.auth.refused(credential)  # the next request fetches another token
            kept = answer.data if not answer.truncated or limit != ANSWER_BYTES else b""
            return status, response.headers, kept


def _odata_error(body: bytes) -> bool:
    """Whether `body` is an OData error (JSON `{"error": ...}` or XML `<error ...>`), as the API's 404 is."""
    head = body[:4096].lstrip()
    if head.startswith(b"{"):
        try:
            return isinstance(json.loads(body), dict) and "error" in json.loads(body)
        except (ValueError, RecursionError):
            return False
    return b"<error" in head or b":error" in head


def _record(body: bytes, *, single: bool) -> dict[str, Any] | None:
    """The log in an OData V2 answer (`{"d": {...}}` for one, `{"d": {"results": [...]}}` for a list): the
    record, {} for an empty list, None for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    inner = data.get("d") if isinstance(data, dict) else None
    if not isinstance(inner, dict):
        return None
    if single:
        return inner if "Status" in inner or "MessageGuid" in inner else None
    results = inner.get("results")
    if not isinstance(results, list):
        return None
    if not results:
        return {}
    first = results[0]
    return first if isinstance(first, dict) and first else None
