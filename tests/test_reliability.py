"""Faults survived: a token-server outage of twice the token lifetime, replicas starting together,
the service key replaced while running (a Kubernetes Secret's symlink swap), and SIGHUP reloads."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from senderd.auth.servicekey import load_service_key
from senderd.auth.token import Token, TokenProvider
from senderd.clock import Clock
from senderd.config import CredentialsConfig, TokenConfig, load_config
from senderd.daemon import Daemon
from senderd.emulator.stack import EmulatorStack
from senderd.errors import TokenError
from senderd.result import SendResult
from senderd.testing import FakeClock
from tests.conftest import CapturedLogs
from tests.tools import Recorder, all_blocked, senderd_run, settle

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def daemon_on(
    stack: EmulatorStack, clock: Clock | None = None
) -> AsyncIterator[tuple[Daemon, Recorder[tuple[float, SendResult]]]]:
    """A daemon on the stack's config (and `clock`); yields once its first send has finished, with a
    recorder of the sends and the (wall) time on the daemon's clock at which each one finished."""
    daemon = Daemon.create(
        load_config(stack.config_path), handle_signals=False, config_path=stack.config_path, clock=clock
    )
    results = Recorder[tuple[float, SendResult]]()

    async def hook(engine: Any, _group: object) -> None:
        engine.listeners.append(lambda result: results((daemon.clock.time(), result)))

    daemon.on_start = hook
    async with anyio.create_task_group() as group:
        group.start_soon(daemon.serve)
        with anyio.fail_after(15):
            await daemon.started.wait()
        await results.wait_for(1)
        yield daemon, results
        daemon.stop()


async def readyz(daemon: Daemon) -> int:
    assert daemon.server is not None
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.server.url}/readyz/token") as response:
        return response.status


async def test_token_server_down_for_twice_the_lifetime(tmp_path: Path) -> None:
    """The token server goes down just after senderd fetched a 4 s token, for 8 s. One fake clock serves
    senderd and the emulator; it moves in 50 ms steps, and the sends and token fetches (real HTTPS) that a
    step starts finish before the next. /readyz/token is asked at every step."""
    lifetime, step = 4, 0.05
    clock = FakeClock()
    extra = (
        '[token]\nstartup_jitter = "0s"\n'
        '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "250ms"\nstart = "now"\nretries = 0\n'
    )
    async with (
        EmulatorStack.started(tmp_path / "emu", token_lifetime=lifetime, config_extra=extra, now=clock.time) as stack,
        daemon_on(stack, clock) as (daemon, results),
    ):
        assert daemon.engine is not None
        tokens = daemon.engine.tokens
        fetches = Recorder[tuple[float, Token | None, TokenError | None]]()
        tokens.listeners.append(lambda _duration, token, error: fetches((clock.time(), token, error)))
        cached = await tokens.get()
        down_at = clock.time()
        stack.token_server.faults.down = True
        readiness: list[tuple[bool, int]] = []  # (a valid token is held, /readyz/token status), at every step
        while clock.time() < down_at + 2 * lifetime:  # the outage lasts twice the token lifetime
            readiness.append((tokens.has_valid_token(), await readyz(daemon)))
            clock.advance(step)
            await settle(daemon.engine, results)
        stack.token_server.faults.down = False
        up_at = clock.time()
        next_try = tokens.next_attempt_in
        failures_in_outage = [t for t, _, e in fetches.items if e is not None]
        while not any(token for t, token, _ in fetches.items if t >= up_at):
            assert clock.time() < up_at + 70, "no token within 70 s of the server's return"
            clock.advance(step)
            await settle(daemon.engine, results)
        recovered_in = clock.time() - up_at
        last_wait = tokens.next_attempt_in
    expiry = cached.expires_at_wall
    failed_while_valid = [r for t, r in results.items if down_at <= t < expiry - 0.5 and not r.ok]
    failed_after_expiry = [r for t, r in results.items if expiry <= t < up_at and not r.ok]
    print(
        f"\noutage {2 * lifetime}s with {lifetime}s tokens: {len(failures_in_outage)} fetch attempts, "
        f"{len(failed_while_valid)} sends failed while the token was valid, token back {recovered_in:.2f}s "
        f"after the server"
    )
    assert failed_while_valid == []
    assert failed_after_expiry  # the outage outlasted the token: without one, sends fail
    assert all(status == (200 if valid else 503) for valid, status in readiness), readiness
    assert readiness[0] == (True, 200)  # ready while the cached token is valid
    assert readiness[-1] == (False, 503)  # not ready once it has expired
    # backoff 1, 2, 4 s (+-10 %) over the outage, an attempt at the first step after each wait
    assert 2 <= len(failures_in_outage) <= 5
    gaps = [b - a for a, b in itertools.pairwise(failures_in_outage)]
    assert all(0.9 * 2**n - 1e-6 <= gap <= 1.1 * 2**n + step + 1e-6 for n, gap in enumerate(gaps)), gaps
    assert next_try is not None
    assert recovered_in <= next_try + step + 1e-6  # at the attempt the backoff had planned, not later
    assert recovered_in <= 8 * 1.1 + 0.5  # within one backoff step (the next one was at most 8 s away)
    assert last_wait is None


