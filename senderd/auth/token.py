"""OAuth 2.0 client-credentials tokens from the BTP token server, kept fresh in the background.

`HttpTokenFetcher` does one token request (mTLS client certificate or HTTP Basic) and maps every failure
to a `TokenError` that says what to check. `TokenProvider` caches the token, refreshes it ahead of expiry
in a background task (`run`), lets any number of concurrent callers share one fetch, backs off on
failures (honouring 429 Retry-After) and keeps serving the cached token while it is valid.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import anyio

from senderd.auth.servicekey import ServiceKey
from senderd.auth.tls import client_context
from senderd.bounded import read_bounded
from senderd.clock import Clock, SystemClock
from senderd.config import CredentialsConfig
from senderd.durations import parse_retry_after
from senderd.errors import TokenError
from senderd.logs import get_logger
from senderd.retry import backoff
from senderd.sessions import open_session, proxy_for, proxy_problem

if TYPE_CHECKING:
    from senderd.config import TokenConfig

log = get_logger("token")
MIN_TOKEN_LIFETIME = 2.0
"""Seconds: a token that lives shorter is refused (XSUAA's shortest is an hour; 2 s still lets tests run)."""
MAX_TOKEN_LIFETIME = 7 * 86400.0
"""Seconds: a longer `expires_in` is taken as this (XSUAA's longest is a day)."""
MIN_REFRESH_INTERVAL = 1.0
"""Seconds between two planned refreshes at the least, whatever the lifetime and the policy say."""
MAX_ANSWER_BYTES = 64 * 1024
"""A token server's answer is a few KiB; a longer one is refused without being read further."""


@dataclass(frozen=True)
class TokenGrant:
    """What the token server answered: the token and its lifetime in seconds."""

    access_token: str
    expires_in: float
    scopes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"TokenGrant(expires_in={self.expires_in}, scopes={self.scopes!r})"


@dataclass(frozen=True)
class Token:
    """A cached access token; times are on the provider's monotonic clock, `expires_at_wall` in Unix time."""

    value: str
    obtained_at: float
    expires_at: float
    expires_at_wall: float
    scopes: tuple[str, ...] = ()
    replaces_refused: bool = False
    """Fetched because the runtime refused the token before it: if the runtime refuses this one too, that
    is its answer (a role or a tenant problem), and fetching once more per send would not change it."""

    @property
    def lifetime(self) -> float:
        """Seconds the token was valid for when it was obtained."""
        return self.expires_at - self.obtained_at

    def remaining(self, now: float) -> float:
        """Seconds of validity left at monotonic time `now`."""
        return self.expires_at - now

    def usable(self, now: float) -> bool:
        """Still valid, with a margin for the request it goes out with (at most 1 s, a tenth of its life)."""
        return self.remaining(now) > min(1.0, self.lifetime / 10)

    def __repr__(self) -> str:
        return f"Token(lifetime={self.lifetime:.0f}s, expires_at_wall={self.expires_at_wall:.0f})"


@dataclass(frozen=True)
class RefreshPolicy:
    """When to refresh and how to back off; durations in seconds."""

    refresh_left: float = 1 / 3
    """Refresh when this fraction of the token's lifetime is left."""
    jitter: float = 0.1
    """Relative jitter on the refresh point and on backoff delays."""
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 600.0
    startup_jitter: float = 0.0
    """The background refresher's first fetch waits a random part of this (no stampede of replicas)."""

    def refresh_delay(self, lifetime: float, rng: random.Random) -> float:
        """Seconds after obtaining a token with `lifetime` at which to refresh it."""
        left = lifetime * self.refresh_left * (1 + rng.uniform(-self.jitter, self.jitter))
        return max(MIN_REFRESH_INTERVAL, lifetime - left)

    def backoff(self, failures: int, retry_after: float | None, rng: random.Random) -> float:
        """Delay before the next attempt after `failures` consecutive failures (1 = the first); at least
        the server's Retry-After (capped by `retry_after_max`)."""
        delay = backoff(failures, initial=self.backoff_initial, maximum=self.backoff_max, jitter=self.jitter, rng=rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max))
        return delay

    @classmethod
    def of(cls, config: TokenConfig) -> RefreshPolicy:
        """The policy that a `[token]` table describes."""
        return cls(
            refresh_left=config.refresh_left,
            jitter=config.refresh_jitter,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            startup_jitter=config.startup_jitter,
        )


