"""How a credentials set proves itself to the runtime: a Bearer token (OAuth), HTTP Basic with
clientid:clientsecret, or the client certificate in the TLS handshake (then no header at all)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from senderd.auth.servicekey import ServiceKey
from senderd.auth.token import Token, TokenProvider


@dataclass(frozen=True, slots=True)
class Credential:
    """What one request carries: its `Authorization` value (None: the TLS client certificate speaks), and
    the token it came from (so that a 401 invalidates exactly that one)."""

    header: str | None
    token: Token | None = None


class RuntimeAuth(Protocol):
    """A set's way to authenticate requests to the runtime."""

    async def credential(self) -> Credential:
        """What the next request carries; raises TokenError when no token can be had."""
        ...

    def ready(self) -> Credential | None:
        """What `credential` would give without waiting, if it would not wait (else None)."""
        ...

    def refused(self, credential: Credential) -> bool:
        """The runtime answered 401 to `credential`: whether another one is worth a try."""
        ...

    @property
    def next_attempt_in(self) -> float | None:
        """Seconds until credentials may be had again after a failure (None: no wait known)."""
        ...


class BearerAuth:
    """OAuth client credentials: the token provider's current token."""

    def __init__(self, tokens: TokenProvider) -> None:
        self.tokens = tokens
        self._last = Credential(None)
        """The credential of the token last used (made once per token, not once per send)."""

    def _of(self, token: Token) -> Credential:
        last = self._last
        if last.token is not token:
            last = self._last = Credential(f"Bearer {token.value}", token)
        return last

    async def credential(self) -> Credential:
        return self._of(await self.tokens.get())

    def ready(self) -> Credential | None:
        token = self.tokens.usable_token()
        return self._of(token) if token is not None else None

    def refused(self, credential: Credential) -> bool:
        return credential.token is not None and self.tokens.invalidate(credential.token)

    @property
    def next_attempt_in(self) -> float | None:
        return self.tokens.next_attempt_in


class BasicAuth:
    """HTTP Basic with the key's clientid and clientsecret, straight to the flow (not recommended by SAP)."""

    def __init__(self, key: Callable[[], ServiceKey]) -> None:
        self.key = key

    async def credential(self) -> Credential:
        key = self.key()
        assert key.client_secret is not None, "checked when the set was opened"
        pair = f"{key.client_id}:{key.client_secret.reveal()}".encode()
        return Credential("Basic " + base64.b64encode(pair).decode("ascii"))

    def ready(self) -> Credential | None:
        return None  # the key is read each time (a rotation replaces it): `credential` does not wait either

    def refused(self, credential: Credential) -> bool:
        return False

    @property
    def next_attempt_in(self) -> float | None:
        return None


class CertificateAuth:
    """The client certificate itself, presented in the TLS handshake by the set's runtime session."""

    async def credential(self) -> Credential:
        return Credential(None)

    def ready(self) -> Credential | None:
        return Credential(None)

    def refused(self, credential: Credential) -> bool:
        return False

    @property
    def next_attempt_in(self) -> float | None:
        return None
