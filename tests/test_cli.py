"""The command line as a user runs it: a real `senderd` subprocess against the emulator."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from senderd.emulator.stack import EmulatorStack
from tests.tools import senderd

pytestmark = pytest.mark.anyio


async def test_token_prints_claims_not_the_token(stack: EmulatorStack) -> None:
    code, out, err = await senderd("token", "-c", str(stack.config_path))
    assert code == 0, err
    assert f"client_id:  {stack.client_id}" in out
    assert stack.scopes[0] in out
    assert re.search(r"lifetime:   (3599|3600)s", out)  # XSUAA rounds expires_in down
    assert "eyJ" not in out and "eyJ" not in err
    code, out, _ = await senderd("token", "-c", str(stack.config_path), "--raw")
    assert code == 0
    token = out.split("token:", 1)[1].strip()
    assert stack.token_server.verify(token)["client_id"] == stack.client_id


async def test_token_with_flags_and_no_config(stack: EmulatorStack) -> None:
    code, out, err = await senderd(
        "token", "--service-key", str(stack.service_key_path), "--ca-file", str(stack.ca_path)
    )
    assert code == 0, err
    assert "client_id:" in out


async def test_check_offline_and_online(stack: EmulatorStack) -> None:
    code, out, err = await senderd("check", "-c", str(stack.config_path))
    assert code == 0, err
    assert "service key OK" in out and "token OK" not in out
    assert stack.token_server.stats.requests == 0
    code, out, err = await senderd("check", "-c", str(stack.config_path), "--online")
    assert code == 0, err
    assert re.search(r"token OK: valid for (3599|3600)s", out)


async def test_token_server_failure_exits_1_with_one_line(stack: EmulatorStack) -> None:
    stack.token_server.faults.down = True
    code, _, err = await senderd("token", "-c", str(stack.config_path))
    assert code == 1
    assert err.strip().count("\n") == 0
    assert err.startswith("senderd: token: token server 127.0.0.1:")
    assert "server error (503" in err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('[credentials]\nservice_key = "nope.json"\n', "nope.json: service key file not found: check the path"),
        ("[credentials]\nservcie_key = 'x'\n", "credentials.servcie_key: unknown key: remove it or check its spelling"),
        ("[credentials\n", "not valid TOML"),
        ("[token]\ntimeout = 'soon'\n", "token.timeout: invalid duration 'soon'"),
    ],
)
async def test_user_mistakes_exit_2_without_traceback(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "senderd.toml"
    path.write_text(config)
    code, _, err = await senderd("check", "-c", str(path))
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith(f"senderd: error: {path}") or err.startswith("senderd: error: ")
    assert message in err
    assert err.strip().count("\n") == 0


async def test_key_export_writes_cert_and_private_key(stack: EmulatorStack, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    code, out, err = await senderd("key", "export", str(stack.service_key_path), "--out", str(out_dir))
    assert code == 0, err
    crt, key = out_dir / "client.crt", out_dir / "client.key"
    assert crt.read_text().count("BEGIN CERTIFICATE") == 2
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "BEGIN PRIVATE KEY" in key.read_text()
    assert "curl --cert" in out and "client_id=" in out and stack.token_server.token_url in out
    # the exported pair really authenticates: build a service key from the files and fetch a token
    flat = {
        "clientid": stack.client_id,
        "certificate": crt.read_text(),
        "key": key.read_text(),
        "tokenurl": stack.token_server.token_url,
        "url": stack.runtime.url,
    }
    key_json = tmp_path / "from-export.json"
    key_json.write_text(json.dumps(flat))
    code, _, err = await senderd("token", "--service-key", str(key_json), "--ca-file", str(stack.ca_path))
    assert code == 0, err


async def test_key_export_to_an_unwritable_place_is_exit_2(stack: EmulatorStack, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = await senderd("key", "export", str(stack.service_key_path), "--out", str(blocker / "sub"))
    assert code == 2
    assert err.startswith(f"senderd: error: --out {blocker / 'sub'}: cannot write there")
    assert "Traceback" not in err


async def test_a_startup_error_inside_the_daemon_is_one_line_exit_2(stack: EmulatorStack) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = stack.config_path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        config += '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "1h"\n'
        stack.config_path.write_text(config)
        code, _, err = await senderd("run", "-c", str(stack.config_path))
    assert code == 2
    assert "Traceback" not in err
    assert f"senderd: error: server.listen: cannot listen on 127.0.0.1:{port}" in err


@pytest.mark.parametrize("link", ["client.key", "client.crt"])
async def test_key_export_never_writes_through_a_symlink(stack: EmulatorStack, tmp_path: Path, link: str) -> None:
    out_dir, victim = tmp_path / "out", tmp_path / "somewhere-else"
    out_dir.mkdir()
    victim.write_text("precious")
    (out_dir / link).symlink_to(victim)
    code, _, err = await senderd("key", "export", str(stack.service_key_path), "--out", str(out_dir))
    assert code == 2
    assert f"{out_dir / link} is a symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == "precious"  # nothing was written through the link
