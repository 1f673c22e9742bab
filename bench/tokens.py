"""Token economy: how many tokens senderd fetches over many 5-second token lifetimes, and whether any send
goes out with an expired token; beside it, blackbox_exporter probing the same kind of endpoint with OAuth.

senderd is the real daemon (`senderd run`, a subprocess) with two flows every 100 ms against the emulator,
whose tokens live 5 s. Fetches are counted by the emulator's token server, expired sends by the runtime
(`stats.expired_tokens`: requests refused because the token had expired).

blackbox_exporter 0.23's oauth2 needs a client secret, so a ClientSecret client is registered on the same
token server; the exporter probes the runtime's GetTimestamp through its /probe endpoint, and the token
server counts what each probe costs in token fetches.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import aiohttp
import anyio

from bench.common import (
    LOOPBACK,
    Mode,
    Section,
    child_env,
    flow_toml,
    free_port,
    poll_until,
    rounded,
    say,
    wait_for_http,
)
from bench.peers import find_tool
from bench.proc import Child, senderd_argv

TOKEN_LIFETIME = 5.0
SEND_EVERY = "100ms"
TARGET_FETCHES_PER_LIFETIME = 1.1

BLACKBOX_CONFIG = """\
modules:
  cpi_oauth:
    prober: http
    timeout: 5s
    http:
      method: GET
      valid_status_codes: [200]
      fail_if_body_not_matches_regexp: ["Current time"]
      tls_config:
        ca_file: {ca}
      oauth2:
        client_id: {client_id}
        client_secret: {secret}
        token_url: {token_url}
        tls_config:
          ca_file: {ca}
