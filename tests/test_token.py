"""The token provider against the emulator's token server, over real mTLS sockets.

Refresh timing runs on a fake clock: the provider's notion of time moves only when the test says so,
while the HTTP fetches are real.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.streams.tls
import pytest
from anyio.abc import TaskGroup

from senderd.auth.servicekey import ServiceKey, load_credentials
from senderd.auth.token import MAX_TOKEN_LIFETIME, RefreshPolicy, Token, TokenGrant, TokenProvider
from senderd.config import CredentialsConfig, TokenConfig
from senderd.emulator.pki import Pki
from senderd.emulator.stack import EmulatorStack
from senderd.errors import TokenError
from senderd.metrics import TRANSIENT_TOKEN_FAILURES
from senderd.testing import FakeClock
from tests.faultproxy import abort_with_rst
from tests.tools import Recorder, all_blocked

pytestmark = pytest.mark.anyio


Fetches = Recorder[tuple[Token | None, TokenError | None]]
"""What each finished fetch gave: the token or the error."""


def creds(stack: EmulatorStack) -> CredentialsConfig:
    return CredentialsConfig(service_key=stack.service_key_path, ca_file=stack.ca_path)


@asynccontextmanager
async def provider_for(
    stack: EmulatorStack, clock: FakeClock | None = None, **token_config: Any
) -> AsyncIterator[tuple[TokenProvider, Fetches]]:
    fetches = Fetches()
    config = creds(stack)
    token_config.setdefault("startup_jitter", 0)
    async with TokenProvider.open(
        load_credentials(config),
        config,
        TokenConfig(**token_config),
        clock=clock,
        listeners=[lambda _duration, token, error: fetches((token, error))],
    ) as provider:
        yield provider, fetches


async def settle(provider: TokenProvider, fetches: Fetches) -> None:
    """Let woken tasks run; if that started a fetch, wait for it to finish."""
    await all_blocked()
    if provider.fetching:
        await fetches.wait_for(len(fetches) + 1, timeout=10)
        await all_blocked()


async def test_certificate_key_gets_a_token_over_mtls(stack: EmulatorStack) -> None:
    async with provider_for(stack) as (provider, _):
        token = await provider.get()
    claims = stack.token_server.verify(token.value)
    assert claims["client_id"] == stack.client_id
    assert claims["scope"] == stack.scopes
    assert token.scopes == tuple(stack.scopes)
    assert 3590 < token.lifetime <= 3600
    assert stack.token_server.stats.issued == 1
    assert stack.token_server.stats.authentications == [(stack.client_id, "tls_client_auth")]  # no secret sent


@pytest.mark.parametrize(
    ("client_auth", "recorded"), [("post", "client_secret_post"), ("basic", "client_secret_basic")]
)
async def test_a_client_secret_goes_in_the_form_body_or_as_basic_when_asked(
    stack: EmulatorStack, tmp_path: Path, client_auth: Literal["post", "basic"], recorded: str
) -> None:
    secret = "the-client-secret+/$="  # characters real secrets have: '+' breaks HTTP Basic unless encoded
    stack.token_server.add_secret_client("sb-secret!b1|it-rt-x!b2", secret, stack.scopes)
    path = tmp_path / "secret-key.json"
    path.write_text(
        json.dumps(stack.service_key(client=None, client_id="sb-secret!b1|it-rt-x!b2", client_secret=secret))
    )
    config = CredentialsConfig(service_key=path, ca_file=stack.ca_path, client_auth=client_auth)
    async with TokenProvider.open(load_credentials(config), config, TokenConfig()) as provider:
        token = await provider.get()
    assert stack.token_server.verify(token.value)["client_id"] == "sb-secret!b1|it-rt-x!b2"
    # by default in the form body, as every SAP library sends it; HTTP Basic only when asked (never both)
    assert stack.token_server.stats.authentications == [("sb-secret!b1|it-rt-x!b2", recorded)]


async def test_single_flight_100_callers_one_fetch(stack: EmulatorStack) -> None:
    stack.token_server.faults.delay = 0.2
    tokens: list[Token] = []

    async def caller() -> None:
        tokens.append(await provider.get())

    async with provider_for(stack) as (provider, _), anyio.create_task_group() as group:
        for _ in range(100):
            group.start_soon(caller)
    assert len(tokens) == 100
    assert len({id(t) for t in tokens}) == 1
    assert stack.token_server.stats.requests == 1


@pytest.mark.parametrize("lifetime", [3, 43200])
async def test_refresh_ahead_never_hands_out_a_token_below_threshold(stack: EmulatorStack, lifetime: int) -> None:
    stack.token_server.token_lifetime = lifetime
    clock = FakeClock()
    step = lifetime / 50
    async with provider_for(stack, clock) as (provider, fetches), anyio.create_task_group() as group:
        await group.start(provider.run)
        await settle(provider, fetches)
        for _ in range(250):  # five lifetimes
            clock.advance(step)
            await settle(provider, fetches)
            token = await provider.get()
            # refresh_left (a third) with the jitter's worst case, of the lifetime the server granted
            assert token.remaining(clock.monotonic()) >= token.lifetime / 3 * (1 - 0.1)
        group.cancel_scope.cancel()
    # one fetch per (granted lifetime - latest refresh point) at most, plus the first
    granted = fetches.items[0][0].lifetime if fetches.items[0][0] else lifetime
    assert len(fetches.items) <= math.ceil(5 * lifetime / (granted * (1 - 1 / 3 * 1.1))) + 1
    assert all(error is None for _, error in fetches.items)


async def test_outage_serves_cached_token_and_backs_off(stack: EmulatorStack) -> None:
    stack.token_server.token_lifetime = 30
    clock = FakeClock()
    async with provider_for(stack, clock) as (provider, fetches), anyio.create_task_group() as group:
        await group.start(provider.run)
        await settle(provider, fetches)
        first = await provider.get()
        stack.token_server.faults.down = True
        down_at = clock.monotonic()
        served_while_valid = 0
        while clock.monotonic() - down_at < 60:  # twice the lifetime
            clock.advance(0.25)
            await settle(provider, fetches)
            if first.usable(clock.monotonic()):
                assert await provider.get() is first  # the cached token keeps serving
                served_while_valid += 1
            else:
                with pytest.raises(TokenError) as info:
                    await provider.get()
                assert info.value.reason == "server_error"
                assert not provider.has_valid_token()
        failures = [e for _, e in fetches.items if e is not None]
        # the outage begins at the refresh point (~20 s); 40 s of backoff 1, 2, 4, 8, 16 (+-10 %), and
        # get() adds a fetch only when no backoff is pending.
        assert 4 <= len(failures) <= 7, len(failures)
        assert served_while_valid >= 70
        stack.token_server.faults.down = False
        next_try = provider.next_attempt_in
        assert next_try is not None and next_try <= 60
        up_at = clock.monotonic()
        while provider.current is None or not provider.has_valid_token():
            clock.advance(0.25)
            await settle(provider, fetches)
        assert clock.monotonic() - up_at <= next_try + 0.25
        group.cancel_scope.cancel()


async def test_429_retry_after_is_honoured(stack: EmulatorStack) -> None:
    stack.token_server.faults.rate_limited = 1
    stack.token_server.faults.retry_after = 7
    clock = FakeClock()
    async with provider_for(stack, clock) as (provider, fetches), anyio.create_task_group() as group:
        await group.start(provider.run)
        await settle(provider, fetches)
        token, error = fetches.items[0]
        assert token is None and error is not None and error.reason == "rate_limited"
        assert error.retry_after == 7
        assert provider.next_attempt_in == pytest.approx(7, abs=0.01)
        clock.advance(6.9)
        await settle(provider, fetches)
        assert stack.token_server.stats.requests == 1  # waited as told
        clock.advance(0.2)
        await settle(provider, fetches)
        assert stack.token_server.stats.requests == 2
        assert provider.has_valid_token()
        group.cancel_scope.cancel()


async def test_a_429_retry_after_beyond_the_cap_waits_only_the_cap(stack: EmulatorStack) -> None:
    stack.token_server.faults.rate_limited = 1
    stack.token_server.faults.retry_after = 100_000
    clock = FakeClock()
    async with provider_for(stack, clock) as (provider, fetches), anyio.create_task_group() as group:
        await group.start(provider.run)
        await settle(provider, fetches)
        _, error = fetches.items[0]
        assert error is not None and error.retry_after == 100_000  # what the server said
        assert provider.next_attempt_in == pytest.approx(600, abs=0.01)  # RefreshPolicy.retry_after_max
        clock.advance(599.9)
        await settle(provider, fetches)
        assert stack.token_server.stats.requests == 1
        clock.advance(0.2)
        await settle(provider, fetches)
        assert stack.token_server.stats.requests == 2
        assert provider.has_valid_token()
        group.cancel_scope.cancel()


async def test_invalidate_only_clears_the_current_token(stack: EmulatorStack) -> None:
    async with provider_for(stack) as (provider, _):
        old = await provider.get()
        provider.invalidate(old)
        new = await provider.get()
        assert new is not old
        provider.invalidate(old)  # stale: a newer token is current, nothing happens
        assert provider.current is new
        assert stack.token_server.stats.issued == 2


# --- token server answers mapped to errors that say what to check ---------------------------------------


async def fetch_error(key: ServiceKey, config: CredentialsConfig) -> TokenError:
    async with TokenProvider.open(key, config, TokenConfig(timeout=5)) as provider:
        with pytest.raises(TokenError) as info:
            await provider.get()
    return info.value


async def test_unregistered_certificate_is_bad_credentials(stack: EmulatorStack, tmp_path: Path) -> None:
    stranger = stack.pki.issue_client("stranger")
    path = tmp_path / "key.json"
    path.write_text(json.dumps(stack.service_key(client=stranger)))
    config = CredentialsConfig(service_key=path, ca_file=stack.ca_path)
    error = await fetch_error(load_credentials(config), config)
    assert error.reason == "bad_credentials"
    assert error.status == 401
    assert "credentials rejected (401 unauthorized: Bad credentials)" in str(error)


async def test_untrusted_server_is_tls_trust(stack: EmulatorStack) -> None:
    config = CredentialsConfig(service_key=stack.service_key_path)  # no ca_file: the emulator CA is unknown
    error = await fetch_error(load_credentials(config), config)
    assert error.reason == "tls_trust"
    assert "set credentials.ca_file" in str(error)


async def test_unreachable_and_server_errors(stack: EmulatorStack, tmp_path: Path) -> None:
    with _free_port() as port:
        path = tmp_path / "key.json"
        path.write_text(json.dumps(stack.service_key(token_url=f"https://127.0.0.1:{port}/oauth/token")))
        config = CredentialsConfig(service_key=path, ca_file=stack.ca_path)
        error = await fetch_error(load_credentials(config), config)
    assert error.reason == "unreachable"
    assert "cannot connect" in str(error)
    stack.token_server.faults.down = True
    error = await fetch_error(load_credentials(creds(stack)), creds(stack))
    assert error.reason == "server_error" and error.status == 503


async def test_server_demanding_a_certificate_refuses_a_secret_client(tmp_path: Path) -> None:
    from senderd.emulator.pki import create_pki
    from senderd.emulator.token_server import TokenServer

    pki = create_pki()
    server = TokenServer(pki, require_client_cert=True)
    server.add_secret_client("sb-x!b1|it-rt-y!b2", "secret-value-123", ["x.ESBMessaging.send"])
    await server.start()
    try:
        path = tmp_path / "key.json"
        path.write_text(
            json.dumps(
                {
                    "clientid": "sb-x!b1|it-rt-y!b2",
                    "clientsecret": "secret-value-123",
                    "tokenurl": server.token_url,
                    "url": "https://127.0.0.1:1",
                }
            )
        )
        (tmp_path / "ca.pem").write_text(pki.ca_pem())
        config = CredentialsConfig(service_key=path, ca_file=tmp_path / "ca.pem")
        error = await fetch_error(load_credentials(config), config)
    finally:
        await server.stop()
    assert error.reason == "unreachable"  # a TLS 1.3 server resets after the handshake: retried, and said
    assert "the server may demand a client certificate, which a ClientSecret key has none of" in str(error)


class _free_port:
    """A port nobody listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *_: object) -> None:
        return None


