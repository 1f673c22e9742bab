"""`senderd demo`: the emulator and the daemon together on localhost, no SAP account needed."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import anyio

from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.result import SendResult

DEMO_FLOWS = """
[pool]
workers = 4
drain_timeout = "5s"

[[flows]]
name = "timestamp"                     # the tutorial's GetTimestamp iFlow
path = "/http/GetTimestamp"
every = "{every}"
expect_body = "Current time \\\\(UTC\\\\)"

[[flows]]
name = "orders"                        # a CSRF-protected POST
path = "/http/Orders"
method = "POST"
every = "{every}"
csrf = true
content_type = "application/xml"
body = "<Order><Id>42</Id></Order>"
application_id = "auto"

[forward]                              # request-reply: the app's own calls, credentials injected
listen = "127.0.0.1:{forward_port}"
"""
FORWARD_PORT = 8788


def forward_port(wanted: int = FORWARD_PORT) -> int:
    """`wanted` if it is free on 127.0.0.1, else any free port (so that two demos can run side by side)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def show(result: SendResult) -> None:
    """Print one line per finished send, as Postman would show the answer."""
    body = result.last.body.decode("utf-8", errors="replace").strip().replace("\n", " ")[:100]
    status = result.status if result.status is not None else "-"
    mpl = f"  (MPL {result.correlation_id})" if result.correlation_id else ""
    detail = body if result.ok else (result.last.error or "")
    print(f"[{result.flow}] {status} {result.outcome}: {detail}{mpl}", flush=True)


async def run_demo(
    directory: Path | None = None, *, token_lifetime: float = 30.0, every: str = "5s", stop_after: float | None = None
) -> int:
    """Start the emulator, then the daemon with two flows; print every answer until Ctrl-C (or `stop_after`)."""
    with tempfile.TemporaryDirectory(prefix="senderd-demo-") as scratch:
        folder = directory or Path(scratch)
        async with EmulatorStack.started(
            folder,
            token_lifetime=token_lifetime,
            config_extra=DEMO_FLOWS.format(every=every, forward_port=forward_port()),
        ) as stack:
            print(f"emulator: token server {stack.token_server.token_url}, runtime {stack.runtime.url}")
            print(f"config:   {stack.config_path}", flush=True)
            daemon = Daemon.create(load_config(stack.config_path))

            async def started(engine: Engine, _group: object) -> None:
                engine.listeners.append(show)
                if daemon.forwarder is not None:
                    print(
                        f"forward:  curl -sS -X POST {daemon.forwarder.url}/http/Orders -H 'Content-Type: "
                        "application/xml' --data '<Order/>'  (request-reply, credentials injected)",
                        flush=True,
                    )
                if daemon.server is not None:
                    print(
                        f"metrics:  {daemon.server.url}/metrics"
                        "  (also /healthz, /readyz, /readyz/token, /probe?flow=timestamp)",
                        flush=True,
                    )

            daemon.on_start = started
            async with anyio.create_task_group() as group:
                group.start_soon(daemon.serve)
                if stop_after is not None:
                    await anyio.sleep(stop_after)
                    daemon.stop()
    return 0
