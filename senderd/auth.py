"""Wiring for authentication: service key from config, TLS context, token session and provider."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import anyio
import structlog

from senderd.clock import Clock
from senderd.config import CredentialsConfig, TokenConfig
from senderd.credentials import ServiceKey, load_service_key
from senderd.errors import ConfigError, SenderdError
from senderd.logs import register_secret
from senderd.tls import client_context
from senderd.token import FetchListener, HttpTokenFetcher, RefreshPolicy, TokenProvider

log = structlog.get_logger(component="credentials")


def load_credentials(config: CredentialsConfig, *, now: dt.datetime | None = None,
                     source: str | None = None) -> ServiceKey:
    """The service key named by `[credentials]`, validated; its secret is registered for redaction."""
    where = f"{source}: " if source and source != "<defaults>" else ""
    if config.service_key is None and config.service_key_env is None:
        raise ConfigError(
            f"{where}credentials.service_key: no service key configured: set it in the config file, "
            "or pass --service-key"
        )
    try:
        passphrase = config.key_passphrase()
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    key = load_service_key(config.service_key, env=config.service_key_env, key_file=config.key_file,
                           key_passphrase=passphrase, now=now)
    if key.client_secret is not None:
        register_secret(key.client_secret.reveal())
    return key


def refresh_policy(config: TokenConfig) -> RefreshPolicy:
    """The token refresh policy from `[token]`."""
    return RefreshPolicy(refresh_left=config.refresh_left, jitter=config.refresh_jitter,
                         backoff_initial=config.backoff_initial, backoff_max=config.backoff_max,
                         startup_jitter=config.startup_jitter)


def token_session(key: ServiceKey, config: CredentialsConfig) -> aiohttp.ClientSession:
    """The one HTTP session for the token server, with our client certificate when the key has one."""
    connector = aiohttp.TCPConnector(ssl=client_context(key, config.ca_file), limit=4)
    return aiohttp.ClientSession(connector=connector)


@asynccontextmanager
async def token_provider(
    key: ServiceKey, credentials: CredentialsConfig, token: TokenConfig, *, clock: Clock | None = None,
    listeners: list[FetchListener] | None = None,
) -> AsyncIterator[TokenProvider]:
    """A `TokenProvider` over its own session, closed on exit (the caller starts `run()` if it wants)."""
    fetcher = HttpTokenFetcher(key, token_session(key, credentials), timeout=token.timeout)
    try:
        yield TokenProvider(fetcher, clock=clock, policy=refresh_policy(token), listeners=listeners)
    finally:
        await fetcher.session.close()  # the current one: rotation may have replaced the first


class CredentialWatcher:
    """Notices a replaced service key file (as Kubernetes updates a mounted Secret: a symlink swap) and
    moves the token fetcher to the new key; an invalid new key is refused and the old one keeps serving."""

    def __init__(self, config: CredentialsConfig, provider: TokenProvider,
                 on_rotated: Callable[[ServiceKey], None] | None = None) -> None:
        self.config = config
        self.provider = provider
        self.on_rotated = on_rotated
        self._seen = self._fingerprint()

    def _fingerprint(self) -> bytes | None:
        path = self.config.service_key
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        key_file = self.config.key_file
        if key_file is not None:
            with contextlib.suppress(OSError):
                data += key_file.read_bytes()
        return hashlib.sha256(data).digest()

    async def run(self, interval: float, clock: Clock) -> None:
        """Check every `interval` seconds until cancelled."""
        while True:
            await clock.sleep(interval)
            await self.check()

    async def check(self) -> bool:
        """Reload if the files changed; True when a new key was taken into use."""
        current = self._fingerprint()
        if current is None or current == self._seen:
            return False
        self._seen = current
        return await self.rotate(self.config)

    async def rotate(self, config: CredentialsConfig) -> bool:
        """Load the key `config` names and use it for the next token fetch (False if it is unusable)."""
        try:
            key = load_credentials(config)
        except SenderdError as exc:
            log.error("credentials_reload_failed", error=str(exc), keeping="the previous service key")
            return False
        fetcher = self.provider.fetcher
        if not isinstance(fetcher, HttpTokenFetcher):
            return False
        try:
            session = token_session(key, config)
        except SenderdError as exc:  # e.g. an unreadable ca_file
            log.error("credentials_reload_failed", error=str(exc), keeping="the previous service key")
            return False
        old_session = fetcher.session
        fetcher.key, fetcher.session = key, session
        self.config = config
        self._seen = self._fingerprint()
        try:
            while self.provider.fetching:  # a fetch on the old session finishes first
                await self.provider.wait_fetch()
        finally:
            with anyio.CancelScope(shield=True):
                await old_session.close()
        expiry = key.certificate_not_after
        log.info("credentials_rotated", source=key.source, key_type=key.key_type,
                 certificate_expires=expiry.isoformat() if expiry else None)
        if self.on_rotated is not None:
            self.on_rotated(key)
        return True
