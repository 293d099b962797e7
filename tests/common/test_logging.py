"""JSON-lines logging: one object per line, extra fields kept, secrets kept out."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator

import pytest
from nacl.signing import SigningKey

from services.common import logging as gslog
from services.common.errors import InvalidInput


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[logging.Logger]:
    """JSON logging to the captured stderr; the root logger and registered secrets restored afterwards."""
    root = logging.getLogger()
    handlers, level, registered = list(root.handlers), root.level, set(gslog._registered)
    gslog.setup_logging("testsvc", "DEBUG")
    yield logging.getLogger("tests.logging")
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    gslog._registered.clear()
    gslog._registered.update(registered)


def records(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines()]


def test_line_shape_and_extra_fields(logs: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.info("stored %s of %d", "file", 3, extra={"job": "abc", "size": 12, "ok": True, "tags": ["a", "b"]})
    (rec,) = records(capsys)
    assert rec["level"] == "INFO"
    assert rec["service"] == "testsvc"
    assert rec["msg"] == "stored file of 3"
    assert rec["logger"] == "tests.logging"
    assert str(rec["ts"]).endswith("Z")
    assert (rec["job"], rec["size"], rec["ok"], rec["tags"]) == ("abc", 12, True, ["a", "b"])


def test_levels_and_one_line_tracebacks(logs: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.debug("d")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logs.exception("failed")
    debug, err = records(capsys)  # two lines: the traceback stays inside its JSON string
    assert debug["level"] == "DEBUG"
    assert err["level"] == "ERROR"
    assert "RuntimeError: boom" in str(err["exc"])


def test_extra_cannot_override_base_fields(logs: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.info("hello", extra={"service": "spoofed", "level": "x"})
    (rec,) = records(capsys)
    assert rec["service"] == "testsvc"
    assert rec["extra_service"] == "spoofed"
    assert rec["level"] == "INFO"


def test_secret_fields_are_redacted(logs: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    logs.info(
        "login",
        extra={
            "secret": "hunter2hunter2",
            "token": "anything",
            "signature": "sig",
            "redis_password": "pw",
            "settings": {"master_key": "k", "port": 1},
            "token_id": "0123abcd",
            "key_id": "feedbeef",
        },
    )
    (rec,) = records(capsys)
    for name in ("secret", "token", "signature", "redis_password"):
        assert rec[name] == gslog.REDACTED
    assert rec["settings"] == {"master_key": gslog.REDACTED, "port": 1}
    assert (rec["token_id"], rec["key_id"]) == ("0123abcd", "feedbeef")  # ids are not secrets


def test_key_material_never_printed(logs: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    key = SigningKey.generate()
    seed = bytes(key)
    logs.info("key %s raw %r", key, seed, extra={"k": key, "blob": seed})
    out = capsys.readouterr().err
    (rec,) = [json.loads(line) for line in out.splitlines()]
    assert seed.hex() not in out
    assert repr(seed) not in out and str(seed) not in out
    assert rec["msg"] == "key <SigningKey> raw <32 bytes>"
    assert (rec["k"], rec["blob"]) == ("<SigningKey>", "<32 bytes>")


def test_tokens_headers_urls_and_registered_secrets_are_masked(
    logs: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    gslog.register_secret("s3cr3t-shared-value")
    logs.warning(
        "got authorization: Bearer gs1.eyJzdWIiOiJ4In0.c2lnbmF0dXJl from redis://:p4ss@db:6379/0"
        " with s3cr3t-shared-value",
        extra={"url": "zdb://:nspw@host:9900/ns", "note": "token gs1.aaaa.bbbb"},
    )
    try:
        raise ValueError("bad secret s3cr3t-shared-value")
    except ValueError:
        logs.exception("oops")
    out = capsys.readouterr().err
    for leaked in ("eyJzdWIiOiJ4In0", "c2lnbmF0dXJl", "p4ss", "nspw", "s3cr3t-shared-value", "aaaa.bbbb"):
        assert leaked not in out
    first = json.loads(out.splitlines()[0])
    assert "redis://:<redacted>@db:6379/0" in str(first["msg"])
    assert first["url"] == "zdb://:<redacted>@host:9900/ns"


def test_bad_level_is_refused() -> None:
    with pytest.raises(InvalidInput, match="log level"):
        gslog.setup_logging("x", "LOUD")


def test_setup_twice_does_not_duplicate_lines(logs: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    gslog.setup_logging("testsvc", "INFO")
    logs.info("once")
    logs.debug("hidden")
    assert [r["msg"] for r in records(capsys)] == ["once"]


def test_warnings_are_logged(logs: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    (rec,) = records(capsys)
    assert "careful" in str(rec["msg"])
