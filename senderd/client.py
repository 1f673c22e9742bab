"""senderd as a library: an async client built from a service key, with the daemon's engine inside
(token refresh, CSRF, retries, checks).

    async with Client.connect("service-key.json") as client:
        result = await client.send("/http/GetTimestamp", method="GET")
        print(result.status, result.correlation_id, result.body.decode())
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from senderd.config import Config, FlowConfig, config_from_dict, format_validation_error
from senderd.engine import Engine
from senderd.errors import ConfigError
from senderd.result import SendResult


class Client:
    """Sends to flow paths of one tenant; open it with `Client.connect`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        service_key: str | Path,
        *,
        ca_file: str | Path | None = None,
        runtime_url: str | None = None,
        key_file: str | Path | None = None,
        **defaults: Any,
    ) -> AsyncIterator[Client]:
        """Load the service key, start the background token refresher, and yield a client.

        `defaults` are flow settings applied to every send (e.g. `retries=5`, `timeout="30s"`).
        """
        credentials = {"service_key": str(service_key)}
        if ca_file is not None:
            credentials["ca_file"] = str(ca_file)
        if key_file is not None:
            credentials["key_file"] = str(key_file)
        data: dict[str, Any] = {"credentials": credentials, "defaults": defaults}
        if runtime_url is not None:
            data["runtime"] = {"url": runtime_url}
        config: Config = config_from_dict(data, source="senderd.Client", base=Path.cwd())
        async with Engine.open(config) as engine:
            yield cls(engine)

    async def send(
        self,
        path: str,
        *,
        method: str = "POST",
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        message_id: str | None = None,
        **settings: Any,
    ) -> SendResult:
        """Send to `path` (e.g. "/http/Orders") and return status, headers, body and correlation id.

        `settings` are any flow settings (`csrf`, `expect_status`, `retries`, `timeout`, `query`, ...).
        """
        defaults = self.engine.config.defaults.model_dump(exclude_unset=True)
        try:
            flow = FlowConfig.model_validate({**defaults, **settings, "name": "client", "path": path, "method": method})
        except ValidationError as exc:
            raise ConfigError(format_validation_error("Client.send", exc)) from None
        payload = body.encode() if isinstance(body, str) else body
        return await self.engine.send(flow, body=payload, headers=headers, message_id=message_id)
