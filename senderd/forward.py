"""Request-reply through the sidecar: the app's own calls to iFlows, forwarded with credentials injected.

The app calls `http://127.0.0.1:8788/http/Orders?x=1` with any method, headers and body; the forwarder sends it
to `<runtime>/http/Orders?x=1` with its credentials set's authentication (a Bearer token, HTTP Basic, or the
client certificate in the TLS handshake) and answers with the runtime's status, headers and body, streamed
both ways (never held whole).

- Only paths matching an `allow` pattern leave; anything else is a 404 that never reaches the runtime.
- The app cannot impersonate or inject: its `Authorization`, `Cookie`, `X-CSRF-Token`, `Host`, `Expect`,
  `Proxy-*` and hop-by-hop headers (and those its `Connection` names) are never passed on; the runtime's
  `Set-Cookie`, `X-CSRF-Token` and hop-by-hop headers never come back.
- CSRF as flows do it (`Sender`'s one token per origin, shared with the set's flows): a 403 to a modifying
  request fetches a token once and replays; a body too large to replay fetches the token first if none is
  in hand. A 401 refreshes the token once and replays. A body is replayable up to `REPLAY_BYTES`; above it
  the runtime's answer is passed through as it is.
- Retries only where safe: GET/HEAD/OPTIONS after a connection failure, or after 429/503 with a
  `Retry-After` that fits the timeout; any method when the connection failed before a byte was sent.
- Errors are JSON `{"error": ..., "reason": ...}`: no token → 503 with Retry-After, runtime unreachable → 502,
  timeout → 504, body too large → 413, path not allowed → 404, missing app token → 401.
"""

from __future__ import annotations

import asyncio
import io
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import anyio
from aiohttp import web
from multidict import CIMultiDict

from senderd.auth.credset import CredentialSet
from senderd.auth.runtime import Credential
from senderd.config import APPLICATION_ID_HEADER, MODIFYING_METHODS, ForwardConfig, parse_listen
from senderd.durations import parse_retry_after
from senderd.engine import Engine
from senderd.errors import TokenError
from senderd.logs import get_logger
from senderd.metrics import FORWARD_NO_ROUTE, ForwardMetrics
from senderd.sender import Sender
from senderd.sessions import proxy_problem
from senderd.site import Site, bearer_authorised

log = get_logger("forward")
REPLAY_BYTES = 1024 * 1024
"""A request body up to this size is kept, so that it can be replayed after a 401 or a CSRF 403."""
CHUNK = 64 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_ATTEMPTS = 3
"""Exchanges per forwarded request at most (the first and its safe retries)."""
RETRY_PAUSE = 0.05
"""Seconds before retrying a connection failure (doubling)."""
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
NEVER_FORWARDED = HOP_BY_HOP | {
    "authorization", "cookie", "cookie2", "x-csrf-token", "host", "expect", "content-length"
}  # fmt: skip
"""Request headers of the app that never reach the runtime (the length is the body's own)."""
NEVER_RETURNED = HOP_BY_HOP | {"set-cookie", "set-cookie2", "x-csrf-token", "content-length"}
"""Answer headers of the runtime that never reach the app (its session and CSRF token stay in senderd)."""
CORRELATION_HEADERS = ("SAP_MessageProcessingLogID", "SAP_MplCorrelationId", "x-correlationid")


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


@dataclass
class Body:
    """A request body: kept whole (`data`, replayable) when it fits `REPLAY_BYTES`, else its first part
    followed by the rest as it arrives (once)."""

    request: web.Request
    limit: int
    data: bytes | None = None
    prefix: bytes = b""
    started: bool = False
    """Whether a streamed body has begun to be sent (it cannot be sent again)."""
    size: int = 0
    too_large: bool = False
    client_gone: bool = False

    @classmethod
    async def read(cls, request: web.Request, limit: int) -> Body:
        """The first `REPLAY_BYTES` (+1) of the body; the whole of it if it ends there."""
        body = cls(request, limit)
        if not request.body_exists:
            body.data = b""
            return body
        kept = bytearray()
        try:
            while len(kept) <= REPLAY_BYTES:
                piece = await request.content.readany()
                if not piece:
                    body.data = bytes(kept)
                    body.size = len(kept)
                    return body
                kept += piece
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise _ClientGone from exc
        if len(kept) > limit:
            raise _BodyTooLarge
        body.prefix = bytes(kept)
        return body

    @property
    def replayable(self) -> bool:
        return self.data is not None

    def payload(self) -> bytes | io.BytesIO | AsyncIterator[bytes] | None:
        """What aiohttp is given for this exchange."""
        if self.data is not None:  # a fresh view each time (aiohttp closes it); large bytes would block the loop
            return io.BytesIO(self.data) if len(self.data) > CHUNK else self.data or None
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        self.started = True
        self.size = len(self.prefix)
        yield self.prefix
        while True:
            try:
                piece = await self.request.content.readany()
            except (ConnectionError, aiohttp.ClientError) as exc:
                self.client_gone = True
                raise _ClientGone from exc
            if not piece:
                return
            self.size += len(piece)
            if self.size > self.limit:
                self.too_large = True
                raise _BodyTooLarge
            yield piece


