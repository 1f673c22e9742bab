"""The one exception tree of senderd.

User mistakes (`ConfigError`, `CredentialsError`, `UsageError`) carry one clear line naming the source, the
field and the fix; the CLI prints that line and exits 2. Failures of the outside world are `TokenError`
(token server), `SpoolError` (the relay's store), `PushError` (the Pushgateway) or outcomes of a send.
Anything else is a bug: logged with its traceback where it is isolated, never silently hidden.
"""

from __future__ import annotations


class SenderdError(Exception):
    """Root of every error senderd raises on purpose."""


class ConfigError(SenderdError):
    """The configuration file or a command-line value is wrong: the message says where and how to fix it."""


class UsageError(ConfigError):
    """A command-line value is wrong (exit 2, like a config mistake)."""


class CredentialsError(SenderdError):
    """The service key, certificate or private key is unusable: the message names file, field and fix."""


class TokenError(SenderdError):
    """The token server did not give a token.

    `reason` is a short stable code used in metrics (see `metrics.TOKEN_FAILURE_REASONS`); `retry_after`
    is the server's Retry-After in seconds, if it sent one.
    """

    def __init__(
        self, message: str, *, reason: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class SpoolError(SenderdError):
    """The relay's spool cannot take the message now (the app should retry later)."""


class SpoolFull(SpoolError):
    """The spool holds as many messages or bytes as it may."""


class IdempotencyConflict(SpoolError):
    """An `Idempotency-Key` already names a message with a different body (`message_id`)."""

    def __init__(self, message: str, *, message_id: str) -> None:
        super().__init__(message)
        self.message_id = message_id


class StoreUnavailable(SpoolError):
    """The relay's store (the PostgreSQL database) cannot be reached now; nothing was acknowledged."""


class PushError(SenderdError):
    """The Pushgateway did not take the metrics."""
