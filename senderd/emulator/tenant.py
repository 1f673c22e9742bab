"""One emulated Cloud Integration tenant: its own PKI, token server, runtime, clients and files.

A tenant registers one client of every key type SAP issues (see `KEY_TYPES`) and writes, into its folder:

| file | what |
|---|---|
| `service-key.json` | Certificate key (SAP-generated: chain leaf + intermediate, PKCS#1 key, certificatedetails) |
| `clientsecret-key.json` | ClientId/Secret key (a secret with `+`, `/`, `$` and `=`) |
| `external-certificate-key.json` | External Certificate key: one certificate, no chain, no `key` |
| `external-certificate.key.pem` | its private key (PKCS#8 PEM; EC P-256, the customer's choice) |
| `external-certificate.p12` | the same key with its certificate as PKCS#12 (passphrase `Tenant.p12_passphrase`) |
| `api-key.json` | a plan-`api` key (ClientId/Secret) for the Message Processing Log API |
| `ca.pem` | the tenant's root CA, which a client must trust |
| `senderd.toml` | a senderd config using `service-key.json` and `ca.pem` |

Files holding secrets are 0600. Its bindings go under the stack's binding root (see `bindings.py`).
The External Certificate is signed by `customer_ca`, a CA of the customer's that the tenant trusts (so its
one certificate is a complete chain); SAP-generated certificates by the tenant's intermediate.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from senderd.emulator.bindings import (
    LAYOUTS,
    Instance,
    Layout,
    Step,
    binding_files,
    vcap_service,
    write_plain,
    write_projected,
)
from senderd.emulator.mpl import MplApi
from senderd.emulator.pki import IssuedCert, Pki, create_pki, create_root_ca
from senderd.emulator.runtime import FlowSpec, Runtime, default_flows
from senderd.emulator.servicekey import (
    KEY_TYPES,
    PLAN_API,
    PLAN_SEND,
    Credentials,
    KeyType,
    client_id_for,
    new_client_secret,
    xsappname_for,
)
from senderd.emulator.token_server import TokenServer

SEND_SCOPE_SUFFIX = "ESBMessaging.send"
API_SCOPE_SUFFIX = "MonitoringDataRead"
API_TOKEN_LIFETIME = 43200.0
"""Plan `api` tokens last 12 h by default (plan integration-flow: the tenant's lifetime, 1 h by default)."""
KEY_FILES: dict[KeyType, str] = {
    "certificate": "service-key.json",
    "clientsecret": "clientsecret-key.json",
    "external-certificate": "external-certificate-key.json",
    "api": "api-key.json",
}
EXTERNAL_KEY_PEM = "external-certificate.key.pem"
EXTERNAL_KEY_P12 = "external-certificate.p12"
DEFAULT_FLOWS = """
[[flows]]
name = "timestamp"                     # the tutorial's GetTimestamp iFlow, once a minute
path = "/http/GetTimestamp"
every = "1m"
expect_body = "Current time"
"""
"""The flow of the written config when the caller brings none (a config without flows runs nothing)."""


@dataclass(frozen=True)
class TenantSpec:
    """How one tenant is set up; what is None takes the stack's setting."""

    name: str
    """The tenant's subdomain (also in its client ids: `...|it-rt-<name>!b...`)."""
    token_lifetime: float | None = None
    client_cert_auth: bool = True
    """The runtime accepts client certificates straight from senders (False: a trial tenant)."""
    pin_external_certificate: bool = True
    """The External Certificate key's "Pin Certificate" option (SAP's default: on)."""
    flows: Sequence[FlowSpec] | None = None
    token_port: int = 0
    runtime_port: int = 0
    api_port: int = 0
    """The port of the tenant's API host (the MPL API; 0: a free one)."""


@dataclass
class Binding:
    """A binding directory written by `Tenant.write_binding` (a mounted Secret, or plain files)."""

    name: str
    path: Path
    layout: Layout
    credentials: Credentials
    projected: bool = True
    """Written with kubelet's atomic-writer layout (`..data` links); False: regular files."""


class Tenant:
    """A tenant's PKI, token server and runtime, one registered client per key type, and its files."""

    def __init__(
        self,
        spec: TenantSpec,
        *,
        directory: Path,
        binding_root: Path,
        flows: Sequence[FlowSpec] | None = None,
        token_lifetime: float = 3600.0,
        now: Callable[[], float],
    ) -> None:
        """Create everything (no server runs until `start`). `flows` and `token_lifetime` apply unless `spec`
        sets its own; `binding_root` is where `write_binding` puts binding directories."""
        self.spec = spec
        self.name = spec.name
        self.directory = directory
        self.binding_root = binding_root
        self.pki: Pki = create_pki()
        self.customer_ca: IssuedCert = create_root_ca(f"{spec.name} customer root CA (senderd emulator)")
        """The customer's CA that signs the External Certificate; the tenant trusts it for client auth."""
        lifetime = token_lifetime if spec.token_lifetime is None else spec.token_lifetime
        self.token_server = TokenServer(
            self.pki, token_lifetime=lifetime, subdomain=spec.name, now=now, client_cas=[self.customer_ca.cert]
        )
        self.runtime = Runtime(
            self.pki,
            self.token_server,
            spec.flows if spec.flows is not None else flows,
            client_cert_auth=spec.client_cert_auth,
            client_cas=[self.customer_ca.cert],
        )
        self.mpl_api = MplApi(self.pki, self.token_server, self.runtime.mpl, tenant=spec.name)
        """The Message Processing Log API on the tenant's API host (plan-`api` tokens with MonitoringDataRead)."""
        self.p12_passphrase = secrets.token_urlsafe(12)
        """The passphrase of `external-certificate.p12`."""
        self.instances: dict[KeyType, Instance] = {
            key_type: Instance(
                f"{spec.name}-{key_type}", str(uuid.uuid4()), PLAN_API if key_type == "api" else PLAN_SEND
            )
            for key_type in KEY_TYPES
        }
        """One service instance per key type (as each would be bound to an app on its own)."""
        self._app_bindings = {key_type: str(uuid.uuid4()) for key_type in KEY_TYPES}
        self.xsappnames = {plan: xsappname_for(spec.name, plan) for plan in (PLAN_SEND, PLAN_API)}
        """The XSUAA app name of each plan (after the `|` of every client id; the prefix of its scopes)."""
        self.credentials: dict[KeyType, Credentials] = {
            key_type: self.issue_credentials(key_type) for key_type in KEY_TYPES
        }
        """The tenant's registered client of each key type: the one its key files hold."""
        self.bindings: dict[str, Binding] = {}

    def __repr__(self) -> str:
        return f"Tenant({self.name!r}, token_server={self.token_server!r}, runtime={self.runtime!r})"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start token server, runtime and MPL API on 127.0.0.1 (the spec's ports; 0: free ones)."""
        await self.token_server.start(port=self.spec.token_port)
        try:
            await self.runtime.start(port=self.spec.runtime_port)
            await self.mpl_api.start(port=self.spec.api_port)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop the servers."""
        try:
            await self.mpl_api.stop()
            await self.runtime.stop()
        finally:
            await self.token_server.stop()

    # -- credentials -------------------------------------------------------------------------------

    def issue_credentials(self, key_type: KeyType, *, instance: Instance | None = None) -> Credentials:
        """New credentials of `key_type` (a new client id, certificate or secret), registered at the token
        server: what creating another service key or binding of the instance gives."""
        instance = instance or self.instances[key_type]
        plan = PLAN_API if key_type == "api" else PLAN_SEND
        xsappname = self.xsappnames[plan]
        client_id = client_id_for(self.name, plan, xsappname=xsappname)
        scopes = (f"{xsappname}.{API_SCOPE_SUFFIX if key_type == 'api' else SEND_SCOPE_SUFFIX}",)
        common: dict[str, Any] = {
            "client_id": client_id,
            "scopes": scopes,
            "instance_name": instance.name,
            "instance_guid": instance.guid,
            "plan": plan,
        }
        if key_type == "certificate":
            client = self.pki.issue_client(f"senderd-emulator-{self.name}")
            credentials = Credentials(key_type, client=client, chain=(self.pki.intermediate.cert,), **common)
            self.token_server.add_certificate_client(client_id, client.cert, scopes)
        elif key_type == "external-certificate":
            # EC: a customer's own choice (and quick to make); SAP-generated keys are RSA
            client = self.pki.issue_client(f"senderd-external-{self.name}", key_type="ec", issuer=self.customer_ca)
            pinned = self.spec.pin_external_certificate
            credentials = Credentials(key_type, client=client, pinned=pinned, **common)
            self.token_server.add_certificate_client(client_id, client.cert, scopes, pinned=pinned)
        else:
            secret = new_client_secret()
            credentials = Credentials(key_type, client_secret=secret, **common)
            lifetime = API_TOKEN_LIFETIME if key_type == "api" else None
            self.token_server.add_secret_client(client_id, secret, scopes, token_lifetime=lifetime)
        return credentials

    def renew_certificate(self, key_type: KeyType = "external-certificate") -> Credentials:
        """A renewed certificate for the same client: same subject and issuer, issued a minute after the
        current one, not registered anew (with "Pin Certificate" off the token server takes it as it is;
        pinned, it is refused). Becomes the tenant's credentials of that type; rewrite the files with
        `write_key_files`."""
        current = self.credentials[key_type]
        if current.client is None:
            raise ValueError(f"{key_type} credentials have no certificate to renew")
        old = current.client.cert
        issuer = self.customer_ca if key_type == "external-certificate" else self.pki.intermediate
        renewed = self.pki.issue_client(
            "renewed",
            key_type="ec" if key_type == "external-certificate" else "rsa",
            issuer=issuer,
            subject=old.subject,
            not_before=old.not_valid_before_utc + timedelta(minutes=1),
            not_after=old.not_valid_after_utc + timedelta(minutes=1),
        )
        self.credentials[key_type] = replace(current, client=renewed)
        return self.credentials[key_type]

    def rotate_key(self, key_type: KeyType = "certificate") -> Credentials:
        """A new key of `key_type` becomes the tenant's (a new client, registered) and the key files are
        written again, each replaced at once; the old client stays registered until `revoke`."""
        self.credentials[key_type] = self.issue_credentials(key_type)
        self.write_key_files()
        return self.credentials[key_type]

    def revoke(self, credentials: Credentials) -> bool:
        """Delete the key or binding of `credentials`: the client is unregistered (no more tokens; the runtime
        no longer takes its certificate or secret). True if it was registered."""
        return self.token_server.remove_client(credentials.client_id)

    @property
    def client(self) -> IssuedCert:
        """The Certificate key's client certificate and key."""
        client = self.credentials["certificate"].client
        assert client is not None
        return client

    @property
    def client_id(self) -> str:
        """The Certificate key's client id."""
        return self.credentials["certificate"].client_id

    @property
    def scopes(self) -> list[str]:
        """The scopes granted to the Certificate key's client."""
        return list(self.credentials["certificate"].scopes)

    # -- service keys ------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """The `url` of the plan-`api` key: the tenant's API host (SAP: the runtime host without `-rt`), a
        listener of its own serving the MPL API, under the name `localhost` (a host apart from the runtime's)."""
        return f"https://localhost:{self.mpl_api.port}"

    def service_key(self, key_type: KeyType = "certificate", **overrides: Any) -> dict[str, Any]:
        """The service key of the tenant's `key_type` client, nested under "oauth" (`overrides`: arguments
        of `service_key_dict`, e.g. `layout="flat"`, `runtime_url=...`)."""
        return self.key_of(self.credentials[key_type], **overrides)

    def key_of(self, credentials: Credentials, **overrides: Any) -> dict[str, Any]:
        """The service key of any credentials of this tenant (e.g. those of a rotated binding)."""
        url = self.api_url if credentials.plan == PLAN_API else self.runtime.url
        token_url = overrides.pop("token_url", self.token_server.token_url)
        return credentials.service_key(token_url=token_url, url=url, **overrides)

    def key_path(self, key_type: KeyType = "certificate") -> Path:
        """The file of the tenant's `key_type` key (see the module docstring)."""
        return self.directory / KEY_FILES[key_type]

    def external_key_path(self, form: str = "pem") -> Path:
        """The External Certificate's private key file: "pem" (PKCS#8) or "p12" (with its certificate)."""
        if form not in ("pem", "p12"):
            raise ValueError('form must be "pem" or "p12"')
        return self.directory / (EXTERNAL_KEY_PEM if form == "pem" else EXTERNAL_KEY_P12)

    @property
    def service_key_path(self) -> Path:
        """The Certificate key (cockpit layout)."""
        return self.key_path("certificate")

    @property
    def ca_path(self) -> Path:
        """The tenant's root CA, which senderd must trust (`credentials.ca_file`)."""
        return self.directory / "ca.pem"

    @property
    def config_path(self) -> Path:
        """A senderd config using the Certificate key and CA above."""
        return self.directory / "senderd.toml"

    def config_text(self, extra: str = "", *, default_flow: bool = True) -> str:
        """A senderd config for this tenant (relative to its folder), followed by `extra`; with the default
        timestamp flow when `extra` brings no flows and `default_flow` is set."""
        flows = DEFAULT_FLOWS if default_flow and "[[flows]]" not in extra else ""
        return (
            "[credentials]\n"
            'service_key = "service-key.json"\n'
            'ca_file = "ca.pem"\n'
            "[server]\n"
            'listen = "127.0.0.1:0"   # a free port; senderd logs the one it got\n' + extra + flows
        )

    def write_key_files(self) -> None:
        """Write every key file and the External Certificate's private key files (0600)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for key_type in KEY_TYPES:
            write_private(self.key_path(key_type), json.dumps(self.service_key(key_type), indent=2) + "\n")
        external = self.credentials["external-certificate"].client
        assert external is not None
        write_private(self.external_key_path("pem"), external.key_pem_pkcs8())
        p12 = pkcs12.serialize_key_and_certificates(
            b"external-certificate",
            external.key,
            external.cert,
            None,
            serialization.BestAvailableEncryption(self.p12_passphrase.encode()),
        )
        write_private(self.external_key_path("p12"), p12)

    def write_files(self, config_extra: str = "") -> None:
        """Write the key files, CA and config into the tenant's folder, and its standard bindings."""
        self.write_key_files()
        self.ca_path.write_text(self.pki.ca_pem())
        self.config_path.write_text(self.config_text(config_extra))
        for layout in LAYOUTS:
            self.write_binding(layout)
        self.write_binding("keyfile", projected=False)

    # -- bindings ----------------------------------------------------------------------------------

    def binding_name(self, layout: Layout, key_type: KeyType = "certificate", *, projected: bool = True) -> str:
        """The standard name of a binding: `<tenant>-<layout>` (lower case), with the key type unless it is
        the Certificate key, and "-plain" when not `projected`: "dev-default", "dev-clientsecret-secretkey",
        "dev-keyfile-plain"."""
        kind = "" if key_type == "certificate" else f"{key_type}-"
        return f"{self.name}-{kind}{layout.lower()}{'' if projected else '-plain'}"

    def binding(self, layout: Layout, key_type: KeyType = "certificate", *, projected: bool = True) -> Binding:
        """A binding written with its standard name. Those of the Certificate key exist from the start: one
        mounted Secret per layout, and "<tenant>-keyfile-plain", a plain folder holding the key file."""
        return self.bindings[self.binding_name(layout, key_type, projected=projected)]

    def write_binding(
        self,
        layout: Layout,
        key_type: KeyType = "certificate",
        *,
        name: str | None = None,
        credentials: Credentials | None = None,
        projected: bool = True,
    ) -> Binding:
        """Write a binding of the tenant's `key_type` client (or of `credentials`) in `layout` to
        `binding_root/<name>` (standard name by default), as a mounted Secret (`projected`) or plain files."""
        name = name or self.binding_name(layout, key_type, projected=projected)
        binding = Binding(name, self.binding_root / name, layout, credentials or self.credentials[key_type], projected)
        self._write(binding)
        self.bindings[name] = binding
        return binding

    def rotate_binding(
        self, name: str, *, credentials: Credentials | None = None, on_step: Callable[[Step], None] | None = None
    ) -> Binding:
        """Rotate binding `name` as the operator and kubelet do: new credentials of the same instance and key
        type (or `credentials`) registered at the token server, the directory swapped atomically (see
        `write_projected`; `on_step` is told each step). The old client stays registered, an overlap window
        as `rotatedBindingTTL` gives, until `revoke(old.credentials)`. Returns the new binding."""
        old = self.bindings[name]
        instance = Instance(old.credentials.instance_name, old.credentials.instance_guid, old.credentials.plan)
        new = replace(
            old, credentials=credentials or self.issue_credentials(old.credentials.key_type, instance=instance)
        )
        self._write(new, on_step)
        self.bindings[name] = new
        return new

    def _write(self, binding: Binding, on_step: Callable[[Step], None] | None = None) -> None:
        credentials = binding.credentials
        instance = Instance(credentials.instance_name, credentials.instance_guid, credentials.plan)
        files = binding_files(binding.layout, self.key_of(credentials), instance)
        if binding.projected:
            write_projected(binding.path, files, on_step=on_step)
        else:
            write_plain(binding.path, files)

    def vcap_services(self) -> list[dict[str, Any]]:
        """This tenant's entries of `VCAP_SERVICES["it-rt"]`: one instance per key type, named
        `<tenant>-<key type>`, its `credentials` the key (`{"oauth": {...}}`)."""
        return [
            vcap_service(self.service_key(k), self.instances[k], binding_guid=self._app_bindings[k]) for k in KEY_TYPES
        ]


def write_private(path: Path, content: str | bytes) -> None:
    """Write a file only its owner can read (0600), replacing it at once (a reader sees old or new)."""
    data = content.encode() if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def tenant_flows(flows: Sequence[FlowSpec] | None, *, copy: bool) -> list[FlowSpec] | None:
    """`flows` for one tenant: copies when several tenants share them (their faults are each tenant's own)."""
    if flows is None:
        return default_flows() if copy else None
    return [replace(flow) for flow in flows] if copy else list(flows)
