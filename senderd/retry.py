"""The retry policy: which attempts are retried, how long to wait, when to give up; and the one backoff
function that the token provider, the send retries and the relay's redelivery all use.

Retryable by default: connection errors, timeouts, 429, 502, 503, 504, and transient token-server
failures; never other 4xx nor 500 (in Cloud Integration a 500 is a flow error), nor a runtime certificate
that is not trusted. Waits grow exponentially with full jitter up to a cap; a `Retry-After` is honoured (up
to its own cap). Both the number of attempts and the total time are bounded.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from senderd.metrics import TRANSIENT_TOKEN_FAILURES
from senderd.result import Attempt, SendResult

_RNG = random.Random()
AttemptListener = Callable[[Attempt, int, float | None], None]
"""Told of each attempt: what it gave, its number (1 = the first), and the wait before the next (or None)."""


def backoff(failures: int, *, initial: float, maximum: float, jitter: float | None, rng: random.Random) -> float:
    """Seconds to wait after `failures` consecutive failures (1 = the first): `initial` doubling per
    failure, capped at `maximum`, then jittered.

    `jitter=None` is full jitter (uniform between 0 and the capped value, as AWS recommends for many
    clients retrying at once); a fraction `j` spreads the value by ±j, never past `maximum`.
    """
    ceiling = min(maximum, initial * 2.0 ** min(max(0, failures - 1), 64))
    if jitter is None:
        return rng.uniform(0, ceiling)
    return min(maximum, ceiling * (1 + rng.uniform(-jitter, jitter)))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds and waits of one flow's retries; durations in seconds (the defaults are the config's)."""

    retries: int
    backoff_initial: float
    backoff_max: float
    retry_after_max: float
    deadline: float
    retry_on: frozenset[int]
    replay_safe: bool = True
    """Whether sending the request again is harmless even if it reached the iFlow: a GET or HEAD, or a
    request with a stable `SAP_ApplicationID` the iFlow can deduplicate on. Otherwise only what surely
    never arrived is retried."""

    def retryable(self, attempt: Attempt) -> bool:
        """Whether another attempt may give a different answer (and may be made)."""
        if not self.replay_safe and _may_have_arrived(attempt):
            return False
        if attempt.status is not None:
            return attempt.status in self.retry_on
        if attempt.outcome == "auth_error":
            return attempt.token_failure in TRANSIENT_TOKEN_FAILURES
        if attempt.outcome == "connection_error":
            return not attempt.certificate_problem
        return attempt.outcome == "timeout"

    def wait(self, attempts_made: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds before the next attempt: Retry-After if given (capped), else full-jitter backoff."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max)
        return backoff(attempts_made, initial=self.backoff_initial, maximum=self.backoff_max, jitter=None, rng=rng)


_MAYBE_FORWARDED = frozenset({502, 504})
"""Gateway answers after which the request may well have reached the iFlow (429 and 503 refuse it)."""


def _may_have_arrived(attempt: Attempt) -> bool:
    if attempt.status is not None:
        return attempt.status in _MAYBE_FORWARDED
    return attempt.outcome == "timeout" or (attempt.outcome == "connection_error" and attempt.request_sent)


async def deliver(
    flow_name: str,
    attempt: Callable[[], Awaitable[Attempt]],
    policy: RetryPolicy,
    *,
    first: tuple[Attempt, float],
    sleep: Callable[[float], Awaitable[None]],
    monotonic: Callable[[], float],
    rng: random.Random | None = None,
    message_id: str | None = None,
    on_attempt: AttemptListener | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SendResult:
    """After the `first` attempt (made by the caller, with the `monotonic()` time it started), run `attempt`
    until it succeeds, is not retryable, or the policy's bounds are reached.

    Gives up when the attempts are used up or when the next wait would end past the deadline.
    `on_attempt` hears of every attempt, with the wait before the next one (None: no next one); once
    `should_stop()` is true, no further attempt is made (the last one's result is the send's). A caller
    whose first attempt succeeded and who wants no `on_attempt` needs none of this: `succeeded_first_time`.
    """
    last, started = first
    rng = rng or _RNG
    codes: list[str] = []
    while True:
        if codes:
            last = await attempt()
        codes.append(str(last.status) if last.status is not None else "none")
        delay: float | None = None
        if last.outcome != "success" and policy.retryable(last) and len(codes) <= policy.retries:
            delay = policy.wait(len(codes), last.retry_after, rng)
            if monotonic() - started + delay > policy.deadline or (should_stop is not None and should_stop()):
                delay = None
        if on_attempt is not None:
            on_attempt(last, len(codes), delay)
        if delay is None:
            break
        await sleep(delay)
        if should_stop is not None and should_stop():
            break
    return SendResult(
        flow=flow_name,
        outcome=last.outcome,
        attempts=len(codes),
        duration=monotonic() - started,
        last=last,
        message_id=message_id,
        attempt_codes=tuple(codes),
    )


def succeeded_first_time(flow_name: str, attempt: Attempt, duration: float, message_id: str | None) -> SendResult:
    """The result of a send whose first attempt succeeded (the common case: no policy, no bookkeeping)."""
    return SendResult(flow_name, "success", 1, duration, attempt, message_id, attempt_codes=(str(attempt.status),))
