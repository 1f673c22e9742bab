"""TLS contexts: verification always on, system trust plus an optional CA bundle, client certificates
loaded without key material lingering on disk.

Python's `ssl` loads certificates from paths only. On Linux the chain and key go into an anonymous
in-memory file (`os.memfd_create`, never on disk) that is closed right after loading; elsewhere into a
0600 temporary file that is removed at once.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from senderd.errors import CredentialsError

if TYPE_CHECKING:  # the module stays light: `once` starts `prepare_trust` before the heavy imports
    from senderd.auth.servicekey import ServiceKey


class _Prepared:
    """System-trust contexts loaded ahead in a thread: OpenSSL parses the system store (~150 certificates, tens
    of milliseconds each time) without holding the GIL, so the load overlaps imports that run meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready: list[ssl.SSLContext] = []

    def start(self, count: int) -> None:
        with self._lock:
            if self._thread is not None or count < 1:
                return
            self._thread = threading.Thread(target=self._load, args=(count,), name="senderd-trust", daemon=True)
            self._thread.start()

    def _load(self, count: int) -> None:
        for _ in range(count):
            try:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            except Exception:  # the caller builds its own and meets the error itself
                return
            with self._lock:
                self._ready.append(context)

    def take(self) -> ssl.SSLContext | None:
        """A prepared context (waiting for the one being loaded), or None when none was asked for or all are gone."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return None
        thread.join()
        with self._lock:
            if not self._ready:
                self._thread = None
                return None
            return self._ready.pop(0)


_PREPARED = _Prepared()


def prepare_trust(count: int) -> None:
    """Start loading the system trust store for the next `count` calls of `trust_context` in the background
    (for `senderd once`, whose start is what a CronJob waits for); those calls then only add `ca_file`."""
    _PREPARED.start(count)


def trust_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies servers against the system store plus `ca_file`."""
    context = _PREPARED.take() or ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except FileNotFoundError:
            raise CredentialsError(f"{ca_file}: CA file not found: check credentials.ca_file") from None
        except (ssl.SSLError, OSError):
            raise CredentialsError(
                f"{ca_file}: not a readable PEM CA bundle: give the PEM certificate(s) of the issuing CA"
            ) from None
    return context


def client_context(key: ServiceKey, ca_file: Path | None = None) -> ssl.SSLContext:
    """A context for the token server: server verification plus, for certificate keys, our client cert."""
    context = trust_context(ca_file)
    if key.uses_certificate:
        load_client_certificate(context, key)
    return context


def load_client_certificate(context: ssl.SSLContext, key: ServiceKey) -> None:
    """Make `context` present `key`'s certificate, with its whole chain, from now on (new connections)."""
    with private_pem_path(key.chain_pem() + key.private_key_pem()) as path:
        try:
            context.load_cert_chain(path)
        except ssl.SSLError:
            raise CredentialsError(f"{key.source}: the TLS library refused the client certificate and key") from None


def _memfd() -> int | None:
    """An anonymous in-memory file readable through /proc, or None where there is none (then a temp file)."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.memfd_create("senderd-client-cert", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:  # seccomp or an old kernel
        return None


@contextlib.contextmanager
def private_pem_path(data: bytes) -> Iterator[str]:
    """Yield a path holding `data` that only this process can read, and that is gone afterwards."""
    fd = _memfd()
    if fd is not None:
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    handle, name = tempfile.mkstemp(prefix="senderd-", suffix=".pem")  # created 0600
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        yield name
    finally:
        os.unlink(name)
