"""Bad configs and service keys, as a table: each is one line on stderr and exit code 2, never a traceback.

Every file directly in `tests/data/bad/` except `expected.toml` is a case, and `expected.toml` maps its
name to the exact message (`{dir}` stands for that folder); its `[xfail]` table names the cases that
document a known bug, with the reason. `*.toml` cases run `senderd check -c FILE`, `*.json` cases run
`senderd check --service-key FILE`, both in-process. `support/` holds what the cases point at.

The certificates and keys in those files were made once with `python -m tests.test_bad_input` (see
`make_fixtures`): valid certificates run 2020-2120, the expired one ended in 2001, the not-yet-valid one
starts in 2090. The other case files are written by hand.
"""

from __future__ import annotations

import json
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from senderd.cli import main
from senderd.emulator.pki import IssuedCert, Pki, create_pki

DATA = Path(__file__).parent / "data" / "bad"
INDEX = DATA / "expected.toml"
UNSET_ENV = (
    "SENDERD_CONFIG",
    "SENDERD_TEST_BAD_INPUT_PASSPHRASE",
    "SERVICE_BINDING_ROOT",
    "VCAP_SERVICES",
    "VCAP_SERVICES_FILE_PATH",
)
"""Environment variables the cases rely on being unset."""


def _index() -> tuple[dict[str, str], dict[str, str]]:
    data = tomllib.loads(INDEX.read_text(encoding="utf-8"))
    xfail: dict[str, str] = data.pop("xfail", {})
    return data, xfail


def _case_files() -> list[str]:
    return sorted(p.name for p in DATA.iterdir() if p.is_file() and p != INDEX)


def _cases() -> list[Any]:
    messages, xfail = _index()
    return [
        pytest.param(
            name, message, id=name, marks=[pytest.mark.xfail(strict=True, reason=xfail[name])] if name in xfail else []
        )
        for name, message in sorted(messages.items())
    ]


def test_index_names_every_case_file() -> None:
    messages, xfail = _index()
    files = _case_files()
    assert sorted(messages) == files, "expected.toml and the case files differ"
    assert set(xfail) <= set(messages), "an [xfail] entry names no case"
    assert all(name.endswith((".toml", ".json")) for name in files)
    assert all(isinstance(m, str) and "\n" not in m for m in messages.values())
    assert len(files) >= 30


@pytest.mark.parametrize(("name", "message"), _cases())
def test_bad_input_is_one_line_and_exit_2(
    name: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in UNSET_ENV:
        monkeypatch.delenv(variable, raising=False)
    folder = DATA.resolve()
    path = folder / name
    argv = ["check", "-c", str(path)] if name.endswith(".toml") else ["check", "--service-key", str(path)]
    try:
        code = main(argv)
    except Exception as exc:  # what a user would see as a traceback
        pytest.fail(f"senderd check raised {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert err == f"senderd: error: {message.replace('{dir}', str(folder))}\n"
    assert code == 2
    assert out == ""


# --- how the key and certificate fixtures were made ---------------------------------------------------

CLIENT_ID = "sb-bad-input!b1|it-rt-test!b2"
TOKEN_URL = "https://test.authentication.cert.eu10.hana.ondemand.com"
RUNTIME_URL = "https://test.it-cpi018-rt.cfapps.eu10.hana.ondemand.com"
PASSPHRASE = b"correct horse battery staple"


def _service_key(**fields: str) -> str:
    """A service key in the cockpit's nested layout, as the cockpit writes it (PEM with `\\n` escapes)."""
    oauth = {"clientid": CLIENT_ID, **fields, "tokenurl": TOKEN_URL, "url": RUNTIME_URL}
    return json.dumps({"oauth": oauth}, indent=2) + "\n"


def _client(pki: Pki, start: datetime, end: datetime) -> IssuedCert:
    return pki.issue_client("bad-input", key_type="ec", not_before=start, not_after=end)


def make_fixtures(folder: Path) -> None:
    """Write the fixture files that hold certificates or keys into `folder` (tests/data/bad)."""
    pki = create_pki()
    valid = _client(pki, datetime(2020, 1, 1, tzinfo=UTC), datetime(2120, 1, 1, tzinfo=UTC))
    other = _client(pki, datetime(2020, 1, 1, tzinfo=UTC), datetime(2120, 1, 1, tzinfo=UTC))
    expired = _client(pki, datetime(2000, 1, 1, tzinfo=UTC), datetime(2001, 1, 1, tzinfo=UTC))
    future = _client(pki, datetime(2090, 1, 1, tzinfo=UTC), datetime(2190, 1, 1, tzinfo=UTC))
    ed_key = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    files = {
        "support/external-key.json": _service_key(certificate=valid.cert_pem()),
        "support/client.key": valid.key_pem_pkcs8(),
        "support/client-encrypted.key": valid.key_pem_pkcs8(PASSPHRASE),
        "key-certificate-key-mismatch.json": _service_key(certificate=valid.cert_pem(), key=other.key_pem_pkcs1()),
        "key-certificate-expired.json": _service_key(certificate=expired.cert_pem(), key=expired.key_pem_pkcs1()),
        "key-certificate-not-yet-valid.json": _service_key(certificate=future.cert_pem(), key=future.key_pem_pkcs1()),
        "key-external-without-key-file.json": _service_key(certificate=valid.cert_pem()),
        "key-private-key-encrypted.json": _service_key(
            certificate=valid.cert_pem(), key=valid.key_pem_pkcs8(PASSPHRASE)
        ),
        "key-private-key-ed25519.json": _service_key(certificate=valid.cert_pem(), key=ed_key),
        "key-private-key-garbage.json": _service_key(
            certificate=valid.cert_pem(),
            key="-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END RSA PRIVATE KEY-----\n",
        ),
        "key-private-key-lone-surrogate.json": _service_key(certificate=valid.cert_pem(), key="\ud800"),
    }
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    make_fixtures(DATA)
