"""Service keys as the BTP cockpit shows them for "Process Integration Runtime", plan integration-flow."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from senderd.emulator.pki import IssuedCert


def client_id_for(tenant: str) -> str:
    """A realistic client id, e.g. "sb-<guid>!b123|it-rt-<tenant>!b456" (with `|` and `!`)."""
    return f"sb-{uuid.uuid4()}!b{random.randint(1, 999999)}|it-rt-{tenant}!b{random.randint(1, 999)}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def service_key_dict(
    *,
    client_id: str,
    token_url: str,
    runtime_url: str,
    client: IssuedCert | None,
    chain: Sequence[x509.Certificate] = (),
    client_secret: str | None = None,
    layout: Literal["nested", "flat"] = "nested",
    include_key: bool = True,
    key_format: Literal["pkcs1", "pkcs8"] = "pkcs1",
    chain_order: Literal["leaf-first", "leaf-last"] = "leaf-first",
) -> dict[str, Any]:
    """A service key: Certificate (SAP-generated), External Certificate (`include_key=False`) or
    ClientId/Secret (`client=None` with `client_secret`)."""
    fields: dict[str, Any] = {"clientid": client_id}
    if client is None:
        if client_secret is None:
            raise ValueError("a service key needs either a client certificate or a client secret")
        fields["clientsecret"] = client_secret
    else:
        certs = [client.cert, *chain] if chain_order == "leaf-first" else [*chain, client.cert]
        fields["certificate"] = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
        if include_key:
            fields["key"] = client.key_pem_pkcs1() if key_format == "pkcs1" else client.key_pem_pkcs8()
    fields["tokenurl"] = token_url
    fields["url"] = runtime_url
    fields["createdate"] = _iso(datetime.now(UTC))
    if client is not None:
        fields["certificatedetails"] = {
            "issuerdn": client.cert.issuer.rfc4514_string(),
            "subjectdn": client.cert.subject.rfc4514_string(),
            "serialnumber": f"{client.cert.serial_number:x}",
            "validuntil": _iso(client.cert.not_valid_after_utc),
        }
    return {"oauth": fields} if layout == "nested" else fields
