"""A Cloud Integration runtime: the HTTPS sender adapter serving deployed flows at /http/<address>.

Every message a flow processes gets a message processing log in `Runtime.mpl` (COMPLETED; FAILED with its
error text; PROCESSING for a while, then its final status, for an asynchronous flow), which the tenant's MPL
API (`mpl.py`) serves. Switches reproduce what SAP documents or what tenants differ in: `csrf_required_header`
(whether a CSRF 403 says `X-CSRF-Token: Required`: unconfirmed for Cloud Integration, so off by default),
`expired_token_status` (500 on tenants before Cloud Integration 6.76.44), `correlation_headers` (off: a flow
whose script strips the `SAP_*` answer headers), `body_stall_limit` (SAP cancels a request whose body stalls
for 20 s)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import math
import random
import secrets
import string
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import jwt
from aiohttp import web
from cryptography import x509

from senderd.emulator.listener import TlsServer, peer_chain
from senderd.emulator.mpl import MplEntry, MplStatus, MplStore
from senderd.emulator.pki import Pki
from senderd.emulator.token_server import RevokedTokenError, TokenServer, basic_credentials

AuthMode = Literal["bearer", "client_certificate", "basic"]
"""How a request to the runtime authenticated: an OAuth token, a client certificate straight to the runtime,
or HTTP Basic with a ClientId/Secret key's `clientid:clientsecret`."""
ALL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
MODIFYING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_BODY = 64 * 1024 * 1024  # SAP recommends payloads <= 40 MB; aiohttp's default 1 MiB would be too strict
TIMESTAMP_PLACEHOLDER = "${date:now:yyyy-MM-dd HH:mm:ss}"
BODY_STALL_LIMIT = 20.0
"""Seconds a request body may stall before the runtime's web server cancels the request (SAP: 20 s)."""
APPLICATION_ID_CHARS = 120
"""The characters of `SAP_ApplicationID` that monitoring keeps as ApplicationMessageId."""
_MPL_ALPHABET = string.ascii_letters + string.digits + "-_"

_NOT_FOUND_HTML = (
    '<!doctype html><html lang="en"><head><title>HTTP Status 404 – Not Found</title>'
    '<style type="text/css">body {font-family:Tahoma,Arial,sans-serif;}</style></head><body>'
    '<h1>HTTP Status 404 – Not Found</h1><hr class="line" /><p><b>Type</b> Status Report</p>'
    "<p><b>Description</b> The origin server did not find a current representation for the target "
    'resource or is not willing to disclose that one exists.</p><hr class="line" /></body></html>'
)


@dataclass
class FlowSpec:
    """One deployed flow with an HTTPS sender. The fault fields may be changed while running."""

    address: str
    methods: frozenset[str] = ALL_METHODS
    csrf: bool = False
    body: str | None = None
    kind: Literal["timestamp", "echo", "static", "large", "async", "count"] = "static"
    """"async": answers 202 at once with `{"info": ..., "requestId": "<MPL id>"}`, as SAP's decoupling patterns
    do; its log stays PROCESSING for `processing_time`, then shows `mpl_status`. "count": reads the body as it
    comes without keeping it (any size) and answers `{"bytes": N, "sha256": "..."}`."""
    status: int = 200
    content_type: str = "text/plain"
    error_rate: float = 0.0
    latency: float = 0.0
    unavailable: int = 0
    unavailable_pattern: tuple[bool, ...] = ()
    retry_after: float = 1.0
    answer_bytes: int = 0
    """`kind="large"`: answer this many bytes (streamed, never held whole), e.g. an export of 100 MB."""
    answer_encoding: str | None = None
    """A Content-Encoding for the answer; "gzip" with `kind="large"` sends a gzip bomb of that inflated size."""
    processing_time: float = 0.0
    """Seconds (emulator time) the message's log shows PROCESSING after the answer (`kind="async"`)."""
    mpl_status: MplStatus = "COMPLETED"
    """The final status of the message's log: a flow can answer 200 or 202 and still fail inside."""
    error_text: str = "com.sap.it.rt.adapter.http.api.exception.HttpResponseException: emulated processing error"
    """The log's ErrorInformation when the flow fails (error_rate) or `mpl_status` is not COMPLETED."""
    return_exception: bool = False
    """"Return Exception to Sender": a failing flow answers its exception text instead of SAP's MPL id text."""
    user_role: str | None = None
    """The flow's own User Role (a scope suffix, checked after CSRF); None: `ESBMessaging.send` alone."""
    iflow: str | None = None
    """The integration flow's id in monitoring (default: the address without slashes)."""

    @property
    def artifact(self) -> str:
        """The integration flow id its logs carry."""
        return self.iflow or (self.address.strip("/").replace("/", "_").replace("*", "") or "root")


