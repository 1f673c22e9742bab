"""Shared fixtures: the anyio backend, a PKI, a running emulator, and captured logs checked for secrets."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from senderd.emulator.pki import Pki, create_pki
from senderd.emulator.stack import EmulatorStack
from senderd.logs import configure_logging


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pki() -> Pki:
    """One PKI for the whole run (key generation is the slow part)."""
    return create_pki()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[EmulatorStack]:
    """A running emulator (token server + runtime) with its service key, CA and config in tmp_path."""
    async with EmulatorStack.started(tmp_path / "emulator") as running:
        yield running


_SECRET_SHAPES = [
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\."),  # a JWT
    re.compile(r"PRIVATE KEY-----"),
]
TEST_SECRETS = (
    "the-client-secret",
    "secret-value-123",
    "s3cr3t-value-xyz",
    "app-to-sidecar-token",
    "not-a-cert-secret",
    "hunter2-client-secret",
    "proxy-pass-4711",
)
"""Client secrets and tokens the tests use: none may appear in any output."""


def secrets_in(text: str) -> list[str]:
    """What in `text` looks like a token, a private key or one of the tests' secrets."""
    found = [shape.pattern for shape in _SECRET_SHAPES if shape.search(text)]
    return found + [secret for secret in TEST_SECRETS if secret in text]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Suite-wide: a test whose captured stdout, stderr or log output holds a secret fails."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    captured = "\n".join(content for _, content in report.sections)
    hits = secrets_in(captured)
    if hits and report.passed:
        report.outcome = "failed"
        report.longrepr = f"secret-shaped text in the captured output of {item.nodeid}: {hits}"


class CapturedLogs:
    """Every log line written during a test, as text."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.extra_secrets: list[str] = []

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def assert_no_secrets(self) -> None:
        text = self.text
        assert not secrets_in(text), f"secret-shaped text in logs: {secrets_in(text)}"
        for secret in self.extra_secrets:
            assert secret not in text, "a known secret reached the logs"


@pytest.fixture(autouse=True)
def logs() -> Iterator[CapturedLogs]:
    """Capture structlog output as JSON for every test and fail the test if a secret shows up."""
    captured = CapturedLogs()
    configure_logging("debug", "json", stream=captured.stream)
    yield captured
    captured.assert_no_secrets()
