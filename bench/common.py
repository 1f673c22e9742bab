"""Helpers every measurement shares: sizes per mode, ports, waits, percentiles, the machine's description."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio

import senderd

Section = dict[str, Any]
"""One measurement's figures, as they go into latest.json under its name."""

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Mode:
    """How big each measurement is: `quick` (under 2 minutes in all) or full (under about 10)."""

    quick: bool

    @property
    def name(self) -> str:
        """The mode's name: quick or full."""
        return "quick" if self.quick else "full"

    def pick(self, quick: float, full: float) -> float:
        """`quick` in quick mode, else `full`."""
        return quick if self.quick else full

    def count(self, quick: int, full: int) -> int:
        """An integer size: `quick` in quick mode, else `full`."""
        return quick if self.quick else full


def say(message: str) -> None:
    """A progress line on stderr (stdout carries the table)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int, timeout: float, *, alive: Callable[[], bool] | None = None) -> None:
    """Return once 127.0.0.1:port accepts connections; TimeoutError after `timeout` or if `alive()` turns False."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stream = await anyio.connect_tcp(LOOPBACK, port)
        except OSError:
            if time.monotonic() > deadline or (alive is not None and not alive()):
                raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout:g}s") from None
            await anyio.sleep(0.02)
            continue
        await stream.aclose()
        return


async def wait_for_http(url: str, timeout: float, *, alive: Callable[[], bool] | None = None) -> None:
    """Return once `url` answers 200 (polling); TimeoutError after `timeout` or if `alive()` turns False."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline or (alive is not None and not alive()):
                raise TimeoutError(f"{url} did not answer 200 within {timeout:g}s")
            await anyio.sleep(0.05)


async def poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Wait until `condition()` holds, checking every `interval`; False if `timeout` passed first.

    For conditions that depend on other processes (a child's output, what the emulator received), which
    no in-process event signals.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(interval)
    return True


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """The median (nan for no values)."""
    return statistics.median(values) if values else float("nan")


def rounded(value: float | None, digits: int = 1) -> float | None:
    """`value` rounded for the report (None stays None)."""
    return None if value is None else round(value, digits)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> Section:
    """Cores, CPU model, Python and senderd versions: what the figures were measured on."""
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "senderd": senderd.__version__,
    }


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for children: ours, unbuffered Python, and `extra`."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("SENDERD_CONFIG", None)
    env.update(extra)
    return env


def flow_toml(name: str, path: str, **settings: object) -> str:
    """One `[[flows]]` table (values rendered as TOML through JSON, which agrees for str/int/float/bool)."""
    lines = ["[[flows]]", f"name = {json.dumps(name)}", f"path = {json.dumps(path)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"