def default_flows() -> list[FlowSpec]:
    """GetTimestamp (the tutorial's flow), Orders (CSRF-protected echo), Flaky, Failing and Async (202, then
    its log PROCESSING for 3 s before COMPLETED)."""
    return [
        FlowSpec(
            "/GetTimestamp",
            methods=frozenset({"GET", "POST"}),
            kind="timestamp",
            body=f"Current time (UTC): {TIMESTAMP_PLACEHOLDER}",
        ),
        FlowSpec("/Orders", methods=frozenset({"POST"}), csrf=True, kind="echo"),
        FlowSpec("/Flaky", unavailable_pattern=(True, True, False), body="OK"),
        FlowSpec("/Failing", error_rate=1.0),
        FlowSpec("/Async", methods=frozenset({"POST"}), kind="async", status=202, processing_time=3.0),
    ]


@dataclass(frozen=True)
class ReceivedMessage:
    """A successful flow execution. The Authorization value is redacted; `token_jti` tells tokens apart."""

    address: str
    method: str
    body: bytes
    headers: dict[str, str]
    query: dict[str, str]
    mpl_id: str
    at: float
    token_jti: str | None = None
    auth: AuthMode | None = None
    """How the request authenticated."""
    client_id: str | None = None
    """The client it authenticated as (a token's `client_id`, the certificate's or Basic's client)."""


@dataclass
class RuntimeStats:
    """What the runtime saw; `by_address` is keyed by the flow's lower-case address (or the path)."""

    requests: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    by_address: collections.Counter[str] = field(default_factory=collections.Counter)
    expired_tokens: int = 0
    revoked_tokens: int = 0
    invalid_tokens: int = 0
    """Requests whose Authorization did not authenticate: a bad token, wrong Basic credentials, another scheme."""
    missing_tokens: int = 0
    """Requests with no credentials at all (no Authorization, no usable client certificate)."""
    auth_modes: collections.Counter[str] = field(default_factory=collections.Counter)
    """Requests that authenticated, by mode (`AuthMode`: "bearer", "client_certificate", "basic"), including
    those then refused with 403 for want of the role."""
    refused_modes: collections.Counter[str] = field(default_factory=collections.Counter)
    """Requests refused with 401, by the mode they tried ("bearer", "basic", "client_certificate", "other"
    for another Authorization scheme, "none" for no credentials)."""
    incomplete_chains: int = 0
    """Client certificates sent without the chain up to the root (dropped, as SAP's load balancer does)."""
    csrf_fetches: int = 0
    csrf_fetch_methods: collections.Counter[str] = field(default_factory=collections.Counter)
    """Token fetches that got a token, by method (HEAD or GET)."""
    csrf_rejections: int = 0
    stalled_bodies: int = 0
    """Requests cancelled because their body stalled for longer than `Runtime.body_stall_limit`."""
    largest_body_gap: float = 0.0
    """The longest wait (real seconds) between two pieces of a request body the runtime read."""
    messages: list[ReceivedMessage] = field(default_factory=list)
    application_ids: list[str | None] = field(default_factory=list)
    """`SAP_ApplicationID` of every request as it arrived (None without one), processed or not."""


def _mpl_id() -> str:
    return "A" + "".join(secrets.choice(_MPL_ALPHABET) for _ in range(27))


def _normalise(address: str) -> str:
    return "/" + address.strip("/").lower() if address.strip("/") else "/"


@dataclass(frozen=True)
class _Principal:
    mode: AuthMode
    client_id: str | None
    scopes: tuple[str, ...]
    jti: str | None = None


