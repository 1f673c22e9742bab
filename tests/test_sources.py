"""Where a set's service key comes from: every layout of a mounted binding, `binding_name`,
`VCAP_SERVICES`, auto-detection in `$SERVICE_BINDING_ROOT`, and every mistake's exact one-line message.

The binding directories are built on disk as the SAP BTP service operator writes its Secret (see
docs: /work/shared/research/sap-2026-12.md section 2) and as the kubelet mounts it: each entry a link
`NAME -> ..data/NAME`, `..data -> ..2026_12_01_…` the current generation, swapped atomically on update.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from senderd.auth.servicekey import load_set, parse_service_key
from senderd.auth.sources import (
    MAX_BINDING_ENTRIES,
    MAX_KEY_BYTES,
    MAX_VCAP_BYTES,
    KeySource,
    Purpose,
    fingerprint,
    read_binding,
    read_key_source,
)
from senderd.config import CredentialsConfig
from senderd.emulator.pki import IssuedCert, Pki
from senderd.emulator.servicekey import service_key_dict
from senderd.errors import ConfigError, CredentialsError

TOKEN_URL = "https://sub.authentication.cert.eu10.hana.ondemand.com/oauth/token"
RUNTIME_URL = "https://tenant.it-cpi018-rt.cfapps.eu10.hana.ondemand.com"
CLIENT_ID = "sb-1234!b5|it-rt-tenant!b6"
NO_SOURCE = "credentials.service_key: no service key configured: set it in the config file, or pass --service-key"


@pytest.fixture(scope="module")
def client(pki: Pki) -> IssuedCert:
    return pki.issue_client("test-sources")


@pytest.fixture(scope="module")
def nested(pki: Pki, client: IssuedCert) -> dict[str, Any]:
    """A Certificate key in the cockpit's nested layout: `{"oauth": {...}}`."""
    return service_key_dict(
        client_id=CLIENT_ID, token_url=TOKEN_URL, runtime_url=RUNTIME_URL, client=client, chain=[pki.intermediate.cert]
    )


@pytest.fixture(scope="module")
def flat(pki: Pki, client: IssuedCert) -> dict[str, Any]:
    """The same kind of key with its fields at the top level."""
    return service_key_dict(
        client_id=CLIENT_ID,
        token_url=TOKEN_URL,
        runtime_url=RUNTIME_URL,
        client=client,
        chain=[pki.intermediate.cert],
        layout="flat",
    )


# --- the service operator's Secrets, and the kubelet's mount ------------------------------------------

INSTANCE = {"instance_name": "cpi-sender", "instance_guid": "6f1c0000-1111-2222-3333-444455556666"}
METADATA_PROPERTIES = [
    {"name": name, "format": "text"} for name in ("instance_name", "instance_guid", "plan", "label", "type")
]


def instance(plan: str = "integration-flow", service: str = "it-rt") -> dict[str, str]:
    """The instance keys the operator adds to every Secret (`addInstanceInfo`)."""
    return {**INSTANCE, "plan": plan, "label": service, "type": service}


def default_secret(credentials: Mapping[str, Any], **kw: str) -> dict[str, str]:
    """Default format: one key per top-level credential field (text as is, objects as JSON), `.metadata`."""
    data = {name: value if isinstance(value, str) else json.dumps(value) for name, value in credentials.items()}
    formats = [{"name": n, "format": "text" if isinstance(v, str) else "json"} for n, v in credentials.items()]
    metadata = {"metaDataProperties": METADATA_PROPERTIES, "credentialProperties": formats}
    return {**data, **instance(**kw), ".metadata": json.dumps(metadata)}


def secret_key_secret(credentials: Mapping[str, Any], name: str = "credentials", **kw: str) -> dict[str, str]:
    """`secretKey: credentials`: the broker's JSON verbatim under one key, marked a container."""
    metadata = {
        "metaDataProperties": METADATA_PROPERTIES,
        "credentialProperties": [{"name": name, "format": "json", "container": True}],
    }
    return {name: json.dumps(credentials), **instance(**kw), ".metadata": json.dumps(metadata)}


def secret_root_key_secret(credentials: Mapping[str, Any], name: str = "root", **kw: str) -> dict[str, str]:
    """`secretRootKey: root`: one JSON whose values are all strings (`oauth` encoded twice); no `.metadata`."""
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in credentials.items()}
    return {name: json.dumps({**values, **instance(**kw)})}


GENERATIONS = iter(f"..2026_12_01_10_00_{n // 1000:02d}.{n:09d}" for n in range(10**6))


