"""One send to a Cloud Integration flow: Bearer token, CSRF handling, timeout, checks, classification.

`Sender.attempt` makes one HTTP exchange as the runtime expects it (with at most one token refresh after a
401 and one CSRF token refetch after `403 X-CSRF-Token: Required`), and says what happened in an `Attempt`.
It neither schedules nor retries: `retry.deliver` does that, and `retry.RetryPolicy` decides what is
retryable.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from urllib.parse import urlsplit

import aiohttp
import anyio
from multidict import CIMultiDict, CIMultiDictProxy

from senderd.auth.runtime import Credential, RuntimeAuth
from senderd.bounded import read_bounded
from senderd.clock import Clock
from senderd.config import DEFAULT_SET, CredentialsConfig, FlowConfig
from senderd.durations import parse_retry_after
from senderd.errors import TokenError
from senderd.logs import get_logger
from senderd.metrics import Metrics, Outcome
from senderd.result import Attempt
from senderd.sessions import proxy_for, proxy_problem

log = get_logger("sender")
CSRF_ANSWER_BYTES = 64 * 1024


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
            with self.clock.fail_after(limit):
                return await self._exchange(flow, body, extra_headers or {}, message_id)
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

    async def _exchange(
        self, flow: FlowConfig, body: bytes | None, extra: dict[str, str], message_id: str | None
    ) -> Attempt:
        url = self.url_of(flow)
        origin = _origin(url)
        credential = await self.auth.credential()
        csrf_refetched = token_refreshed = False
        if flow.csrf is True and flow.modifying and origin not in self._csrf:
            await self._fetch_csrf(flow, url, origin, credential)
        while True:
            headers = CIMultiDict(flow.headers)
            headers.update(extra)
            if credential.header is not None:
                headers["Authorization"] = credential.header
            if flow.content_type and "Content-Type" not in headers:
                headers["Content-Type"] = flow.content_type
            if message_id is not None and "SAP_ApplicationID" not in headers:
                headers["SAP_ApplicationID"] = message_id
            if flow.modifying and origin in self._csrf:
                headers["X-CSRF-Token"] = self._csrf[origin]
            async with self.session.request(
                flow.method,
                url,
                params=flow.query or None,
                data=body,
                headers=headers,
                proxy=self._proxy(origin),
                allow_redirects=False,
            ) as response:
                answer_body = await read_bounded(response, flow.max_response_bytes)
                status, answer = response.status, response.headers
            payload = answer_body.data
            truncated = answer_body.truncated
            self.metrics.attempt(flow.name, status)
            if status == 401 and not token_refreshed:
                token_refreshed = True
                self.metrics.runtime_auth_failure(self.name, "unauthorized")  # once per send, whatever comes next
                if self.auth.refused(credential):
                    credential = await self.auth.credential()
                    continue
                return self._classify(flow, status, answer, payload, counted=True, truncated=truncated)
            if (
                status == 403
                and answer.get("X-CSRF-Token", "").lower() == "required"
                and flow.csrf is not False
                and flow.modifying
                and not csrf_refetched
            ):
                csrf_refetched = True
                await self._fetch_csrf(flow, url, origin, credential, stale=self._csrf.get(origin))
                continue
            return self._classify(flow, status, answer, payload, counted=token_refreshed, truncated=truncated)

    async def _fetch_csrf(
        self, flow: FlowConfig, url: str, origin: str, credential: Credential, stale: str | None = None
    ) -> None:
        """GET with `X-CSRF-Token: Fetch`; one fetch per origin at a time, shared by concurrent senders."""
        lock = self._csrf_lock.setdefault(origin, anyio.Lock())
        async with lock:
            if self._csrf.get(origin) not in (None, stale):
                return  # another sender refreshed it while we waited
            headers = {"X-CSRF-Token": "Fetch"}
            if credential.header is not None:
                headers["Authorization"] = credential.header
            async with self.session.get(
                url, headers=headers, params=flow.query or None, proxy=self._proxy(origin), allow_redirects=False
            ) as response:
                await read_bounded(response, CSRF_ANSWER_BYTES)  # the token is in a header; the body is waste
                value = response.headers.get("X-CSRF-Token")
            if value and value.lower() != "required":
                self._csrf[origin] = value
            else:
                self._csrf.pop(origin, None)

    def _classify(
        self,
        flow: FlowConfig,
        status: int,
        headers: CIMultiDictProxy[str],
        body: bytes,
        *,
        counted: bool = False,
        truncated: bool = False,
    ) -> Attempt:
        """What an answer means; `counted`: a 401 of this send was already counted as an auth failure."""
        attempt = self._verdict(flow, status, headers, body, counted)
        return dataclasses.replace(attempt, answer_truncated=True) if truncated else attempt

    def _verdict(
        self, flow: FlowConfig, status: int, headers: CIMultiDictProxy[str], body: bytes, counted: bool
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
                error=_http_error(status, headers, body, urlsplit(self.url_of(flow)).path),
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


def _http_error(status: int, headers: CIMultiDictProxy[str], body: bytes, path: str) -> str:
    """What a non-expected status says, with what usually causes it."""
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