async def test_run_fetches_at_start_and_stops_on_cancel(stack: EmulatorStack) -> None:
    async with provider_for(stack) as (provider, fetches):
        group: TaskGroup
        async with anyio.create_task_group() as group:
            await group.start(provider.run)
            await fetches.wait_for(1, timeout=10)
            group.cancel_scope.cancel()
    assert provider.has_valid_token()


def test_backoff_stays_capped_after_thousands_of_failures() -> None:
    import random

    from senderd.auth.token import RefreshPolicy

    policy = RefreshPolicy()
    rng = random.Random(1)
    assert policy.backoff(100_000, None, rng) <= 60.0
    assert 0.9 <= policy.backoff(1, None, rng) <= 1.1
    assert policy.backoff(3, 30.0, rng) == 30.0  # Retry-After wins when longer


@asynccontextmanager
async def resetting_server(pki: Pki, *, after_handshake: bool) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 that resets every connection, during or after the TLS handshake."""
    context = pki.server_ssl_context(client_ca=True)

    async def handle(client: anyio.abc.SocketStream) -> None:
        if after_handshake:
            tls = await anyio.streams.tls.TLSStream.wrap(client, server_side=True, ssl_context=context)
            await tls.receive()  # the request arrived; the answer never does
        else:
            await client.receive()  # the ClientHello
        abort_with_rst(client)
        await client.aclose()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610 - anyio, not Django
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("after_handshake", "reason", "said"),
    [
        (True, "unreachable", "the connection broke after the TLS handshake"),
        (False, "client_certificate", "TLS handshake refused"),
    ],
    ids=["after-handshake", "during-handshake"],
)
async def test_a_reset_is_classified_by_when_it_happened(
    stack: EmulatorStack, tmp_path: Path, after_handshake: bool, reason: str, said: str
) -> None:
    async with resetting_server(stack.pki, after_handshake=after_handshake) as port:
        key = json.loads(stack.service_key_path.read_text())
        key["oauth"]["tokenurl"] = f"https://127.0.0.1:{port}"
        path = tmp_path / "key.json"
        path.write_text(json.dumps(key))
        config = CredentialsConfig(service_key=path, ca_file=stack.ca_path)
        error = await fetch_error(load_credentials(config), config)
    assert error.reason == reason
    assert said in str(error)
    assert (error.reason in TRANSIENT_TOKEN_FAILURES) is after_handshake  # only a handshake refusal is final


class FixedGrant:
    """A token server stand-in (for the provider's own rules) that always answers with the same lifetime."""

    def __init__(self, expires_in: float) -> None:
        self.expires_in = expires_in
        self.calls = 0

    async def __call__(self) -> TokenGrant:
        self.calls += 1
        return TokenGrant(access_token=f"token-{self.calls}", expires_in=self.expires_in)


async def test_an_absurdly_short_lifetime_is_a_failed_fetch_with_backoff_not_a_storm() -> None:
    clock, grants = FakeClock(), FixedGrant(0.001)
    provider = TokenProvider(grants, clock=clock, policy=RefreshPolicy(jitter=0))
    async with anyio.create_task_group() as group:
        await group.start(provider.run)
        for _ in range(100):  # 10 s of fake time
            clock.advance(0.1)
            await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    assert grants.calls <= 5  # 1, 2, 4 s of backoff: a handful, not thousands
    assert not provider.has_valid_token()
    assert provider.last_error is not None and provider.last_error.reason == "bad_response"
    assert "too short to use" in str(provider.last_error)


async def test_an_absurdly_long_lifetime_is_clamped() -> None:
    clock = FakeClock()
    token = await TokenProvider(FixedGrant(1e12), clock=clock).get()
    assert token.expires_at_wall == clock.time() + MAX_TOKEN_LIFETIME


@pytest.mark.parametrize(
    ("answer", "encoding", "said"),
    [
        (b'{"access_token": "abc", "expires_in": 3600, "token_type": "mac"}', None, "token_type 'mac' is not bearer"),
        (b"{" + b" " * (1 << 20) + b"}", None, "larger than 64 KiB"),
        (gzip.compress(b"{" + b" " * (50 << 20) + b"}"), "gzip", "larger than 64 KiB"),  # inflated only so far
    ],
    ids=["mac-token", "huge", "gzip-bomb"],
)
async def test_a_token_answer_senderd_cannot_trust_is_refused(
    stack: EmulatorStack, answer: bytes, encoding: str | None, said: str
) -> None:
    stack.token_server.faults.answer, stack.token_server.faults.answer_encoding = answer, encoding
    error = await fetch_error(load_credentials(creds(stack)), creds(stack))
    assert error.reason == "bad_response"
    assert said in str(error)
