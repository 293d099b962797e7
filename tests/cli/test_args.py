"""The gridstor CLI without a gateway: argument parsing, addresses, files it keeps, messages and exit codes."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.cli import main
from services.cli.app import build_parser
from services.cli.connect import (
    load_signing_key,
    load_token,
    parse_hostport,
    resolve_endpoints,
    token_expiry,
    token_path,
    write_private,
)
from services.cli.failures import CliFailure, describe_rpc_error
from services.cli.progress import Progress, human
from services.common.config import DEFAULT_PORTS
from services.common.tokens import issue
from tests.helpers import free_port

GOOD_ID = "ab" * 24 + "0000002a"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- parsing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["put"],
        ["get"],
        ["get", GOOD_ID, "--offset", "-1"],
        ["get", GOOD_ID, "--length", "ten"],
        ["status", "abc", "--timeout", "0"],
        ["--gateway", "not-an-address", "stat", GOOD_ID],
        ["--gateway", "http://host:1", "stat", GOOD_ID],
        ["--gateway", "host:99999", "stat", GOOD_ID],
        ["login", "--key", "k", "--secret-file", "s"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: gridstor" in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("keygen", "login", "put", "status", "get", "exists", "stat"):
        assert command in text
    assert "exit codes" in text


def test_global_options_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--json", "--gateway", "h:1", "put", "f", "--wait"])
    after = parser.parse_args(["put", "f", "--wait", "--json", "--gateway", "h:1"])
    for ns in (before, after):
        assert ns.json is True and ns.gateway == "h:1" and ns.wait is True and ns.file == "f"
    plain = parser.parse_args(["stat", GOOD_ID])
    assert plain.json is False and plain.gateway is None and plain.config is None and plain.token is None


def test_get_defaults() -> None:
    ns = build_parser().parse_args(["get", GOOD_ID])
    assert (ns.output, ns.offset, ns.length) == (None, 0, 0)
    ns = build_parser().parse_args(["get", GOOD_ID, "-o", "-", "--offset", "5", "--length", "7"])
    assert (ns.output, ns.offset, ns.length) == ("-", 5, 7)


# -- addresses ------------------------------------------------------------------------------------------


def test_default_addresses_are_the_local_default_config() -> None:
    ep = resolve_endpoints(None, None, env={})
    assert dict(ep.addresses) == {s: f"127.0.0.1:{p}" for s, p in DEFAULT_PORTS.items()}


def test_gateway_puts_every_service_behind_one_address() -> None:
    ep = resolve_endpoints("edge.example:8080", None, env={"GRIDSTOR_GATEWAY": "other:1"})
    assert set(ep.addresses.values()) == {"edge.example:8080"}
    assert resolve_endpoints(None, None, env={"GRIDSTOR_GATEWAY": "[::1]:9000"}).of("meta") == "[::1]:9000"


def test_config_gives_host_and_ports(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text("listen_host: 0.0.0.0\nports: {meta: 17003, ingest: 17002}\n")
    ep = resolve_endpoints(None, str(cfg), env={})
    assert ep.of("meta") == "127.0.0.1:17003"  # a wildcard listener is reached on loopback
    assert ep.of("ingest") == "127.0.0.1:17002"
    assert ep.of("auth") == f"127.0.0.1:{DEFAULT_PORTS['auth']}"
    assert resolve_endpoints(None, None, env={"GRIDSTOR_CONFIG": str(cfg)}).of("meta") == "127.0.0.1:17003"
    # A flag beats the environment.
    assert resolve_endpoints(None, str(cfg), env={"GRIDSTOR_GATEWAY": "x:1"}).of("meta") == "127.0.0.1:17003"


def test_bad_config_or_env_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: sideways\n")
    with pytest.raises(CliFailure) as info:
        resolve_endpoints(None, str(bad), env={})
    assert info.value.code == 2 and "mode" in str(info.value)
    with pytest.raises(CliFailure) as info:
        resolve_endpoints(None, None, env={"GRIDSTOR_GATEWAY": "nope"})
    assert info.value.code == 2 and "GRIDSTOR_GATEWAY" in str(info.value)


def test_bad_config_flag_exits_2(tmp_path: Path) -> None:
    code, out, err = run("--config", str(tmp_path / "missing.yaml"), "stat", GOOD_ID)
    assert code == 2 and out == ""
    assert err.startswith("gridstor: config: cannot read") and err.count("\n") == 1


@pytest.mark.parametrize("text", ["127.0.0.1:7101", "localhost:1", "[::1]:443", "grid.example.org:65535"])
def test_parse_hostport_accepts(text: str) -> None:
    assert parse_hostport(text) == text


# -- failures and messages ------------------------------------------------------------------------------


def test_malformed_id_fails_before_any_call() -> None:
    port = free_port()  # nothing listens: any call would be "cannot reach"
    for command in ("get", "exists", "stat"):
        code, out, err = run("--gateway", f"127.0.0.1:{port}", command, "not-an-id")
        assert code == 1 and out == ""
        assert err.startswith("gridstor: invalid file id 'not-an-id': file id must start with 56 hex")
        assert err.count("\n") == 1


def test_unreachable_gateway_is_one_clear_line() -> None:
    port = free_port()
    code, out, err = run("--gateway", f"127.0.0.1:{port}", "stat", GOOD_ID)
    assert code == 1 and out == ""
    assert err == (
        f"gridstor: cannot reach the meta service at 127.0.0.1:{port}: is the gateway running? (start it with"
        " `make up`; choose the address with --gateway HOST:PORT or --config FILE)\n"
    )
    code, _, err = run("--gateway", f"127.0.0.1:{port}", "status", "0" * 32)
    assert code == 1 and "cannot reach the ingest service" in err


def test_put_of_a_missing_file(tmp_path: Path) -> None:
    code, out, err = run("put", str(tmp_path / "nope.txt"))
    assert (code, out) == (1, "")
    assert err == f"gridstor: cannot read {tmp_path / 'nope.txt'}: No such file or directory\n"
    code, _, err = run("put", str(tmp_path))
    assert code == 1 and "is a directory" in err


def test_get_refuses_to_write_to_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    assert main(["get", GOOD_ID], stdout=Tty(), stderr=err) == 2
    assert "use -o FILE" in err.getvalue()


def test_get_into_a_missing_folder(tmp_path: Path) -> None:
    code, _, err = run("get", GOOD_ID, "-o", str(tmp_path / "no" / "such" / "file"))
    assert code == 1 and "does not exist" in err


class FakeRpcError(grpc.RpcError, grpc.Call):
    """Only what describe_rpc_error reads: a code, details and trailers."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "no file with id x", "not found: no file with id x"),
        (grpc.StatusCode.INVALID_ARGUMENT, "offset must not be negative", "invalid request: offset must not be"),
        (grpc.StatusCode.OUT_OF_RANGE, "offset 9 is beyond", "out of range: offset 9 is beyond"),
        (grpc.StatusCode.UNAUTHENTICATED, "token has expired", "not authenticated: token has expired (run `gridstor"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit", "too large: over the limit"),
        (grpc.StatusCode.UNAVAILABLE, "chunk 3: 15 of 16 shards", "unavailable: chunk 3"),
        (grpc.StatusCode.DATA_LOSS, "hash mismatch", "data integrity error: hash mismatch"),
        (grpc.StatusCode.INTERNAL, "", "gateway error: INTERNAL"),
    ],
)
def test_status_codes_read_as_words(code: grpc.StatusCode, details: str, expected: str) -> None:
    assert describe_rpc_error(FakeRpcError(code, details), "meta", "h:1").startswith(expected)


