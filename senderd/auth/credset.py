"""A credentials set: the unit of isolation. Its own service key, token provider (for OAuth), TLS contexts,
proxy and runtime session: one set's token server being down, slow or refusing delays no other set."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from senderd.auth.runtime import BasicAuth, BearerAuth, CertificateAuth, RuntimeAuth
from senderd.auth.servicekey import ServiceKey, load_set
from senderd.auth.sources import KeySource, Purpose
from senderd.auth.tls import load_client_certificate, trust_context
from senderd.auth.token import HttpTokenFetcher, TokenProvider
from senderd.bounded import ACCEPT_ENCODING
from senderd.clock import Clock
from senderd.config import Config, CredentialsConfig
from senderd.errors import ConfigError, CredentialsError, SenderdError, TokenError
from senderd.logs import get_logger
from senderd.metrics import Metrics
from senderd.sessions import open_session

log = get_logger("credentials")


@dataclass
class CredentialSet:
    """One named set of credentials, opened: what a sender to its runtime needs."""

    name: str
    config: CredentialsConfig
    key: ServiceKey
    source: KeySource
    runtime_url: str
    session: aiohttp.ClientSession
    """The runtime session (for `client-certificate`, its TLS context presents the client certificate)."""
    auth: RuntimeAuth
    tokens: TokenProvider | None = None
    """The set's token provider (OAuth only)."""
    metrics: Metrics | None = None
    clock: Clock | None = None
    runtime_context: ssl.SSLContext | None = field(default=None, repr=False)
    token_timeout: float = 10.0
    purpose: Purpose = "send"
    """What the set is for: sending to iFlows, or reading the MPL API (its `runtime_url` is then the API host)."""

    @property
    def where(self) -> str:
        """The set's table in the config, for messages."""
        return f"credentials.{self.name}"

    @classmethod
    @asynccontextmanager
    async def open(
        cls, name: str, config: Config, *, metrics: Metrics, clock: Clock, purpose: Purpose | None = None,
        key: tuple[ServiceKey, KeySource] | None = None,
    ) -> AsyncIterator[CredentialSet]:  # fmt: skip
        """Load the set's key and open its sessions (closed on exit). Raises ConfigError/CredentialsError.

        `purpose` (default: what the config makes of the set) refuses a binding of the wrong plan; an `api` set
        talks to its key's `url` (the tenant's API host), never to `[runtime] url`."""
        creds = config.credentials[name]
        purpose = purpose or config.purpose(name)
        where = "credentials" if len(config.credentials) == 1 else f"credentials.{name}"
        loaded, source = key or load_set(creds, source=config.source, where=where, purpose=purpose)
        for note in loaded.notes:
            log.warning("credentials_note", credentials=name, note=note)
        _check_mode(creds, loaded, config.source, where)
        if purpose == "api" and _xsappname(loaded.client_id).startswith("it-rt-"):
            log.warning("credentials_note", credentials=name, note=f"{loaded.source}: the client id looks like a "
                        "key of plan integration-flow (it-rt-...): the MPL API needs a key of plan api")  # fmt: skip
        if purpose == "api" and "-rt." in (urlsplit(loaded.runtime_url or "").hostname or ""):
            log.warning("credentials_note", credentials=name, note=f"{loaded.source}: url {loaded.runtime_url} is "
                        "a runtime (-rt) host: the MPL API is on the tenant's host without -rt")  # fmt: skip
        metrics.declare_set(name)
        if loaded.certificate_not_after is not None:
            metrics.certificate_expires(name, loaded.certificate_not_after.timestamp())
        if purpose == "api":
            runtime_url = creds.runtime_url or loaded.runtime_url
            ca_file = creds.ca_file or config.runtime.ca_file
        else:
            runtime_url = creds.runtime_url or config.runtime.url or loaded.runtime_url
            ca_file = config.runtime.ca_file or creds.ca_file
        if runtime_url is None:
            raise ConfigError(
                f"{config.source}: {where}.runtime_url: the service key has no 'url': set runtime_url (or runtime.url)"
            )
        if creds.auth == "basic":
            log.warning("basic_auth", credentials=name, note="SAP does not recommend HTTP Basic for production")
        context = trust_context(ca_file)
        if creds.auth == "client-certificate":
            load_client_certificate(context, loaded)
        async with contextlib.AsyncExitStack() as stack:
            tokens: TokenProvider | None = None
            if creds.auth == "oauth":
                tokens = await stack.enter_async_context(
                    TokenProvider.open(
                        loaded, creds, config.token_for(name), clock=clock, listeners=[metrics.token_listener(name)]
                    )
                )
            session = open_session(
                context,
                creds,
                limit=max(10, config.pool.workers * 2),
                # unsafe=True keeps cookies from IP-address hosts too (the CSRF session must come back)
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                headers={"Accept-Encoding": ACCEPT_ENCODING},
            )
            stack.push_async_callback(session.close)
            credential_set = cls(name, creds, loaded, source, runtime_url, session, CertificateAuth(), tokens,
                                 metrics, clock, context, config.token_for(name).timeout, purpose)  # fmt: skip
            if tokens is not None:
                credential_set.auth = BearerAuth(tokens)
            elif creds.auth == "basic":
                credential_set.auth = BasicAuth(lambda: credential_set.key)  # the key in use, also after a rotation
            metrics.watch_credentials(name, lambda: credential_set.ready()[0])
            yield credential_set

    def ready(self) -> tuple[bool, str]:
        """Whether the set can authenticate a send now, and why not."""
        if self.tokens is None:
            return True, f"{self.config.auth}: no token needed"
        if self.tokens.has_valid_token():
            return True, "ok"
        error = self.tokens.last_error
        return False, f"no valid token: {error}" if error is not None else "no valid token yet"

    async def rotate(self, config: CredentialsConfig, *, where: str) -> bool:
        """Take the credentials `config` names into use, once they work (OAuth: once they got a token); a
        broken replacement is refused with one log line, and the old credentials keep serving."""
        try:
            key, source = load_set(config, where=where, purpose=self.purpose)
            _check_mode(config, key, "", where)
            if key == self.key and config == self.config:
                self.source = source
                return True
            if self.tokens is not None:
                fetcher = HttpTokenFetcher.create(key, config, timeout=self.token_timeout, clock=self.clock)
                await self.tokens.switch_to(fetcher)
            elif self.runtime_context is not None and config.auth == "client-certificate":
                load_client_certificate(self.runtime_context, key)  # new connections present the new one
        except (SenderdError, TokenError) as exc:
            log.error("credentials_reload_failed", credentials=self.name, error=str(exc),
                      keeping="the credentials in use")  # fmt: skip
            if self.metrics is not None:
                self.metrics.rotation(self.name, "refused")
            return False
        self.config, self.key, self.source = config, key, source
        expiry = key.certificate_not_after
        if self.metrics is not None:
            self.metrics.rotation(self.name, "rotated")
            if expiry is not None:
                self.metrics.certificate_expires(self.name, expiry.timestamp())
        log.info("credentials_rotated", credentials=self.name, source=key.source, key_type=key.key_type,
                 certificate_expires=expiry.isoformat() if expiry else None)  # fmt: skip
        return True


def _xsappname(client_id: str) -> str:
    """What follows the `|` of a client id (`it-rt-<tenant>!b..` for plan integration-flow, `it!b..` for api)."""
    return client_id.rpartition("|")[2]


def _check_mode(config: CredentialsConfig, key: ServiceKey, source: str, where: str) -> None:
    """The auth mode and the key must fit: a certificate for client-certificate, a secret for basic."""
    prefix = f"{source}: " if source and source != "<defaults>" else ""
    if config.auth == "client-certificate" and not key.uses_certificate:
        raise CredentialsError(
            f"{prefix}{where}.auth: client-certificate needs a Certificate or External Certificate key; "
            f"{key.source} is a {key.key_type} key"
        )
    if config.auth == "basic" and key.client_secret is None:
        raise CredentialsError(
            f"{prefix}{where}.auth: basic needs a ClientId/Secret key; {key.source} is a {key.key_type} key"
        )
