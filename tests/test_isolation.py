"""One flow's failure is that send's outcome, never the daemon's end: a body file that vanishes, or an
exception nobody foresaw inside a send, ends that send only (logged with its traceback, counted)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from senderd.config import FlowConfig, load_config
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.result import Attempt, SendResult
from senderd.sender import Sender
from tests.conftest import CapturedLogs
from tests.tools import senderd_run, serving

pytestmark = pytest.mark.anyio


async def run_until(stack: EmulatorStack, done: Callable[[list[SendResult]], bool]) -> tuple[Daemon, list[SendResult]]:
    """Run a daemon on the stack's config until `done(results)`; return it (stopped) and the results."""
    daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
    async with serving(daemon) as sends:
        await sends.wait_until(done, timeout=20)
    return daemon, sends.items


async def test_a_body_file_that_vanishes_while_running_changes_nothing(tmp_path: Path) -> None:
    body = tmp_path / "order.xml"
    body.write_text("<Order/>")
    extra = (
        f'[[flows]]\nname = "orders"\npath = "/http/Orders"\nmethod = "POST"\ncsrf = true\nbody_file = "{body}"\n'
        'every = "100ms"\nstart = "now"\n'
    )
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:

        def vanished_after_first(results: list[SendResult]) -> bool:
            if len(results) == 1:
                body.unlink()  # read at load: the daemon does not need it any more
            return len(results) >= 4

        _, results = await run_until(stack, vanished_after_first)
    assert [r.outcome for r in results[:4]] == ["success"] * 4
    assert all(m.body == b"<Order/>" for m in stack.runtime.stats.messages)


async def test_an_exception_inside_one_send_ends_only_that_send(
    tmp_path: Path, logs: CapturedLogs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real: Callable[..., Awaitable[Attempt]] = Sender.attempt

    async def buggy(self: Sender, flow: FlowConfig, *args: Any, **kwargs: Any) -> Attempt:
        if flow.name == "broken":
            raise RuntimeError("a bug in one send")  # what no handler foresaw
        return await real(self, flow, *args, **kwargs)

    monkeypatch.setattr(Sender, "attempt", buggy)
    extra = (
        '[[flows]]\nname = "broken"\npath = "/http/GetTimestamp"\nevery = "100ms"\nstart = "now"\n'
        '[[flows]]\nname = "fine"\npath = "/http/GetTimestamp"\nevery = "100ms"\nstart = "now"\n'
    )
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        daemon, results = await run_until(stack, lambda r: sum(x.flow == "fine" for x in r) >= 3)
    broken = [r for r in results if r.flow == "broken"]
    assert broken and all(r.outcome == "internal_error" for r in broken)
    assert all(r.ok for r in results if r.flow == "fine")
    count = daemon.metrics.registry.get_sample_value("senderd_internal_errors_total", {"component": "send"})
    assert count == len(broken)
    crashes = [json.loads(line) for line in logs.text.splitlines() if '"send_crashed"' in line]
    assert crashes and crashes[0]["level"] == "error" and "RuntimeError: a bug in one send" in crashes[0]["exception"]


async def test_at_the_file_descriptor_limit_the_log_stays_structured_and_short(tmp_path: Path) -> None:
    extra = '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "1h"\n'
    async with (
        EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack,
        senderd_run("-c", str(stack.config_path), open_files=48) as daemon,
    ):
        url = (await daemon.wait_for("listening"))["url"]
        host, port = url.removeprefix("http://").rsplit(":", 1)
        clients = []
        try:
            for _ in range(100):  # more connections than the daemon has descriptors
                with contextlib.suppress(OSError):
                    clients.append(socket.create_connection((host, int(port)), timeout=5))
            first = await daemon.wait_for("event_loop_error")
            await anyio.sleep(2)  # the span under test: two seconds of a loop that cannot accept
        finally:
            for client in clients:
                client.close()
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait()
    assert "Too many open files" in first["error"]
    assert daemon.stderr.count("\n") < 5  # 44,000 lines of tracebacks in 5 s before
    assert len(daemon.logged("event_loop_error")) <= 3
    assert all(line.startswith("{") for line in daemon.text.splitlines() if line)
