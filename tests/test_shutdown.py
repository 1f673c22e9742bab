"""Stopping on time: SIGTERM ends waits for tokens and retries at once; only exchanges on the wire drain."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
import pytest

from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from tests.tools import serving

pytestmark = pytest.mark.anyio

HANGING_TOKENS = '[token]\ntimeout = "60s"\nstartup_jitter = "0s"\n[pool]\ndrain_timeout = "60s"\n'
"""A token request that would hang for a minute, and a drain that would wait as long."""


async def test_a_stop_ends_a_send_waiting_for_a_token_at_once(tmp_path: Path) -> None:
    extra = HANGING_TOKENS + '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "1h"\nstart = "now"\n'
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.token_server.faults.delay = 300  # the token server takes the request and never answers in time
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        with anyio.fail_after(10):  # well within the 60 s drain and the 60 s token timeout
            async with serving(daemon) as sends:
                await stack.token_server.wait_for_requests(1)  # the fetch is on its way; the send waits for it
    assert [r.outcome for r in sends.items] == ["auth_error"]
    assert "senderd is stopping" in (sends.items[0].last.error or "")


async def test_a_stop_cuts_a_retry_backoff_short(tmp_path: Path) -> None:
    extra = (
        '[pool]\ndrain_timeout = "60s"\n'
        '[[flows]]\nname = "busy"\npath = "/http/Busy"\nevery = "1h"\nstart = "now"\n'
        'retries = 5\nretry_after_max = "5m"\ndeadline = "10m"\n'
    )
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.runtime.add_flow(FlowSpec("/Busy", unavailable=-1, retry_after=120))  # "come back in 2 minutes"
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        with anyio.fail_after(15):
            async with serving(daemon) as sends:
                await stack.runtime.wait_for_requests(1)  # the first attempt got its 503 + Retry-After: 120
    assert [(r.outcome, r.attempts, r.status) for r in sends.items] == [("http_error", 1, 503)]


async def test_sigterm_while_the_first_token_fetch_hangs_exits_promptly(tmp_path: Path) -> None:
    extra = HANGING_TOKENS + '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "1h"\nstart = "now"\n'
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.token_server.faults.delay = 300
        command = [sys.executable, "-m", "senderd", "run", "-c", str(stack.config_path)]
        async with await anyio.open_process(command) as process:
            try:
                assert process.stdout is not None
                with anyio.fail_after(20):  # well within Kubernetes' 30 s grace; it took 33 s before
                    seen = ""
                    while '"event":"started"' not in seen:
                        seen += (await process.stdout.receive()).decode()
                    await stack.token_server.wait_for_requests(1)
                    process.send_signal(signal.SIGTERM)
                    code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
    assert code == 0
