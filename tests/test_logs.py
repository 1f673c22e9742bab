"""Logging: the redaction processor scrubs every shape of secret before a line is written."""

from __future__ import annotations

import io
import json

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
