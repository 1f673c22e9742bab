"""An XSUAA-like OAuth token server over TLS: client credentials with a client certificate or a secret."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import math
import secrets
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from senderd.emulator.listener import TlsServer
from senderd.emulator.pki import Pki

_FORM = "application/x-www-form-urlencoded"


class RevokedTokenError(jwt.InvalidTokenError):
    """`TokenServer.verify` of a token that `TokenServer.revoke_issued` revoked: valid in form and time,
    refused all the same (the runtime answers 401)."""


@dataclass
class TokenServerFaults:
    """Faults applied to token requests, in this order: delay, down, answer, rate_limited. Mutable at run time."""

    down: bool = False
    rate_limited: int = 0
    retry_after: float = 1.0
    delay: float = 0.0
    answer: bytes | None = None
    """A raw 200 answer instead of a token (a misbehaving or impostor server)."""
    answer_encoding: str | None = None
    """The Content-Encoding header sent with `answer` (e.g. "gzip" for a compressed bomb)."""
    basic_plus_as_space: bool = False
    """Read a `+` in HTTP Basic credentials as a space, unless `X-CF-ENCODED-CREDENTIALS: true` (SAP's note
    "a secret containing + fails with Basic, send it in the body"; how the real server gets there is
    unconfirmed, so it is off by default and raw Basic works)."""


@dataclass
class TokenServerStats:
    """Counts of `POST /oauth/token` calls (other paths are not counted)."""

    requests: int = 0
    issued: int = 0
    rejected: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    issued_at: list[float] = field(default_factory=list)
    authentications: list[tuple[str, str]] = field(default_factory=list)
    """(client id, method) of every request whose client authenticated; the methods are named as in the
    OpenID discovery document: client_secret_basic, client_secret_post, tls_client_auth."""


@dataclass(frozen=True, repr=False)
class _Client:
    scopes: tuple[str, ...]
    cert_der: bytes | None = None
    secret: str | None = None
    pinned: bool = True
    """False: any certificate of the same subject and issuer DN, no older than the newest one used, will do
    (an External Certificate key created with "Pin Certificate" off)."""
    subject_issuer: tuple[bytes, bytes] | None = None
    token_lifetime: float | None = None


def _names(cert: x509.Certificate) -> tuple[bytes, bytes]:
    return cert.subject.public_bytes(), cert.issuer.public_bytes()


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json_error(status: int, error: str, description: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status, headers=headers or None)


class TokenServer(TlsServer):
    """`POST /oauth/token`, `GET /token_keys`, `GET /.well-known/openid-configuration`, like XSUAA."""

    what = "token server"

    def __init__(
        self,
        pki: Pki,
        *,
        token_lifetime: float = 3600,
        require_client_cert: bool = False,
        subdomain: str = "emulator",
        now: Callable[[], float] = time.time,
        client_cas: Sequence[x509.Certificate] = (),
    ) -> None:
        """`now` is the Unix time the server issues (`iat`, `exp`), verifies and records tokens by; a test on a
        fake clock passes that clock's `time`, so that tokens expire when the fake clock says so.
        `client_cas` are trusted for client certificates besides the PKI's root (a customer's CA)."""
        self.token_lifetime = token_lifetime
        self.now = now
        self.faults = TokenServerFaults()
        self.stats = TokenServerStats()
        self._pki = pki
        self._require_client_cert = require_client_cert
        self._client_cas = tuple(client_cas)
        self._subdomain = subdomain
        self._zone_id = str(uuid.uuid4())
        self._clients: dict[str, _Client] = {}
        self._newest_used: dict[str, datetime] = {}  # unpinned client id -> not_valid_before of its newest cert
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = f"default-jwt-key-{secrets.randbelow(10**9)}"
        self._request_seen = asyncio.Event()
        self._issued_ids: set[str] = set()
        self._revoked_ids: set[str] = set()

    def __repr__(self) -> str:
        url = self._listener.url if self._listener else None
        return f"TokenServer(url={url!r}, clients={len(self._clients)})"

    def add_certificate_client(
        self,
        client_id: str,
        cert: x509.Certificate,
        scopes: Sequence[str],
        *,
        pinned: bool = True,
        token_lifetime: float | None = None,
    ) -> None:
        """Register (or replace) a client that authenticates with this exact TLS client certificate.

        `pinned=False` is an External Certificate key with "Pin Certificate" off: a renewed certificate with
        the same subject and issuer DN works too, and once a newer one was used an older one is refused.
        `token_lifetime` overrides the server's for this client's tokens."""
        der = cert.public_bytes(serialization.Encoding.DER)
        self._clients[client_id] = _Client(
            tuple(scopes), cert_der=der, pinned=pinned, subject_issuer=_names(cert), token_lifetime=token_lifetime
        )
        self._newest_used.pop(client_id, None)

    def add_secret_client(
        self, client_id: str, secret: str, scopes: Sequence[str], *, token_lifetime: float | None = None
    ) -> None:
        """Register (or replace) a client that authenticates with a client secret (`token_lifetime` as above)."""
        self._clients[client_id] = _Client(tuple(scopes), secret=secret, token_lifetime=token_lifetime)

    def remove_client(self, client_id: str) -> bool:
        """Forget a client, as deleting its service key or binding does: it gets no more tokens (and the
        runtime no longer accepts its certificate or secret). Tokens already issued stay valid until `exp`.
        True if it was registered."""
        self._newest_used.pop(client_id, None)
        return self._clients.pop(client_id, None) is not None

    def has_client(self, client_id: str) -> bool:
        """True while `client_id` is registered."""
        return client_id in self._clients

    def client_scopes(self, client_id: str) -> tuple[str, ...] | None:
        """The scopes of a registered client (None when it is not registered)."""
        client = self._clients.get(client_id)
        return client.scopes if client else None

    def certificate_client(self, cert_der: bytes) -> str | None:
        """The id of the registered certificate client that this certificate (DER) authenticates, or None.

        Only the certificate is compared: its chain must already have been checked (by the TLS handshake)."""
        cert = x509.load_der_x509_certificate(cert_der)
        for client_id, client in self._clients.items():
            if self._certificate_matches(client_id, client, cert_der, cert):
                return client_id
        return None

    def secret_client(self, client_id: str, secret: str) -> bool:
        """True if `client_id` is a registered secret client and `secret` is its secret."""
        return self._check_secret(client_id, secret, "") is not None

    def _certificate_matches(self, client_id: str, client: _Client, der: bytes, cert: x509.Certificate) -> bool:
        if client.cert_der is None:
            return False
        if hmac.compare_digest(der, client.cert_der):
            return client.pinned or self._not_superseded(client_id, cert)
        if client.pinned or client.subject_issuer != _names(cert):
            return False
        return self._not_superseded(client_id, cert)

    def _not_superseded(self, client_id: str, cert: x509.Certificate) -> bool:
        """Pin off: accept the certificate unless a newer one of the client was used; remember the newest."""
        issued = cert.not_valid_before_utc
        newest = self._newest_used.get(client_id)
        if newest is not None and issued < newest:
            return False
        self._newest_used[client_id] = issued
        return True

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen with TLS on host:port (0 = a free port)."""
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/token_keys", self._token_keys)
        app.router.add_get("/.well-known/openid-configuration", self._openid_configuration)
        ctx = self._pki.server_ssl_context(
            client_ca=True, require_client_cert=self._require_client_cert, extra_client_cas=self._client_cas
        )
        await self._listen(app, ctx, host, port)

    @property
    def url(self) -> str:
        """Base URL, e.g. "https://127.0.0.1:<port>"."""
        return self._started().url

    @property
    def token_url(self) -> str:
        """The token endpoint."""
        return self.url + "/oauth/token"

    @property
    def jwks_url(self) -> str:
        """The JWKS endpoint."""
        return self.url + "/token_keys"

    # -- tokens ------------------------------------------------------------------------------------

    def public_jwks(self) -> dict[str, Any]:
        """The signing key as a JWKS, with XSUAA's extra `value` (PEM) field."""
        public = self._signing_key.public_key()
        numbers = public.public_numbers()
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "e": _b64url_uint(numbers.e),
                    "n": _b64url_uint(numbers.n),
                    "kid": self._kid,
                    "alg": "RS256",
                    "use": "sig",
                    "value": pem.decode(),
                }
            ]
        }

    def revoke_issued(self) -> int:
        """Revoke every token issued so far (as a UAA does when a client's tokens are revoked): `verify`
        refuses them from now on, so the runtime answers 401 although they have not expired. Tokens issued
        afterwards are valid. Returns how many tokens were revoked."""
        revoked = len(self._issued_ids)
        self._revoked_ids |= self._issued_ids
        self._issued_ids = set()
        return revoked

    def verify(self, token: str, *, leeway: float = 0) -> dict[str, Any]:
        """Check the RS256 signature and `exp` (strictly, unless `leeway`) and return the claims.

        Raises `jwt.ExpiredSignatureError`, `RevokedTokenError` or another `jwt.InvalidTokenError`.
        """
        header = jwt.get_unverified_header(token)
        if header.get("kid") != self._kid:
            raise jwt.InvalidTokenError("unknown key id")
        claims: dict[str, Any] = jwt.decode(
            token,
            self._signing_key.public_key(),
            algorithms=["RS256"],
            options={"require": ["exp", "iat"], "verify_aud": False, "verify_exp": False, "verify_iat": False},
        )
        # PyJWT's own iat and exp checks, on this server's clock rather than the machine's
        try:
            issued_at, expires_at = int(claims["iat"]), int(claims["exp"])
        except (TypeError, ValueError):
            raise jwt.DecodeError("iat and exp must be integers") from None
        now = self.now()
        if issued_at > now + leeway:
            raise jwt.ImmatureSignatureError("The token is not yet valid (iat)")
        if expires_at <= now - leeway:
            raise jwt.ExpiredSignatureError("Signature has expired")
        if claims.get("jti") in self._revoked_ids:
            raise RevokedTokenError("the token was revoked")
        return claims

    def mint(self, client_id: str, *, lifetime: float, scopes: Sequence[str] | None = None) -> str:
        """A signed token for `client_id` without any request (for tests; negative lifetime = expired)."""
        if scopes is None:
            client = self._clients.get(client_id)
            scopes = client.scopes if client else ()
        return self._issue(client_id, tuple(scopes), lifetime)[0]

    def _issue(self, client_id: str, scopes: tuple[str, ...], lifetime: float) -> tuple[str, str, float]:
        """(token, jti, seconds until exp)."""
        now = self.now()
        iat = int(now)
        exp = int(now + lifetime)  # floor: never valid for longer than promised
        jti = uuid.uuid4().hex
        self._issued_ids.add(jti)
        audiences = [s.split(".", 1)[0] for s in scopes if "." in s]
        claims = {
            "jti": jti,
            "ext_attr": {"enhancer": "XSUAA", "subaccountid": self._zone_id, "zdn": self._subdomain},
            "sub": client_id,
            "authorities": list(scopes),
            "scope": list(scopes),
            "client_id": client_id,
            "cid": client_id,
            "azp": client_id,
            "grant_type": "client_credentials",
            "rev_sig": secrets.token_hex(4),
            "iat": iat,
            "exp": exp,
            "iss": self.token_url if self._listener else "https://emulator/oauth/token",
            "zid": self._zone_id,
            "aud": list(dict.fromkeys([*audiences, client_id])),
        }
        headers = {"jku": (self.jwks_url if self._listener else ""), "kid": self._kid, "typ": "JWT"}
        token = jwt.encode(claims, self._signing_key, algorithm="RS256", headers=headers)
        return token, jti, exp - now

    # -- handlers ----------------------------------------------------------------------------------

    async def wait_for_requests(self, count: int) -> None:
        """Return once at least `count` token requests have arrived (for tests that act mid-request)."""
        while self.stats.requests < count:
            await self._request_seen.wait()

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        self._request_seen.set()
        self._request_seen = asyncio.Event()
        try:
            response = await self._token_response(request)
        except web.HTTPException as exc:  # e.g. 413 from request.post()
            self.stats.statuses[exc.status] += 1
            self.stats.rejected += 1
            raise
        self.stats.statuses[response.status] += 1
        if response.status == 200:
            self.stats.issued += 1
            self.stats.issued_at.append(self.now())
        else:
            self.stats.rejected += 1
        return response

    async def _token_response(self, request: web.Request) -> web.Response:
        faults = self.faults
        if faults.delay > 0:
            await asyncio.sleep(faults.delay)
        if faults.down:
            return web.Response(status=503, text="Service Unavailable")
        if faults.answer is not None:
            headers = {"Content-Encoding": faults.answer_encoding} if faults.answer_encoding else {}
            return web.Response(body=faults.answer, content_type="application/json", headers=headers)
        if faults.rate_limited != 0:
            if faults.rate_limited > 0:
                faults.rate_limited -= 1
            return _json_error(
                429,
                "too_many_requests",
                "Rate limit exceeded",
                **{"Retry-After": str(max(0, math.ceil(faults.retry_after)))},
            )
        if request.content_type != _FORM:
            return _json_error(400, "invalid_request", f"Content-Type must be {_FORM}")
        form = await request.post()
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        if request.headers.get("Authorization") and "client_secret" in values:  # RFC 6749 5.2
            return _json_error(400, "invalid_request", "more than one client authentication method")
        authenticated = self._authenticate(request, values)
        if authenticated is None:
            return _json_error(401, "unauthorized", "Bad credentials")
        self.stats.authentications.append(authenticated)
        client_id = authenticated[0]
        grant_type = values.get("grant_type")
        if grant_type is None:
            return _json_error(400, "invalid_request", "Missing grant type")
        if grant_type != "client_credentials":
            return _json_error(400, "unsupported_grant_type", f"Unsupported grant type: {grant_type}")
        client = self._clients[client_id]
        lifetime = self.token_lifetime if client.token_lifetime is None else client.token_lifetime
        token, jti, remaining = self._issue(client_id, client.scopes, lifetime)
        return web.json_response(
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": max(0, math.floor(remaining)),
                "scope": " ".join(client.scopes),
                "jti": jti,
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    def _authenticate(self, request: web.Request, form: dict[str, str]) -> tuple[str, str] | None:
        """The authenticated client id and how it authenticated, or None."""
        auth = request.headers.get("Authorization", "")
        if auth:
            encoded = _url_encoded(request)
            basic = basic_credentials(auth, url_encoded=encoded)
            if basic is None:
                return None
            if self.faults.basic_plus_as_space and not encoded:
                basic = (basic[0].replace("+", " "), basic[1].replace("+", " "))
            return self._check_secret(*basic, "client_secret_basic")
        client_id = form.get("client_id", "")
        if "client_secret" in form:
            return self._check_secret(client_id, form["client_secret"], "client_secret_post")
        client = self._clients.get(client_id)
        peer = _peer_certificate(request)
        if client is None or peer is None:
            return None
        if not self._certificate_matches(client_id, client, peer, x509.load_der_x509_certificate(peer)):
            return None
        return client_id, "tls_client_auth"

    def _check_secret(self, client_id: str, secret: str, method: str) -> tuple[str, str] | None:
        client = self._clients.get(client_id)
        if client is None or client.secret is None:
            return None
        return (client_id, method) if hmac.compare_digest(client.secret.encode(), secret.encode()) else None

    async def _token_keys(self, request: web.Request) -> web.Response:
        return web.json_response(self.public_jwks())

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.token_url,
                "token_endpoint": self.token_url,
                "jwks_uri": self.jwks_url,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "tls_client_auth",
                ],
                "mtls_endpoint_aliases": {"token_endpoint": self.token_url},
            }
        )


def basic_credentials(header: str, *, url_encoded: bool = False) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` value, or None when it is not one.

    `url_encoded`: both parts were form-encoded before base64 (RFC 6749 2.3.1), which UAA undoes only when
    the request says `X-CF-ENCODED-CREDENTIALS: true`."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    if url_encoded:
        user, password = urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)
    return user, password


def _url_encoded(request: web.Request) -> bool:
    return request.headers.get("X-CF-ENCODED-CREDENTIALS", "").strip().lower() == "true"


def _peer_certificate(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    return ssl_object.getpeercert(binary_form=True)
