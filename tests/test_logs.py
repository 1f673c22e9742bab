"""Logging: the redaction processor scrubs every shape of secret before a line is written."""

from __future__ import annotations

import io
import json
from typing import Any

from senderd.emulator.pki import Pki
from senderd.logs import REDACTED, configure_logging, get_logger, register_secret


def test_redaction_processor_scrubs_every_shape(pki: Pki) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    register_secret("hunter2-client-secret")
    jwt_like = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4eXoxMjM0NSJ9.c2lnbmF0dXJlLXZhbHVl"
    get_logger("test").info(
        "event",
        access_token="abc",
        detail=f"got {jwt_like} back",
        header="Bearer abc.def.ghi",
        nested={"client_secret": "x", "note": "uses hunter2-client-secret"},
        pem=pki.issue_client("x", key_type="ec").key_pem_pkcs8(),
        count=3,
    )
    line = json.loads(stream.getvalue())
    assert line["access_token"] == REDACTED
    assert jwt_like not in stream.getvalue()
    assert line["header"] == f"Bearer {REDACTED}"
    assert line["nested"] == {"client_secret": REDACTED, "note": f"uses {REDACTED}"}
    assert "PRIVATE KEY" not in stream.getvalue()
    assert line["count"] == 3


def test_a_line_reads_the_same_with_orjson_and_with_the_stdlib_encoder() -> None:
    import orjson  # the dev extra installs it: this test checks that the optional extra changes nothing

    from senderd import logs

    event: dict[Any, Any] = {"flow": "a", "status": 200, "latency_ms": 3.2, "error": None, "ok": True,
                             "note": 'é "q"\n', "codes": ["200"], "set": {1}, "big": 2**70, 3: "three"}  # fmt: skip
    line = logs._render_json(None, "info", dict(event))
    assert logs.orjson is orjson  # type: ignore[attr-defined]
    assert line == logs._ENCODER.encode(event)  # the big int and the int key fall back to the stdlib
    del event["big"], event[3]
    assert logs._render_json(None, "info", dict(event)) == logs._ENCODER.encode(event)  # \u escapes, as before
    event["note"] = 'e "q"\n'
    fast = logs._render_json(None, "info", dict(event))
    assert fast == logs._ENCODER.encode(event) and json.loads(fast)["set"] == "{1}"
