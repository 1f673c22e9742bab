"""The retry policy: which attempts are retried, how long to wait, when to give up (tenacity).

Retryable by default: connection errors, timeouts, 429, 502, 503, 504; never other 4xx nor 500 (in Cloud
Integration a 500 is a flow error). Waits grow exponentially with full jitter up to a cap; a
`Retry-After` from the runtime is honoured (up to its own cap). Both the number of attempts and the total
time are bounded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_result

from senderd.config import FlowConfig
from senderd.sender import Attempt, SendResult

_RNG = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds and waits of one flow's retries; durations in seconds."""

    retries: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0
    deadline: float = 120.0

    @classmethod
    def of(cls, flow: FlowConfig) -> RetryPolicy:
        """The policy a flow's settings describe."""
        return cls(retries=flow.retries, backoff_initial=flow.backoff_initial, backoff_max=flow.backoff_max,
                   retry_after_max=flow.retry_after_max, deadline=flow.deadline)

    def wait(self, attempt_number: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds before attempt `attempt_number + 1`: Retry-After if given, else full-jitter backoff."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max)
        ceiling = min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt_number - 1, 64))
        return rng.uniform(0, ceiling)


async def deliver(
    flow_name: str,
    attempt: Callable[[], Awaitable[Attempt]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    message_id: str | None = None,
) -> SendResult:
    """Run `attempt` until it succeeds, is not retryable, or the policy's bounds are reached.

    The first attempt is made directly (most sends need no other); tenacity takes over for retries.
    """
    rng = rng or _RNG
    started = monotonic()
    codes: list[str] = []

    def finished(last: Attempt) -> SendResult:
        return SendResult(flow=flow_name, outcome=last.outcome, attempts=len(codes),
                          duration=monotonic() - started, last=last, message_id=message_id,
                          attempt_codes=tuple(codes))

    def give_up(attempts_made: int, upcoming_sleep: float) -> bool:
        """Out of attempts, or the next wait would end past the deadline."""
        return attempts_made > policy.retries or monotonic() - started + upcoming_sleep > policy.deadline

    async def one() -> Attempt:
        result = await attempt()
        codes.append(str(result.status) if result.status is not None else "none")
        return result

    first = await one()
    if not first.retryable:
        return finished(first)
    delay = policy.wait(1, first.retry_after, rng)
    if give_up(1, delay):
        return finished(first)
    await sleep(delay)

    # tenacity counts its own attempts from 1; ours are one more (the first was made above)
    def wait(state: RetryCallState) -> float:
        last = state.outcome.result() if state.outcome is not None else None
        return policy.wait(state.attempt_number + 1, last.retry_after if last is not None else None, rng)

    def stop(state: RetryCallState) -> bool:
        return give_up(state.attempt_number + 1, state.upcoming_sleep)  # tenacity computes the wait first

    retrying = AsyncRetrying(
        stop=stop,
        wait=wait,
        retry=retry_if_result(lambda result: result.retryable),
        sleep=sleep,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome is not None else None,
        reraise=True,
    )
    last: Attempt = await retrying(one)
    return finished(last)
