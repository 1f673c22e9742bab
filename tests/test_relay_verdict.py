"""What a relay delivery's end means for the message (issue 11, defect 14): only a verdict about the message
ends it early; our own credentials' or the token server's problems pause delivery."""

from __future__ import annotations

import pytest

from senderd.metrics import Outcome
from senderd.relay.verdict import Verdict, verdict
from senderd.result import Attempt, SendResult


def result(outcome: Outcome, status: int | None = None, **facts: object) -> SendResult:
    return SendResult("f", outcome, 1, 0.1, Attempt(outcome, status, **facts))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (result("success", 200), "delivered"),
        (result("auth_error", 401), "pause"),  # the runtime refused our token: not the message's fault
        (result("auth_error", None, token_failure="bad_credentials"), "pause"),  # the token server's 401
        (result("auth_error", None, token_failure="bad_response"), "pause"),  # an HTML 200 from it
        (result("auth_error", None, token_failure="unreachable"), "pause"),  # a reset
        (result("connection_error", None, certificate_problem=True), "pause"),
        (result("http_error", 400), "dead"),
        (result("http_error", 404), "dead"),
        (result("auth_error", 403), "dead"),
        (result("http_error", 413), "dead"),
        (result("http_error", 500), "dead"),  # Cloud Integration: the flow failed on this message
        (result("flow_failed", 200), "dead"),
        (result("unconfirmed", 200), "dead"),
        (result("check_failed", 200), "dead"),
        (result("http_error", 408), "redeliver"),
        (result("http_error", 429), "redeliver"),
        (result("http_error", 502), "redeliver"),
        (result("http_error", 503), "redeliver"),
        (result("timeout"), "redeliver"),
        (result("connection_error", None, request_sent=True), "redeliver"),
        (result("internal_error"), "redeliver"),
    ],
)
def test_verdict(sent: SendResult, expected: Verdict) -> None:
    assert verdict(sent) == expected