FetchListener = Callable[[float, Token | None, TokenError | None], None]
"""Called after every fetch with its duration and either the token or the error (for metrics)."""


class TokenFetcher(Protocol):
    """One token request; `aclose` releases what it holds (its HTTP session)."""

    async def __call__(self) -> TokenGrant: ...

    async def aclose(self) -> None: ...


class TokenProvider:
    """The one place that holds the current token. Start `run()` in a task group to refresh ahead."""

    def __init__(
        self,
        fetch: TokenFetcher | Callable[[], Awaitable[TokenGrant]],
        *,
        clock: Clock | None = None,
        policy: RefreshPolicy | None = None,
        rng: random.Random | None = None,
        listeners: list[FetchListener] | None = None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock or SystemClock()
        self._policy = policy or RefreshPolicy()
        self._rng = rng or random.Random()
        self.listeners = listeners if listeners is not None else []
        self._token: Token | None = None
        self._refresh_at = 0.0
        self._retry_at = 0.0
        self._failures = 0
        self._last_error: TokenError | None = None
        self._inflight: anyio.Event | None = None
        self._fetched = anyio.Event()
        """Set (and replaced) whenever a fetch ends, however it ends."""
        self._wake = anyio.Event()
        self._running = False
        self._stopping = False
        self._after_refusal = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        key: ServiceKey,
        credentials: CredentialsConfig,
        token: TokenConfig,
        *,
        clock: Clock | None = None,
        listeners: list[FetchListener] | None = None,
        rng: random.Random | None = None,
    ) -> AsyncIterator[TokenProvider]:
        """A provider fetching over HTTP for `key`; its session closes on exit (start `run()` to refresh ahead).

        Raises CredentialsError when the TLS context cannot be built (e.g. an unreadable `ca_file`).
        """
        clock = clock or SystemClock()
        provider = cls(
            HttpTokenFetcher.create(key, credentials, timeout=token.timeout, clock=clock),
            clock=clock,
            policy=RefreshPolicy.of(token),
            listeners=listeners,
            rng=rng,
        )
        try:
            yield provider
        finally:
            with anyio.CancelScope(shield=True):
                await provider.aclose()

    async def replace_fetcher(self, fetch: TokenFetcher) -> None:
        """Fetch with `fetch` from now on (new credentials); the old fetcher is closed once a fetch it has
        under way has finished. The cached token keeps serving until the next refresh."""
        old, self._fetch = self._fetch, fetch
        try:
            while self.fetching:
                await self.wait_fetch()
        finally:
            closer = getattr(old, "aclose", None)
            if closer is not None:
                with anyio.CancelScope(shield=True):
                    await closer()

    async def switch_to(self, fetch: TokenFetcher) -> Token:
        """Take new credentials into use only once they got a token: fetch with `fetch`; on success it is the
        fetcher from now on and its token the current one; on a TokenError nothing changes (and `fetch` is
        closed). The old credentials keep serving until then."""
        started = self._clock.monotonic()
        try:
            grant = _usable(await fetch())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await fetch.aclose()
            raise
        await self.replace_fetcher(fetch)
        token = self._accept(grant, started)
        self._notify(started, token, None)
        self._wake.set()  # the refresher plans anew
        return token

    async def aclose(self) -> None:
        """Close the current fetcher (its HTTP session)."""
        closer = getattr(self._fetch, "aclose", None)
        if closer is not None:
            await closer()

    @property
    def current(self) -> Token | None:
        """The cached token, valid or not."""
        return self._token

    @property
    def last_error(self) -> TokenError | None:
        """The error of the last fetch, if it failed."""
        return self._last_error

    @property
    def fetching(self) -> bool:
        """True while a fetch is under way."""
        return self._inflight is not None

    async def wait_fetch(self) -> None:
        """Return when the fetch under way (if any) has finished."""
        if self._inflight is not None:
            await self._inflight.wait()

    @property
    def next_attempt_in(self) -> float | None:
        """Seconds until the next fetch attempt after a failure (None when not backing off)."""
        if self._last_error is None:
            return None
        return max(0.0, self._retry_at - self._clock.monotonic())

    def has_valid_token(self) -> bool:
        """True while a usable token is cached (what readiness reports)."""
        return self.usable_token() is not None

    def usable_token(self) -> Token | None:
        """The cached token if it is usable now (what `get` returns without waiting), else None."""
        token = self._token
        return token if token is not None and token.usable(self._clock.monotonic()) else None

    async def get(self) -> Token:
        """A usable token: the cached one, or (only when none is usable) the result of a shared fetch.

        While `run()` refreshes in the background, the fetch happens there (a caller that gives up waiting
        leaves it running for the others); otherwise the first caller fetches and the others share it.
        """
        while True:
            token = self._token
            now = self._clock.monotonic()
            if token is not None and token.usable(now):
                return token
            if self._stopping:
                raise TokenError("no token: senderd is stopping", reason=self._stop_reason())
            if self._inflight is None and self._backing_off(now):
                raise self._backing_off_error()
            if self._inflight is None and not self._running:
                await self._fetch_once()
                continue
            fetched = self._fetched
            if self._inflight is None:
                self._wake.set()  # the refresher fetches now
            await fetched.wait()
            if not self.has_valid_token() and self._backing_off(self._clock.monotonic()):
                raise self._backing_off_error()

    def stop(self) -> None:
        """Senderd is stopping: callers waiting for a token (and later ones, if none is valid) get a
        TokenError at once instead of waiting for the token server."""
        self._stopping = True
        self._fetch_finished()

    def _backing_off(self, now: float) -> bool:
        return self._last_error is not None and now < self._retry_at

    def _stop_reason(self) -> str:
        return self._last_error.reason if self._last_error is not None else "unreachable"

    def _fetch_finished(self) -> None:
        self._fetched.set()
        self._fetched = anyio.Event()

    def invalidate(self, token: Token) -> bool:
        """The runtime refused `token` (401): drop it if it is still the current one, and refresh.

        Returns whether a retry with another token makes sense: False when `token` itself replaced a
        refused one (then it is kept: one refresh per token, not one per send).
        """
        if token.replaces_refused:
            return False
        if self._token is token:
            self._token = None
            self._after_refusal = True
            if self._last_error is None:  # during a backoff the next attempt stays where it is
                self._retry_at = 0.0
            self._wake.set()
        return True

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep a token fresh until cancelled: refresh ahead of expiry, back off on failure."""
        self._running = True
        try:
            task_status.started()
            if self._token is None and self._policy.startup_jitter > 0:
                await self._sleep_or_wake(self._rng.uniform(0, self._policy.startup_jitter))
            while True:
                now = self._clock.monotonic()
                if self._inflight is not None:
                    await self._inflight.wait()
                    continue
                token = self._token
                if token is not None and token.usable(now) and now < self._refresh_at:
                    await self._sleep_or_wake(self._refresh_at - now)
                    continue
                if now < self._retry_at:
                    await self._sleep_or_wake(self._retry_at - now)
                    continue
                with contextlib.suppress(TokenError):  # logged and backed off; the cached token keeps serving
                    await self._fetch_once()
        finally:
            self._running = False
            self._fetch_finished()  # whoever waited for this refresher fetches for themselves now

    def _backing_off_error(self) -> TokenError:
        assert self._last_error is not None
        wait = max(0.0, self._retry_at - self._clock.monotonic())
        return TokenError(
            f"{self._last_error} (next token attempt in {wait:.1f}s)",
            reason=self._last_error.reason,
            status=self._last_error.status,
        )

    async def _sleep_or_wake(self, delay: float) -> None:
        async with anyio.create_task_group() as group:

            async def sleeper() -> None:
                await self._clock.sleep(delay)
                group.cancel_scope.cancel()

            async def waker() -> None:
                await self._wake.wait()
                group.cancel_scope.cancel()

            group.start_soon(sleeper)
            group.start_soon(waker)
        if self._wake.is_set():
            self._wake = anyio.Event()

    async def _fetch_once(self) -> Token:
        event = anyio.Event()
        self._inflight = event
        started = self._clock.monotonic()
        try:
            try:
                grant = _usable(await self._fetch())
            except TokenError:
                raise
            except Exception as exc:  # a bug or an OS failure nobody foresaw: a failed fetch, not the daemon's end
                log.exception("token_fetch_crashed")
                raise TokenError(
                    f"token fetch failed unexpectedly ({type(exc).__name__}: {str(exc)[:160]})", reason="unreachable"
                ) from None
        except TokenError as exc:
            self._failures += 1
            self._last_error = exc
            delay = self._policy.backoff(self._failures, exc.retry_after, self._rng)
            self._retry_at = self._clock.monotonic() + delay
            log.warning(
                "token_fetch_failed",
                reason=exc.reason,
                error=str(exc),
                failures=self._failures,
                retry_in_s=round(delay, 3),
                cached_token_valid=self.has_valid_token(),
            )
            self._notify(started, None, exc)
            raise
        finally:
            self._inflight = None
            event.set()
            self._fetch_finished()
        token = self._accept(grant, started)
        self._notify(started, token, None)
        self._wake.set()
        return token

    def _accept(self, grant: TokenGrant, started: float) -> Token:
        """Make `grant` (requested at monotonic time `started`) the current token, and plan its refresh."""
        # Lifetimes count from when the request went out: the server started the clock then at the latest.
        now = started
        token = Token(
            value=grant.access_token,
            obtained_at=now,
            expires_at=now + grant.expires_in,
            expires_at_wall=self._clock.time() - (self._clock.monotonic() - now) + grant.expires_in,
            scopes=grant.scopes,
            replaces_refused=self._after_refusal,
        )
        self._after_refusal = False
        self._token = token
        self._failures = 0
        self._last_error = None
        self._retry_at = 0.0
        self._refresh_at = now + self._policy.refresh_delay(grant.expires_in, self._rng)
        log.info("token_refreshed", expires_in_s=grant.expires_in, next_refresh_in_s=round(self._refresh_at - now, 3))
        return token

    def _notify(self, started: float, token: Token | None, error: TokenError | None) -> None:
        duration = self._clock.monotonic() - started
        for listener in self.listeners:
            listener(duration, token, error)


def _usable(grant: TokenGrant) -> TokenGrant:
    """`grant`, unless its lifetime is too short to use (a refresh storm: a failed fetch, backed off); an
    absurdly long one is clamped."""
    if grant.expires_in < MIN_TOKEN_LIFETIME:
        raise TokenError(
            f"the token server gave a token valid for {grant.expires_in:g}s, too short to use (at least "
            f"{MIN_TOKEN_LIFETIME:g}s): check the token server's token validity setting",
            reason="bad_response",
        )
    if grant.expires_in > MAX_TOKEN_LIFETIME:
        return dataclasses.replace(grant, expires_in=MAX_TOKEN_LIFETIME)
    return grant


class HttpTokenFetcher:
    """One client-credentials request to the service key's token URL over its own session."""

    def __init__(
        self,
        key: ServiceKey,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 10.0,
        clock: Clock | None = None,
        credentials: CredentialsConfig | None = None,
    ) -> None:
        self.key = key
        self.session = session
        self.timeout = timeout
        self.clock = clock or SystemClock()
        self.credentials = credentials or CredentialsConfig()
        self.proxy = proxy_for(key.token_url, self.credentials)

    @classmethod
    def create(
        cls, key: ServiceKey, credentials: CredentialsConfig, *, timeout: float, clock: Clock | None = None
    ) -> HttpTokenFetcher:
        """A fetcher with a new session: our client certificate when the key has one, `ca_file` trusted, the
        set's proxy."""
        session = open_session(client_context(key, credentials.ca_file), credentials, limit=4)
        return cls(key, session, timeout=timeout, clock=clock, credentials=credentials)

    async def aclose(self) -> None:
        """Close the session."""
        await self.session.close()

    async def __call__(self) -> TokenGrant:
        key = self.key
        form = {"grant_type": "client_credentials", "client_id": key.client_id}
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if not key.uses_certificate and key.client_secret is not None:
            if self.credentials.client_auth == "basic":
                pair = f"{key.client_id}:{key.client_secret.reveal()}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
            else:  # as every SAP library does: a '+' in a secret survives form encoding, not HTTP Basic
                form["client_secret"] = key.client_secret.reveal()
        host = urlsplit(key.token_url).netloc
        try:
            async with self.session.post(
                key.token_url,
                data=form,
                headers=headers,
                proxy=self.proxy,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                body = await read_bounded(response, MAX_ANSWER_BYTES)
                if body.truncated:
                    raise TokenError(
                        f"token server {host}: answer {response.status} larger than {MAX_ANSWER_BYTES // 1024} KiB: "
                        "not a token server's answer; check the service key's tokenurl",
                        reason="bad_response",
                        status=response.status,
                    )
                return _grant_from_response(response.status, response.headers, body.data, host, self.clock.time())
        except TokenError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TokenError(
                f"token server {host}: its TLS certificate is not trusted ({_ssl_reason(exc)}): "
                "set credentials.ca_file to the CA bundle that issued it",
                reason="tls_trust",
            ) from None
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise TokenError(
                _client_cert_message(host, exc, key.uses_certificate), reason="client_certificate"
            ) from None
        except (aiohttp.ClientHttpProxyError, aiohttp.ClientProxyConnectionError) as exc:
            raise TokenError(
                f"token server {host}: {proxy_problem(exc, self.credentials)}", reason="unreachable"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if exc.os_error.errno == errno.ECONNRESET:  # cut off while the TLS handshake was under way
                raise TokenError(
                    _client_cert_message(host, exc, key.uses_certificate), reason="client_certificate"
                ) from None
            raise TokenError(
                f"token server {host}: cannot connect ({exc.os_error.strerror or exc.os_error}): "
                "check the service key's tokenurl and the network",
                reason="unreachable",
            ) from None
        except TimeoutError:
            raise TokenError(f"token server {host}: no answer within {self.timeout:g}s", reason="timeout") from None
        except aiohttp.ClientError as exc:
            if _tls_alert(exc):  # TLS 1.3 servers refuse a client certificate after the handshake, by an alert
                raise TokenError(
                    _client_cert_message(host, exc, key.uses_certificate), reason="client_certificate"
                ) from None
            # A reset or close after the handshake: the network, a proxy or the server, for now (retried);
            # a TLS 1.3 server that refuses our certificate may also just reset, so the message says both.
            cause = (
                "the server may refuse the client certificate"
                if key.uses_certificate
                else "the server may demand a client certificate, which a ClientSecret key has none of"
            )
            raise TokenError(
                f"token server {host}: the connection broke after the TLS handshake ({_short(exc)}): retrying; "
                f"if it persists, {cause}, or a proxy in between drops the connection",
                reason="unreachable",
            ) from None
        except OSError as exc:  # raised by the session itself, e.g. at the file descriptor limit
            raise TokenError(
                f"token server {host}: {type(exc).__name__}: {_short(exc)}", reason="unreachable"
            ) from None


def _tls_alert(exc: BaseException) -> bool:
    """True when the error is a TLS alert (the peer refused something in our handshake), not a bare reset."""
    text = str(exc).upper()
    return "ALERT" in text or "CERTIFICATE" in text


def _short(exc: BaseException) -> str:
    return (str(exc).split("\n")[0][:120] or type(exc).__name__).strip()


def _ssl_reason(exc: BaseException) -> str:
    text = str(exc)
    if "certificate has expired" in text:
        return "certificate has expired"
    if "unable to get local issuer" in text or "self-signed" in text or "self signed" in text:
        return "unknown issuer"
    if "hostname" in text.lower() or "IP address mismatch" in text:
        return "host name mismatch"
    return "verification failed"


def _client_cert_message(host: str, exc: BaseException, sent_certificate: bool) -> str:
    detail = (str(exc).split("]")[-1].strip() or type(exc).__name__)[:120]
    if not sent_certificate:
        return (
            f"token server {host}: connection refused during TLS ({detail}): the server demands a client "
            "certificate and a ClientSecret key has none; use the token URL without '.cert.'"
        )
    return (
        f"token server {host}: TLS handshake refused ({detail}): the server did not accept the client "
        "certificate; check that certificate and key come from this service key and that the token URL "
        "is the '.cert.' host"
    )


def _error_detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    parts = [str(data.get(k, ""))[:120] for k in ("error", "error_description") if data.get(k)]
    return ": ".join(parts)


def _grant_from_response(status: int, headers: Any, body: bytes, host: str, now: float) -> TokenGrant:
    if status == 200:
        try:
            data = json.loads(body)
            token = data["access_token"]
            expires_in = float(data["expires_in"])
        except (ValueError, KeyError, TypeError):
            raise TokenError(
                f"token server {host}: answer 200 without a usable access_token/expires_in",
                reason="bad_response",
                status=status,
            ) from None
        if not isinstance(token, str) or not token or not math.isfinite(expires_in) or expires_in <= 0:
            raise TokenError(
                f"token server {host}: answer 200 with an invalid token", reason="bad_response", status=status
            )
        token_type = data.get("token_type", "bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenError(
                f"token server {host}: token_type {str(token_type)[:40]!r} is not bearer: senderd sends Bearer "
                "tokens only; check the service key's tokenurl",
                reason="bad_response",
                status=status,
            )
        scope = data.get("scope")
        scopes = tuple(scope.split()) if isinstance(scope, str) else ()
        return TokenGrant(access_token=token, expires_in=expires_in, scopes=scopes)
    detail = _error_detail(body)
    said = f"{status} {detail}".strip()
    if status == 401:
        raise TokenError(
            f"token server {host}: credentials rejected ({said}): check that clientid and certificate "
            "(or clientsecret) come from the same, undeleted service key",
            reason="bad_credentials",
            status=status,
        )
    if status == 400:
        raise TokenError(
            f"token server {host}: bad request ({said}): check the service key's clientid",
            reason="bad_request",
            status=status,
        )
    if status == 429:
        retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
        raise TokenError(
            f"token server {host}: rate limited (429); retry after {retry_after or 0:g}s",
            reason="rate_limited",
            status=status,
            retry_after=retry_after,
        )
    if status >= 500:
        raise TokenError(
            f"token server {host}: server error ({said})",
            reason="server_error",
            status=status,
            retry_after=parse_retry_after(headers.get("Retry-After"), now=now),
        )
    raise TokenError(f"token server {host}: unexpected answer ({said})", reason="bad_response", status=status)


def claims_of(token: str) -> dict[str, Any]:
    """The JWT's claims, decoded without verifying the signature (for display only)."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}
