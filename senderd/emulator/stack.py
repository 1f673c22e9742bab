"""The whole emulated BTP side in one object: PKI, token server, runtime, and the files a user needs.

`EmulatorStack.started(dir)` starts both servers on free localhost ports and writes into `dir`:
`service-key.json` (cockpit layout: nested "oauth", chain leaf + intermediate, PKCS#1 key),
`ca.pem` (the emulator's root CA) and `senderd.toml` (a config that uses both).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from senderd.emulator.pki import IssuedCert, Pki, create_pki
from senderd.emulator.runtime import FlowSpec, Runtime
from senderd.emulator.servicekey import client_id_for, service_key_dict
from senderd.emulator.token_server import TokenServer

TENANT = "emulator"
SEND_SCOPE_SUFFIX = "ESBMessaging.send"
DEFAULT_FLOWS = """
[[flows]]
name = "timestamp"                     # the tutorial's GetTimestamp iFlow, once a minute
path = "/http/GetTimestamp"
every = "1m"
expect_body = "Current time"
"""
"""The flow of the written config when the caller brings none (a config without flows runs nothing)."""


@dataclass
class EmulatorStack:
    """A running token server and runtime, with a registered certificate client."""

    pki: Pki
    token_server: TokenServer
    runtime: Runtime
    client: IssuedCert
    client_id: str
    directory: Path

    @property
    def service_key_path(self) -> Path:
        """The cockpit-layout service key for the registered client."""
        return self.directory / "service-key.json"

    @property
    def ca_path(self) -> Path:
        """The emulator's root CA, which senderd must trust (`credentials.ca_file`)."""
        return self.directory / "ca.pem"

    @property
    def config_path(self) -> Path:
        """A senderd config using the service key and CA above."""
        return self.directory / "senderd.toml"

    @property
    def scopes(self) -> list[str]:
        """The scopes granted to the registered client."""
        return [f"{self.client_id.split('|')[-1]}.{SEND_SCOPE_SUFFIX}"]

    def service_key(self, **overrides: object) -> dict[str, object]:
        """The service key dict (see `service_key_dict`), with optional overrides of its arguments."""
        arguments: dict[str, object] = {
            "client_id": self.client_id,
            "token_url": self.token_server.token_url,
            "runtime_url": self.runtime.url,
            "client": self.client,
            "chain": [self.pki.intermediate.cert],
        }
        arguments.update(overrides)
        return service_key_dict(**arguments)  # type: ignore[arg-type]

    def config_text(self, extra: str = "", *, default_flow: bool = True) -> str:
        """A senderd config for this stack (relative to its folder), followed by `extra`; with the default
        timestamp flow when `extra` brings no flows and `default_flow` is set."""
        flows = DEFAULT_FLOWS if default_flow and "[[flows]]" not in extra else ""
        return (
            "[credentials]\n"
            'service_key = "service-key.json"\n'
            'ca_file = "ca.pem"\n'
            "[server]\n"
            'listen = "127.0.0.1:0"   # a free port; senderd logs the one it got\n' + extra + flows
        )

    def write_files(self, config_extra: str = "") -> None:
        """Write service key, CA and config into the stack's folder (the key file 0600)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_private(self.service_key_path, json.dumps(self.service_key(), indent=2) + "\n")
        self.ca_path.write_text(self.pki.ca_pem())
        self.config_path.write_text(self.config_text(config_extra))

    @classmethod
    @asynccontextmanager
    async def started(
        cls,
        directory: Path,
        *,
        token_lifetime: float = 3600.0,
        token_port: int = 0,
        runtime_port: int = 0,
        flows: Sequence[FlowSpec] | None = None,
        config_extra: str = "",
        now: Callable[[], float] = time.time,
    ) -> AsyncIterator[EmulatorStack]:
        """Start token server and runtime on 127.0.0.1, write the files, stop both on exit.

        `now` is the emulator's Unix time (see `TokenServer`): a fake clock's `time` in tests."""
        pki = create_pki()
        token_server = TokenServer(pki, token_lifetime=token_lifetime, subdomain=TENANT, now=now)
        client = pki.issue_client("senderd-emulator-client")
        client_id = client_id_for(TENANT)
        runtime = Runtime(pki, token_server, flows)
        stack = cls(
            pki=pki, token_server=token_server, runtime=runtime, client=client, client_id=client_id, directory=directory
        )
        token_server.add_certificate_client(client_id, client.cert, stack.scopes)
        await token_server.start(port=token_port)
        try:
            await runtime.start(port=runtime_port)
            try:
                stack.write_files(config_extra)
                yield stack
            finally:
                await runtime.stop()
        finally:
            await token_server.stop()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
