"""Service keys as the BTP cockpit shows them for "Process Integration Runtime" (plans integration-flow
and api), and the credentials behind them."""

from __future__ import annotations

import random
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from senderd.emulator.pki import IssuedCert

KeyType = Literal["certificate", "clientsecret", "external-certificate", "api"]
"""The keys SAP issues: Certificate (SAP-generated), ClientId/Secret, External Certificate (the user holds
the private key), and a plan-`api` key (ClientId/Secret) for the Message Processing Log API."""
KEY_TYPES: tuple[KeyType, ...] = ("certificate", "clientsecret", "external-certificate", "api")
PLAN_SEND = "integration-flow"
PLAN_API = "api"


def xsappname_for(tenant: str, plan: str = PLAN_SEND) -> str:
    """The XSUAA app name of a tenant's service plan, e.g. "it-rt-<tenant>!b456" (plan `api`: "it!b456")."""
    return f"it!b{random.randint(1, 999)}" if plan == PLAN_API else f"it-rt-{tenant}!b{random.randint(1, 999)}"


def client_id_for(tenant: str, plan: str = PLAN_SEND, *, xsappname: str | None = None) -> str:
    """A realistic client id, e.g. "sb-<guid>!b123|it-rt-<tenant>!b456" (with `|` and `!`); for plan `api`
    "sb-<guid>!b123|it!b456". Every key of one tenant and plan shares the `xsappname` after the `|`."""
    return f"sb-{uuid.uuid4()}!b{random.randint(1, 999999)}|{xsappname or xsappname_for(tenant, plan)}"


def new_client_secret() -> str:
    """A client secret shaped like SAP's: a guid, `$`, then base64-like text with `+`, `/` and a trailing `=`
    (so that it must be form-encoded, and breaks a sender that does not)."""
    return f"{uuid.uuid4()}${secrets.token_urlsafe(12)}+{secrets.token_urlsafe(9)}/{secrets.token_urlsafe(9)}="


@dataclass(frozen=True, repr=False)
class Credentials:
    """One registered OAuth client of a tenant (one service key or binding) and the instance it belongs to."""

    key_type: KeyType
    client_id: str
    scopes: tuple[str, ...]
    instance_name: str
    instance_guid: str
    plan: str = PLAN_SEND
    client: IssuedCert | None = None
    """The client certificate and its key (Certificate and External Certificate keys)."""
    chain: tuple[x509.Certificate, ...] = ()
    """What follows the leaf in the key's `certificate` field (the intermediate; none for External)."""
    client_secret: str | None = None
    pinned: bool = True
    """External Certificate: "Pin Certificate" (on by default)."""
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When the key was created (its `createdate`)."""

    def __repr__(self) -> str:
        return f"Credentials({self.key_type}, client_id={self.client_id!r}, instance={self.instance_name!r})"

    @property
    def uses_certificate(self) -> bool:
        """True for Certificate and External Certificate credentials."""
        return self.client is not None

    def service_key(self, *, token_url: str, url: str, **overrides: Any) -> dict[str, Any]:
        """The service key of these credentials (see `service_key_dict`; `overrides` are its arguments)."""
        arguments: dict[str, Any] = {
            "client_id": self.client_id,
            "token_url": token_url,
            "runtime_url": url,
            "client": self.client,
            "chain": self.chain,
            "client_secret": self.client_secret,
            "include_key": self.key_type == "certificate",
            "created": self.created,
        }
        arguments.update(overrides)
        return service_key_dict(**arguments)


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
    created: datetime | None = None,
) -> dict[str, Any]:
    """A service key: Certificate (SAP-generated), External Certificate (`include_key=False`) or
    ClientId/Secret (`client=None` with `client_secret`).

    `certificatedetails` is written as SAP does: `serialnumber` "0x..." in hex, `validuntil` like
    "2027-01-01T12:56:52.000Z"."""
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
    fields["createdate"] = _iso(created or datetime.now(UTC))
    if client is not None:
        fields["certificatedetails"] = {
            "issuerdn": client.cert.issuer.rfc4514_string(),
            "subjectdn": client.cert.subject.rfc4514_string(),
            "serialnumber": f"0x{client.cert.serial_number:X}",
            "validuntil": _iso(client.cert.not_valid_after_utc),
        }
    return {"oauth": fields} if layout == "nested" else fields
