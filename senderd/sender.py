"""One send to a Cloud Integration flow: Bearer token, CSRF handling, timeout, checks, classification.

`Sender.attempt` makes one HTTP exchange as the runtime expects it, and says what happened in an `Attempt`:
- at most one token refresh after a 401, and after a 500 that came while the token was within
  `EXPIRY_500_WINDOW` seconds of its expiry (tenants before Cloud Integration 6.76.44 answered an expired
  token with 500);
- the CSRF rule: a 403 to a modifying request of a flow that is not `csrf = false` fetches a token once (HEAD
  with `X-CSRF-Token: Fetch` as SAP Cloud SDK does, GET if HEAD is refused; a token is taken even from an
  error answer; the session cookies are kept) and retries once. Whether Cloud Integration's 403 says
  `X-CSRF-Token: Required` is unconfirmed, so nothing depends on it. A 403 that persists with a fresh token
  is reported as the role problem it is.
It neither schedules nor retries: `retry.deliver` does that, and `retry.RetryPolicy` decides what is
retryable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import uuid
from collections.abc import Awaitable
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
import anyio
from multidict import CIMultiDict, CIMultiDictProxy

from senderd.auth.runtime import Credential, RuntimeAuth
from senderd.bounded import read_bounded
from senderd.clock import Clock, SystemClock
from senderd.config import DEFAULT_SET, CredentialsConfig, FlowConfig
from senderd.durations import parse_retry_after
from senderd.errors import TokenError
from senderd.logs import get_logger
from senderd.metrics import Metrics, Outcome
from senderd.result import Attempt
from senderd.sessions import proxy_for, proxy_problem

log = get_logger("sender")
T = TypeVar("T")
CSRF_ANSWER_BYTES = 64 * 1024
EXPIRY_500_WINDOW = 5.0
"""Seconds before a token's expiry within which a 500 is taken for an expired token (old tenants): refreshed and
retried once."""
ROLE_HINT = (
    "the client needs the role ESBMessaging.send (or the User Role the flow's HTTPS sender adapter names); "
    "role changes take up to an hour to apply"
)


class Sender:
    """Sends to flows on one runtime session of one credentials set; shared by all workers."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: RuntimeAuth,
        runtime_url: str,
        metrics: Metrics,
        clock: Clock,
        credentials: CredentialsConfig | None = None,
        *,
        name: str = DEFAULT_SET,
    ) -> None:
        self.session = session
        self.auth = auth
        self.runtime_url = runtime_url.rstrip("/")
        self.metrics = metrics
        self.clock = clock
        self.credentials = credentials or CredentialsConfig()
        self.name = name
        """The credentials set's name (a metric label)."""
        self._csrf: dict[str, str] = {}  # origin -> token (bound to the session cookies in the jar)
        self._csrf_lock: dict[str, anyio.Lock] = {}
        self._html_warned: set[str] = set()
        self._proxies: dict[str, str | None] = {}
        self._routes: dict[str, _Route] = {}
        self._native_timeout = isinstance(clock, SystemClock)
        """On the system clock an attempt's deadline rides on the request as aiohttp's own timeout (which it
        sets anyway), not in a timeout scope of its own around the whole attempt: the waits outside the
        request (a token, a CSRF token) get one only when they wait."""

    def proxy(self, origin: str) -> str | None:
        """The proxy for requests to `origin` (looked up once per origin)."""
        return self._proxy(origin)

    def _proxy(self, origin: str) -> str | None:
        """The proxy for requests to `origin` (looked up once per origin)."""
        try:
            return self._proxies[origin]
        except KeyError:
            proxy = self._proxies[origin] = proxy_for(origin, self.credentials)
            return proxy

    def url_of(self, flow: FlowConfig) -> str:
        """The absolute URL of the flow's endpoint."""
        return flow.path if flow.path.startswith("https://") else self.runtime_url + flow.path

    def _route(self, flow: FlowConfig) -> _Route:
        """Where and with which fixed headers the flow's requests go (worked out once per flow configuration:
        parsing the URL and building the headers were a tenth of a send's own cost)."""
        route = self._routes.get(flow.name)
        if route is None or route.flow is not flow:  # a reload brings new flow objects
            url = self.url_of(flow)
            origin = _origin(url)
            whole = aiohttp.ClientTimeout(total=flow.timeout)
            route = _Route(flow, url, origin, self._proxy(origin), _flow_headers(flow, {}), whole)
            self._routes[flow.name] = route
        return route

    async def attempt(
        self,
        flow: FlowConfig,
        body: bytes | None = None,
        extra_headers: dict[str, str] | None = None,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> Attempt:
        """One exchange under the flow's timeout (or `timeout`, if shorter: what is left of a deadline)."""
        limit = flow.timeout if timeout is None else max(0.001, min(flow.timeout, timeout))
        try:
            if self._native_timeout:
                deadline_at = self.clock.monotonic() + limit
                whole = limit == flow.timeout
                return await self._exchange(flow, body, extra_headers or {}, message_id, deadline_at, whole)
            async with self.clock.fail_after(limit):
                return await self._exchange(flow, body, extra_headers or {}, message_id, None)
        except TimeoutError:
            self.metrics.attempt(flow.name, None)
            return Attempt("timeout", error=f"no answer within {limit:g}s")
        except TokenError as exc:  # counted per fetch by the token provider's listener
            return Attempt(
                "auth_error",
                error=f"no token: {exc}",
                token_failure=exc.reason,
                retry_after=self.auth.next_attempt_in,
            )
        except aiohttp.ClientConnectorCertificateError as exc:
            self.metrics.attempt(flow.name, None)
            return Attempt("connection_error", error=_certificate_problem(exc), certificate_problem=True)
        except (aiohttp.ClientError, OSError) as exc:
            self.metrics.attempt(flow.name, None)
            sent = not isinstance(exc, aiohttp.ClientConnectorError)  # refused, unresolvable, handshake: never sent
            said = proxy_problem(exc, self.credentials) or f"{type(exc).__name__}: {_short(exc)}"
            return Attempt("connection_error", error=said, request_sent=sent)

    async def _within(self, wait: Awaitable[T], deadline_at: float | None) -> T:
        """A wait outside the request, under what is left of the attempt's deadline (None: the whole attempt
        is under `clock.fail_after` already)."""
        if deadline_at is None:
            return await wait
        async with asyncio.timeout(deadline_at - self.clock.monotonic()):
            return await wait

    def _request_timeout(self, deadline_at: float | None) -> aiohttp.ClientTimeout:
        if deadline_at is None:
            return self.session.timeout
        return aiohttp.ClientTimeout(total=max(0.001, deadline_at - self.clock.monotonic()))

    async def _exchange(
        self, flow: FlowConfig, body: bytes | None, extra: dict[str, str], message_id: str | None,
        deadline_at: float | None, whole: bool = False,
    ) -> Attempt:  # fmt: skip
        """The attempt; `deadline_at` (system clock): when it must have ended, else it runs under a timeout;
        `whole`: the attempt has the flow's whole `timeout` (a request sent at once takes the one made for it)."""
        route = self._route(flow)
        url, origin = route.url, route.origin
        credential = self.auth.ready() if deadline_at is not None else None
        if credential is None:
            whole = False
            credential = await self._within(self.auth.credential(), deadline_at)
        token_refreshed = False
        csrf: CsrfNote = None
        if flow.csrf is True and flow.modifying and origin not in self._csrf:
            whole = False
            await self._within(self._fetch_csrf(flow, url, origin, credential), deadline_at)
        while True:
            headers = route.headers_with(extra)
            if credential.header is not None:
                headers["Authorization"] = credential.header
            if message_id is not None and "SAP_ApplicationID" not in headers:
                headers["SAP_ApplicationID"] = message_id
            sent_csrf = self._csrf.get(origin) if flow.modifying else None
            if sent_csrf is not None:
                headers["X-CSRF-Token"] = sent_csrf
            async with self.session.request(
                flow.method,
                url,
                params=flow.query or None,
                data=_payload(body),
                headers=headers,
                proxy=route.proxy,
                allow_redirects=False,
                timeout=route.timeout if whole else self._request_timeout(deadline_at),
            ) as response:
                answer_body = await read_bounded(response, flow.max_response_bytes)
                status, answer = response.status, response.headers
            whole = False  # a second request has what is left
            payload = answer_body.data
            truncated = answer_body.truncated
            self.metrics.attempt(flow.name, status)
            if status == 401 and not token_refreshed:
                token_refreshed = True
                self.metrics.runtime_auth_failure(self.name, "unauthorized")  # once per send, whatever comes next
                if self.auth.refused(credential):
                    credential = await self._within(self.auth.credential(), deadline_at)
                    continue
                return self._classify(flow, status, answer, payload, counted=True, truncated=truncated)
            if status == 500 and not token_refreshed and self._near_expiry(credential):
                token_refreshed = True  # an old tenant's answer to an expired token: the flow did not run
                log.info("expired_token_500", flow=flow.name, credentials=self.name, action="refresh and retry once")
                if self.auth.refused(credential):
                    credential = await self._within(self.auth.credential(), deadline_at)
                    continue
            if status == 403 and flow.csrf is not False and flow.modifying and csrf is None:
                token = await self._within(
                    self._fetch_csrf(flow, url, origin, credential, stale=sent_csrf), deadline_at
                )
                csrf = "none" if token is None else "fresh"
                if token is not None and token != sent_csrf:
                    continue  # the same token again: the session was fine, the 403 is not about CSRF
            return self._classify(
                flow, status, answer, payload, counted=token_refreshed, truncated=truncated, csrf=csrf
            )

    def _near_expiry(self, credential: Credential) -> bool:
        token = credential.token
        return token is not None and token.remaining(self.clock.monotonic()) <= EXPIRY_500_WINDOW

    def csrf_token(self, origin: str) -> str | None:
        """The CSRF token in hand for `origin` (shared by every flow and forwarded request of this set)."""
        return self._csrf.get(origin)

    async def fetch_csrf(
        self, url: str, credential: Credential, *, stale: str | None = None, params: dict[str, str] | None = None
    ) -> str | None:
        """Fetch a CSRF token for `url`'s origin as flows do (see `_fetch_csrf`); the token in hand, or None."""
        return await self._fetch_csrf(params, url, _origin(url), credential, stale)

    async def _fetch_csrf(
        self, flow: FlowConfig | dict[str, str] | None, url: str, origin: str, credential: Credential,
        stale: str | None = None,
    ) -> str | None:  # fmt: skip
        """Fetch a CSRF token: HEAD with `X-CSRF-Token: Fetch`, then GET if HEAD gave none (unless it was
        refused for authorisation, which GET would be too). The token counts whatever the answer's status;
        the answer's cookies (the session it is bound to) stay in the session's jar. One fetch per origin at
        a time, shared by concurrent senders; one that finds a token other than `stale` already fetched by
        another takes it. Returns the token in hand (None: the runtime gave none)."""
        lock = self._csrf_lock.setdefault(origin, anyio.Lock())
        async with lock:
            current = self._csrf.get(origin)
            if current not in (None, stale):
                return current  # another sender refreshed it while we waited
            headers = {"X-CSRF-Token": "Fetch"}
            params = flow.query if isinstance(flow, FlowConfig) else flow
            if credential.header is not None:
                headers["Authorization"] = credential.header
            value: str | None = None
            for method in ("HEAD", "GET"):
                async with self.session.request(
                    method,
                    url,
                    headers=headers,
                    params=params or None,
                    proxy=self._proxy(origin),
                    allow_redirects=False,
                ) as response:
                    await read_bounded(response, CSRF_ANSWER_BYTES)  # the token is in a header; the body is waste
                    value = _csrf_token(response.headers.get("X-CSRF-Token"))
                    status = response.status
                if value is not None or status in (401, 403):
                    break
            if value is not None:
                self._csrf[origin] = value
            else:
                self._csrf.pop(origin, None)
            return value

    def _classify(
        self,
        flow: FlowConfig,
        status: int,
        headers: CIMultiDictProxy[str],
        body: bytes,
        *,
        counted: bool = False,
        truncated: bool = False,
        csrf: CsrfNote = None,
    ) -> Attempt:
        """What an answer means; `counted`: a 401 of this send was already counted as an auth failure;
        `csrf`: after a 403, whether a fresh CSRF token was tried ("fresh") or none could be had ("none")."""
        plain = status == 200 and not truncated and flow.expect_body is None and not flow.expect_status
        if plain and (flow.name in self._html_warned or _HTML.match(body[:64]) is None):
            return Attempt("success", status, headers, body)  # the common case, in one step
        attempt = self._verdict(flow, status, headers, body, counted, csrf)
        body_id = mpl_id_in_body(status, body)
        if body_id is not None:
            attempt = dataclasses.replace(attempt, body_mpl_id=body_id)
        return dataclasses.replace(attempt, answer_truncated=True) if truncated else attempt

    def _verdict(
        self,
        flow: FlowConfig,
        status: int,
        headers: CIMultiDictProxy[str],
        body: bytes,
        counted: bool,
        csrf: CsrfNote,
    ) -> Attempt:
        expected = flow.expect_status
        status_ok = status in expected if expected else 200 <= status < 300
        if not status_ok:
            outcome: Outcome = "http_error"
            if status in (401, 403) and status not in flow.retry_on:
                outcome = "auth_error"
                if status == 403:
                    self.metrics.runtime_auth_failure(self.name, "forbidden")
                elif not counted:
                    self.metrics.runtime_auth_failure(self.name, "unauthorized")
            return Attempt(
                outcome,
                status,
                headers,
                body,
                error=_http_error(status, headers, body, urlsplit(self.url_of(flow)).path, csrf),
                retry_after=parse_retry_after(headers.get("Retry-After"), now=self.clock.time()),
            )
        if flow.expect_body is not None:
            text = body.decode("utf-8", errors="replace")
            if re.search(flow.expect_body, text) is None:
                return Attempt(
                    "check_failed",
                    status,
                    headers,
                    body,
                    error=f"body does not match expect_body {flow.expect_body!r}{_excerpt(body)}",
                )
        if flow.expect_body is None and flow.name not in self._html_warned and _HTML.match(body[:64]):
            self._html_warned.add(flow.name)  # once per flow: a login page is a 200 too
            log.warning(
                "html_answer",
                flow=flow.name,
                status=status,
                hint="an HTML page answered with success: often a login page (wrong URL or authentication "
                "mode); set expect_body to check what the flow returns",
            )
        return Attempt("success", status, headers, body)


_EXPIRED_OR_NOT_YET_VALID = frozenset({9, 10})  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
_NAME_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _certificate_problem(exc: aiohttp.ClientConnectorCertificateError) -> str:
    """What is wrong with the runtime's certificate, and what fixes it."""
    cause = exc.certificate_error
    code = getattr(cause, "verify_code", None)
    reason = getattr(cause, "verify_message", None) or _short(cause)
    where = f"runtime {exc.host}:{exc.port}"
    if code in _EXPIRED_OR_NOT_YET_VALID:
        return f"{where}: TLS {reason}: the runtime's certificate must be renewed (or this machine's clock is off)"
    if code in _NAME_MISMATCH:
        return f"{where}: TLS {reason}: check the host in runtime.url or the flow's path"
    return f"{where}: TLS certificate not trusted ({reason}): set runtime.ca_file or credentials.ca_file"


@dataclasses.dataclass(frozen=True, slots=True)
class _Route:
    """A flow's request target and fixed headers (its own, and its `content_type`)."""

    flow: FlowConfig
    url: str
    origin: str
    proxy: str | None
    headers: CIMultiDict[str]
    timeout: aiohttp.ClientTimeout
    """The request timeout of an attempt with the flow's whole `timeout`."""

    def headers_with(self, extra: dict[str, str]) -> CIMultiDict[str]:
        """A fresh copy of the fixed headers with a caller's `extra` ones (which may bring a Content-Type)."""
        return self.headers.copy() if not extra else _flow_headers(self.flow, extra)


def _flow_headers(flow: FlowConfig, extra: dict[str, str]) -> CIMultiDict[str]:
    """The flow's own headers, a caller's `extra` over them, and the flow's `content_type` unless one of them
    names a Content-Type."""
    headers = CIMultiDict(flow.headers)
    headers.update(extra)
    if flow.content_type and "Content-Type" not in headers:
        headers["Content-Type"] = flow.content_type
    return headers


CsrfNote = Literal["fresh", "none"] | None
"""After a 403 to a modifying request: a fresh CSRF token was tried ("fresh"), or none could be had ("none")."""


def _csrf_token(value: str | None) -> str | None:
    """A CSRF token from an `X-CSRF-Token` answer header (not the words `Required` or `Fetch`)."""
    if value is None or not value.strip() or value.strip().lower() in ("required", "fetch", "unsafe"):
        return None
    return value.strip()


_MPL_ID_TEXT = re.compile(rb"The MPL ID for the failed message is\s*:\s*([A-Za-z0-9_-]{1,64})")
_REQUEST_ID = re.compile(
    rb"[\"']?(?:requestId|SAP_MessageProcessingLogI[Dd]|MessageGuid|mplId)[\"']?\s*(?:[:=]|>)\s*[\"']?"
    rb"([A-Za-z0-9_-]{8,64})",
    re.IGNORECASE,
)
_LONE_ID = re.compile(rb"^\s*([A-Za-z0-9_-]{20,64})\s*$")
MPL_ID_SCAN_BYTES = 16 * 1024
"""How much of an answer is searched for an MPL id (the documented texts are short)."""


def mpl_id_in_body(status: int, body: bytes) -> str | None:
    """The message processing log id an answer's body names: a 500's documented text ("The MPL ID for the
    failed message is : <id>"), or a 202's id to poll (`"requestId": "<id>"` as in SAP's decoupling patterns,
    `<requestId>` in XML, or the body being just the id)."""
    head = body[:MPL_ID_SCAN_BYTES]
    if status == 500:
        found = _MPL_ID_TEXT.search(head)
    elif status == 202:
        found = _REQUEST_ID.search(head) or _LONE_ID.match(head)
    else:
        return None
    return found.group(1).decode("ascii") if found else None


STREAMED_BODY_BYTES = 1 << 20
"""A body above this is written in pieces, the event loop free between them (aiohttp writes raw bytes in one
go): no other send's body stalls behind a large one, and this one flows as fast as the runtime reads it."""


def _payload(body: bytes | None) -> bytes | io.BytesIO | None:
    """What aiohttp is given for `body`: the bytes, or a fresh view of them to write in pieces (aiohttp closes
    it after the request: each attempt gets its own; BytesIO shares the bytes, no copy)."""
    if body is not None and len(body) > STREAMED_BODY_BYTES:
        return io.BytesIO(body)
    return body


def new_message_id() -> str:
    """A fresh id for `SAP_ApplicationID` (32 hex characters, well within the 120-character limit)."""
    return uuid.uuid4().hex


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _short(exc: BaseException) -> str:
    return str(exc).split("\n")[0][:160] or type(exc).__name__


_HTML = re.compile(rb"^\s*<(!doctype html|html)", re.IGNORECASE)
_TITLE = re.compile(rb"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _excerpt(body: bytes) -> str:
    """The start of an answer, on one line; an HTML page by its title."""
    if _HTML.match(body[:64]):
        title = _TITLE.search(body[:2048])
        text = title.group(1).decode("utf-8", errors="replace").strip() if title else "an HTML page"
    else:
        text = body[:160].decode("utf-8", errors="replace").strip()
    text = " ".join(text.split())
    return f": {text}" if text else ""


def _http_error(status: int, headers: CIMultiDictProxy[str], body: bytes, path: str, csrf: CsrfNote = None) -> str:
    """What a non-expected status says, with what usually causes it."""
    if status == 403:
        if csrf == "fresh":
            return f"HTTP 403 again with a freshly fetched CSRF token and its session cookies: not CSRF: {ROLE_HINT}"
        if csrf == "none":
            return f"HTTP 403, and the runtime handed out no CSRF token: {ROLE_HINT}"
        return f"HTTP 403: {ROLE_HINT}"
    mpl_id = mpl_id_in_body(status, body)
    if status == 500 and mpl_id is not None:
        return (
            f"HTTP 500: the iFlow failed to process the message (MPL ID {mpl_id}): its message processing "
            "log in Cloud Integration monitoring says why"
        )
    if status == 404 and (not body.strip() or _HTML.match(body[:64])):  # Tomcat's page: no flow there
        return (
            f"HTTP 404: no iFlow is deployed at {path}: check the flow's path (Cloud Integration serves an "
            "HTTPS sender at /http/<address>) and that the iFlow is deployed and started"
        )
    if status in _REDIRECTS:
        location = headers.get("Location", "")[:200] or "nowhere"
        return (
            f"HTTP {status}: redirected to {location}: usually a login page, i.e. a wrong URL (not the "
            "runtime's /http/ endpoint) or an authentication mode this endpoint does not take"
        )
    return f"HTTP {status}{_excerpt(body)}"
