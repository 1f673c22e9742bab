"""The relay against hostile clients, on a real socket: bytes that are not UTF-8 anywhere in a request
(fuzzed with hypothesis over raw bytes), slow clients, too many connections, bodies larger than memory
should hold. Nothing a client sends may end the daemon or reach a 5xx."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_relay import post, relay_daemon

pytestmark = pytest.mark.anyio
TOKEN = "app-to-sidecar-token"


def exchange(host: str, port: int, request: bytes) -> bytes:
    """Send `request` raw on a fresh connection; return everything answered until the server closes (or
    5 s pass)."""
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(request)  # with "Connection: close": the server closes once it has answered
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def status_of(answer: bytes) -> int | None:
    """The status code of the first response in `answer` (None: no response at all)."""
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


_TEXT = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"application/xml", b"text/plain; charset=\xff", b"\xff\xfe", b"a\x80b", b"\xc3\x28", b""]),
)
_FLOW = st.one_of(
    st.sampled_from([b"orders", b"nope", b"%FF", b"%C3%28", b"\xff", b"or%00ders"]), st.binary(max_size=12)
)
_AUTH = st.one_of(
    st.just(f"Bearer {TOKEN}".encode()),
    st.just(f"bearer {TOKEN}".encode()),
    st.binary(max_size=40).map(lambda b: b"Bearer " + b),
    st.binary(max_size=40),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request that is mostly well-formed, with hostile bytes where a client controls them."""
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"P\xffST"]))
    target = draw(
        st.sampled_from([b"/v1/flows/%s/messages", b"/v1/messages/%s", b"/v1/dead", b"/v1/dead/%s/retry", b"/%s"])
    )
    if b"%s" in target:
        target = target.replace(b"%s", draw(_FLOW))
    headers = [b"Host: relay", b"Connection: close"]
    if draw(st.booleans()):
        headers.append(b"Authorization: " + draw(_AUTH))
    if draw(st.booleans()):
        headers.append(b"Content-Type: " + draw(_TEXT))
    if draw(st.booleans()):
        headers.append(b"Idempotency-Key: " + draw(_TEXT))
    if draw(st.booleans()):
        headers.append(draw(st.binary(max_size=30)) + b": " + draw(_TEXT))
    body = draw(st.binary(max_size=64))
    headers.append(b"Content-Length: %d" % len(body))
    headers = [h.replace(b"\r", b"").replace(b"\n", b"") for h in headers]
    return method + b" " + target + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body


@pytest.mark.timeout(240)
async def test_fuzzed_raw_requests_get_an_answer_below_500_and_the_daemon_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_TOKEN", TOKEN)
    async with relay_daemon(tmp_path, token_env="RELAY_TOKEN") as (_, daemon, url, _d):
        assert daemon.relay is not None
        host, port = daemon.relay.api.site.host, daemon.relay.api.site.port
        seen: list[tuple[bytes, int | None]] = []

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(requests())
        def fuzz(request: bytes) -> None:
            code = status_of(exchange(host, port, request))
            seen.append((request, code))
            assert code is not None and code < 500, (request, code)

        await anyio.to_thread.run_sync(fuzz)
        status, _, _ = await post(f"{url}/v1/flows/orders/messages", Authorization=f"Bearer {TOKEN}")
    assert status == 202  # the spool's writer and the API are alive after all that
    assert len(seen) >= 300


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"POST /v1/flows/orders/messages HTTP/1.1\r\nContent-Type: text/\xff\r\nContent-Length: 1\r\n\r\nx", 415),
        (b"POST /v1/flows/or\xffders/messages HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"POST /v1/flows/%FF/messages HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\nx", 404),
        (b"GET /v1/messages/%FF HTTP/1.1\r\n\r\n", 404),
        (b"GET /v1/messages/\xff\xfe HTTP/1.1\r\n\r\n", 400),
        (b"POST /v1/dead/%C3%28/retry HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404),
        (b"POST /v1/flows/orders/messages HTTP/1.1\r\nAuthorization: Bearer \xff\r\nContent-Length: 0\r\n\r\n", 401),
        (b"POST /v1/flows/orders/messages HTTP/1.1\r\nAuthorization: \xc3\x28\r\nContent-Length: 0\r\n\r\n", 401),
        (b"POST /v1/flows/orders/messages HTTP/1.1\r\nIdempotency-Key: \xff\r\nContent-Type: a/b\r\n\r\n", 400),
    ],
)
async def test_bytes_that_are_not_utf8_get_a_4xx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request_bytes: bytes, expected: int
) -> None:
    added = b"Host: relay\r\nConnection: close\r\n"
    if b"Authorization" not in request_bytes:
        added += b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    request_bytes = request_bytes.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n" + added, 1)
    monkeypatch.setenv("RELAY_TOKEN", TOKEN)
    async with relay_daemon(tmp_path, token_env="RELAY_TOKEN") as (_, daemon, url, _d):
        assert daemon.relay is not None
        host, port = daemon.relay.api.site.host, daemon.relay.api.site.port
        answer = await anyio.to_thread.run_sync(exchange, host, port, request_bytes)
        after, _, _ = await post(f"{url}/v1/flows/orders/messages", Authorization=f"Bearer {TOKEN}")
    assert status_of(answer) == expected, answer
    assert after == 202


async def test_a_lower_case_bearer_scheme_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TOKEN", TOKEN)
    async with relay_daemon(tmp_path, token_env="RELAY_TOKEN") as (_, _d, url, _x):
        status, _, _ = await post(f"{url}/v1/flows/orders/messages", Authorization=f"bearer {TOKEN}")
    assert status == 202  # RFC 6750: the scheme is case-insensitive
