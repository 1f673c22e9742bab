"""Security guarantees: TLS verification cannot be switched off, key files never linger, the relay is
local by default. (Every test's captured output is also scanned for secrets: see conftest.py.)"""

from __future__ import annotations

import os
import re
import ssl
import stat
from pathlib import Path

import pytest

from senderd.auth import tls
from senderd.config import RelayConfig, config_from_dict
from senderd.errors import ConfigError

SOURCE = Path(__file__).resolve().parent.parent / "senderd"
BYPASSES = re.compile(
    r"verify_ssl\s*=\s*False|ssl\s*=\s*False|CERT_NONE|check_hostname\s*=\s*False|"
    r"_create_unverified_context|verify_mode\s*=\s*ssl\.CERT_OPTIONAL"
)


def test_no_code_path_disables_tls_verification() -> None:
    hits = []
    for path in SOURCE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BYPASSES.search(line):
                hits.append(f"{path.relative_to(SOURCE.parent)}:{number}: {line.strip()}")
    # The emulator's *server* asks for client certificates optionally (ClientSecret clients have none);
    # that is a server-side setting and verifies every certificate that is presented.
    assert [h for h in hits if not h.startswith("senderd/emulator/pki.py")] == []


def test_client_contexts_verify_and_check_host_names() -> None:
    context = tls.trust_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("section", ["credentials", "runtime", "token", "server", "relay"])
@pytest.mark.parametrize("key", ["insecure", "verify", "verify_ssl", "tls_verify"])
def test_there_is_no_insecure_switch(section: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"{section}.{key}: unknown key"):
        config_from_dict({section: {key: False}}, source="c.toml")


def test_key_temp_file_fallback_is_0600_and_gone_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "memfd_create")  # as on a system without it
    with tls.private_pem_path(b"key material") as path:
        assert not path.startswith("/proc/")  # the fallback: a file, not the in-memory one
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o600
        assert Path(path).read_bytes() == b"key material"
    assert not os.path.exists(path)


def test_the_relay_listens_on_localhost_by_default() -> None:
    assert RelayConfig().listen.startswith("127.0.0.1:")