"""


async def _senderd_over_lifetimes(mode: Mode, workdir: Path) -> Section:
    from senderd.emulator.stack import EmulatorStack

    lifetimes = mode.count(4, 12)
    flows = flow_toml(
        "timestamp", "/http/GetTimestamp", every=SEND_EVERY, start="now", expect_body="Current time"
    ) + flow_toml("timestamp-2", "/http/GetTimestamp", every=SEND_EVERY, expect_body="Current time")
    async with EmulatorStack.started(workdir / "emulator", token_lifetime=TOKEN_LIFETIME, config_extra=flows) as stack:
        runtime, token_server = stack.runtime, stack.token_server
        log = (workdir / "senderd-run.log").open("wb")
        say(f"tokens: senderd run, 2 flows every {SEND_EVERY}, {TOKEN_LIFETIME:g}s tokens, {lifetimes} lifetimes")
        started = time.monotonic()
        child = Child(
            senderd_argv("run", "-c", str(stack.config_path), "--log-level", "info"),
            env=child_env(),
            stdout=log,
            stderr=log,
        )
        try:
            await poll_until(lambda: not child.running, lifetimes * TOKEN_LIFETIME, 0.1)
            if not child.running:
                raise RuntimeError(f"senderd run exited early: see {workdir / 'senderd-run.log'}")
            elapsed = time.monotonic() - started
            fetches = token_server.stats.issued
            first_at = token_server.stats.issued_at[0] if token_server.stats.issued_at else time.time()
            covered = time.time() - first_at  # from the first token on: the lifetimes that were needed
        finally:
            await child.stop(10)
            log.close()
        messages = len(runtime.stats.messages)
        intervals = [
            later - earlier
            for earlier, later in zip(token_server.stats.issued_at, token_server.stats.issued_at[1:], strict=False)
        ]
    used = covered / TOKEN_LIFETIME
    planned, extra = _against_the_rule(token_server.stats.issued_at, covered)
    return {
        "fetches": fetches,
        "planned_refreshes": planned,
        "extra_fetches": extra,
        "lifetimes": rounded(used, 2),
        "fetches_per_lifetime": rounded(fetches / used, 2) if used > 0 else None,
        "expired_sends": runtime.stats.expired_tokens,
        "token_lifetime_s": TOKEN_LIFETIME,
        "mean_refresh_interval_s": rounded(sum(intervals) / len(intervals), 2) if intervals else None,
        "sends": messages,
        "runtime_401": runtime.stats.by_status[401],
        "run_s": rounded(elapsed, 1),
    }


def _against_the_rule(issued_at: list[float], covered: float) -> tuple[int, int]:
    """What the refresh rule plans for a run of `covered` seconds (the first fetch, then one refresh each
    time a third of the lifetime is left), and how many fetches came sooner than the rule allows (with its
    ±10 % jitter): those are extra, e.g. after a refused token or a lost refresh."""
    from senderd.auth.token import RefreshPolicy

    policy = RefreshPolicy()
    lifetime = float(int(TOKEN_LIFETIME))  # the emulator, like XSUAA, rounds expires_in down
    if lifetime == TOKEN_LIFETIME:
        lifetime -= 1  # whole seconds: exp is floored, so the time left is just under it
    interval = lifetime * (1 - policy.refresh_left)
    earliest = lifetime * (1 - policy.refresh_left * (1 + policy.jitter))
    planned = 1 + int(covered // interval)
    extra = sum(later - earlier < earliest - 0.05 for earlier, later in itertools.pairwise(issued_at))
    return planned, extra


async def _probe_many(url: str, count: int, concurrency: int, max_s: float) -> tuple[int, int]:
    left, done, succeeded = count, 0, 0
    async with aiohttp.ClientSession() as session:

        async def prober() -> None:
            nonlocal left, done, succeeded
            while left > 0:
                left -= 1
                async with session.get(url) as response:
                    text = await response.text()
                done += 1
                succeeded += "\nprobe_success 1" in text

        with anyio.move_on_after(max_s):
            async with anyio.create_task_group() as group:
                for _ in range(concurrency):
                    group.start_soon(prober)
    return done, succeeded


async def _blackbox(mode: Mode, workdir: Path) -> Section:
    from senderd.emulator.stack import EmulatorStack

    section: Section = {"blackbox_fetches_per_1k_probes": None}
    exporter = find_tool("prometheus-blackbox-exporter", needed_for="token.blackbox_fetches_per_1k_probes")
    if exporter is None:
        return section
    probes = mode.count(200, 1000)
    async with EmulatorStack.started(workdir / "emulator-blackbox", token_lifetime=TOKEN_LIFETIME) as stack:
        client_id, secret = "sb-blackbox!b1|it-rt-emulator!b1", "bench-" + stack.client_id[-12:].replace("|", "x")
        stack.token_server.add_secret_client(client_id, secret, stack.scopes)
        config = workdir / "blackbox.yml"
        config.write_text(
            BLACKBOX_CONFIG.format(
                ca=stack.ca_path, client_id=client_id, secret=secret, token_url=stack.token_server.token_url
            )
        )
        port = free_port()
        log = (workdir / "blackbox.log").open("wb")
        child = Child(
            [exporter, f"--config.file={config}", f"--web.listen-address={LOOPBACK}:{port}"], stdout=log, stderr=log
        )
        try:
            await wait_for_http(f"http://{LOOPBACK}:{port}/-/healthy", 10, alive=lambda: child.running)
            target = f"{stack.runtime.url}/http/GetTimestamp"
            url = f"http://{LOOPBACK}:{port}/probe?module=cpi_oauth&target={target}"
            say(f"tokens: blackbox_exporter, {probes} probes with oauth2")
            before = stack.token_server.stats.issued
            done, succeeded = await _probe_many(url, probes, 4, mode.pick(60, 180))
            fetches = stack.token_server.stats.issued - before
            rss = child.rss_mb()
        finally:
            await child.stop(5)
            log.close()
    if succeeded < done:
        say(f"tokens: {done - succeeded} of {done} blackbox probes failed (see {workdir / 'blackbox.log'})")
    section.update(
        {
            "blackbox_fetches_per_1k_probes": rounded(fetches * 1000 / done) if done else None,
            "blackbox_probes": done,
            "blackbox_probe_success": succeeded,
            "blackbox_rss_mb": rounded(rss),
        }
    )
    return section


async def measure(mode: Mode, workdir: Path) -> Section:
    """token.fetches, lifetimes, expired_sends, blackbox_fetches_per_1k_probes, ..."""
    section = await _senderd_over_lifetimes(mode, workdir)
    section.update(await _blackbox(mode, workdir))
    return section
