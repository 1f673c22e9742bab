"""Config validation: each mistake is one error naming the file and the field; paths resolve against the
config's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from senderd.config import load_config
from senderd.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[credentials]\nservice_key = 'a.json'\nservice_key_env = 'X'\n",
            "credentials: give one source of credentials, not service_key and service_key_env",
        ),
        ("[token]\nrefresh_left = 1.5\n", "token.refresh_left: Input should be less than 1"),
        ("[tokens]\n", "tokens: unknown key: remove it or check its spelling"),
        ("[token]\nbackoff_max = true\n", "token.backoff_max: a duration is a string such as 500ms, 30s, 5m, 1h"),
        (
            "[[flows]]\nname = 'a'\npath = '/http/a'\nevery = '1s'\ncron = '* * * * *'\n",
            "flows[0]: give every or cron, not both",
        ),
        (
            "[[flows]]\nname = 'a'\npath = '/http/a'\ncron = '61 * * * *'\n",
            "flows[0]: invalid cron expression '61 * * * *': bad minute field '61' (allowed: 0-59); "
            "use 5 fields, e.g. */5 * * * *",
        ),
        (
            "[[flows]]\nname = 'a'\npath = '/http/a'\ncron = '0 * * * *'\ntimezone = 'Mars/Base'\n",
            "flows[0]: unknown time zone 'Mars/Base': use an IANA name such as Europe/Berlin",
        ),
        (
            "[[flows]]\nname = 'a'\npath = 'http/a'\n",
            "flows[0].path: must start with / (relative to runtime.url) or be an https:// URL, found 'http/a'",
        ),
        (
            "[[flows]]\nname = 'a'\npath = '/a'\n[[flows]]\nname = 'a'\npath = '/b'\n",
            "flow name 'a' is used twice: names must be unique",
        ),
        (
            "[[flows]]\nname = 'a'\npath = '/a'\nevry = '1s'\n",
            "flows[0].evry: unknown key: remove it or check its spelling",
        ),
        ("[defaults]\nretries = -1\n", "defaults.retries: Input should be greater than or equal to 0"),
        ("[token]\nbackoff_initial = '0s'\n", "token.backoff_initial: must be at least 1ms"),
        ("[[flows]]\nname = 'a'\npath = '/a'\ntimeout = 0\n", "flows[0].timeout: must be at least 1ms"),
        (
            "[[flows]]\nname = 'a'\npath = '/a'\nevery = '0.5ms'\n",
            "flows[0]: invalid interval 0.0005: use a duration of at least 1ms, e.g. 30s or 5m",
        ),
        (
            "[[flows]]\nname = 'a'\npath = '/a'\nheaders = { X = \"a\\nb\" }\n",
            "flows[0].headers: the value of 'X' contains a control character (such as a line break): remove it",
        ),
        (
            "[[flows]]\nname = 'a'\npath = '/a'\nbody_file = '/no/such/file'\n",
            "flows[0]: body_file '/no/such/file' is missing or unreadable (No such file or directory): check the path",
        ),
        (
            "[relay]\nstore = 'postgresql'\n",
            'relay: dsn_env: store = "postgresql" needs the environment variable holding the DSN, '
            'e.g. dsn_env = "SENDERD_POSTGRES_DSN"',
        ),
        ("[relay]\ndsn_env = 'PG'\n", 'relay: dsn_env: only with store = "postgresql"'),
        (
            "[relay]\nstore = 'mysql'\n",
            "relay.store: Input should be 'sqlite' or 'postgresql'",
        ),
        (
            "[cluster]\nshard = '3/3'\n",
            'cluster: shard: use "I/N" with 0 <= I < N, e.g. "0/3", found \'3/3\'',
        ),
        (
            "[[flows]]\nname = 'a'\npath = '/a'\nexpect_body = '('\n",
            "flows[0].expect_body: not a valid regular expression (missing ), unterminated subpattern at position 0)",
        ),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


def test_config_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[credentials]\nservice_key = 'keys/k.json'\n[token]\nbackoff_max = '2m'\n")
    config = load_config(path)
    assert config.credentials_set().service_key == tmp_path / "keys" / "k.json"
    assert config.token.backoff_max == 120.0


def test_what_sap_advises_against_is_a_warning(tmp_path: Path) -> None:
    big = tmp_path / "big.xml"
    big.write_bytes(b"x" * (41 * 1024 * 1024))
    path = tmp_path / "c.toml"
    path.write_text(
        "[credentials.send]\nservice_key = 'k.json'\n[credentials.mpl]\nservice_key = 'api.json'\n"
        "[relay]\nmax_message_bytes = 52428800\n"
        "[[flows]]\nname = 'big'\npath = '/http/Big'\nmethod = 'POST'\nbody_file = 'big.xml'\n"
        "[[flows]]\nname = 'q'\npath = '/http/Q'\nquery = { note = 'two words', ok = 'one' }\n"
        "[[flows]]\nname = 'fixed'\npath = '/http/F'\nconfirm = 'mpl'\nconfirm_credentials = 'mpl'\n"
        "application_id = 'always-the-same'\n"
        "[[flows]]\nname = 'none'\npath = '/http/N'\nconfirm = 'mpl'\nconfirm_credentials = 'mpl'\n"
        "application_id = false\n"
        "[[flows]]\nname = 'fine'\npath = '/http/OK'\nconfirm = 'mpl'\nconfirm_credentials = 'mpl'\n"
        "headers = { Content-Type = 'text/xml; charset=utf-8' }\n"
    )
    config = load_config(path)
    assert config.api_sets == {"mpl"}
    assert config.send_sets == ["send"]
    assert config.credentials_default == "send"  # the MPL API set sends nothing: no need to name "send"
    assert config.flow("fine").message_ids == "auto"  # a confirmed GET gets an id to be found by
    assert config.flow("q").message_ids is None
    assert [line.removeprefix(f"{path}: ") for line in config.warnings()] == [
        "flows.big: the body is 41 MB, more than the 40 MB SAP recommends for a message",
        "flows.q.query: whitespace in the value of note: Cloud Integration turns query parameters into headers, "
        "whose values should have none",
        'flows.fixed: confirm = "mpl" with a fixed application_id: every message has that id, so a message without '
        "an MPL id in its answer may be confirmed by an earlier one's log",
        'flows.none: confirm = "mpl" with application_id = false: only answers that carry an MPL id can be '
        "confirmed (the MPL API finds other messages by their SAP_ApplicationID)",
        "relay.max_message_bytes allows 50 MB: SAP recommends messages of at most 40 MB",
    ]