@dataclass
class Answer:
    """The runtime's answer: open (`response`, to be streamed) or already read (`body`)."""

    status: int
    headers: CIMultiDict[str]
    response: aiohttp.ClientResponse | None = None
    body: bytes = b""


@dataclass
class ForwardRecord:
    """What happened to one forwarded request (the log line's fields; listeners get it too)."""

    method: str
    path: str
    route: str
    status: int = 0
    outcome: str = "ok"
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    attempts: int = 0
    correlation: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class ForwardError(Exception):
    """A request the forwarder answers itself (JSON, with a reason)."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


class Forwarder:
    """Forwards the app's requests on `forward.listen` through one credentials set."""

    def __init__(self, config: ForwardConfig, credential_set: CredentialSet, sender: Sender, engine: Engine) -> None:
        self.config = config
        self.set = credential_set
        self.sender = sender
        self.clock = engine.clock
        self.metrics: ForwardMetrics = engine.metrics.watch_forward(config.allow)
        self.token = config.token()
        self.runtime_url = credential_set.runtime_url.rstrip("/")
        self.stopping = False
        self.listeners: list[Callable[[ForwardRecord], None]] = []
        self._patterns = [(p.lower(), p) for p in config.allow]
        self._idle: anyio.Event | None = None  # made only when someone waits (an Event per request costs)
        self._inflight = 0
        self._client_timeout = aiohttp.ClientTimeout(total=None, sock_read=config.timeout)
        self.site = Site(self.app(), *parse_listen(config.listen), config_key="forward.listen")

    @classmethod
    @asynccontextmanager
    async def open(cls, config: ForwardConfig, engine: Engine) -> AsyncIterator[Forwarder]:
        """Listen on `forward.listen` (closed on exit). Raises ConfigError (address in use, token unset)."""
        name = config.credentials or engine.config.credentials_default
        assert name is not None, "validated at load"
        forwarder = cls(config, engine.sets[name], engine.senders[name], engine)
        await forwarder.site.start()
        try:
            yield forwarder
        finally:
            await forwarder.site.stop()

    @property
    def url(self) -> str:
        """The base URL the app calls (with the real port once started)."""
        return self.site.url

    def app(self) -> web.Application:
        """The forwarder's aiohttp application: every method, every path."""
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def stop_accepting(self) -> None:
        """From now on, new requests are answered 503 (the stop has begun); those in flight go on."""
        self.stopping = True

    def ready(self) -> tuple[bool, str]:
        """Whether requests are taken now (listening, not stopping), and why not; a missing token is not
        a reason: such a request is answered 503 `no_token` by itself."""
        if self.stopping:
            return False, "stopping"
        if not self.site.listening:
            return False, f"not listening on {self.config.listen}"
        return True, "ok"

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self._inflight:
            self._idle = self._idle or anyio.Event()
            await self._idle.wait()

    def route_of(self, path: str) -> str | None:
        """The `allow` pattern that `path` (as sent, undecoded) matches, or None. Dot segments, encoded
        slashes, dots and backslashes never match: the runtime must see exactly the path that was allowed."""
        lowered = path.lower()
        if "\\" in path or "%2f" in lowered or "%2e" in lowered or "%5c" in lowered or "//" in path:
            return None
        if any(segment in (".", "..") for segment in path.split("/")):
            return None
        for pattern, original in self._patterns:
            if pattern.endswith("*"):
                if lowered.startswith(pattern[:-1]):
                    return original
            elif lowered == pattern:
                return original
        return None

    # --- one request ----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = self.clock.monotonic()
        path = request.raw_path.partition("?")[0]
        record = ForwardRecord(request.method, path[:200], FORWARD_NO_ROUTE)
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            response = await self._forward(request, path, record)
        except ForwardError as exc:
            record.outcome, record.error = exc.reason, str(exc)
            response = _error(exc.status, exc.reason, str(exc), exc.headers)
        finally:
            self._inflight -= 1
            if not self._inflight and self._idle is not None:
                self._idle.set()
                self._idle = None
            self.metrics.inflight.dec()
        if not record.status:
            record.status = response.status if record.outcome != "client_disconnected" else 0
        record.seconds = self.clock.monotonic() - started
        self.metrics.finished(record.route, record.method, record.status, record.seconds)
        self._log(record)
        for listener in self.listeners:
            listener(record)
        return response

    def _log(self, record: ForwardRecord) -> None:
        event = log.info if record.outcome == "ok" else log.warning
        event(
            "forwarded",
            method=record.method,
            path=record.path,
            route=record.route,
            status=record.status,
            outcome=record.outcome,
            duration_ms=round(record.seconds * 1000, 1),
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            attempts=record.attempts,
            credentials=self.set.name,
            **({"error": record.error} if record.error else {}),
            **record.correlation,
        )

    async def _forward(self, request: web.Request, path: str, record: ForwardRecord) -> web.StreamResponse:
        if self.token is not None and not bearer_authorised(request.headers.get("Authorization"), self.token):
            raise ForwardError(401, "unauthorized", "send 'Authorization: Bearer <forward token>'",
                               {"WWW-Authenticate": "Bearer"})  # fmt: skip
        if self.stopping:
            raise ForwardError(503, "stopping", "senderd is stopping: retry", {"Retry-After": "5"})
        route = self.route_of(path)
        if route is None:
            raise ForwardError(404, "not_allowed", f"path {path[:200]!r} is not in forward.allow")
        record.route = route
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise self._too_large()
        try:
            body = await Body.read(request, self.config.max_body_bytes)
        except _BodyTooLarge:
            raise self._too_large() from None
        except _ClientGone:
            record.outcome = "client_disconnected"
            return web.Response(status=400)
        url = self.runtime_url + request.raw_path
        headers = self._outbound(request)
        try:
            # asyncio's own timeout: anyio's fail_after looks its backend up on every call, a tenth of the
            # forwarder's own CPU per request (the tests' 504 and the token wait run under it as well)
            async with asyncio.timeout(self.config.timeout):
                answer = await self._exchange(request.method, url, headers, body, record)
        except TimeoutError:
            raise ForwardError(504, "timeout", f"no answer from the runtime within {self.config.timeout:g}s "
                               "(forward.timeout)") from None  # fmt: skip
        except TokenError as exc:
            wait = self.set.auth.next_attempt_in
            retry = str(max(1, math.ceil(wait))) if wait is not None else "5"
            raise ForwardError(503, "no_token", f"no token: {exc}", {"Retry-After": retry}) from None
        except (aiohttp.ClientError, OSError, _BodyTooLarge, _ClientGone) as exc:
            if body.too_large:
                raise self._too_large() from None
            if body.client_gone:
                record.outcome = "client_disconnected"
                return web.Response(status=400)
            said = proxy_problem(exc, self.set.config) or f"{type(exc).__name__}: {_short(exc)}"
            raise ForwardError(502, "unreachable", f"runtime unreachable: {said}") from None
        record.bytes_in = body.size
        record.status = answer.status
        record.correlation = {
            _snake(name): answer.headers[name][:128] for name in CORRELATION_HEADERS if name in answer.headers
        }
        return await self._answer(request, answer, record)

    def _too_large(self) -> ForwardError:
        limit = self.config.max_body_bytes
        return ForwardError(413, "too_large", f"body larger than forward.max_body_bytes ({limit})")

    def _outbound(self, request: web.Request) -> CIMultiDict[str]:
        """The app's headers, less what it may not pass on."""
        named = {
            token.strip().lower() for value in request.headers.getall("Connection", []) for token in value.split(",")
        }
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lowered = name.lower()
            if lowered in NEVER_FORWARDED or lowered in named or lowered.startswith("proxy-"):
                continue
            headers.add(name, value)
        if "Accept-Encoding" not in headers:
            headers["Accept-Encoding"] = "identity"  # not the session's gzip: the app asked for none
        if (
            self.config.application_id == "auto"
            and request.method in MODIFYING_METHODS
            and APPLICATION_ID_HEADER not in headers
        ):
            headers[APPLICATION_ID_HEADER] = uuid.uuid4().hex
        return headers

    async def _exchange(
        self, method: str, url: str, headers: CIMultiDict[str], body: Body, record: ForwardRecord
    ) -> Answer:
        sender, auth = self.sender, self.set.auth
        origin = _origin(url)
        modifying = method in MODIFYING_METHODS
        credential = await auth.credential()
        if modifying and not body.replayable and sender.csrf_token(origin) is None:
            await sender.fetch_csrf(url, credential)  # a 403 could not be replayed: have a token first
        refreshed = csrf_tried = False
        pause = RETRY_PAUSE
        deadline = self.clock.monotonic() + self.config.timeout
        while True:
            record.attempts += 1
            sent_csrf = sender.csrf_token(origin) if modifying else None
            outgoing = self._with_credentials(headers, credential, sent_csrf)
            try:
                response = await sender.session.request(
                    method, url, data=body.payload(), headers=outgoing, proxy=sender.proxy(origin),
                    allow_redirects=False, skip_auto_headers=("Content-Type", "User-Agent"),
                    timeout=self._client_timeout,
                )  # fmt: skip
            except aiohttp.ClientConnectorError:
                if record.attempts < MAX_ATTEMPTS and not body.started:  # nothing was sent: any method
                    await self.clock.sleep(pause)
                    pause *= 2
                    continue
                raise
            except (aiohttp.ClientError, OSError):
                if record.attempts < MAX_ATTEMPTS and method in SAFE_METHODS and not body.started:
                    await self.clock.sleep(pause)
                    pause *= 2
                    continue
                raise
            status = response.status
            if status == 401 and not refreshed:
                refreshed = True
                if self.set.metrics is not None:
                    self.set.metrics.runtime_auth_failure(self.set.name, "unauthorized")
                if auth.refused(credential) and body.replayable:  # else the next request has a fresh one
                    response.release()
                    credential = await auth.credential()
                    continue
            if status == 403 and modifying and not csrf_tried and body.replayable:
                csrf_tried = True
                kept = await _read_some(response)
                token = await sender.fetch_csrf(url, credential, stale=sent_csrf)
                if token is not None and token != sent_csrf:
                    continue
                return Answer(status, CIMultiDict(response.headers), body=kept)
            if status in (429, 503) and method in SAFE_METHODS and record.attempts < MAX_ATTEMPTS:
                wait = parse_retry_after(response.headers.get("Retry-After"), now=self.clock.time())
                if wait is not None and self.clock.monotonic() + wait < deadline:
                    response.release()
                    await self.clock.sleep(wait)
                    continue
            return Answer(status, CIMultiDict(response.headers), response=response)

    @staticmethod
    def _with_credentials(headers: CIMultiDict[str], credential: Credential, csrf: str | None) -> CIMultiDict[str]:
        if credential.header is None and csrf is None:
            return headers
        outgoing = headers.copy()
        if credential.header is not None:
            outgoing["Authorization"] = credential.header
        if csrf is not None:
            outgoing["X-CSRF-Token"] = csrf
        return outgoing

    async def _answer(self, request: web.Request, answer: Answer, record: ForwardRecord) -> web.StreamResponse:
        """Stream the runtime's answer to the app; an app that goes away ends the exchange (and its
        connection to the runtime, which cannot be reused half-read)."""
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in answer.headers.items():
            if name.lower() not in NEVER_RETURNED:
                headers.add(name, value)
        out = web.StreamResponse(status=answer.status, headers=headers)
        upstream = answer.response
        if upstream is None:
            out.content_length = len(answer.body)
        elif upstream.content_length is not None and "chunked" not in answer.headers.get("Transfer-Encoding", ""):
            out.content_length = upstream.content_length
        try:
            await out.prepare(request)
            if upstream is None:
                await out.write(answer.body)
                record.bytes_out = len(answer.body)
            else:
                while True:
                    try:
                        chunk = await upstream.content.readany()
                    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                        record.outcome, record.error = "runtime_broke_off", f"{type(exc).__name__} mid-answer"
                        _abort(request)
                        return out
                    if not chunk:
                        break
                    await out.write(chunk)
                    record.bytes_out += len(chunk)
            await out.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            record.outcome = "client_disconnected"
            if upstream is not None:
                upstream.close()
            return out
        finally:
            if upstream is not None:
                upstream.release()
        return out


async def _read_some(response: aiohttp.ClientResponse, limit: int = CHUNK) -> bytes:
    """Up to `limit` bytes of an answer that will not be streamed (then released)."""
    try:
        data = await response.content.read(limit)
    finally:
        response.release()
    return data


def _abort(request: web.Request) -> None:
    """Close the app's connection without ending the answer: a cut answer must not look complete."""
    if request.transport is not None:
        request.transport.abort()


def _error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status, headers=headers)


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}"


def _short(exc: BaseException) -> str:
    return str(exc).split("\n")[0][:160] or type(exc).__name__


def _snake(header: str) -> str:
    return header.lower().replace("-", "_").removeprefix("sap_")
