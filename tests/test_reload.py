"""SIGHUP reloads apply what changed and nothing else: unchanged flows keep their phase, the command line's
flags stay applied, new credentials are taken into use, and what needs a restart is said and kept."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from senderd.cli import _config, build_parser
from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.result import SendResult
from senderd.testing import FakeClock
from tests.conftest import CapturedLogs
from tests.tools import Recorder, serving, settle

pytestmark = pytest.mark.anyio

FLOWS = (
    '[token]\nstartup_jitter = "0s"\n'
    '[[flows]]\nname = "hourly"\npath = "/http/Orders"\nmethod = "POST"\nbody = "<o/>"\ncsrf = true\n'
    'every = "1h"\nstart = "now"\n'
    '[[flows]]\nname = "half-minute"\npath = "/http/GetTimestamp"\nevery = "30s"\n'
)


@asynccontextmanager
async def fake_time_daemon(
    stack: EmulatorStack, clock: FakeClock
) -> AsyncIterator[tuple[Daemon, Recorder[SendResult]]]:
    """A daemon on `clock` over the stack's config file; yields it and the sends it finishes."""
    daemon = Daemon.create(
        load_config(stack.config_path), handle_signals=False, config_path=stack.config_path, clock=clock
    )
    async with serving(daemon) as sends:
        yield daemon, sends


async def settle_daemon(daemon: Daemon, sends: Recorder[SendResult]) -> None:
    assert daemon.engine is not None
    await settle(daemon.engine, sends)


async def test_reload_storms_neither_refire_nor_rephase_unchanged_flows(tmp_path: Path, logs: CapturedLogs) -> None:
    clock = FakeClock()
    async with (
        EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS) as stack,
        fake_time_daemon(stack, clock) as (daemon, sends),
    ):
        for step in range(24):  # 2 minutes of fake time, a no-op reload every 5 s
            await settle_daemon(daemon, sends)
            assert await daemon.reload()
            if step % 6 == 0:  # and a SIGHUP storm now and then
                for _ in range(10):
                    assert await daemon.reload()
            clock.advance(5.0)
        await settle_daemon(daemon, sends)
    sent = [r.flow for r in sends.items]
    assert sent.count("hourly") == 1  # start = "now" fired once, not once per reload (50 times before)
    assert sent.count("half-minute") == 4  # every 30 s for 2 minutes: reloads did not starve it (0 before)
    reloaded = [json.loads(line) for line in logs.text.splitlines() if '"config_reloaded"' in line]
    assert len(reloaded) == 24 + 4 * 10 and all(line["rescheduled"] == [] for line in reloaded)


async def test_a_changed_schedule_restarts_only_that_flow(tmp_path: Path, logs: CapturedLogs) -> None:
    clock = FakeClock()
    async with (
        EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS) as stack,
        fake_time_daemon(stack, clock) as (daemon, sends),
    ):
        await settle_daemon(daemon, sends)
        text = stack.config_path.read_text().replace('every = "30s"', 'every = "10s"')
        stack.config_path.write_text(text)
        assert await daemon.reload()
        for _ in range(6):
            clock.advance(5.0)
            await settle_daemon(daemon, sends)
    reloaded = next(json.loads(line) for line in logs.text.splitlines() if '"config_reloaded"' in line)
    assert reloaded["rescheduled"] == ["half-minute"]
    assert [r.flow for r in sends.items].count("hourly") == 1


async def test_what_needs_a_restart_is_said_and_kept_for_every_component(tmp_path: Path, logs: CapturedLogs) -> None:
    clock = FakeClock()
    async with (
        EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS) as stack,
        fake_time_daemon(stack, clock) as (daemon, _),
    ):
        assert daemon.engine is not None
        running_url = daemon.engine.sender.runtime_url
        stack.config_path.write_text(
            stack.config_path.read_text() + '[runtime]\nurl = "https://elsewhere.example"\n[pool]\nworkers = 3\n'
        )
        assert await daemon.reload()
        assert daemon.engine.config.runtime.url is None  # the holder keeps what runs: sender, relay, server agree
        assert daemon.engine.config.pool.workers == 8
        assert daemon.engine.sender.runtime_url == running_url
    reloaded = next(json.loads(line) for line in logs.text.splitlines() if '"config_reloaded"' in line)
    assert reloaded["restart_needed_for"] == ["pool", "runtime"]


async def test_a_reload_takes_new_credentials_from_another_environment_variable(
    tmp_path: Path, logs: CapturedLogs, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS) as stack:
        other = stack.pki.issue_client("second-client")
        other_id = stack.client_id.replace("sb-", "sb-second-", 1)
        stack.token_server.add_certificate_client(other_id, other.cert, stack.scopes)
        monkeypatch.setenv("KEY_A", stack.service_key_path.read_text())
        monkeypatch.setenv("KEY_B", json.dumps(stack.service_key(client=other, client_id=other_id)))
        text = stack.config_path.read_text().replace('service_key = "service-key.json"', 'service_key_env = "KEY_A"')
        stack.config_path.write_text(text)
        clock = FakeClock()
        async with fake_time_daemon(stack, clock) as (daemon, _):
            assert daemon.engine is not None
            first = await daemon.engine.tokens.get()
            stack.config_path.write_text(text.replace("KEY_A", "KEY_B"))
            assert await daemon.reload()
            daemon.engine.tokens.invalidate(first)
            second = await daemon.engine.tokens.get()
    assert stack.token_server.verify(first.value)["client_id"] == stack.client_id
    assert stack.token_server.verify(second.value)["client_id"] == other_id  # loaded and used, not thrown away
    assert '"credentials_rotated"' in logs.text


def test_the_command_line_key_keeps_its_symlink(tmp_path: Path) -> None:
    target = tmp_path / "..2026_12_01" / "service-key.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "service-key.json"
    link.symlink_to(target)
    args = build_parser().parse_args(["check", "--service-key", str(link)])
    config = _config(args)
    assert config.credentials_set().service_key == link  # kubelet swaps what the link points to: follow it anew


async def test_sighup_keeps_the_command_line_flags(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS) as stack:
        text = stack.config_path.read_text().replace('service_key = "service-key.json"', 'service_key = "gone.json"')
        stack.config_path.write_text(text)  # the file alone names a key that is not there
        command = [
            sys.executable, "-m", "senderd", "run", "-c", str(stack.config_path),
            "--service-key", str(stack.service_key_path),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        async with await anyio.open_process(command, env=env) as process:
            try:
                assert process.stdout is not None
                seen = ""
                with anyio.fail_after(20):
                    while '"event":"started"' not in seen:
                        seen += (await process.stdout.receive()).decode()
                    process.send_signal(signal.SIGHUP)
                    while '"config_reload' not in seen:
                        seen += (await process.stdout.receive()).decode()
                    process.send_signal(signal.SIGTERM)
                    await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
    assert '"event":"config_reloaded"' in seen and "config_reload_failed" not in seen
