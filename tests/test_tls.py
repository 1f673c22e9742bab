"""TLS contexts: the client certificate's private key is loaded from memory and leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from senderd.auth.servicekey import parse_service_key
from senderd.auth.tls import client_context, private_pem_path
from senderd.emulator.pki import IssuedCert, Pki
from senderd.emulator.servicekey import service_key_dict


def test_client_key_is_loaded_from_memory_and_gone_after(pki: Pki, tmp_path: Path) -> None:
    client: IssuedCert = pki.issue_client("mem")
    key = parse_service_key(
        json.dumps(
            service_key_dict(
                client_id="c",
                token_url="https://127.0.0.1/oauth/token",
                runtime_url="https://127.0.0.1",
                client=client,
                chain=[pki.intermediate.cert],
            )
        ),
        source="k",
    )
    with private_pem_path(b"secret bytes") as path:
        fd = int(path.rsplit("/", 1)[1])
        assert path.startswith("/proc/self/fd/")
        assert os.readlink(path).startswith("/memfd:")  # anonymous memory, never on a disk
        assert Path(path).read_bytes() == b"secret bytes"
    with pytest.raises(OSError):
        os.fstat(fd)  # closed right after loading
    before = set(os.listdir("/proc/self/fd"))
    client_context(key)
    assert set(os.listdir("/proc/self/fd")) <= before  # no descriptor left behind
