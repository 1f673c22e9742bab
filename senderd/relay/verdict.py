"""What a relay delivery's end says about the message: deliver it again later, pause (the problem is ours),
or give it up (dead). A pure function of the send's result.

Only a verdict about the message itself ends it early: a 4xx from the runtime other than 401, 408 and 429,
a 500 (in Cloud Integration, the flow failed on this message), a failure inside the flow or an answer that
failed the flow's checks. A 401 from the runtime, any token-server failure (down, reset, an HTML page, 401)
and a runtime certificate senderd refuses are problems with our own credentials or setup: delivery of the
credentials set pauses, and the round is not counted against `max_deliveries`. Anything else (timeouts,
resets, 408, 429, 502-504) is delivered again later, the round counted.
"""

from __future__ import annotations

from typing import Literal

from senderd.result import SendResult

Verdict = Literal["delivered", "redeliver", "pause", "dead"]
_NOT_ABOUT_THE_MESSAGE = frozenset({401, 408, 429})
_ABOUT_THE_MESSAGE = frozenset({"flow_failed", "unconfirmed", "check_failed"})


def verdict(result: SendResult) -> Verdict:
    """What to do with a relay message whose delivery round ended with `result`."""
    if result.ok:
        return "delivered"
    last = result.last
    if last.outcome in _ABOUT_THE_MESSAGE:
        return "dead"
    if last.status == 401 or (last.status is None and (last.outcome == "auth_error" or last.certificate_problem)):
        return "pause"
    if last.status is not None and (last.status == 500 or (400 <= last.status < 500)):
        return "redeliver" if last.status in _NOT_ABOUT_THE_MESSAGE else "dead"
    return "redeliver"
