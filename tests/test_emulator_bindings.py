"""Bindings as the SAP BTP service operator writes them and kubelet mounts them, and VCAP_SERVICES.

Everything is read back here with plain os/json calls, as a program in a pod would see it.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from senderd.emulator import KEY_TYPES, EmulatorStack, Tenant, write_projected

pytestmark = pytest.mark.anyio

TIMESTAMP_DIR = re.compile(r"\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d+")
INSTANCE_METADATA = [
    {"name": "instance_name", "format": "text"},
    {"name": "instance_guid", "format": "text"},
    {"name": "plan", "format": "text"},
    {"name": "label", "format": "text"},
    {"name": "type", "format": "text"},
]


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[EmulatorStack]:
    async with EmulatorStack.started(tmp_path / "emu", tenants=("dev", "prod")) as stack:
        yield stack


def projected(directory: Path) -> dict[str, str]:
    """Check kubelet's atomic-writer layout and return the entries as a program reads them."""
    data = directory / "..data"
    assert data.is_symlink()
    target = os.readlink(data)
    assert TIMESTAMP_DIR.fullmatch(target), target
    real = directory / target
    assert real.is_dir() and not real.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o755
    names = sorted(os.listdir(real))
    assert sorted(n for n in os.listdir(directory) if not n.startswith("..")) == names
    assert sorted(n for n in os.listdir(directory) if n.startswith("..")) == sorted(["..data", target])
    entries = {}
    for name in names:
        assert os.readlink(directory / name) == f"..data/{name}"
        assert (real / name).is_file() and not (real / name).is_symlink()
        assert stat.S_IMODE((real / name).stat().st_mode) == 0o600
        entries[name] = (directory / name).read_text()
    return entries


def instance_fields(tenant: Tenant) -> dict[str, str]:
    instance = tenant.instances["certificate"]
    return {
        "instance_name": instance.name,
        "instance_guid": instance.guid,
        "plan": "integration-flow",
        "label": "it-rt",
        "type": "it-rt",
    }


async def test_the_binding_root_holds_every_tenant_in_every_layout(two: EmulatorStack) -> None:
    assert sorted(os.listdir(two.binding_root)) == [
        f"{t}-{layout}"
        for t in ("dev", "prod")
        for layout in ("default", "keyfile", "keyfile-plain", "secretkey", "secretrootkey")
    ]
    dev, prod = two["dev"], two["prod"]
    assert dev.binding("default").path == two.binding_root / "dev-default"
    dev_key = json.loads(projected(dev.binding("keyfile").path)["service-key.json"])
    prod_key = json.loads(projected(prod.binding("keyfile").path)["service-key.json"])
    assert dev_key["oauth"]["clientid"] == dev.client_id != prod_key["oauth"]["clientid"] == prod.client_id


@pytest.mark.parametrize("tenant_name", ["dev", "prod"])
async def test_default_layout_has_one_entry_per_credential_field(two: EmulatorStack, tenant_name: str) -> None:
    tenant = two[tenant_name]
    entries = projected(two.binding_root / f"{tenant_name}-default")
    key = json.loads(tenant.key_path("certificate").read_text())
    assert sorted(entries) == sorted(["oauth", "instance_name", "instance_guid", "plan", "label", "type", ".metadata"])
    assert json.loads(entries["oauth"]) == key["oauth"]  # the key's fields, as JSON text
    assert "\n" not in entries["oauth"]  # one line, PEM breaks escaped
    assert {name: entries[name] for name in instance_fields(tenant)} == instance_fields(tenant)
    assert json.loads(entries[".metadata"]) == {
        "metaDataProperties": INSTANCE_METADATA,
        "credentialProperties": [{"name": "oauth", "format": "json"}],
    }


