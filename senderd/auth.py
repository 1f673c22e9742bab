"""Wiring for authentication: service key from config, TLS context, token session and provider."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from senderd.clock import Clock
from senderd.config import CredentialsConfig, TokenConfig
from senderd.credentials import ServiceKey, load_service_key
from senderd.errors import ConfigError
from senderd.logs import register_secret
from senderd.tls import client_context
from senderd.token import FetchListener, HttpTokenFetcher, RefreshPolicy, TokenProvider


def load_credentials(config: CredentialsConfig, *, now: dt.datetime | None = None) -> ServiceKey:
    """The service key named by `[credentials]`, validated; its secret is registered for redaction."""
    if config.service_key is None and config.service_key_env is None:
        raise ConfigError(
            "credentials.service_key: no service key configured: set it in the config file, "
            "or pass --service-key"
        )
    key = load_service_key(config.service_key, env=config.service_key_env, key_file=config.key_file,
                           key_passphrase=config.key_passphrase(), now=now)
    if key.client_secret is not None:
        register_secret(key.client_secret.reveal())
    return key


def refresh_policy(config: TokenConfig) -> RefreshPolicy:
    """The token refresh policy from `[token]`."""
    return RefreshPolicy(refresh_left=config.refresh_left, jitter=config.refresh_jitter,
                         backoff_initial=config.backoff_initial, backoff_max=config.backoff_max)


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
    async with token_session(key, credentials) as session:
        fetcher = HttpTokenFetcher(key, session, timeout=token.timeout)
        yield TokenProvider(fetcher, clock=clock, policy=refresh_policy(token), listeners=listeners)