@pytest.mark.parametrize(
    ("details", "trailers", "expected"),
    [
        ("upload is over the limit of 5 bytes", (("gridstor-error", "LimitExceeded"),), "too large: upload is"),
        (
            "the gateway's spool disk is full; try again later",
            (("gridstor-error", "OutOfSpace"),),
            "gateway out of space: the gateway's spool disk is full; try again later",
        ),
        (
            "all 16 download slots of this meta process stayed taken for 30 s; try again in 2 s",
            (("gridstor-error", "Busy"), ("retry-after", "2")),
            "gateway busy: all 16 download slots",
        ),
        ("too many uploads", (("gridstor-error", "RateLimited"), ("retry-after", "3")), "over a limit: too many"),
        ("no such class", (("gridstor-error", "NoSuchThing"),), "too large: no such class"),
    ],
)
def test_resource_exhausted_reads_as_its_cause(
    details: str, trailers: tuple[tuple[str, str], ...], expected: str
) -> None:
    """The server names the error's class in a trailer: a full spool disk is not a file too large."""
    err = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details, trailers)
    assert describe_rpc_error(err, "ingest", "h:1").startswith(expected)


def test_an_upload_over_max_upload_reads_as_too_large() -> None:
    """TooLarge is INVALID_ARGUMENT (never worth retrying); its trailer still gives the words."""
    err = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "the upload is over the upload limit of 5 bytes",
        (("gridstor-error", "TooLarge"),),
    )
    assert describe_rpc_error(err, "ingest", "h:1") == "too large: the upload is over the upload limit of 5 bytes"