async def test_secret_key_layout_holds_the_key_verbatim(two: EmulatorStack) -> None:
    dev = two["dev"]
    entries = projected(two.binding_root / "dev-secretkey")
    assert sorted(entries) == sorted(
        ["credentials", "instance_name", "instance_guid", "plan", "label", "type", ".metadata"]
    )
    assert json.loads(entries["credentials"]) == json.loads(dev.key_path("certificate").read_text())
    assert {name: entries[name] for name in instance_fields(dev)} == instance_fields(dev)
    assert json.loads(entries[".metadata"]) == {
        "metaDataProperties": INSTANCE_METADATA,
        "credentialProperties": [{"name": "credentials", "format": "json", "container": True}],
    }


async def test_secret_root_key_layout_is_strings_with_oauth_encoded_twice(two: EmulatorStack) -> None:
    dev = two["dev"]
    entries = projected(two.binding_root / "dev-secretrootkey")
    assert list(entries) == ["root"]  # no .metadata, no type
    root = json.loads(entries["root"])
    assert all(isinstance(value, str) for value in root.values())
    assert sorted(root) == sorted(["oauth", *instance_fields(dev)])
    assert json.loads(root["oauth"]) == json.loads(dev.key_path("certificate").read_text())["oauth"]
    assert {name: root[name] for name in instance_fields(dev)} == instance_fields(dev)


async def test_keyfile_layout_is_one_downloaded_key(two: EmulatorStack) -> None:
    key = json.loads(two["dev"].key_path("certificate").read_text())
    entries = projected(two.binding_root / "dev-keyfile")
    assert list(entries) == ["service-key.json"]
    assert json.loads(entries["service-key.json"]) == key
    plain = two.binding_root / "dev-keyfile-plain"
    assert two["dev"].binding("keyfile", projected=False).path == plain
    assert os.listdir(plain) == ["service-key.json"]  # a plain folder: no links, no ..data
    assert not (plain / "service-key.json").is_symlink()
    assert json.loads((plain / "service-key.json").read_text()) == key


async def test_bindings_of_other_key_types_and_plain_folders(two: EmulatorStack) -> None:
    dev = two["dev"]
    api = dev.write_binding("default", "api")
    assert api.path == two.binding_root / "dev-api-default"
    entries = projected(api.path)
    assert entries["plan"] == "api"
    assert entries["instance_name"] == "dev-api"
    assert json.loads(entries["oauth"])["clientid"].split("|")[-1].startswith("it!b")
    plain = dev.write_binding("secretKey", "clientsecret", name="plain", projected=False)
    assert not any(p.is_symlink() for p in plain.path.iterdir())
    assert not (plain.path / "..data").exists()
    credentials = json.loads((plain.path / "credentials").read_text())
    assert credentials["oauth"]["clientsecret"] == dev.credentials["clientsecret"].client_secret
    assert stat.S_IMODE((plain.path / "credentials").stat().st_mode) == 0o600


async def test_vcap_services_names_every_instance(two: EmulatorStack) -> None:
    vcap = json.loads(two.vcap_services_path.read_text())
    assert vcap == two.vcap_services()
    assert list(vcap) == ["it-rt"]
    entries = {entry["name"]: entry for entry in vcap["it-rt"]}
    assert sorted(entries) == sorted(f"{t}-{k}" for t in ("dev", "prod") for k in KEY_TYPES)
    for tenant in (two["dev"], two["prod"]):
        for key_type in KEY_TYPES:
            entry = entries[f"{tenant.name}-{key_type}"]
            assert entry["label"] == "it-rt"
            assert entry["plan"] == ("api" if key_type == "api" else "integration-flow")
            assert entry["instance_name"] == entry["name"]
            assert entry["instance_guid"] == tenant.instances[key_type].guid
            assert entry["credentials"] == json.loads(tenant.key_path(key_type).read_text())
            assert list(entry["credentials"]) == ["oauth"]


# -- rotation ---------------------------------------------------------------------------------------