def mount(directory: Path, data: Mapping[str, str | bytes], *, kubelet: bool = True) -> Path:
    """Write a Secret's data into `directory` as the kubelet does (or as plain files)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not kubelet:
        for name, value in data.items():
            _write(directory / name, value)
        return directory
    generation = next(GENERATIONS)
    (directory / generation).mkdir()
    for name, value in data.items():
        _write(directory / generation / name, value)
    (directory / "..data").symlink_to(generation)
    for name in data:
        (directory / name).symlink_to(f"..data/{name}")
    return directory


def swap(directory: Path, data: Mapping[str, str | bytes]) -> None:
    """An update as the kubelet's atomic writer makes it: new generation, `..data` renamed over, old links
    pruned, new ones added, old generation removed."""
    old = os.readlink(directory / "..data")
    generation = next(GENERATIONS)
    (directory / generation).mkdir()
    for name, value in data.items():
        _write(directory / generation / name, value)
    (directory / "..data_tmp").symlink_to(generation)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in os.listdir(directory / old):
        if name not in data:
            (directory / name).unlink()
    for name in data:
        if not os.path.lexists(directory / name):
            (directory / name).symlink_to(f"..data/{name}")
    shutil.rmtree(directory / old)


def _write(path: Path, value: str | bytes) -> None:
    path.write_bytes(value.encode() if isinstance(value, str) else value)


def binding(path: Path, purpose: Purpose | None = None) -> KeySource:
    return read_key_source(CredentialsConfig(binding=path), purpose=purpose, environ={})


def message(exc: pytest.ExceptionInfo[Exception], root: Path) -> str:
    return str(exc.value).replace(str(root), "{dir}")


# --- every layout reads back to the same key ----------------------------------------------------------


@pytest.mark.parametrize("kubelet", [True, False], ids=["kubelet", "plain"])
def test_default_layout_nested(tmp_path: Path, nested: dict[str, Any], kubelet: bool) -> None:
    directory = mount(tmp_path / "cpi", default_secret(nested), kubelet=kubelet)
    source = binding(directory, "send")
    assert json.loads(source.text) == nested
    assert (source.source, source.layout, source.plan, source.rotates) == (
        str(directory),
        "default",
        "integration-flow",
        True,
    )
    names = [".metadata", "instance_guid", "instance_name", "label", "oauth", "plan", "type"]
    assert source.watched == tuple(directory / name for name in names)  # the configured paths, not ..data targets
    assert parse_service_key(source.text, source=source.source).client_id == CLIENT_ID


def test_default_layout_flat_fields(tmp_path: Path, flat: dict[str, Any]) -> None:
    data = default_secret(flat)
    assert {"clientid", "certificate", "key", "tokenurl", "url", "certificatedetails"} <= data.keys()
    assert json.loads(data[".metadata"])["credentialProperties"][-1] == {"name": "certificatedetails", "format": "json"}
    source = binding(mount(tmp_path / "cpi", data))
    assert json.loads(source.text) == flat
    assert source.layout == "default"


def test_secret_key_layout(tmp_path: Path, nested: dict[str, Any]) -> None:
    source = binding(mount(tmp_path / "cpi", secret_key_secret(nested)), "send")
    assert json.loads(source.text) == nested
    assert (source.layout, source.plan) == ("secretKey", "integration-flow")
    assert tmp_path / "cpi" / "credentials" in source.watched


def test_secret_root_key_layout(tmp_path: Path, nested: dict[str, Any]) -> None:
    data = secret_root_key_secret(nested)
    root = json.loads(data["root"])
    assert isinstance(root["oauth"], str) and "type" in root  # oauth encoded twice; no .metadata
    source = binding(mount(tmp_path / "cpi", data), "send")
    assert json.loads(source.text) == nested
    assert (source.source, source.layout, source.plan) == (
        str(tmp_path / "cpi" / "root"),
        "secretRootKey",
        "integration-flow",
    )


def test_secret_root_key_flat(tmp_path: Path, flat: dict[str, Any]) -> None:
    source = binding(mount(tmp_path / "cpi", secret_root_key_secret(flat)))
    assert json.loads(source.text) == flat  # certificatedetails, encoded twice, decoded too


def test_directory_holding_one_key_file(tmp_path: Path, nested: dict[str, Any]) -> None:
    directory = mount(tmp_path / "cpi", {"service-key.json": json.dumps(nested, indent=2)})
    source = binding(directory, "api")  # the plan is unknown: nothing to refuse
    assert json.loads(source.text) == nested
    assert (source.source, source.layout, source.plan) == (str(directory / "service-key.json"), "key file", None)


def test_binding_without_metadata(tmp_path: Path, nested: dict[str, Any], flat: dict[str, Any]) -> None:
    data = default_secret(nested)
    del data[".metadata"]
    assert json.loads(binding(mount(tmp_path / "a", data)).text) == nested
    data = default_secret(flat)
    del data[".metadata"]
    source = binding(mount(tmp_path / "b", data))
    assert (json.loads(source.text), source.layout) == (flat, "files")
    data = secret_key_secret(nested)  # a secretKey Secret without its .metadata: the one JSON key object
    del data[".metadata"]
    assert json.loads(binding(mount(tmp_path / "c", data)).text) == nested


def test_literal_escapes_and_trailing_newlines_survive(tmp_path: Path, flat: dict[str, Any]) -> None:
    """Hand-made Secrets (`kubectl create secret --from-file`) end files with a line break."""
    data = {name: value + "\n" for name, value in default_secret(flat).items() if name != ".metadata"}
    key = parse_service_key(binding(mount(tmp_path / "cpi", data)).text, source="x")
    assert (key.client_id, key.token_url) == (CLIENT_ID, TOKEN_URL)


def test_load_set_reads_a_binding(tmp_path: Path, nested: dict[str, Any]) -> None:
    directory = mount(tmp_path / "cpi", default_secret(nested))
    key, source = load_set(CredentialsConfig(binding=directory), purpose="send")
    assert (key.client_id, key.source, key.key_type) == (CLIENT_ID, str(directory), "certificate")
    assert source.watched


# --- rotation through the ..data link -----------------------------------------------------------------


def test_data_swap_changes_the_fingerprint(tmp_path: Path, nested: dict[str, Any], pki: Pki) -> None:
    directory = mount(tmp_path / "cpi", default_secret(nested))
    first = binding(directory)
    before = fingerprint(first)
    assert before is not None and fingerprint(binding(directory)) == before
    other = pki.issue_client("rotated")
    rotated = service_key_dict(client_id=CLIENT_ID, token_url=TOKEN_URL, runtime_url=RUNTIME_URL, client=other)
    swap(directory, default_secret(rotated))
    assert fingerprint(first) not in (before, None)  # the first read's paths now lead to the new files
    assert fingerprint(first) == fingerprint(binding(directory))
    assert json.loads(binding(directory).text) == rotated


def test_key_source_repr_shows_no_key(tmp_path: Path, nested: dict[str, Any]) -> None:
    source = binding(mount(tmp_path / "cpi", default_secret(nested)))
    assert "PRIVATE KEY" not in repr(source) and "source=" in repr(source)


def test_swap_to_another_layout_is_followed(tmp_path: Path, nested: dict[str, Any]) -> None:
    directory = mount(tmp_path / "cpi", default_secret(nested))
    swap(directory, secret_root_key_secret(nested))
    source = binding(directory)
    assert (source.layout, source.watched) == ("secretRootKey", (directory / "root",))
    assert sorted(os.listdir(directory))[-1] == "root"


def test_reader_never_sees_a_missing_file_or_a_mixed_generation(tmp_path: Path) -> None:
    """While the kubelet swaps generations as fast as it can, every read is whole and from one generation."""

    def generation(n: int) -> dict[str, str]:
        flat = {"clientid": f"client-{n}", "clientsecret": "s", "tokenurl": f"https://t{n}.example/oauth/token"}
        return default_secret(flat)

    directory = mount(tmp_path / "cpi", generation(0))
    done = threading.Event()
    swaps = [0]

    def rotate() -> None:
        try:
            while not done.is_set():
                swaps[0] += 1
                swap(directory, generation(swaps[0] % 2))
                time.sleep(0.001)  # a real kubelet swaps once a sync period at most: let some reads through
        finally:
            done.set()

    thread = threading.Thread(target=rotate)
    thread.start()
    reads = 0
    seen = set()
    deadline = time.monotonic() + 20
    try:
        while swaps[0] < 100 and not done.is_set() and time.monotonic() < deadline:
            fields = json.loads(binding(directory).text)
            number = fields["clientid"].removeprefix("client-")
            assert fields["tokenurl"] == f"https://t{number}.example/oauth/token"
            seen.add(number)
            reads += 1
    finally:
        done.set()
        thread.join()
    assert swaps[0] >= 100 and reads > 10
    assert seen == {"0", "1"}


# --- every binding mistake, one line each ---------------------------------------------------------------


def oauth_only(**fields: str) -> dict[str, Any]:
    return {"oauth": {"clientid": CLIENT_ID, "clientsecret": "s", "tokenurl": TOKEN_URL, **fields}}


def without(data: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in data.items() if k not in names}


MISTAKES: list[Any] = [
    pytest.param(
        without(default_secret(oauth_only()), "type", "label", ".metadata"),
        None,
        "{dir}: no 'type' file: not a service binding (the SAP BTP service operator writes type = it-rt); "
        "mount the ServiceBinding's Secret there, or fix credentials.binding",
        id="missing-type",
    ),
    pytest.param(
        without(default_secret(oauth_only()), "type", "label"),
        None,
        "{dir}: no 'type' file: not a service binding (the SAP BTP service operator writes type = it-rt); "
        "mount the ServiceBinding's Secret there, or fix credentials.binding",
        id="missing-type-with-metadata",
    ),
    pytest.param(
        default_secret({"clientid": "x"}, service="xsuaa", plan="application"),
        None,
        "{dir}/type: a binding of service 'xsuaa', expected it-rt (SAP Process Integration Runtime): "
        "bind a service instance of offering it-rt",
        id="wrong-type",
    ),
    pytest.param(
        {**default_secret(oauth_only()), "label": "destination"},
        None,
        "{dir}/label: a binding of service 'destination', expected it-rt (SAP Process Integration Runtime): "
        "bind a service instance of offering it-rt",
        id="wrong-label",
    ),
    pytest.param(
        secret_root_key_secret({"clientid": "x"}, service="xsuaa"),
        None,
        "{dir}/root: field 'type': a binding of service 'xsuaa', expected it-rt (SAP Process Integration "
        "Runtime): bind a service instance of offering it-rt",
        id="root-wrong-type",
    ),
    pytest.param(
        default_secret(oauth_only(), plan="api"),
        "send",
        "{dir}/plan: plan 'api', but sending to iFlows needs plan integration-flow: bind an it-rt instance of "
        "plan integration-flow",
        id="plan-api-to-send",
    ),
    pytest.param(
        secret_key_secret(oauth_only()),
        "api",
        "{dir}/plan: plan 'integration-flow', but the Message Processing Log API needs plan api: bind an it-rt "
        "instance of plan api",
        id="plan-send-for-api",
    ),
    pytest.param(
        secret_root_key_secret(oauth_only(), plan="standard"),
        None,
        "{dir}/root: field 'plan': plan 'standard', expected integration-flow (to send to iFlows) or api (the "
        "MPL API): bind an it-rt instance of one of those plans",
        id="plan-unknown",
    ),
    pytest.param(
        {**default_secret(oauth_only()), "oauth": "clientid: x"},
        None,
        "{dir}/oauth: not valid JSON at line 1 column 1 (Expecting value): it must hold the service key's "
        "fields as JSON; recreate the ServiceBinding",
        id="oauth-not-json",
    ),
    pytest.param(
        without({**default_secret(oauth_only()), "oauth": "{"}, ".metadata"),
        None,
        "{dir}/oauth: not valid JSON at line 1 column 2 (Expecting property name enclosed in double quotes): "
        "it must hold the service key's fields as JSON; recreate the ServiceBinding",
        id="oauth-not-json-no-metadata",
    ),
    pytest.param(
        {"root": json.dumps({"oauth": "{'clientid': 'x'}", **instance()})},
        None,
        "{dir}/root: field 'oauth': not valid JSON at line 1 column 2 (Expecting property name enclosed in "
        "double quotes): it must hold the service key's fields as JSON; recreate the ServiceBinding",
        id="root-oauth-not-json",
    ),
    pytest.param(
        {**default_secret(oauth_only()), "oauth": "[1]"},
        None,
        "{dir}/oauth: holds JSON list, not an object of key fields: recreate the ServiceBinding",
        id="oauth-a-list",
    ),
    pytest.param(
        default_secret({"oauth": {"clientid": CLIENT_ID, "clientsecret": "s"}}),
        None,
        "{dir}/oauth: field 'tokenurl' is missing: recreate the ServiceBinding (its credentials are incomplete)",
        id="field-missing-in-oauth",
    ),
    pytest.param(
        default_secret({"clientsecret": "s", "tokenurl": TOKEN_URL}),
        None,
        "{dir}/clientid: missing: the binding has no field 'clientid': recreate the ServiceBinding (its "
        "credentials are incomplete)",
        id="field-file-missing",
    ),
    pytest.param(
        instance(),
        None,
        "{dir}: no credentials: neither an 'oauth' nor a 'clientid' file: recreate the ServiceBinding (its "
        "credentials are incomplete)",
        id="no-credentials",
    ),
    pytest.param(
        secret_key_secret({"oauth": {"clientid": CLIENT_ID}}),
        None,
        "{dir}/credentials: field 'oauth.tokenurl' is missing: recreate the ServiceBinding (its credentials are "
        "incomplete)",
        id="field-missing-in-container",
    ),
    pytest.param(
        secret_root_key_secret({"clientid": CLIENT_ID}),
        None,
        "{dir}/root: field 'tokenurl' is missing: recreate the ServiceBinding (its credentials are incomplete)",
        id="field-missing-in-root",
    ),
    pytest.param(
        {"root": json.dumps({"oauth": json.dumps(oauth_only()["oauth"]), "plan": "integration-flow"})},
        None,
        "{dir}/root: field 'type' is missing: not a service binding (the SAP BTP service operator writes "
        '"type": "it-rt"): recreate the ServiceBinding',
        id="root-missing-type",
    ),
    pytest.param(
        {"root": json.dumps({**json.loads(secret_root_key_secret(oauth_only())["root"]), "type": ["it-rt"]})},
        None,
        "{dir}/root: field 'type' must be a string: recreate the ServiceBinding",
        id="root-type-not-a-string",
    ),
    pytest.param(
        {"root": json.dumps({"oauth": "7", **instance()})},
        None,
        "{dir}/root: field 'oauth': holds JSON value, not an object of key fields: recreate the ServiceBinding",
        id="root-oauth-a-number",
    ),
    pytest.param(
        {**default_secret(oauth_only()), "oauth": '{"clientid": 1' + "0" * 5000 + "}"},
        None,
        "{dir}/oauth: not valid JSON (too long a number, or nested too deeply): it must hold the service key's "
        "fields as JSON; recreate the ServiceBinding",
        id="oauth-huge-number",
    ),
    pytest.param(
        {**without(default_secret({"clientid": CLIENT_ID}), ".metadata"), "tokenurl": TOKEN_URL, "x": "{nope"},
        None,
        None,
        id="files-text-that-looks-like-json",
    ),
    pytest.param(
        {"a.json": json.dumps(oauth_only()), "b.json": json.dumps(oauth_only())},
        None,
        "{dir}: several candidate key files (a.json, b.json): keep only the service key there, or set "
        "service_key to the one to use",
        id="several-key-files",
    ),
    pytest.param(
        {"old.json": json.dumps(oauth_only()), "new.json": json.dumps(oauth_only()), **instance()},
        None,
        "{dir}: several candidate key files (new.json, old.json): keep only one there, or set service_key to "
        "the one to use",
        id="several-key-files-in-a-binding",
    ),
    pytest.param(
        {**default_secret(oauth_only()), ".metadata": "{"},
        None,
        "{dir}/.metadata: not valid JSON at line 1 column 2 (Expecting property name enclosed in double "
        "quotes): recreate the ServiceBinding (its Secret is damaged)",
        id="metadata-not-json",
    ),
    pytest.param(
        {**default_secret(oauth_only()), ".metadata": json.dumps({"credentialProperties": {"oauth": "json"}})},
        None,
        "{dir}/.metadata: not the service operator's format (a 'credentialProperties' list of "
        '{"name": ..., "format": ...}): recreate the ServiceBinding (its Secret is damaged)',
        id="metadata-wrong-shape",
    ),
    pytest.param(
        without(default_secret(oauth_only()), "oauth"),
        None,
        "{dir}/oauth: missing, though .metadata lists it: recreate the ServiceBinding (its Secret is damaged)",
        id="metadata-names-a-missing-file",
    ),
    pytest.param(
        {**secret_key_secret(oauth_only()), "credentials": "[]"},
        None,
        "{dir}/credentials: holds JSON list, not the service key object: recreate the ServiceBinding (its Secret "
        "is damaged)",
        id="container-not-an-object",
    ),
    pytest.param(
        {**default_secret(oauth_only()), "oauth": b"\xff\xfe{}"},
        None,
        "{dir}/oauth: not UTF-8 text: recreate the ServiceBinding (its Secret is damaged)",
        id="not-utf8",
    ),
    pytest.param(
        {**default_secret(oauth_only()), "oauth": "x" * (MAX_KEY_BYTES + 1)},
        None,
        "{dir}/oauth: larger than 1024 KiB, too large for a binding file: check credentials.binding",
        id="file-too-large",
    ),
    pytest.param(
        {f"f{n:02d}": "x" for n in range(MAX_BINDING_ENTRIES + 1)},
        None,
        f"{{dir}}: more than {MAX_BINDING_ENTRIES} entries, not a service binding: check credentials.binding",
        id="too-many-entries",
    ),
]


@pytest.mark.parametrize("kubelet", [True, False], ids=["kubelet", "plain"])
@pytest.mark.parametrize(("data", "purpose", "expected"), MISTAKES)
def test_binding_mistakes(
    tmp_path: Path, data: dict[str, str | bytes], purpose: Purpose | None, expected: str | None, kubelet: bool
) -> None:
    directory = mount(tmp_path / "cpi", data, kubelet=kubelet)
    if expected is None:  # not a mistake: what could look like one is read
        assert json.loads(binding(directory, purpose).text)["x"] == "{nope"
        return
    with pytest.raises(CredentialsError) as exc:
        binding(directory, purpose)
    assert message(exc, directory) == expected


def test_a_file_where_a_directory_was_expected(tmp_path: Path, nested: dict[str, Any]) -> None:
    """A `subPath` mount of one Secret key: a file that the kubelet never updates."""
    path = tmp_path / "oauth"
    path.write_text(json.dumps(nested["oauth"]))
    with pytest.raises(CredentialsError) as exc:
        binding(path)
    assert message(exc, tmp_path) == (
        "{dir}/oauth: a file, not a binding directory: a single-file (subPath) mount never sees a rotated Secret; "
        "mount the Secret as a directory (no subPath) and point credentials.binding at it"
    )


def test_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "cpi").mkdir()
    (tmp_path / "cpi" / "..data").symlink_to("..2026_12_01_10_00_00.1")  # dot-entries are not files of it
    with pytest.raises(CredentialsError) as exc:
        binding(tmp_path / "cpi")
    assert message(exc, tmp_path) == (
        "{dir}/cpi: empty binding directory: the ServiceBinding's Secret is not mounted there; check the volume "
        "mount and credentials.binding"
    )


def test_the_binding_root_instead_of_a_binding(tmp_path: Path, nested: dict[str, Any]) -> None:
    mount(tmp_path / "bindings" / "cpi", default_secret(nested))
    mount(tmp_path / "bindings" / "uaa", default_secret(nested))
    with pytest.raises(CredentialsError) as exc:
        read_key_source(CredentialsConfig(binding=tmp_path / "bindings"), where="credentials.prod", environ={})
    assert message(exc, tmp_path) == (
        "{dir}/bindings: holds directories (cpi, uaa) but no files: this looks like $SERVICE_BINDING_ROOT; point "
        "credentials.prod.binding at one binding in it (or use binding_name)"
    )


def test_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as exc:
        binding(tmp_path / "cpi")
    assert message(exc, tmp_path) == (
        "{dir}/cpi: binding directory not found: mount the ServiceBinding's Secret there, or fix credentials.binding"
    )


def test_a_link_to_nothing(tmp_path: Path, nested: dict[str, Any]) -> None:
    directory = mount(tmp_path / "cpi", default_secret(nested))
    (directory / "stale").symlink_to("..data/stale")
    with pytest.raises(CredentialsError) as exc:
        binding(directory)
    assert message(exc, directory) == (
        "{dir}/stale: a link to nothing (its target is missing): mount the ServiceBinding's Secret as a whole "
        "directory at {dir}"
    )


def test_a_key_file_that_is_not_json_is_left_to_parse_service_key(tmp_path: Path) -> None:
    directory = mount(tmp_path / "cpi", {"key.json": "clientid: x"})
    source = binding(directory)
    assert (source.text, source.source) == ("clientid: x", str(directory / "key.json"))


def test_service_key_names_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as exc:
        read_key_source(CredentialsConfig(service_key=tmp_path), environ={})
    assert message(exc, tmp_path) == (
        "{dir}: a directory, not a service key file: for a mounted binding, set binding instead"
    )


def test_read_binding_directly(tmp_path: Path, nested: dict[str, Any]) -> None:
    directory = mount(tmp_path / "it-rt" / "cpi", without(default_secret(nested), "type", "label", ".metadata"))
    assert read_binding(directory, default_label="it-rt").plan == "integration-flow"


def test_a_path_through_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CredentialsError) as exc:
        binding(tmp_path / "file" / "cpi")
    assert message(exc, tmp_path) == "{dir}/file/cpi: cannot read the binding directory (Not a directory)"


def test_entries_that_are_neither_files_nor_directories_are_skipped(tmp_path: Path, nested: dict[str, Any]) -> None:
    directory = mount(tmp_path / "cpi", default_secret(nested))
    os.mkfifo(directory / "pipe")  # never opened: reading a FIFO would block
    assert directory / "pipe" not in binding(directory).watched


def test_fingerprint_of_a_file_gone_is_none(tmp_path: Path, nested: dict[str, Any]) -> None:
    directory = mount(tmp_path / "cpi", default_secret(nested), kubelet=False)
    source = binding(directory)
    (directory / "plan").unlink()
    assert fingerprint(source) is None
    assert fingerprint(KeySource("{}", "$X", rotates=False)) == fingerprint(KeySource("{}", "$Y", rotates=False))


# --- binding_name -------------------------------------------------------------------------------------


def named(name: str, environ: Mapping[str, str], legacy: Path, purpose: Purpose | None = None) -> KeySource:
    return read_key_source(CredentialsConfig(binding_name=name), purpose=purpose, environ=environ, legacy_root=legacy)


def test_binding_name_in_service_binding_root(tmp_path: Path, nested: dict[str, Any]) -> None:
    mount(tmp_path / "bindings" / "cpi", secret_key_secret(nested))
    source = named("cpi", {"SERVICE_BINDING_ROOT": str(tmp_path / "bindings")}, tmp_path / "legacy")
    assert (json.loads(source.text), source.source) == (nested, str(tmp_path / "bindings" / "cpi"))


def test_binding_name_in_the_legacy_path(tmp_path: Path, flat: dict[str, Any], nested: dict[str, Any]) -> None:
    legacy = tmp_path / "sapcp"
    # each file one property, no type: the label is the service directory's name
    mount(legacy / "it-rt" / "cpi", {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()})
    mount(legacy / "xsuaa" / "cpi", default_secret(nested, service="xsuaa"))
    source = named("cpi", {"SERVICE_BINDING_ROOT": str(tmp_path / "bindings")}, legacy)  # not in the root
    assert (json.loads(source.text), source.source) == (flat, str(legacy / "it-rt" / "cpi"))  # it-rt first
    assert named("cpi", {}, legacy).source == str(legacy / "it-rt" / "cpi")


def test_binding_name_in_another_services_legacy_path(tmp_path: Path, flat: dict[str, Any]) -> None:
    legacy = tmp_path / "sapcp"
    mount(legacy / "xsuaa" / "uaa", {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()})
    with pytest.raises(CredentialsError) as exc:
        named("uaa", {}, legacy)
    assert message(exc, tmp_path) == (
        "{dir}/sapcp/xsuaa/uaa: a binding of service 'xsuaa', expected it-rt (SAP Process Integration Runtime): "
        "bind a service instance of offering it-rt"
    )


def test_binding_name_not_found(tmp_path: Path, nested: dict[str, Any]) -> None:
    mount(tmp_path / "bindings" / "other", default_secret(nested))
    (tmp_path / "bindings" / "xsuaa").mkdir()
    with pytest.raises(ConfigError) as exc:
        named("cpi", {"SERVICE_BINDING_ROOT": str(tmp_path / "bindings")}, tmp_path / "sapcp")
    assert message(exc, tmp_path) == (
        "credentials.binding_name: no binding 'cpi' in $SERVICE_BINDING_ROOT ({dir}/bindings) nor in "
        "{dir}/sapcp/*/ (bindings there: other, xsuaa): mount the ServiceBinding's Secret at "
        "$SERVICE_BINDING_ROOT/cpi, or fix the name"
    )
    with pytest.raises(ConfigError) as exc:
        named("cpi", {}, tmp_path / "sapcp")
    assert message(exc, tmp_path) == (
        "credentials.binding_name: no binding 'cpi' in {dir}/sapcp/*/ ($SERVICE_BINDING_ROOT is not set): mount the "
        "ServiceBinding's Secret at "
        "$SERVICE_BINDING_ROOT/cpi, or fix the name"
    )


@pytest.mark.parametrize("name", ["..", "a/b", "", "..data", ".hidden"])
def test_binding_name_is_one_directory_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        read_key_source(CredentialsConfig(binding_name=name), where="credentials.prod", environ={})
    assert str(exc.value) == (
        f"credentials.prod.binding_name: {name!r} is not a binding name: give the name of its directory"
    )


# --- nothing configured: $SERVICE_BINDING_ROOT --------------------------------------------------------


def detect(root: Path | None, purpose: Purpose | None = None) -> KeySource:
    environ = {"SERVICE_BINDING_ROOT": str(root)} if root else {}
    return read_key_source(CredentialsConfig(), purpose=purpose, environ=environ)


def test_detect_one_binding(tmp_path: Path, nested: dict[str, Any]) -> None:
    root = tmp_path / "bindings"
    mount(root / "cpi", default_secret(nested))
    mount(root / "uaa", default_secret({"clientid": "x"}, service="xsuaa", plan="application"))
    mount(root / "mpl", secret_root_key_secret(nested, plan="api"))
    (root / "not-a-binding").mkdir()
    mount(root / "two-files", {"a": "1", "b": "2"})
    mount(root / "one-text-file", {"a": "it-rt"})
    mount(root / "one-json-list", {"a": "[]"})
    mount(root / "one-key-file", {"key.json": json.dumps(nested)})  # no type: not a binding to detect
    (root / "a-file").write_text("{}")
    assert detect(root).source == str(root / "cpi")  # default plan: integration-flow
    assert detect(root, "send").source == str(root / "cpi")
    assert detect(root, "api").source == str(root / "mpl" / "root")  # a secretRootKey binding is found too


def test_detect_several_bindings(tmp_path: Path, nested: dict[str, Any]) -> None:
    root = tmp_path / "bindings"
    mount(root / "cpi-a", default_secret(nested))
    mount(root / "cpi-b", secret_key_secret(nested))
    with pytest.raises(ConfigError) as exc:
        detect(root)
    assert message(exc, tmp_path) == (
        "credentials.binding_name: several it-rt bindings of plan integration-flow in $SERVICE_BINDING_ROOT "
        "({dir}/bindings): cpi-a, cpi-b: set binding_name to the one to use"
    )


def test_detect_no_binding(tmp_path: Path, nested: dict[str, Any]) -> None:
    root = tmp_path / "bindings"
    mount(root / "uaa", default_secret({"clientid": "x"}, service="xsuaa", plan="application"))
    mount(root / "mpl", default_secret(nested, plan="api"))
    for where in (root, tmp_path / "missing", None):
        with pytest.raises(ConfigError) as exc:
            detect(where)
        assert str(exc.value) == NO_SOURCE


# --- VCAP_SERVICES ------------------------------------------------------------------------------------


def vcap(credentials: Mapping[str, Any], *, name: str = "cpi-sender", plan: str = "integration-flow") -> str:
    """`VCAP_SERVICES` as Cloud Foundry writes it, with an xsuaa binding beside ours."""
    ours: dict[str, Any] = {
        "label": "it-rt",
        "plan": plan,
        "name": name,
        "instance_name": name,
        "instance_guid": "6f1c",
        "binding_guid": "9a8b",
        "binding_name": None,
        "tags": [],
        "credentials": credentials,
        "syslog_drain_url": None,
        "volume_mounts": [],
    }
    uaa = {"label": "xsuaa", "plan": "application", "name": "uaa", "credentials": {"clientid": "x"}}
    return json.dumps({"xsuaa": [uaa], "it-rt": [ours]})


def from_vcap(name: str, environ: Mapping[str, str], purpose: Purpose | None = None) -> KeySource:
    return read_key_source(CredentialsConfig(vcap_service=name), purpose=purpose, environ=environ)


def test_vcap_services_variable(nested: dict[str, Any], flat: dict[str, Any]) -> None:
    source = from_vcap("cpi-sender", {"VCAP_SERVICES": vcap(nested)}, "send")
    assert json.loads(source.text) == nested
    assert (source.source, source.plan, source.rotates, source.watched, source.layout) == (
        "$VCAP_SERVICES it-rt/cpi-sender",
        "integration-flow",
        False,
        (),
        "VCAP_SERVICES",
    )
    assert json.loads(from_vcap("cpi-sender", {"VCAP_SERVICES": vcap(flat)}).text) == flat


def test_vcap_services_file(tmp_path: Path, nested: dict[str, Any], flat: dict[str, Any]) -> None:
    path = tmp_path / "vcap.json"
    path.write_text(vcap(nested))
    environ = {"VCAP_SERVICES_FILE_PATH": str(path)}  # file-based-vcap-services: VCAP_SERVICES is not set
    source = from_vcap("cpi-sender", environ)
    assert json.loads(source.text) == nested
    assert (source.source, source.rotates, source.watched) == (f"{path} it-rt/cpi-sender", True, (path,))
    before = fingerprint(source)
    path.write_text(vcap(flat))
    assert fingerprint(source) != before
    assert json.loads(from_vcap("cpi-sender", environ).text) == flat


def test_vcap_services_file_wins_over_the_variable(tmp_path: Path, nested: dict[str, Any]) -> None:
    path = tmp_path / "vcap.json"
    path.write_text(vcap(nested))
    environ = {"VCAP_SERVICES_FILE_PATH": str(path), "VCAP_SERVICES": "not json"}
    assert json.loads(from_vcap("cpi-sender", environ).text) == nested


def test_vcap_oauth_encoded_twice_is_decoded(nested: dict[str, Any]) -> None:
    text = vcap({"oauth": json.dumps(nested["oauth"])})
    assert json.loads(from_vcap("cpi-sender", {"VCAP_SERVICES": text}).text) == nested


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param(
            {},
            "$VCAP_SERVICES: not set (nor VCAP_SERVICES_FILE_PATH): credentials.vcap_service reads Cloud Foundry's "
            "bound services; bind the it-rt instance to the app, or use another source of credentials",
            id="unset",
        ),
        pytest.param(
            {"VCAP_SERVICES": "{'it-rt': []}"},
            "$VCAP_SERVICES: not valid JSON at line 1 column 2 (Expecting property name enclosed in double quotes): "
            "Cloud Foundry writes it: check what sets or overrides it",
            id="not-json",
        ),
        pytest.param(
            {"VCAP_SERVICES": "[]"}, "$VCAP_SERVICES: holds JSON list, not an object of services by label", id="list"
        ),
        pytest.param(
            {"VCAP_SERVICES": json.dumps({"xsuaa": [{"name": "uaa", "label": "xsuaa"}], "destination": []})},
            "$VCAP_SERVICES: no it-rt service is bound (services: destination, xsuaa): bind the Process Integration "
            "Runtime instance 'cpi-sender' to the app",
            id="no-it-rt",
        ),
        pytest.param(
            {"VCAP_SERVICES": vcap({}, name="cpi-a")},
            "$VCAP_SERVICES: no it-rt instance named 'cpi-sender' (there are: cpi-a): set credentials.vcap_service "
            "to one of them",
            id="no-such-instance",
        ),
        pytest.param(
            {"VCAP_SERVICES": vcap({"oauth": {"clientid": "x", "tokenurl": TOKEN_URL}}, plan="api")},
            "$VCAP_SERVICES it-rt/cpi-sender: field 'plan': plan 'api', but sending to iFlows needs plan "
            "integration-flow: bind an it-rt instance of plan integration-flow",
            id="wrong-plan",
        ),
        pytest.param(
            {"VCAP_SERVICES": json.dumps({"it-rt": [{"name": "cpi-sender", "plan": "integration-flow"}]})},
            "$VCAP_SERVICES it-rt/cpi-sender: field 'credentials' is missing or not an object: unbind and bind the "
            "service again",
            id="no-credentials",
        ),
        pytest.param(
            {"VCAP_SERVICES": vcap({"oauth": {"clientid": "x"}})},
            "$VCAP_SERVICES it-rt/cpi-sender: field 'credentials.oauth.tokenurl' is missing: unbind and bind the "
            "service instance again",
            id="field-missing",
        ),
        pytest.param(
            {"VCAP_SERVICES": vcap({"oauth": "{clientid"})},
            "$VCAP_SERVICES it-rt/cpi-sender: field 'credentials.oauth': not valid JSON at line 1 column 2 "
            "(Expecting property name enclosed in double quotes): it must hold the service key's fields as JSON; "
            "recreate the ServiceBinding",
            id="oauth-not-json",
        ),
    ],
)
def test_vcap_mistakes(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(CredentialsError) as exc:
        from_vcap("cpi-sender", environ, "send")
    assert str(exc.value) == expected


def test_vcap_instance_of_another_service() -> None:
    with pytest.raises(CredentialsError) as exc:
        from_vcap("uaa", {"VCAP_SERVICES": vcap({})})
    assert str(exc.value) == (
        "$VCAP_SERVICES xsuaa/uaa: a binding of service 'xsuaa', expected it-rt (SAP Process Integration Runtime): "
        "set credentials.vcap_service to an it-rt instance"
    )


def test_vcap_file_mistakes(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as exc:
        from_vcap("cpi-sender", {"VCAP_SERVICES_FILE_PATH": str(tmp_path / "nope.json")})
    assert message(exc, tmp_path) == "{dir}/nope.json: VCAP_SERVICES file not found: check VCAP_SERVICES_FILE_PATH"
    with pytest.raises(CredentialsError) as exc:
        from_vcap("cpi-sender", {"VCAP_SERVICES_FILE_PATH": str(tmp_path)})
    assert message(exc, tmp_path) == "{dir}: a directory, not a VCAP_SERVICES file: check VCAP_SERVICES_FILE_PATH"
    (tmp_path / "big.json").write_text(" " * (MAX_VCAP_BYTES + 1))
    with pytest.raises(CredentialsError) as exc:
        from_vcap("cpi-sender", {"VCAP_SERVICES_FILE_PATH": str(tmp_path / "big.json")})
    assert message(exc, tmp_path) == (
        "{dir}/big.json: larger than 4096 KiB, too large for a VCAP_SERVICES: check VCAP_SERVICES_FILE_PATH"
    )


def test_vcap_variable_too_large() -> None:
    with pytest.raises(CredentialsError) as exc:
        from_vcap("cpi-sender", {"VCAP_SERVICES": " " * (MAX_VCAP_BYTES + 1)})
    assert str(exc.value) == "$VCAP_SERVICES: larger than 4096 KiB, too large to be read"


def test_vcap_api_plan_for_the_api(nested: dict[str, Any]) -> None:
    assert from_vcap("cpi-sender", {"VCAP_SERVICES": vcap(nested, plan="api")}, "api").plan == "api"
