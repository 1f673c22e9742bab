"""Answers senderd cannot trust: any size, any coding. At most `max_response_bytes` is kept (the checks see
the first bytes), a compressed answer is never inflated past that, and an HTML page answering 200 is said."""

from __future__ import annotations

import json
import resource
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from tests.conftest import CapturedLogs
from tests.tools import engine_for

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@contextmanager
def socket_bound_but_closed() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening), held for the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_a_large_answer_is_cut_at_max_response_bytes_and_the_checks_see_its_start(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Export", kind="large", answer_bytes=100 * MiB))
    flow = {"name": "export", "path": "/http/Export", "max_response_bytes": 1 * MiB, "expect_body": "^x{1000}"}
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("export"))
    assert result.ok, result.last.error
    assert len(result.body) == 1 * MiB
    assert result.last.answer_truncated


async def test_a_gzip_bomb_is_never_inflated_past_the_cap(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/Bomb", kind="large", answer_bytes=2048 * MiB, answer_encoding="gzip"))
    flow = {"name": "bomb", "path": "/http/Bomb", "max_response_bytes": 2 * MiB}
    async with engine_for(stack, flow) as engine:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with anyio.fail_after(20):
            result = await engine.send(engine.config.flow("bomb"))
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.ok
    assert len(result.body) == 2 * MiB and set(result.body) == {ord("x")}  # inflated: the first 2 MiB, no more
    assert result.last.answer_truncated
    assert grown_mb < 64, f"peak RSS grew {grown_mb:.0f} MB for a 2 GB bomb"  # 2 GB inflated would show


async def test_eight_100_mb_answers_at_once_stay_within_a_bounded_rss(tmp_path: Path) -> None:
    flows = (
        "".join(f'[[flows]]\nname = "export-{n}"\npath = "/http/Export"\nretries = 0\n' for n in range(8))
        + "[pool]\nworkers = 8\n"
    )
    async with EmulatorStack.started(tmp_path / "emu", config_extra=flows) as stack:
        stack.runtime.add_flow(FlowSpec("/Export", kind="large", answer_bytes=100 * MiB))
        command = [sys.executable, "-m", "senderd", "once", "-c", str(stack.config_path)]
        script = (
            "import resource, subprocess, sys\n"
            f"code = subprocess.run({command!r}, stdout=subprocess.DEVNULL).returncode\n"
            "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        )
        with anyio.fail_after(60):
            result = await anyio.run_process([sys.executable, "-c", script], check=True)
    code, peak_kb = (int(value) for value in result.stdout.split())
    print(f"\n8 concurrent 100 MB answers (10 MiB kept each): once exit {code}, peak RSS {peak_kb / 1024:.0f} MB")
    assert code == 0
    assert peak_kb / 1024 < 250  # 945 MB before: each answer was read whole


async def test_an_html_page_answering_200_is_warned_about_once(stack: EmulatorStack, logs: CapturedLogs) -> None:
    page = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>login</body></html>"
    stack.runtime.add_flow(FlowSpec("/Portal", body=page, content_type="text/html"))
    async with engine_for(stack, {"name": "portal", "path": "/http/Portal"}) as engine:
        results = [await engine.send(engine.config.flow("portal")) for _ in range(3)]
    assert all(r.ok for r in results)  # a success it stays: it is a hint, not a verdict
    warnings = [json.loads(line) for line in logs.text.splitlines() if '"html_answer"' in line]
    assert len(warnings) == 1 and warnings[0]["flow"] == "portal" and "login page" in warnings[0]["hint"]


async def test_a_post_that_may_have_arrived_is_retried_only_under_one_message_id(stack: EmulatorStack) -> None:
    stack.runtime.add_flow(FlowSpec("/SlowOrders", methods=frozenset({"POST"}), latency=0.5, body="ok"))
    flow = {"name": "order", "path": "/http/SlowOrders", "method": "POST", "body": "<o/>", "timeout": "100ms",
            "retries": 2, "backoff_initial": "1ms"}  # fmt: skip
    async with engine_for(stack, flow) as engine:
        result = await engine.send(engine.config.flow("order"))
    assert result.outcome == "timeout" and result.attempts == 3  # each may have reached the iFlow
    assert stack.runtime.stats.application_ids == [result.message_id] * 3  # under one id: the flow can dedupe


async def test_without_a_message_id_a_post_is_retried_only_when_it_surely_never_arrived(
    stack: EmulatorStack, tmp_path: Path
) -> None:
    stack.runtime.add_flow(FlowSpec("/SlowOrders", methods=frozenset({"POST"}), latency=0.5, body="ok"))
    settings = {"method": "POST", "body": "<o/>", "timeout": "100ms", "retries": 2, "backoff_initial": "1ms",
                "application_id": False}  # fmt: skip
    with socket_bound_but_closed() as port:
        flows = [
            {"name": "slow", "path": "/http/SlowOrders", **settings},
            {"name": "refused", "path": f"https://127.0.0.1:{port}/http/Orders", **settings},
        ]
        async with engine_for(stack, *flows) as engine:
            slow = await engine.send(engine.config.flow("slow"))
            refused = await engine.send(engine.config.flow("refused"))
    assert (slow.outcome, slow.attempts) == ("timeout", 1)  # it may have arrived: sent once, not three times
    assert stack.runtime.stats.application_ids == [None]
    assert (refused.outcome, refused.attempts) == ("connection_error", 3)  # never arrived: safe to retry