async def test_rotation_swaps_data_atomically(two: EmulatorStack, tmp_path: Path) -> None:
    dev = two["dev"]
    binding = dev.binding("default")
    path = binding.path / "oauth"
    old_text = path.read_text()
    old_target = os.readlink(binding.path / "..data")
    held = path.open()  # a reader that opened the file before the rotation
    seen: list[tuple[str, str]] = []

    def look(step: str) -> None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = "<missing>"
        seen.append((step, "old" if text == old_text else "new" if text != "<missing>" else text))

    rotated = dev.rotate_binding(binding.name, on_step=look)
    assert seen == [
        ("write", "old"),
        ("link data", "old"),
        ("swap data", "new"),
        ("link entries", "new"),
        ("remove stale entries", "new"),
        ("remove old", "new"),
    ]
    assert held.read() == old_text  # still the old file, though its directory is gone
    held.close()
    assert not (binding.path / old_target).exists()
    assert not (binding.path / "..data_tmp").exists()
    new = json.loads(projected(binding.path)["oauth"])
    assert new["clientid"] == rotated.credentials.client_id != binding.credentials.client_id
    assert dev.bindings[binding.name] is rotated
    assert rotated.credentials.instance_guid == binding.credentials.instance_guid
    assert rotated.credentials.scopes == binding.credentials.scopes

    # the overlap window: old and new credentials both get tokens until the old ones are revoked
    old_fields = json.loads(old_text)
    assert await token_status(dev, old_fields, tmp_path / "old") == 200
    assert await token_status(dev, new, tmp_path / "new") == 200
    assert dev.revoke(binding.credentials)
    assert await token_status(dev, old_fields, tmp_path / "old") == 401
    assert await token_status(dev, new, tmp_path / "new") == 200


def key_context(tenant: Tenant, fields: dict[str, Any], folder: Path) -> ssl.SSLContext:
    """Trust the tenant's CA; present the key's certificate chain and key when it has them."""
    ctx = ssl.create_default_context(cafile=str(tenant.ca_path))
    if "certificate" in fields:
        folder.mkdir(exist_ok=True)
        (folder / "cert.pem").write_text(fields["certificate"])
        (folder / "key.pem").write_text(fields["key"])
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ctx


async def token_status(tenant: Tenant, fields: dict[str, Any], folder: Path) -> int:
    """POST a token request with the key `fields` (mTLS with certificate and key, or the secret in the body)."""
    form = {"grant_type": "client_credentials", "client_id": fields["clientid"]}
    if "clientsecret" in fields:
        form["client_secret"] = fields["clientsecret"]
    connector = aiohttp.TCPConnector(ssl=key_context(tenant, fields, folder))
    async with aiohttp.ClientSession(connector=connector) as s:
        return (await s.post(tenant.token_server.token_url, data=form)).status


async def test_rotation_to_given_credentials_of_another_type(two: EmulatorStack, tmp_path: Path) -> None:
    dev = two["dev"]
    binding = dev.binding("secretRootKey")
    secret = dev.credentials["clientsecret"]
    dev.rotate_binding(binding.name, credentials=secret)
    oauth = json.loads(json.loads(projected(binding.path)["root"])["oauth"])
    assert oauth["clientsecret"] == secret.client_secret
    assert await token_status(dev, oauth, tmp_path) == 200


def test_write_projected_adds_and_removes_entries(tmp_path: Path) -> None:
    directory = tmp_path / "secret"
    first = write_projected(directory, {"a": "1", "b": "2"})
    assert projected(directory) == {"a": "1", "b": "2"}
    second = write_projected(directory, {"b": "3", "c": b"4"})
    assert projected(directory) == {"b": "3", "c": "4"}
    assert not first.exists()
    assert second.name == os.readlink(directory / "..data")
    assert not (directory / "a").is_symlink()
    with pytest.raises(ValueError, match="not a Secret entry name"):
        write_projected(directory, {"..data": "x"})
