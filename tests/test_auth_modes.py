"""Every way a sender authenticates, and every way credentials arrive, against the emulator as SAP delivers
them: each key type with OAuth, the client certificate straight to the runtime, HTTP Basic; a binding
directory in each layout (rotated by a kubelet-style `..data` swap while running), VCAP_SERVICES, and
zero configuration below $SERVICE_BINDING_ROOT."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from senderd.config import config_from_dict
from senderd.daemon import Daemon
from senderd.emulator import EmulatorStack, TenantSpec
from senderd.emulator.tenant import Tenant
from senderd.engine import Engine
from senderd.errors import CredentialsError
from senderd.metrics import Metrics
from senderd.result import SendResult
from tests.conftest import CapturedLogs
from tests.tools import senderd, serving

pytestmark = pytest.mark.anyio
FLOW = {"name": "ts", "path": "/http/GetTimestamp", "retries": 0}


@asynccontextmanager
async def tenant(tmp_path: Path, spec: TenantSpec | str = "dev") -> AsyncIterator[tuple[EmulatorStack, Tenant]]:
    async with EmulatorStack.started(tmp_path / "emu", tenants=(spec,)) as stack:
        yield stack, stack.tenant


def config_for(dev: Tenant, **credentials: Any) -> Any:
    return config_from_dict(
        {"credentials": {"ca_file": str(dev.ca_path), **credentials}, "flows": [FLOW]}, source="test.toml"
    )


async def send_once(config: Any) -> SendResult:
    async with Engine.open(config, metrics=Metrics(process=False)) as engine:
        return await engine.send(engine.config.flow("ts"))


@pytest.mark.parametrize(
    ("key_type", "extra", "token_auth"),
    [
        ("certificate", {}, "tls_client_auth"),
        ("clientsecret", {}, "client_secret_post"),
        ("clientsecret", {"client_auth": "basic"}, "client_secret_basic"),
        ("external-certificate", {"key_file": "pem"}, "tls_client_auth"),
        ("external-certificate", {"key_file": "p12", "key_passphrase_env": "P12_PASS"}, "tls_client_auth"),
    ],
    ids=["certificate", "secret-in-form", "secret-as-basic", "external-pem", "external-p12"],
)
async def test_oauth_with_every_key_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_type: str, extra: dict[str, str], token_auth: str
) -> None:
    async with tenant(tmp_path) as (_, dev):
        if "key_file" in extra:
            extra = {**extra, "key_file": str(dev.external_key_path(extra["key_file"]))}
            monkeypatch.setenv("P12_PASS", dev.p12_passphrase)
        result = await send_once(config_for(dev, service_key=str(dev.key_path(key_type)), **extra))  # type: ignore[arg-type]
        assert result.ok, result.last.error
        assert dev.token_server.stats.authentications[-1][1] == token_auth
        assert dev.runtime.stats.auth_modes == {"bearer": 1}


async def test_the_client_certificate_straight_to_the_runtime(tmp_path: Path) -> None:
    async with tenant(tmp_path) as (_, dev):
        result = await send_once(config_for(dev, service_key=str(dev.key_path()), auth="client-certificate"))
        assert result.ok, result.last.error
        assert dev.token_server.stats.requests == 0  # no token at all
        assert dev.runtime.stats.auth_modes == {"client_certificate": 1}
        assert dev.runtime.stats.incomplete_chains == 0  # the whole chain, as SAP's load balancer needs


async def test_http_basic_straight_to_the_flow_is_warned_about(tmp_path: Path, logs: CapturedLogs) -> None:
    async with tenant(tmp_path) as (_, dev):
        result = await send_once(config_for(dev, service_key=str(dev.key_path("clientsecret")), auth="basic"))
        assert result.ok, result.last.error
        assert dev.token_server.stats.requests == 0
        assert dev.runtime.stats.auth_modes == {"basic": 1}
    assert '"basic_auth"' in logs.text and "does not recommend" in logs.text


async def test_a_trial_tenant_refuses_the_client_certificate_and_says_so(tmp_path: Path) -> None:
    async with tenant(tmp_path, TenantSpec("trial", client_cert_auth=False)) as (_, trial):
        result = await send_once(config_for(trial, service_key=str(trial.key_path()), auth="client-certificate"))
    assert result.outcome == "auth_error" and result.status == 401


async def test_an_auth_mode_that_does_not_fit_the_key_is_one_line(tmp_path: Path) -> None:
    async with tenant(tmp_path) as (_, dev):
        with pytest.raises(CredentialsError, match="auth: basic needs a ClientId/Secret key"):
            await send_once(config_for(dev, service_key=str(dev.key_path()), auth="basic"))
        with pytest.raises(CredentialsError, match="auth: client-certificate needs a Certificate or External"):
            await send_once(config_for(dev, service_key=str(dev.key_path("clientsecret")), auth="client-certificate"))


@pytest.mark.parametrize("layout", ["default", "secretKey", "secretRootKey", "keyfile"])
async def test_each_binding_layout_sends(tmp_path: Path, layout: str) -> None:
    async with tenant(tmp_path) as (_, dev):
        result = await send_once(config_for(dev, binding=str(dev.binding(layout).path)))  # type: ignore[arg-type]
        assert result.ok, result.last.error


async def test_vcap_services_in_the_environment_and_in_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with tenant(tmp_path) as (stack, dev):
        name = dev.vcap_services()[0]["name"]
        monkeypatch.setenv("VCAP_SERVICES", stack.vcap_services_path.read_text())
        assert (await send_once(config_for(dev, vcap_service=name))).ok
        monkeypatch.delenv("VCAP_SERVICES")
        monkeypatch.setenv("VCAP_SERVICES_FILE_PATH", str(stack.vcap_services_path))
        assert (await send_once(config_for(dev, vcap_service=name))).ok


async def test_zero_configuration_below_service_binding_root(tmp_path: Path) -> None:
    async with tenant(tmp_path) as (_, dev):
        root = tmp_path / "bindings"
        root.mkdir()
        shutil.copytree(dev.binding("default").path, root / "cpi", symlinks=True)
        config = tmp_path / "senderd.toml"
        config.write_text(
            f'[credentials]\nca_file = "{dev.ca_path}"\n[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\n'
        )
        env = {"SERVICE_BINDING_ROOT": str(root)}
        code, out, err = await senderd("check", "-c", str(config), env=env)
        assert code == 0, err
        assert "binding" in out
        code, _, err = await senderd("once", "-c", str(config), env=env)
        assert code == 0, err
        shutil.copytree(dev.binding("secretKey").path, root / "second", symlinks=True)
        code, _, err = await senderd("check", "-c", str(config), env=env)
        assert code == 2 and "cpi" in err and "second" in err  # several: one line listing them


async def test_a_binding_rotated_by_kubelet_while_running_is_taken_into_use(tmp_path: Path, logs: CapturedLogs) -> None:
    async with tenant(tmp_path) as (_, dev):
        binding = dev.binding("default")
        config = config_from_dict(
            {
                "credentials": {"binding": str(binding.path), "ca_file": str(dev.ca_path), "watch_interval": "50ms"},
                "token": {"startup_jitter": "0s"},
                "flows": [{**FLOW, "every": "100ms", "start": "now"}],
            },
            source="test.toml",
        )
        daemon = Daemon.create(config, handle_signals=False, metrics=Metrics(process=False))
        async with serving(daemon) as sends:
            await sends.wait_for(2)
            old = binding.credentials
            new = dev.rotate_binding(binding.name).credentials  # a new client; the Secret's ..data link swapped
            with anyio.fail_after(10):
                while (
                    dev.token_server.verify(
                        daemon.engine.tokens.current.value  # type: ignore[union-attr]
                    )["client_id"]
                    != new.client_id
                ):
                    await sends.wait_for(len(sends) + 1)
            dev.revoke(old)  # the operator deletes the old credentials after rotatedBindingTTL
            count = len(sends)
            await sends.wait_for(count + 3)
    assert all(result.ok for result in sends.items[count:])  # the new client serves on
    assert '"credentials_rotated"' in logs.text
    rotated = [json.loads(line) for line in logs.text.splitlines() if '"credentials_rotated"' in line]
    assert rotated[0]["credentials"] == "default"


async def test_a_broken_replacement_is_refused_and_the_old_credentials_keep_serving(
    tmp_path: Path, logs: CapturedLogs
) -> None:
    async with tenant(tmp_path) as (_, dev):
        key = tmp_path / "link" / "service-key.json"
        key.parent.mkdir()
        key.write_text(dev.key_path().read_text())
        config = config_from_dict(
            {"credentials": {"service_key": str(key), "ca_file": str(dev.ca_path)}, "flows": [FLOW]},
            source="test.toml",
        )
        metrics = Metrics(process=False)
        async with Engine.open(config, metrics=metrics) as engine:
            credential_set = engine.only_set
            stranger = dev.issue_credentials("certificate")
            dev.revoke(stranger)  # well-formed, but the token server does not know it
            key.write_text(json.dumps(dev.key_of(stranger)))
            assert not await credential_set.rotate(credential_set.config, where="credentials")
            assert (await engine.send(engine.config.flow("ts"))).ok  # the old key keeps serving
    assert (
        metrics.registry.get_sample_value(
            "senderd_credentials_rotations_total", {"credentials": "default", "result": "refused"}
        )
        == 1
    )
    assert '"credentials_reload_failed"' in logs.text
