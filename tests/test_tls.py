"""TLS contexts: the client certificate's private key is loaded from memory and leaves nothing behind."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

import pytest

from senderd.auth.servicekey import parse_service_key
from senderd.auth.tls import client_context, prepare_trust, private_pem_path, trust_context
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


def test_prepared_trust_contexts_are_those_trust_context_builds(pki: Pki, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(pki.root.cert_pem())
    built = trust_context(ca_file)
    prepare_trust(2)
    prepared = [trust_context(ca_file), trust_context(None)]
    assert prepared[0] is not prepared[1]
    for context in prepared:
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert prepared[0].cert_store_stats() == built.cert_store_stats()  # the system store and ca_file
    assert prepared[1].cert_store_stats()["x509_ca"] == built.cert_store_stats()["x509_ca"] - 1
    assert trust_context(ca_file).cert_store_stats() == built.cert_store_stats()  # none left: built at once


def test_a_failed_preparation_leaves_trust_context_to_meet_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> ssl.SSLContext:
        raise ssl.SSLError("no store")

    monkeypatch.setattr(ssl, "create_default_context", broken)
    prepare_trust(1)
    with pytest.raises(ssl.SSLError, match="no store"):
        trust_context()
