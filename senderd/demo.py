"""`senderd demo`: the emulator and senderd together on localhost, no SAP account needed."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import anyio

from senderd.auth import load_credentials, token_provider
from senderd.config import load_config
from senderd.emulator.stack import EmulatorStack
from senderd.errors import TokenError
from senderd.token import Token


async def run_demo(directory: Path | None = None, *, token_lifetime: float = 30.0,
                   stop_after: float | None = None) -> int:
    """Start the emulator, then keep a token fresh and print each refresh until Ctrl-C (or `stop_after`)."""
    with tempfile.TemporaryDirectory(prefix="senderd-demo-") as scratch:
        folder = directory or Path(scratch)
        async with EmulatorStack.started(folder, token_lifetime=token_lifetime) as stack:
            print(f"emulator token server {stack.token_server.token_url}, runtime {stack.runtime.url}")
            print(f"config {stack.config_path} (service key {stack.service_key_path})", flush=True)
            config = load_config(stack.config_path)
            key = load_credentials(config.credentials)

            def show(_duration: float, token: Token | None, error: TokenError | None) -> None:
                if token is not None:
                    expires = dt.datetime.fromtimestamp(token.expires_at_wall, dt.UTC)
                    print(f"token refreshed: valid for {token.lifetime:.0f}s, until {expires:%H:%M:%S} UTC",
                          flush=True)
                elif error is not None:
                    print(f"token fetch failed: {error}", flush=True)

            async with token_provider(key, config.credentials, config.token, listeners=[show]) as provider:
                with anyio.move_on_after(stop_after if stop_after is not None else float("inf")):
                    await provider.run()
    return 0