class Runtime(TlsServer):
    """Serves flows at /http/<address> behind sender authentication, CSRF and per-flow faults.

    A sender authenticates with a Bearer token of `token_server`, with a client certificate of one of its
    certificate clients (no Authorization header; the TLS server asks for a certificate and the whole chain
    must be sent), or with HTTP Basic `clientid:clientsecret` of one of its secret clients.
    Its time (token expiry, `ReceivedMessage.at`, the timestamp flow's answer) is the token server's `now`."""

    what = "runtime"

    def __init__(
        self,
        pki: Pki,
        token_server: TokenServer,
        flows: Sequence[FlowSpec] | None = None,
        *,
        required_scope_suffix: str = "ESBMessaging.send",
        client_cert_auth: bool = True,
        client_cas: Sequence[x509.Certificate] = (),
    ) -> None:
        """`client_cas` are trusted for client certificates besides the PKI's root (a customer's CA)."""
        self.flows: dict[str, FlowSpec] = {}
        self.down = False
        self.refuse_tokens = False
        """Answer 401 to every token, valid or not (a tenant that does not trust this token issuer)."""
        self.client_cert_auth = client_cert_auth
        """Accept client certificates straight to the runtime; False on a trial tenant (a certificate without
        a token is then as good as none)."""
        self.basic_auth = True
        """Accept HTTP Basic with a secret client's `clientid:clientsecret`."""
        self.csrf_required_header = False
        """Send `X-CSRF-Token: Required` with a CSRF 403 (Tomcat's filter does; for Cloud Integration it is
        unconfirmed, so a client must not depend on it: off by default)."""
        self.csrf_head_fetch = True
        """Hand out CSRF tokens to HEAD; False: HEAD is refused with 405 (a client must then GET)."""
        self.csrf_fetch_status = 200
        """The status of a token fetch's answer (the token is in its header whatever the status)."""
        self.expired_token_status = 401
        """What an expired token gets: 401, or 500 as on tenants before Cloud Integration 6.76.44 (March 2026)."""
        self.correlation_headers = True
        """Answer with `SAP_MessageProcessingLogID` and `SAP_MplCorrelationId` (False: a flow that strips them,
        as SAP recommends for internal headers; the MPL id is then only in a 500's text)."""
        self.body_stall_limit = BODY_STALL_LIMIT
        """Real seconds a request body may stall before the request is cancelled (408, connection closed)."""
        self.mpl = MplStore()
        """The message processing logs of every message processed (served by the tenant's MPL API)."""
        self.stats = RuntimeStats()
        self._pki = pki
        self._client_cas = tuple(client_cas)
        self._anchors = [pki.root.cert.subject, *(ca.subject for ca in client_cas)]
        self._token_server = token_server
        self._required_scope_suffix = required_scope_suffix
        self._sessions: dict[str, tuple[str, str]] = {}  # JSESSIONID -> (__VCAP_ID__, CSRF token)
        self._pattern_pos: collections.Counter[str] = collections.Counter()
        self._request_seen = asyncio.Event()
        for flow in default_flows() if flows is None else flows:
            self.add_flow(flow)

    async def wait_for_requests(self, count: int) -> None:
        """Return once at least `count` requests have arrived (for tests that must act mid-request)."""
        while self.stats.requests < count:
            await self._request_seen.wait()

    async def wait_for_messages(self, count: int) -> None:
        """Return once at least `count` flow executions have been recorded in `stats.messages`."""
        while len(self.stats.messages) < count:
            await self._request_seen.wait()

    def __repr__(self) -> str:
        url = self._listener.url if self._listener else None
        return f"Runtime(url={url!r}, flows={sorted(self.flows)})"

    def add_flow(self, flow: FlowSpec) -> None:
        """Deploy (or replace) a flow."""
        self.flows[_normalise(flow.address)] = flow

    def expire_csrf_tokens(self) -> None:
        """Forget every session and CSRF token, as after a runtime restart or session timeout."""
        self._sessions.clear()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen with TLS on host:port (0 = a free port)."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        ctx = self._pki.server_ssl_context(
            client_ca=True, trust_intermediate=True, extra_client_cas=self._client_cas
        )  # asks for a client certificate, never requires one
        await self._listen(app, ctx, host, port)

    @property
    def url(self) -> str:
        """Base URL, e.g. "https://127.0.0.1:<port>"; flows are at url + "/http/<address>"."""
        return self._started().url

    def _find_flow(self, path: str) -> tuple[str, FlowSpec] | None:
        if not path.lower().startswith("/http/"):
            return None
        address = _normalise(path[len("/http") :])
        if address in self.flows:
            return address, self.flows[address]
        wildcards = [key for key in self.flows if key.endswith("/*")]
        for key in sorted(wildcards, key=len, reverse=True):
            prefix = key[:-1]  # keeps the trailing "/"
            if address.startswith(prefix) or address == prefix[:-1]:
                return key, self.flows[key]
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        self.stats.application_ids.append(request.headers.get("SAP_ApplicationID"))
        found = self._find_flow(request.path)
        self.stats.by_address[found[0] if found else request.path.lower()] += 1
        self._request_seen.set()
        self._request_seen = asyncio.Event()
        try:
            response = await self._respond(request, found)
        except web.HTTPException as exc:  # e.g. 413 from request.read()
            self.stats.by_status[exc.status] += 1
            raise
        self.stats.by_status[response.status] += 1
        return response

    async def _respond(self, request: web.Request, found: tuple[str, FlowSpec] | None) -> web.StreamResponse:
        if self.down:
            return _unavailable(1.0)
        if not request.path.lower().startswith("/http/"):
            return _not_found()
        principal = self._authenticate(request)
        if isinstance(principal, web.Response):
            return principal
        self.stats.auth_modes[principal.mode] += 1
        if not any(s.endswith(self._required_scope_suffix) for s in principal.scopes):
            return web.Response(status=403, text="Forbidden")
        if found is None:
            return _not_found()
        key, flow = found
        if flow.csrf:  # before the method check: a POST-only flow still answers a GET token fetch
            csrf = self._check_csrf(request)
            if csrf is not None:
                return csrf
        if request.method not in flow.methods:
            return web.Response(status=405, headers={"Allow": ", ".join(sorted(flow.methods))})
        if flow.user_role is not None and not any(s.endswith(flow.user_role) for s in principal.scopes):
            return web.Response(status=403, text="Forbidden")
        return await self._run_flow(request, key, flow, principal)

    def _authenticate(self, request: web.Request) -> web.Response | _Principal:
        """Who sent the request, or the 401 answer (counted by mode)."""
        auth = request.headers.get("Authorization")
        if not auth:
            return self._certificate_principal(request)
        scheme = auth.partition(" ")[0].lower()
        if scheme == "basic":
            return self._basic_principal(auth)
        if scheme != "bearer":
            return self._refuse("other", "invalid_tokens")
        if self.refuse_tokens:
            return self._refuse("bearer", "invalid_tokens")
        token = auth.partition(" ")[2].strip()
        try:
            claims = self._token_server.verify(token) if token else None
        except jwt.ExpiredSignatureError:
            if self.expired_token_status == 500:
                self.stats.expired_tokens += 1
                return web.Response(status=500, text="Internal Server Error")
            return self._refuse("bearer", "expired_tokens")
        except RevokedTokenError:
            return self._refuse("bearer", "revoked_tokens")
        except jwt.InvalidTokenError:
            claims = None
        if claims is None:
            return self._refuse("bearer", "invalid_tokens")
        scopes = claims.get("scope", [])
        client_id = claims.get("client_id")
        return _Principal(
            "bearer",
            client_id if isinstance(client_id, str) else None,
            tuple(s for s in scopes if isinstance(s, str)) if isinstance(scopes, list) else (),
            jti=claims.get("jti"),
        )

    def _basic_principal(self, header: str) -> web.Response | _Principal:
        credentials = basic_credentials(header) if self.basic_auth else None
        if credentials is None or not self._token_server.secret_client(*credentials):
            return self._refuse("basic", "invalid_tokens")
        client_id = credentials[0]
        return _Principal("basic", client_id, self._token_server.client_scopes(client_id) or ())

    def _certificate_principal(self, request: web.Request) -> web.Response | _Principal:
        chain = peer_chain(request)
        if not chain or not self.client_cert_auth:
            return self._refuse("none", "missing_tokens")
        if not self._complete(chain):
            self.stats.incomplete_chains += 1  # the load balancer drops it: as if none was sent
            return self._refuse("none", "missing_tokens")
        client_id = self._token_server.certificate_client(chain[0])
        if client_id is None:
            return self._refuse("client_certificate")
        return _Principal("client_certificate", client_id, self._token_server.client_scopes(client_id) or ())

    def _complete(self, chain: list[bytes]) -> bool:
        """True if the certificates sent lead from the leaf to a trusted root (which need not be sent)."""
        certs = [x509.load_der_x509_certificate(der) for der in chain]
        current = certs[0]
        for _ in range(len(certs)):
            if current.issuer in self._anchors:
                return True
            issuer = next((c for c in certs if c.subject == current.issuer and c is not current), None)
            if issuer is None:
                return False
            current = issuer
        return False

    def _refuse(self, mode: str, counter: str | None = None) -> web.Response:
        self.stats.refused_modes[mode] += 1
        if counter is not None:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        return _unauthorized()

    def _check_csrf(self, request: web.Request) -> web.Response | None:
        """Tomcat RestCsrfPreventionFilter: fetch on GET/HEAD, require on modifying methods."""
        session_id = request.cookies.get("JSESSIONID", "")
        session = self._sessions.get(session_id)
        if session is not None and request.cookies.get("__VCAP_ID__") != session[0]:
            session = None  # routed to another instance: the session is unknown there
        header = request.headers.get("X-CSRF-Token", "")
        if request.method in ("GET", "HEAD") and header.lower() == "fetch":
            if request.method == "HEAD" and not self.csrf_head_fetch:
                return web.Response(status=405, headers={"Allow": "GET, POST"})
            self.stats.csrf_fetches += 1
            self.stats.csrf_fetch_methods[request.method] += 1
            response = web.Response(status=self.csrf_fetch_status)
            if session is None:
                session_id, vcap_id = secrets.token_hex(16).upper(), secrets.token_hex(14)
                session = (vcap_id, secrets.token_hex(16).upper())
                self._sessions[session_id] = session
                response.set_cookie("JSESSIONID", session_id, path="/", secure=True, httponly=True)
                response.set_cookie("__VCAP_ID__", vcap_id, path="/", secure=True, httponly=True)
            response.headers["X-CSRF-Token"] = session[1]
            return response
        if request.method in MODIFYING_METHODS and (
            session is None or not hmac.compare_digest(header.encode(), session[1].encode())
        ):
            self.stats.csrf_rejections += 1
            required = {"X-CSRF-Token": "Required"} if self.csrf_required_header else None
            return web.Response(status=403, text="CSRF token validation failed", headers=required)
        return None

    async def _run_flow(
        self, request: web.Request, key: str, flow: FlowSpec, principal: _Principal
    ) -> web.StreamResponse:
        if flow.latency > 0:
            await asyncio.sleep(flow.latency)
        if flow.unavailable != 0:
            if flow.unavailable > 0:
                flow.unavailable -= 1
            return _unavailable(flow.retry_after)
        if flow.unavailable_pattern:
            position = self._pattern_pos[key]
            self._pattern_pos[key] += 1
            if flow.unavailable_pattern[position % len(flow.unavailable_pattern)]:
                return _unavailable(flow.retry_after)
        if flow.kind == "count":
            return await _count_body(request, flow)
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        mpl_id, now = _mpl_id(), self._token_server.now()
        correlation = _mpl_id()
        application_id = request.headers.get("SAP_ApplicationID")
        entry = MplEntry(
            mpl_id, correlation, flow.artifact, application_id[:APPLICATION_ID_CHARS] if application_id else None, now
        )
        headers = {"SAP_MessageProcessingLogID": mpl_id, "SAP_MplCorrelationId": correlation}
        if not self.correlation_headers:
            headers = {}
        if flow.error_rate > 0 and random.random() < flow.error_rate:
            self.mpl.add(replace(entry, final_status="FAILED", error=flow.error_text))
            text = flow.error_text if flow.return_exception else _internal_error(mpl_id)
            return web.Response(status=500, text=text, headers=headers)
        if flow.mpl_status != "COMPLETED":
            entry.final_status, entry.error = flow.mpl_status, flow.error_text
        if flow.kind == "async" or flow.processing_time > 0:
            entry.completes_at = now + flow.processing_time
        self.mpl.add(entry)
        self.stats.messages.append(
            ReceivedMessage(
                address=key,
                method=request.method,
                body=body,
                headers=_recorded_headers(request),
                query=dict(request.query),
                mpl_id=mpl_id,
                at=now,
                token_jti=principal.jti,
                auth=principal.mode,
                client_id=principal.client_id,
            )
        )
        self._request_seen.set()
        self._request_seen = asyncio.Event()
        if flow.kind == "echo":
            headers["Content-Type"] = request.headers.get("Content-Type", flow.content_type)
            return web.Response(status=flow.status, body=body, headers=headers)
        if flow.kind == "large":
            return await _stream_large(request, flow, headers)
        if flow.kind == "async":
            accepted = {"info": "the message has been saved and will be processed soon", "requestId": mpl_id}
            return web.json_response(accepted, status=flow.status, headers=headers)
        text = flow.body or ""
        if flow.kind == "timestamp":
            text = (flow.body or f"Current time (UTC): {TIMESTAMP_PLACEHOLDER}").replace(
                TIMESTAMP_PLACEHOLDER,
                datetime.fromtimestamp(self._token_server.now(), UTC).strftime("%Y-%m-%d %H:%M:%S"),
            )
        headers["Content-Type"] = flow.content_type
        return web.Response(status=flow.status, body=text.encode(), headers=headers)

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The whole request body, read as it comes; a body that stalls for `body_stall_limit` (SAP: 20 s)
        cancels the request (408, connection closed), one over `MAX_BODY` is refused (413)."""
        pieces: list[bytes] = []
        size = 0
        last = time.monotonic()
        while True:
            try:
                piece = await asyncio.wait_for(request.content.readany(), self.body_stall_limit)
            except TimeoutError:
                self.stats.stalled_bodies += 1
                return web.Response(status=408, text="Request Timeout", headers={"Connection": "close"})
            now = time.monotonic()
            self.stats.largest_body_gap = max(self.stats.largest_body_gap, now - last)
            last = now
            if not piece:
                return b"".join(pieces)
            size += len(piece)
            if size > MAX_BODY:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=size)
            pieces.append(piece)


def _internal_error(mpl_id: str) -> str:
    """The documented answer of a flow that failed (IS Development/handle-errors-in-successful-responses)."""
    return (
        f"An internal server error occured: The MPL ID for the failed message is : {mpl_id}\n"
        "For more details please check tail log."
    )


async def _stream_large(request: web.Request, flow: FlowSpec, headers: dict[str, str]) -> web.StreamResponse:
    """`flow.answer_bytes` of "x" (gzip-compressed when asked: a bomb), written in chunks as they are read."""
    response = web.StreamResponse(status=flow.status, headers={**headers, "Content-Type": flow.content_type})
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if flow.answer_encoding == "gzip" else None
    if compressor is not None:
        response.headers["Content-Encoding"] = "gzip"
    else:
        response.content_length = flow.answer_bytes
    await response.prepare(request)
    chunk, left = b"x" * 65536, flow.answer_bytes
    try:
        while left > 0:
            piece = chunk[: min(left, len(chunk))]
            left -= len(piece)
            data = piece
            if compressor is not None:  # flushed every piece: the bomb arrives as it is made, never all at once
                data = compressor.compress(piece) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await response.write(data)
            await asyncio.sleep(0)  # a small write does not wait: let the reader run between pieces
        if compressor is not None:
            await response.write(compressor.flush())
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):  # the client stopped reading: what a capped reader does
        pass
    return response


async def _count_body(request: web.Request, flow: FlowSpec) -> web.Response:
    """The size and SHA-256 of a body read in pieces and dropped (an upload of any size, never held)."""
    digest, size = hashlib.sha256(), 0
    while piece := await request.content.readany():
        digest.update(piece)
        size += len(piece)
    return web.json_response({"bytes": size, "sha256": digest.hexdigest()}, status=flow.status)


def _recorded_headers(request: web.Request) -> dict[str, str]:
    headers = {key.lower(): ", ".join(request.headers.getall(key)) for key in request.headers}
    if "authorization" in headers:
        headers["authorization"] = headers["authorization"].split(" ", 1)[0] + " [redacted]"
    return headers


def _not_found() -> web.Response:
    return web.Response(status=404, text=_NOT_FOUND_HTML, content_type="text/html")


def _unauthorized() -> web.Response:
    return web.Response(status=401, text="Unauthorized", headers={"WWW-Authenticate": 'Bearer realm="IT"'})


def _unavailable(retry_after: float) -> web.Response:
    return web.Response(
        status=503, text="Service Unavailable", headers={"Retry-After": str(max(0, math.ceil(retry_after)))}
    )
