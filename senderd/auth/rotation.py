"""Credentials rotated without a restart: a watched service key file, swapped in through the token
provider's API (`TokenProvider.replace_fetcher`)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

from senderd.auth.servicekey import ServiceKey, load_credentials
from senderd.auth.token import HttpTokenFetcher, TokenProvider
from senderd.clock import Clock
from senderd.config import CredentialsConfig, TokenConfig
from senderd.errors import SenderdError
from senderd.logs import get_logger

log = get_logger("credentials")


class CredentialWatcher:
    """Owns which service key is in use: notices a replaced key file (as Kubernetes updates a mounted
    Secret: a symlink swap) and takes a reload's new credentials, moving the token provider to the new
    key; an invalid new key is refused and the old one keeps serving."""

    def __init__(
        self,
        config: CredentialsConfig,
        token: TokenConfig,
        provider: TokenProvider,
        clock: Clock,
        key: ServiceKey,
        on_rotated: Callable[[ServiceKey], None] | None = None,
    ) -> None:
        self.config = config
        self.token = token
        self.provider = provider
        self.clock = clock
        self.key = key
        self.on_rotated = on_rotated
        self._seen = self._fingerprint()

    def _fingerprint(self) -> bytes | None:
        path = self.config.service_key
        if path is None:
            return None
        try:
            data = path.read_bytes()  # the path as given: a swapped symlink is followed anew each time
        except OSError:
            return None
        key_file = self.config.key_file
        if key_file is not None:
            with contextlib.suppress(OSError):
                data += key_file.read_bytes()
        return hashlib.sha256(data).digest()

    async def run(self) -> None:
        """Check every `credentials.watch_interval` until cancelled (a key from an environment variable
        cannot change while the process runs: nothing to watch)."""
        while True:
            await self.clock.sleep(self.config.watch_interval)
            await self.check()

    async def check(self) -> bool:
        """Reload if the files changed; True when they did and their key is the one in use now."""
        current = self._fingerprint()
        if current is None or current == self._seen:
            return False
        self._seen = current
        return await self.rotate(self.config)

    async def rotate(self, config: CredentialsConfig) -> bool:
        """Use the key `config` names for the next token fetch; False (and a log line) if it is unusable.
        Nothing changes when it is the key and configuration already in use."""
        try:
            key = load_credentials(config)
            if key == self.key and config == self.config:
                return True
            fetcher = HttpTokenFetcher.create(key, config, timeout=self.token.timeout, clock=self.clock)
        except SenderdError as exc:  # e.g. an invalid key or an unreadable ca_file
            log.error("credentials_reload_failed", error=str(exc), keeping="the previous service key")
            return False
        self.config, self.key = config, key
        self._seen = self._fingerprint()
        await self.provider.replace_fetcher(fetcher)
        expiry = key.certificate_not_after
        log.info(
            "credentials_rotated",
            source=key.source,
            key_type=key.key_type,
            certificate_expires=expiry.isoformat() if expiry else None,
        )
        if self.on_rotated is not None:
            self.on_rotated(key)
        return True