async def test_replicas_starting_together_do_not_stampede(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu") as stack:
        clock = FakeClock()
        fetch_times: list[float] = []
        config = CredentialsConfig(service_key=stack.service_key_path, ca_file=stack.ca_path)
        key = load_service_key(stack.service_key_path)
        providers: list[TokenProvider] = []
        async with anyio.create_task_group() as group:
            for replica in range(20):

                async def one(seed: int = replica) -> None:
                    async with TokenProvider.open(
                        key, config, TokenConfig(startup_jitter=5), clock=clock, rng=random.Random(seed)
                    ) as p:
                        p.listeners.append(lambda *_: fetch_times.append(clock.monotonic()))
                        providers.append(p)
                        await p.run()

                group.start_soon(one)
            await all_blocked()
            for _ in range(60):  # 6 s of fake time, in steps
                clock.advance(0.1)
                await all_blocked()
                for provider in providers:  # real HTTP fetches under way: let them land
                    await provider.wait_fetch()
            group.cancel_scope.cancel()
    start = 1000.0
    spread = max(fetch_times) - min(fetch_times)
    print(f"\n20 replicas, startup_jitter 5s: first fetches spread over {spread:.1f}s")
    assert len(fetch_times) == 20
    assert all(start <= t <= start + 5.1 for t in fetch_times)
    assert spread > 3.0
    assert len({round(t) for t in fetch_times}) >= 4  # not one burst


def swap_key(keys: Path, version: str, text: str) -> None:
    """Replace the service key as the kubelet does: write a new folder, then swap the `..data` link."""
    folder = keys / f"..{version}"
    folder.mkdir()
    (folder / "service-key.json").write_text(text)
    (keys / "..data_tmp").symlink_to(folder.name)
    os.replace(keys / "..data_tmp", keys / "..data")


async def test_service_key_rotation_is_picked_up_without_restart(tmp_path: Path, logs: CapturedLogs) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    async with EmulatorStack.started(tmp_path / "emu", token_lifetime=3) as stack:
        swap_key(keys, "v1", stack.service_key_path.read_text())
        (keys / "service-key.json").symlink_to("..data/service-key.json")
        stack.config_path.write_text(
            f'[credentials]\nservice_key = "{keys}/service-key.json"\nca_file = "{stack.ca_path}"\n'
            'watch_interval = "1h"\n[token]\nstartup_jitter = "0s"\n[server]\nlisten = "127.0.0.1:0"\n'
            '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "200ms"\nstart = "now"\n'
        )
        async with daemon_on(stack) as (daemon, results):
            assert daemon.engine is not None
            fetches = Recorder[TokenError | None]()
            daemon.engine.tokens.listeners.append(lambda _duration, _token, error: fetches(error))
            new_client = stack.pki.issue_client("rotated-client")
            stack.token_server.add_certificate_client(stack.client_id, new_client.cert, stack.scopes)  # old is out
            swap_key(keys, "v2", json.dumps(stack.service_key(client=new_client)))
            watcher = daemon.watchers["default"]
            assert await watcher.check()  # what the watcher's loop does every watch_interval
            await fetches.wait_for(1, timeout=10)  # the next fetch can only succeed with the new certificate
            expiry = daemon.metrics.registry.get_sample_value(
                "senderd_client_certificate_expiry_timestamp_seconds", {"credentials": "default"}
            )
            swap_key(keys, "v3", "{ not json")
            assert not await watcher.check()  # refused: the old key keeps serving
            sends_before = len(results)
            with anyio.fail_after(10):
                await stack.runtime.wait_for_messages(len(stack.runtime.stats.messages) + 5)
    assert fetches.items == [None] * len(fetches)  # every fetch succeeded, the first with the new certificate
    assert expiry == new_client.cert.not_valid_after_utc.timestamp()
    assert all(result.ok for _, result in results.items[sends_before:])  # the old key kept serving
    assert "credentials_rotated" in logs.text


async def test_sighup_reloads_and_refuses_an_invalid_config(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu") as stack:
        base = stack.config_text(default_flow=False)
        stack.config_path.write_text(base + '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "1h"\n')
        async with senderd_run("-c", str(stack.config_path)) as daemon:
            with anyio.fail_after(30):
                url = (await daemon.wait_for("listening"))["url"]
                await daemon.wait_for("started")  # signal handlers are installed by then
                stack.config_path.write_text(
                    base + '[[flows]]\nname = "orders"\npath = "/http/Orders"\nmethod = "POST"\nbody = "<o/>"\n'
                    'every = "200ms"\nstart = "now"\n'
                )
                daemon.send_signal(signal.SIGHUP)
                reloaded = await daemon.wait_for("config_reloaded")
                await stack.runtime.wait_for_messages(1)  # the new flow runs without a restart
                stack.config_path.write_text(base + "[[flows]]\nname = 'x'\n")  # no path: invalid
                daemon.send_signal(signal.SIGHUP)
                failed = await daemon.wait_for("config_reload_failed")
                async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
                    metrics = await response.text()
                before = len(stack.runtime.stats.messages)
                await stack.runtime.wait_for_messages(before + 2)  # still sending with the old config
                daemon.send_signal(signal.SIGTERM)
                code = await daemon.wait()
    assert reloaded["flows"] == ["orders"]
    assert stack.runtime.stats.messages[0].address == "/orders"
    assert "flows[0].path: required key is missing" in failed["error"]
    assert "senderd_config_last_reload_successful 0.0" in metrics
    assert code == 0


async def test_a_reload_with_unusable_credentials_keeps_the_running_config(tmp_path: Path) -> None:
    extra = '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "200ms"\nstart = "now"\n'
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack, daemon_on(stack) as (daemon, _):
        bad_ca = tmp_path / "bad-ca.pem"
        bad_ca.write_text("not a certificate")
        good = stack.config_path.read_text()
        stack.config_path.write_text(good.replace('ca_file = "ca.pem"', f'ca_file = "{bad_ca}"'))
        assert not await daemon.reload()
        before = len(stack.runtime.stats.messages)
        await stack.runtime.wait_for_messages(before + 2)  # still sending with the old credentials
    assert daemon.metrics.registry.get_sample_value("senderd_config_last_reload_successful") == 0
