"""Behind a corporate egress proxy: token and runtime requests go through a real HTTP proxy (tinyproxy on
127.0.0.1), mTLS to the token server through the CONNECT tunnel; the proxy's password is a secret like any
other; a proxy that refuses or cannot be reached is a clear error naming it."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest

from senderd.emulator.stack import EmulatorStack
from tests.tools import engine_for, free_port, require_tool, senderd, wait_for_port

pytestmark = pytest.mark.anyio
PROXY_PASSWORD = "proxy-pass-4711"


@dataclass
class Proxy:
    """A running tinyproxy and its log."""

    url: str
    log: Path

    def connects(self) -> list[str]:
        """The `host:port` of every CONNECT tunnel the proxy opened, in order."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return [line.split("CONNECT ", 2)[2].split()[0] for line in lines if ": CONNECT " in line]


@asynccontextmanager
async def tinyproxy(
    tmp_path: Path, stack: EmulatorStack, *, allow: bool = True, password: bool = False
) -> AsyncIterator[Proxy]:
    """tinyproxy on 127.0.0.1, allowing CONNECT to the emulator's ports (or to none, with `allow=False`)."""
    binary = require_tool("tinyproxy")
    port = free_port()
    ports = [urlsplit(stack.token_server.url).port, urlsplit(stack.runtime.url).port] if allow else [9]
    folder = tmp_path / "tinyproxy"
    folder.mkdir()
    log = folder / "tinyproxy.log"
    lines = [
        f"Port {port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{log}"', "LogLevel Connect",
        f'PidFile "{folder / "pid"}"', "MaxClients 50", "Allow 127.0.0.1",
        *(f"ConnectPort {p}" for p in ports),
        *([f"BasicAuth senderd {PROXY_PASSWORD}"] if password else []),
    ]  # fmt: skip
    (folder / "tinyproxy.conf").write_text("\n".join(lines) + "\n")
    process = await anyio.open_process([binary, "-d", "-c", str(folder / "tinyproxy.conf")])
    try:
        await wait_for_port(port)
        auth = f"senderd:{PROXY_PASSWORD}@" if password else ""
        yield Proxy(f"http://{auth}127.0.0.1:{port}", log)
    finally:
        process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()


def ports_of(stack: EmulatorStack) -> set[str]:
    return {urlsplit(stack.token_server.url).netloc, urlsplit(stack.runtime.url).netloc}


async def test_token_and_runtime_requests_go_through_the_configured_proxy(stack: EmulatorStack, tmp_path: Path) -> None:
    async with tinyproxy(tmp_path, stack, password=True) as proxy:
        flow = {"name": "orders", "path": "/http/Orders", "method": "POST", "body": "<o/>", "csrf": True}
        async with engine_for(stack, flow, credentials={"proxy": proxy.url}) as engine:
            result = await engine.send(engine.config.flow("orders"))
    assert result.ok, result.last.error
    assert set(proxy.connects()) == ports_of(stack)  # the mTLS token fetch and the runtime calls, tunnelled
    assert stack.token_server.stats.authentications[0][1] == "tls_client_auth"  # the certificate got through


async def test_https_proxy_from_the_environment_and_no_proxy(stack: EmulatorStack, tmp_path: Path) -> None:
    async with tinyproxy(tmp_path, stack) as proxy:
        env = {**os.environ, "HTTPS_PROXY": proxy.url, "NO_PROXY": ""}
        for lower in ("https_proxy", "no_proxy"):
            env.pop(lower, None)
        code, _, err = await senderd("once", "-c", str(stack.config_path), env=env)
        assert code == 0, err
        assert set(proxy.connects()) == ports_of(stack)
        tunnels = len(proxy.connects())
        code, _, err = await senderd("once", "-c", str(stack.config_path), env={**env, "NO_PROXY": "127.0.0.1"})
        assert code == 0, err
        assert len(proxy.connects()) == tunnels  # NO_PROXY: straight to the servers


async def test_a_proxy_that_refuses_the_tunnel_is_named_in_the_error(stack: EmulatorStack, tmp_path: Path) -> None:
    async with tinyproxy(tmp_path, stack, allow=False) as proxy:
        flow = {"name": "ts", "path": "/http/GetTimestamp", "retries": 0}
        async with engine_for(stack, flow, credentials={"proxy": proxy.url}) as engine:
            result = await engine.send(engine.config.flow("ts"))
    assert result.outcome == "auth_error"  # no token: the proxy would not tunnel to the token server
    assert f"proxy {proxy.url} (credentials.proxy) refused the connection (HTTP 403" in (result.last.error or "")


async def test_an_unreachable_proxy_is_named_and_its_password_never_shown(stack: EmulatorStack) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        url = f"http://senderd:{PROXY_PASSWORD}@127.0.0.1:{port}"
        flow = {"name": "ts", "path": "/http/GetTimestamp", "retries": 0}
        async with engine_for(stack, flow, credentials={"proxy": url}) as engine:
            result = await engine.send(engine.config.flow("ts"))
    error = result.last.error or ""
    assert f"proxy http://127.0.0.1:{port} (credentials.proxy) is unreachable" in error
    assert PROXY_PASSWORD not in error
