"""`senderd demo`, the README's first command: the emulator and the daemon together, one line per send."""

from __future__ import annotations

import re

import pytest

from tests.tools import senderd

pytestmark = pytest.mark.anyio

MPL = r"  \(MPL A[A-Za-z0-9_-]{27}\)"
TIMESTAMP = re.compile(r"\[timestamp\] 200 success: Current time \(UTC\): \d{4}-\d\d-\d\d \d\d:\d\d:\d\d" + MPL)
ORDERS = re.compile(r"\[orders\] 200 success: <Order><Id>42</Id></Order>" + MPL)


async def test_demo_sends_both_flows_and_prints_their_answers() -> None:
    code, out, err = await senderd("demo", "--duration", "3", "--every", "500ms")
    assert code == 0, err
    assert out.startswith("emulator: token server https://127.0.0.1:")
    answers = [line for line in out.splitlines() if line.startswith("[")]
    timestamp = [line for line in answers if TIMESTAMP.fullmatch(line)]
    orders = [line for line in answers if ORDERS.fullmatch(line)]  # the CSRF-protected POST, echoed
    assert len(timestamp) >= 2 and len(orders) >= 2, out
    assert len(timestamp) + len(orders) == len(answers), out  # every send was a success