def test_unexpected_errors_have_no_traceback_unless_debug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "tok"
    token_file.mkdir()  # reading it fails with an OSError the CLI does not expect here
    monkeypatch.setenv("GRIDSTOR_TOKEN_FILE", str(token_file))
    code, _, err = run("--gateway", f"127.0.0.1:{free_port()}", "put", os.devnull)
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    monkeypatch.setenv("GRIDSTOR_DEBUG", "1")
    code, _, err = run("--gateway", f"127.0.0.1:{free_port()}", "put", os.devnull)
    assert code == 1 and "Traceback" in err


# -- files in the config dir ----------------------------------------------------------------------------


def test_token_file_location_and_mode(tmp_path: Path, private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert token_path() == private_home / ".config" / "gridstor" / "token"
    monkeypatch.setenv("GRIDSTOR_TOKEN_FILE", str(tmp_path / "t"))
    assert token_path() == tmp_path / "t"
    write_private(token_path(), "gs1.abc.def\n")
    assert stat.S_IMODE(os.stat(tmp_path / "t").st_mode) == 0o600
    assert load_token(token_path()) == "gs1.abc.def"
    assert load_token(tmp_path / "absent") == ""


def test_token_expiry_is_read_without_the_key() -> None:
    from nacl.signing import SigningKey

    token, claims = issue(SigningKey.generate(), "alice", 3600)
    assert token_expiry(token) == claims.expires_at
    assert token_expiry("garbage") is None


def test_keygen_writes_a_private_key_and_prints_the_public_hex(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "me"
    code, out, err = run("keygen", "--out", str(key))
    assert code == 0
    public = out.strip()
    assert len(public) == 64 and int(public, 16) >= 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_signing_key(key).verify_key.encode().hex() == public
    assert (tmp_path / "keys" / "me.pub").read_text().strip() == public
    assert "allowlist:" in err and public in err
    # Never overwritten by accident.
    code, out, err = run("keygen", "--out", str(key))
    assert code == 1 and "exists already" in err and out == ""
    code, out, _ = run("--json", "keygen", "--out", str(key), "--force")
    assert code == 0 and json.loads(out)["public_key"] != public


def test_keygen_default_path(private_home: Path) -> None:
    code, out, _ = run("-q", "keygen")
    assert code == 0
    assert load_signing_key(private_home / ".config" / "gridstor" / "id_ed25519").verify_key.encode().hex() == (
        out.strip()
    )


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    assert run("keygen", "--out", str(key))[0] == 0
    key.chmod(0o644)
    code, _, err = run("login", "--identity", "alice", "--key", str(key))
    assert code == 1 and "chmod 600" in err
    key.write_text("hello\n")
    key.chmod(0o600)
    code, _, err = run("login", "--identity", "alice", "--key", str(key))
    assert code == 1 and "not a gridstor private key" in err


def test_login_needs_identity_with_a_key_and_set_env(tmp_path: Path) -> None:
    code, _, err = run("login", "--key", str(tmp_path / "k"))
    assert code == 2 and "--identity" in err
    code, _, err = run("login", "--secret-env", "GRIDSTOR_NO_SUCH_VARIABLE")
    assert code == 2 and "is not set" in err


# -- progress -------------------------------------------------------------------------------------------


def test_progress_is_silent_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()
    with Progress("put x", 100, stream=stream) as bar:
        bar.update(50)
        bar.update(50)
    assert stream.getvalue() == ""


def test_progress_on_a_terminal() -> None:
    stream = Tty()
    with Progress("put x", 2 * 1024 * 1024, stream=stream) as bar:
        bar.update(1024 * 1024)
    text = stream.getvalue()
    assert text.startswith("\r\x1b[Kput x") and text.endswith("\n")
    assert "50%" in text and "1.0 MiB / 2.0 MiB" in text
    # An error wipes the bar instead of leaving a half line before the message.
    stream = Tty()
    with pytest.raises(RuntimeError), Progress("get", 10, stream=stream) as bar:
        bar.update(5)
        raise RuntimeError
    assert stream.getvalue().endswith("\r\x1b[K")


def test_human_sizes() -> None:
    assert human(512) == "512 B"
    assert human(4096) == "4.0 KiB"
    assert human(5 * 1024**3) == "5.0 GiB"
