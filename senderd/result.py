"""What a send gives: one `Attempt` per HTTP exchange, and the `SendResult` of the whole send.

Both are values: never changed once made (`dataclasses.replace` makes a changed copy). They are not
`frozen` dataclasses only because a frozen one takes six times as long to make (2.0 against 0.34 us for an
Attempt), and a send makes two."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from senderd.metrics import Outcome

if TYPE_CHECKING:
    from senderd.confirm import Confirmation

MPL_HEADER = "SAP_MessageProcessingLogID"
CORRELATION_HEADERS = (MPL_HEADER, "SAP_MplCorrelationId", "x-correlationid")
"""The runtime's answer headers that find a message in Cloud Integration monitoring (names are matched without
regard to case: SAP's docs also write `SAP_MessageProcessingLogId`)."""


@dataclass(slots=True)
class Attempt:
    """What one HTTP exchange gave: the facts; whether to retry is `retry.RetryPolicy`'s decision."""

    outcome: Outcome
    status: int | None = None
    headers: CIMultiDictProxy[str] | None = None
    body: bytes = b""
    error: str | None = None
    retry_after: float | None = None
    """Seconds the runtime (Retry-After) or the token provider (its backoff) asked to wait."""
    token_failure: str | None = None
    """Why no token was available (a `TokenError` reason), for an `auth_error` without an answer."""
    certificate_problem: bool = False
    """The runtime's TLS certificate was refused: no retry helps until someone fixes it."""
    request_sent: bool = False
    """For a connection error: it happened after the connection was up, so the request may have arrived."""
    answer_truncated: bool = False
    """The answer was longer than the flow's `max_response_bytes`: `body` holds its first bytes only."""
    body_mpl_id: str | None = None
    """The MPL id the answer's body named (a 500's documented text, a 202's id to poll)."""

    @property
    def correlation(self) -> dict[str, str]:
        """The runtime's correlation headers that were present, by their canonical names; the MPL id from the
        body when no header carried it."""
        found = {} if self.headers is None else {n: self.headers[n] for n in CORRELATION_HEADERS if n in self.headers}
        if self.body_mpl_id is not None and MPL_HEADER not in found:
            found = {MPL_HEADER: self.body_mpl_id, **found}
        return found


@dataclass(slots=True)
class SendResult:
    """The verdict of a whole send (all attempts)."""

    flow: str
    outcome: Outcome
    attempts: int
    duration: float
    last: Attempt
    message_id: str | None = None
    attempt_codes: tuple[str, ...] = ()
    confirmation: Confirmation | None = None
    """What the Message Processing Log API said (flows with `confirm = "mpl"` whose send succeeded); a send it
    did not confirm has `last` carry its outcome (`flow_failed`, `unconfirmed`) and error."""

    @property
    def ok(self) -> bool:
        """True when the send succeeded."""
        return self.outcome == "success"

    @property
    def status(self) -> int | None:
        """The last HTTP status, if an answer came."""
        return self.last.status

    @property
    def body(self) -> bytes:
        """The last answer's body."""
        return self.last.body

    @property
    def headers(self) -> CIMultiDictProxy[str] | None:
        """The last answer's headers, if an answer came."""
        return self.last.headers

    @property
    def mpl_id(self) -> str | None:
        """The id of the message processing log that the runtime wrote for this message: as its answer said
        (header or body), else as the MPL API found it by the message's `SAP_ApplicationID`."""
        said = self.last.correlation.get(MPL_HEADER)
        if said is None and self.confirmation is not None:
            return self.confirmation.mpl_id
        return said

    @property
    def correlation_id(self) -> str | None:
        """The message processing log id (or another correlation id) the runtime answered with."""
        values = self.last.correlation
        return next(iter(values.values()), None)
