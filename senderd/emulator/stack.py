"""The whole emulated BTP side in one object: one tenant or several, and the files a user needs.

`EmulatorStack.started(dir)` starts one tenant (token server and runtime on free localhost ports) and
writes into `dir` its key files (see `tenant.py`: `service-key.json`, the Certificate key in cockpit layout,
beside a key of every other type), `ca.pem` (its root CA) and `senderd.toml` (a config that uses both).
`EmulatorStack.started(dir, tenants=("dev", "prod"))` starts one tenant per name, each with its own CA,
clients, token server and runtime, each writing into `dir/<name>/`; the stack's own attributes (`pki`,
`token_server`, `service_key_path`, ...) are then those of the first tenant. Each tenant also serves the
Message Processing Log API on a port of its own (`Tenant.api_url`, the `url` of its `api-key.json`).

Either way `dir/bindings/` is a `$SERVICE_BINDING_ROOT` holding every tenant's bindings as the SAP BTP
service operator writes them (`<tenant>-default`, `<tenant>-secretkey`, `<tenant>-secretrootkey`,
`<tenant>-keyfile`, a Secret of one key file, and `<tenant>-keyfile-plain`, the key file in a plain folder
without `..data` links), and `dir/vcap-services.json` is a `VCAP_SERVICES` holding an
instance per tenant and key type (`<tenant>-<key type>`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from senderd.emulator.bindings import SERVICE_LABEL
from senderd.emulator.pki import IssuedCert, Pki
from senderd.emulator.runtime import FlowSpec, Runtime
from senderd.emulator.servicekey import KeyType
from senderd.emulator.tenant import (
    DEFAULT_FLOWS,
    SEND_SCOPE_SUFFIX,
    Tenant,
    TenantSpec,
    tenant_flows,
    write_private,
)
from senderd.emulator.token_server import TokenServer

TENANT = "emulator"
"""The name of the one tenant of a stack started without `tenants`."""

__all__ = ["DEFAULT_FLOWS", "SEND_SCOPE_SUFFIX", "TENANT", "EmulatorStack"]


@dataclass
class EmulatorStack:
    """Running tenants (token server and runtime each, with registered clients) and their files."""

    tenants: dict[str, Tenant]
    """By name, in the order given; the first is the stack's own."""
    directory: Path

    @property
    def tenant(self) -> Tenant:
        """The first tenant: the one the attributes below belong to."""
        return next(iter(self.tenants.values()))

    def __getitem__(self, name: str) -> Tenant:
        """The tenant called `name`."""
        return self.tenants[name]

    @property
    def pki(self) -> Pki:
        """The first tenant's PKI."""
        return self.tenant.pki

    @property
    def token_server(self) -> TokenServer:
        """The first tenant's token server."""
        return self.tenant.token_server

    @property
    def runtime(self) -> Runtime:
        """The first tenant's runtime."""
        return self.tenant.runtime

    @property
    def client(self) -> IssuedCert:
        """The first tenant's Certificate key client certificate."""
        return self.tenant.client

    @property
    def client_id(self) -> str:
        """The first tenant's Certificate key client id."""
        return self.tenant.client_id

    @property
    def service_key_path(self) -> Path:
        """The cockpit-layout Certificate key of the first tenant's registered client."""
        return self.tenant.service_key_path

    @property
    def ca_path(self) -> Path:
        """The first tenant's root CA, which senderd must trust (`credentials.ca_file`)."""
        return self.tenant.ca_path

    @property
    def config_path(self) -> Path:
        """A senderd config using the first tenant's service key and CA."""
        return self.tenant.config_path

    @property
    def scopes(self) -> list[str]:
        """The scopes granted to the first tenant's Certificate key client."""
        return self.tenant.scopes

    @property
    def binding_root(self) -> Path:
        """The `$SERVICE_BINDING_ROOT` holding every tenant's bindings."""
        return self.directory / "bindings"

    @property
    def vcap_services_path(self) -> Path:
        """The `VCAP_SERVICES` JSON file (for `VCAP_SERVICES_FILE_PATH`, or read it into `VCAP_SERVICES`)."""
        return self.directory / "vcap-services.json"

    def service_key(self, key_type: KeyType = "certificate", **overrides: object) -> dict[str, Any]:
        """The first tenant's service key (see `Tenant.service_key`)."""
        return self.tenant.service_key(key_type, **overrides)

    def config_text(self, extra: str = "", *, default_flow: bool = True) -> str:
        """A senderd config for the first tenant (relative to its folder), followed by `extra`; with the
        default timestamp flow when `extra` brings no flows and `default_flow` is set."""
        return self.tenant.config_text(extra, default_flow=default_flow)

    def vcap_services(self) -> dict[str, list[dict[str, Any]]]:
        """`VCAP_SERVICES` as Cloud Foundry sets it: `{"it-rt": [...]}`, every tenant's instances."""
        return {SERVICE_LABEL: [entry for tenant in self.tenants.values() for entry in tenant.vcap_services()]}

    def write_files(self, config_extra: str = "") -> None:
        """Write every tenant's files and bindings, and `vcap-services.json` (keys 0600)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for tenant in self.tenants.values():
            tenant.write_files(config_extra)
        write_private(self.vcap_services_path, json.dumps(self.vcap_services(), indent=2) + "\n")

    @classmethod
    @asynccontextmanager
    async def started(
        cls,
        directory: Path,
        *,
        tenants: Sequence[str | TenantSpec] | None = None,
        token_lifetime: float = 3600.0,
        token_port: int = 0,
        runtime_port: int = 0,
        flows: Sequence[FlowSpec] | None = None,
        config_extra: str = "",
        now: Callable[[], float] = time.time,
    ) -> AsyncIterator[EmulatorStack]:
        """Start every tenant's token server and runtime on 127.0.0.1, write the files, stop all on exit.

        Without `tenants`: one tenant called "emulator" writing into `directory` itself. With `tenants`
        (names or `TenantSpec`s): one per entry, each in `directory/<name>/`, each with its own copy of
        `flows`; `token_port`/`runtime_port` are then set per tenant in its spec. `token_lifetime` and
        `flows` apply where a spec sets none. `now` is the emulator's Unix time (see `TokenServer`): a fake
        clock's `time` in tests."""
        if tenants is None:
            specs = [TenantSpec(TENANT, token_port=token_port, runtime_port=runtime_port)]
        else:
            if token_port or runtime_port:
                raise ValueError("with several tenants, give each its ports in a TenantSpec")
            specs = [TenantSpec(spec) if isinstance(spec, str) else spec for spec in tenants]
            names = [spec.name for spec in specs]
            if not specs or len(set(names)) != len(names):
                raise ValueError(f"tenants need distinct names, found {names}")
        several = tenants is not None
        stack = cls(
            tenants={
                spec.name: Tenant(
                    spec,
                    directory=directory / spec.name if several else directory,
                    binding_root=directory / "bindings",
                    flows=tenant_flows(flows, copy=several),
                    token_lifetime=token_lifetime,
                    now=now,
                )
                for spec in specs
            },
            directory=directory,
        )
        async with AsyncExitStack() as running:
            for tenant in stack.tenants.values():
                await tenant.start()
                running.push_async_callback(tenant.stop)
            stack.write_files(config_extra)
            yield stack
