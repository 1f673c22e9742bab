"""The tutorial's scenario, 200 times: get a token with the client certificate, call GetTimestamp.

newman (the Postman CLI) runs a generated collection for 200 iterations, with the certificate and key that
`senderd key export` writes (`--ssl-client-cert/--ssl-client-key`) and a pre-request script that fetches
the token, as Postman users set it up. senderd does the same 200 sends with `senderd once` over 200 flows,
one at a time (`pool.workers = 1`, like newman's iterations), and once more with 8 workers. Wall time and
peak RSS of each process are compared: `speedup = newman_s / senderd_s`, `rss_ratio = newman / senderd`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import anyio.to_thread

from bench.common import Mode, Section, child_env, flow_toml, rounded, say
from bench.peers import find_tool
from bench.proc import Child, Usage, senderd_argv

SENDS = 200

PRE_REQUEST = """\
pm.sendRequest({
    url: pm.collectionVariables.get("token_url"),
    method: "POST",
    header: { "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json" },
    body: { mode: "urlencoded", urlencoded: [
        { key: "grant_type", value: "client_credentials" },
        { key: "client_id", value: pm.collectionVariables.get("client_id") }
    ] }
}, function (err, res) {
    if (err) { throw err; }
    if (res.code !== 200) { throw new Error("token request failed: " + res.code + " " + res.text()); }
    pm.collectionVariables.set("access_token", res.json().access_token);
});
"""

TESTS = """\
pm.test("status 200", function () { pm.response.to.have.status(200); });
pm.test("body", function () { pm.expect(pm.response.text()).to.include("Current time"); });
"""


def collection(token_url: str, client_id: str, runtime_url: str) -> dict[str, Any]:
    """A Postman v2.1 collection: GetTimestamp with a Bearer token fetched by the pre-request script."""
    return {
        "info": {
            "name": "senderd bench: GetTimestamp",
            "schema": "https://schema.getpostman.com/json/collection/v2.1.0/collection.json",
        },
        "variable": [
            {"key": "token_url", "value": token_url},
            {"key": "client_id", "value": client_id},
            {"key": "runtime_url", "value": runtime_url},
            {"key": "access_token", "value": ""},
        ],
        "item": [
            {
                "name": "GetTimestamp",
                "event": [
                    {"listen": "prerequest", "script": {"type": "text/javascript", "exec": PRE_REQUEST.splitlines()}},
                    {"listen": "test", "script": {"type": "text/javascript", "exec": TESTS.splitlines()}},
                ],
                "request": {
                    "method": "GET",
                    "url": "{{runtime_url}}/http/GetTimestamp",
                    "header": [{"key": "Authorization", "value": "Bearer {{access_token}}"}],
                },
            }
        ],
    }


async def _timed(argv: list[str], log: Path, timeout: float) -> Usage:
    with log.open("wb") as output:
        child = Child(argv, env=child_env(), stdout=output, stderr=output)
        return await child.wait_async(timeout)


async def measure(mode: Mode, workdir: Path) -> Section:
    """newman.speedup, newman.rss_ratio, newman.senderd_s, newman.newman_s, ..."""
    from senderd.emulator.stack import EmulatorStack

    section: Section = {"speedup": None, "rss_ratio": None, "sends": SENDS}
    flows = "".join(
        flow_toml(f"timestamp-{index:03d}", "/http/GetTimestamp", expect_body="Current time") for index in range(SENDS)
    )
    async with EmulatorStack.started(workdir / "emulator", config_extra="[pool]\nworkers = 1\n" + flows) as stack:
        runtime, tokens = stack.runtime.stats, stack.token_server.stats

        say(f"newman: senderd once, {SENDS} flows, one at a time")
        before = (len(runtime.messages), tokens.issued)
        ours = await _timed(senderd_argv("once", "-c", str(stack.config_path)), workdir / "senderd-once.log", 120)
        if ours.returncode != 0 or len(runtime.messages) - before[0] != SENDS:
            raise RuntimeError(f"senderd once failed (exit {ours.returncode}): see {workdir / 'senderd-once.log'}")
        section.update(
            {
                "senderd_s": rounded(ours.wall_s, 3),
                "senderd_rss_mb": rounded(ours.peak_rss_mb),
                "senderd_token_fetches": tokens.issued - before[1],
            }
        )

        stack.write_files("[pool]\nworkers = 8\n" + flows)
        say(f"newman: senderd once, {SENDS} flows, 8 workers")
        parallel = await _timed(senderd_argv("once", "-c", str(stack.config_path)), workdir / "senderd-once-8.log", 120)
        section["senderd_8_workers_s"] = rounded(parallel.wall_s, 3) if parallel.returncode == 0 else None

        newman = find_tool("newman", needed_for="newman.speedup and newman.rss_ratio")
        if newman is None:
            return section
        keys = workdir / "keys"
        await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                senderd_argv("key", "export", str(stack.service_key_path), "--out", str(keys)),
                check=True,
                capture_output=True,
                timeout=60,
                env=child_env(),
            )
        )
        collection_path = workdir / "collection.json"
        collection_path.write_text(
            json.dumps(collection(stack.token_server.token_url, stack.client_id, stack.runtime.url), indent=2)
        )
        say(f"newman: newman run, {SENDS} iterations (token + GetTimestamp each)")
        before = (len(runtime.messages), tokens.issued)
        theirs = await _timed(
            [
                newman,
                "run",
                str(collection_path),
                "-n",
                str(SENDS),
                "--silent",
                "--ssl-client-cert",
                str(keys / "client.crt"),
                "--ssl-client-key",
                str(keys / "client.key"),
                "--ssl-extra-ca-certs",
                str(stack.ca_path),
            ],
            workdir / "newman.log",
            mode.pick(120, 300),
        )
        sent, fetched = len(runtime.messages) - before[0], tokens.issued - before[1]
    if theirs.returncode != 0 or sent != SENDS:
        say(f"newman: newman failed (exit {theirs.returncode}, {sent} sends): see {workdir / 'newman.log'}")
        return section
    section.update(
        {
            "speedup": rounded(theirs.wall_s / ours.wall_s, 2),
            "rss_ratio": rounded(theirs.peak_rss_mb / ours.peak_rss_mb, 2),
            "newman_s": rounded(theirs.wall_s, 3),
            "newman_rss_mb": rounded(theirs.peak_rss_mb),
            "newman_token_fetches": fetched,
        }
    )
    return section
