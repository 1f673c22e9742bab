"""Where a credentials set's service key comes from: a file, an environment variable, a mounted binding
directory (the SAP BTP service operator's Secret, in any of its layouts), `$SERVICE_BINDING_ROOT`,
`VCAP_SERVICES`; and the fingerprint that tells a rotation.

`read_key_source` turns a set's configuration into the key's JSON text plus what is known about it (its
plan, whether it can rotate, which files to watch); `servicekey.parse_service_key` validates the text.
Paths are never resolved once and kept: Kubernetes swaps a mounted Secret's whole directory through its
`..data` symlink, so every read goes through the path as configured.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from senderd.config import CredentialsConfig
from senderd.errors import ConfigError, CredentialsError

Purpose = Literal["send", "api"]
"""What a set is used for: sending to iFlows (plan `integration-flow`) or the MPL API (plan `api`)."""
MAX_KEY_BYTES = 1 << 20
"""A service key (or one binding file) is a few KiB; anything beyond this is not one (and is not read whole)."""


@dataclass(frozen=True)
class KeySource:
    """A service key as read from its source, before validation."""

    text: str
    """The key's JSON (nested `{"oauth": {...}}` or flat), as `parse_service_key` takes it."""
    source: str
    """Where it came from, for messages: a path, `$VAR`, `binding DIR`, `VCAP_SERVICES it-rt/NAME`."""
    plan: str | None = None
    """The binding's plan (`integration-flow`, `api`) when the source says."""
    rotates: bool = True
    """False where a replacement cannot reach a running process (an environment variable)."""
    watched: tuple[Path, ...] = ()
    """The files whose content decides `fingerprint`, as configured (links are followed anew each read)."""


def read_key_source(
    config: CredentialsConfig, *, where: str = "credentials", purpose: Purpose | None = None,
    environ: Mapping[str, str] | None = None,
) -> KeySource:  # fmt: skip
    """The service key that `config` names. `where` prefixes configuration errors (e.g. `credentials.prod`);
    `purpose` refuses a binding of the wrong plan. Raises ConfigError / CredentialsError (one line)."""
    env = os.environ if environ is None else environ
    if config.service_key is not None:
        return KeySource(_read_file(config.service_key), str(config.service_key), watched=(config.service_key,))
    if config.service_key_env is not None:
        value = env.get(config.service_key_env)
        source = f"${config.service_key_env}"
        if not value:
            raise CredentialsError(
                f"{source}: environment variable is not set or empty: put the service key JSON in it"
            )
        if len(value) > MAX_KEY_BYTES:
            raise CredentialsError(f"{source}: larger than {MAX_KEY_BYTES // 1024} KiB, too large for a service key")
        return KeySource(value, source, rotates=False)
    raise ConfigError(
        f"{where}.service_key: no service key configured: set it in the config file, or pass --service-key"
    )


def fingerprint(source: KeySource) -> bytes | None:
    """A digest of the watched files as they are now (None when one cannot be read: a swap under way)."""
    digest = hashlib.sha256()
    for path in source.watched:
        try:
            digest.update(path.read_bytes())
        except OSError:
            return None
    return digest.digest()


def _read_file(path: Path) -> str:
    source = str(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_BYTES + 1)
    except FileNotFoundError:
        raise CredentialsError(f"{source}: service key file not found: check the path") from None
    except OSError as exc:
        raise CredentialsError(
            f"{source}: cannot read the service key ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(data) > MAX_KEY_BYTES:
        raise CredentialsError(
            f"{source}: larger than {MAX_KEY_BYTES // 1024} KiB, too large for a service key: check the path"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CredentialsError(f"{source}: cannot read the service key (UnicodeDecodeError)") from None
