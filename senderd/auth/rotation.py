"""Credentials rotated without a restart: each set's files (a key file, a key file's private key, a mounted
binding directory swapped by kubelet through its `..data` link) are watched, and a replacement is taken into
use through the set (`CredentialSet.rotate`), which refuses one that does not work."""

from __future__ import annotations

import hashlib

from senderd.auth.credset import CredentialSet
from senderd.auth.sources import fingerprint
from senderd.clock import Clock


class CredentialWatcher:
    """Notices that a set's credentials changed on disk and hands them to the set."""

    def __init__(self, credential_set: CredentialSet, clock: Clock, *, where: str) -> None:
        self.set = credential_set
        self.clock = clock
        self.where = where
        self._seen = self._fingerprint()

    def _fingerprint(self) -> bytes | None:
        source = self.set.source
        if not source.watched:
            return None
        digest = fingerprint(source)  # the paths as given: a swapped `..data` link is followed anew
        key_file = self.set.config.key_file
        if digest is None or key_file is None:
            return digest
        try:
            return hashlib.sha256(digest + key_file.read_bytes()).digest()
        except OSError:
            return None  # a swap under way, or gone: look again next time

    @property
    def watching(self) -> bool:
        """False when nothing can change while the process runs (a key from an environment variable)."""
        return self.set.source.rotates and bool(self.set.source.watched)

    async def run(self) -> None:
        """Check every `watch_interval` until cancelled."""
        while True:
            await self.clock.sleep(self.set.config.watch_interval)
            await self.check()

    async def check(self) -> bool:
        """Take the files' credentials into use if they changed; True when they did and are in use now.

        A replacement that is refused is not tried again until the files change once more."""
        current = self._fingerprint()
        if current is None or current == self._seen:
            return False
        self._seen = current
        return await self.set.rotate(self.set.config, where=self.where)
