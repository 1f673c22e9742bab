"""The one exception tree of senderd.

User mistakes (`ConfigError`, `CredentialsError`) carry one clear line naming the source, the field and
the fix; the CLI prints that line and exits 2. Transport and HTTP failures are `TokenError` (token
server) or outcomes of a send. Anything else is a bug and is not caught.
"""

from __future__ import annotations


class SenderdError(Exception):
    """Root of every error senderd raises on purpose."""


class ConfigError(SenderdError):
    """The configuration file or a command-line value is wrong: the message says where and how to fix it."""


class CredentialsError(SenderdError):
    """The service key, certificate or private key is unusable: the message names file, field and fix."""


class TokenError(SenderdError):
    """The token server did not give a token.

    `reason` is a short stable code used in metrics (`bad_credentials`, `client_certificate`,
    `bad_request`, `rate_limited`, `server_error`, `unreachable`, `tls_trust`, `timeout`,
    `bad_response`); `retry_after` is the server's Retry-After in seconds, if it sent one.
    """

    def __init__(self, message: str, *, reason: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
