"""What a newcomer trips over, tried as they would: every command's message for the usual first mistakes,
the output they watch, and the commands README gives them."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest

from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.logs import configure_logging
from senderd.metrics import Metrics
from tests.conftest import CapturedLogs
from tests.tools import engine_for, require_tool, senderd

pytestmark = pytest.mark.anyio


def one_line_error(err: str, starts: str) -> None:
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert err.startswith(starts), err


@asynccontextmanager
async def emulator_process(directory: Path, *extra: str) -> AsyncIterator[tuple[anyio.abc.Process, dict[str, str]]]:
    """`senderd emulator --dir DIR` as a user starts it; yields the process and what it printed."""
    command = [sys.executable, "-m", "senderd", "emulator", "--dir", str(directory), *extra]
    async with await anyio.open_process(command) as process:
        try:
            assert process.stdout is not None
            printed = ""
            with anyio.fail_after(20):
                while "press Ctrl-C to stop" not in printed:
                    printed += (await process.stdout.receive()).decode()
            fields = dict(line.split(":", 1) for line in printed.splitlines() if ":" in line)
            yield process, {key.strip(): value.strip() for key, value in fields.items()}
        finally:
            if process.returncode is None:
                process.kill()


async def test_the_emulator_writes_a_config_that_check_and_once_accept_and_stops_with_0(tmp_path: Path) -> None:
    async with emulator_process(tmp_path / "emu") as (process, printed):
        config = printed["config"]
        code, out, err = await senderd("check", "-c", config)
        assert code == 0, err
        assert "config OK" in out
        code, out, err = await senderd("once", "-c", config)
        assert code == 0, err
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            assert await process.wait() == 0
    async with emulator_process(tmp_path / "emu2") as (process, _):
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            assert await process.wait() == 0


async def test_check_refuses_what_run_refuses(stack: EmulatorStack, tmp_path: Path) -> None:
    config = tmp_path / "senderd.toml"
    config.write_text(f'[credentials]\nservice_key = "{stack.service_key_path}"\nca_file = "{stack.ca_path}"\n')
    results = [await senderd(command, "-c", str(config)) for command in ("check", "run", "once")]
    for code, _, err in results:
        assert code == 2
        one_line_error(err, f"senderd: error: {config}: flows: no flows configured: add at least one [[flows]]")
    assert len({err for _, _, err in results}) == 1  # one verdict, one message


@pytest.mark.parametrize("command", ["run", "once", "check", "send", "token"])
async def test_no_config_file_says_how_to_give_one(command: str, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "SENDERD_CONFIG"}
    args = [command, "ts"] if command == "send" else [command]
    result = subprocess.run(  # noqa: ASYNC221 - a short-lived process; its environment is the point
        [sys.executable, "-m", "senderd", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30
    )
    assert result.returncode == 2
    one_line_error(result.stderr, "senderd: error: no config file given: use -c FILE or $SENDERD_CONFIG")


async def test_the_emulator_on_a_busy_port_or_an_unusable_dir_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code, _, err = await senderd("emulator", "--dir", str(tmp_path / "e"), "--token-port", port)
    assert code == 2
    one_line_error(err, f"senderd: error: --token-port {port} / --runtime-port 0: cannot listen")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for command in ("emulator", "demo"):
        code, _, err = await senderd(command, "--dir", str(blocker))
        assert code == 2
        one_line_error(err, f"senderd: error: --dir {blocker}: cannot use it")


async def test_key_export_prints_a_curl_command_that_works_against_a_private_ca(
    stack: EmulatorStack, tmp_path: Path
) -> None:
    curl = require_tool("curl")
    code, out, err = await senderd(
        "key", "export", str(stack.service_key_path), "--out", str(tmp_path / "out"), "--ca-file", str(stack.ca_path)
    )
    assert code == 0, err
    command = out.split("get a token with:", 1)[1].replace("\\\n", " ")
    assert "--cacert" in command
    argv = shlex.split(command)
    assert argv[0] == "curl"
    result = await anyio.run_process([curl, "--silent", "--show-error", *argv[1:]], check=False)
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    assert answer["token_type"] == "bearer" and stack.token_server.stats.issued == 1
    # (the token itself is not printed by the test: secret scanning covers the captured output)


async def test_a_path_without_http_is_warned_at_check_and_a_404_printed_once(stack: EmulatorStack) -> None:
    base = stack.config_text(default_flow=False)
    stack.config_path.write_text(base + '[[flows]]\nname = "wrong"\npath = "/GetTimestamp"\n')
    code, out, err = await senderd("check", "-c", str(stack.config_path))
    assert code == 0, err
    assert f"senderd: warning: {stack.config_path}: flows.wrong.path: '/GetTimestamp' does not start with /http/" in err
    code, out, err = await senderd("send", "-c", str(stack.config_path), "wrong")
    assert code == 1
    both = out + err
    assert both.count("<!doctype html>") == 1  # the page, once
    assert "no iFlow is deployed at /GetTimestamp" in err


async def test_check_online_exits_1_when_the_token_server_fails(stack: EmulatorStack) -> None:
    stack.token_server.faults.down = True
    code, _, err = await senderd("check", "-c", str(stack.config_path), "--online")
    assert code == 1
    one_line_error(err, "senderd: token: token server 127.0.0.1:")


async def test_each_attempt_is_a_debug_line_with_the_wait_before_the_next(
    stack: EmulatorStack, logs: CapturedLogs
) -> None:
    stack.runtime.add_flow(FlowSpec("/Twice503", unavailable=2, retry_after=0))
    flow = {"name": "t", "path": "/http/Twice503", "backoff_initial": "1ms"}
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("t"))
    assert result.ok and result.attempts == 3
    lines = [json.loads(line) for line in logs.text.splitlines() if '"attempt_finished"' in line]
    assert [(line["attempt"], line["status"], line["level"]) for line in lines] == [
        (1, 503, "debug"),
        (2, 503, "debug"),
        (3, 200, "debug"),
    ]
    assert lines[0]["retry_in_s"] == 0 and lines[2]["retry_in_s"] is None


async def test_console_lines_start_with_the_event_and_the_flow(stack: EmulatorStack) -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    async with engine_for(stack, {"name": "ts", "path": "/http/GetTimestamp"}) as engine:
        await engine.send(engine.config.flow("ts"))
    line = next(line for line in stream.getvalue().splitlines() if "send_finished" in line)
    after_level = line.split("]", 1)[1].split()
    assert after_level[:2] == ["send_finished", "flow=ts"], line
    assert after_level[-1].startswith("component=")


def test_metrics_have_no_created_series_and_declare_late_skips() -> None:
    metrics = Metrics(process=False)
    metrics.declare_flow("ts", 30.0)
    text = generate_latest(metrics.registry).decode()
    assert "_created" not in text
    assert 'senderd_skipped_ticks_total{flow="ts",reason="late"} 0.0' in text


async def test_demo_prints_each_answer_as_it_comes_and_ctrl_c_exits_0() -> None:
    command = [sys.executable, "-m", "senderd", "demo", "--every", "200ms"]
    async with await anyio.open_process(command) as process:
        try:
            assert process.stdout is not None
            seen = ""
            with anyio.fail_after(20):  # into a pipe, the answers arrive while the demo runs
                while "[timestamp] 200 success" not in seen or "[orders] 200 success" not in seen:
                    seen += (await process.stdout.receive()).decode()
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()


async def test_the_library_leaves_the_host_programs_logging_alone(stack: EmulatorStack, tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(
        "import logging, anyio\n"
        "from senderd import Client\n"
        "records = []\n"
        "class Keep(logging.Handler):\n"
        "    def emit(self, record): records.append(record.getMessage())\n"
        "async def main():\n"
        f"    async with Client.connect({str(stack.service_key_path)!r}, ca_file={str(stack.ca_path)!r}) as c:\n"
        "        result = await c.send('/http/GetTimestamp', method='GET')\n"
        "    print('status', result.status)\n"
        "    logging.getLogger('senderd').addHandler(Keep())\n"
        "    logging.getLogger('senderd').setLevel(logging.INFO)\n"
        "    async with Client.connect("
        + repr(str(stack.service_key_path))
        + ", ca_file="
        + repr(str(stack.ca_path))
        + ") as c:\n"
        "        await c.send('/http/GetTimestamp', method='GET')\n"
        "    print('records', sum('send_finished' in r for r in records))\n"
        "anyio.run(main)\n"
    )
    result = await anyio.run_process([sys.executable, str(script)], check=False)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    assert out.splitlines() == ["status 200", "records 1"]  # nothing printed unasked; `logging` gets the events
    assert err == ""
