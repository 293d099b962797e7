"""Bad and unauthorized requests through the real edge get client errors, never internal ones, and the gateway
keeps serving: text fields that are not UTF-8, malformed authorization headers, claimed admin identities,
another user's SSH account over REST, server paths. (Header and upload sizes: tests/limits, tests/edge/test_live.)
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gridstor.v1 import ingest_pb2
from services.common import sshsig
from services.common.keys import signing_key
from services.common.rpc import admin_token
from tests.gateway import Gateway, curl, run_gateway

SECRET = "refusals-test-secret-0123"
NOT_UTF8 = "the request is not a valid {}: a text field (such as a file id or a name) is not valid UTF-8"
CHALLENGE = 'Bearer realm="gridstor"'


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("refusals")
    settings = {"mode": "secret", "secret": SECRET, "tls": {"edge": False}}
    with run_gateway(root, settings, ssh=True, maint=True) as g:
        yield g


def login(gw: Gateway, **body: Any) -> str:
    r = curl("-X", "POST", "-d", json.dumps({"secret": SECRET, **body}), f"{gw.edge}/v1/auth")
    assert r.status == 200, r.body
    return str(json.loads(r.body)["token"])


def raw_call(target: str, method: str, payload: bytes, metadata: Any = None) -> grpc.RpcError:
    """A unary call with hand-made request bytes (as a client in any language could send); its error."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, metadata=metadata, timeout=30)
    return info.value


def stored(gw: Gateway, token: str, data: bytes = b"still serving\n") -> str:
    """Upload ``data`` through the edge (with ``token``; "" = none) and download it back by id: the gateway serves."""
    auth = ("-H", f"Authorization: Bearer {token}") if token else ()
    r = curl("-X", "POST", *auth, "--data-binary", data.decode(), f"{gw.edge}/v1/files?name=ok.txt")
    assert r.status == 200, r.body
    job = json.loads(r.body)["job"]
    r = curl(f"{gw.edge}/v1/jobs/{job}?wait=true&timeout_seconds=15")
    file_id = str(json.loads(r.body)["file_id"])
    assert curl(f"{gw.edge}/v1/files/{file_id}").body == data
    return file_id


def test_text_fields_that_are_not_utf8_are_400_not_500(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r = curl(f"{gw.edge}/v1/files/%FF%FEabc")
    assert (r.status, json.loads(r.body)) == (
        400,
        {"code": 3, "message": NOT_UTF8.format("gridstor.v1.DownloadRequest"), "details": []},
    )
    r = curl(f"{gw.edge}/v1/files/%C3%28/stat")
    assert (r.status, json.loads(r.body)["message"]) == (400, NOT_UTF8.format("gridstor.v1.StatRequest"))
    # gRPC: the same bytes straight to meta, and through Envoy
    raw = b"\x0a\x03\xff\xfe\x41"  # field 1 (id), 3 bytes that are not UTF-8
    for target in (f"127.0.0.1:{gw.cfg.ports['meta']}", f"127.0.0.1:{gw.envoy_port}"):
        err = raw_call(target, "/gridstor.v1.MetaService/Stat", raw)
        assert isinstance(err, grpc.Call)
        assert (err.code(), err.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            NOT_UTF8.format("gridstor.v1.StatRequest"),
        )
    # a client-streaming call: an upload whose name is not UTF-8
    token = login(gw)
    r = curl("-X", "POST", "-H", f"Authorization: Bearer {token}", "--data-binary", "x", f"{gw.edge}/v1/files?name=%FF")
    assert (r.status, json.loads(r.body)["message"]) == (400, NOT_UTF8.format("gridstor.v1.UploadRequest"))
    # one line per refusal in the services' log, never a traceback
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.WARNING]
    refusals = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("refused ")]
    assert (
        f"refused /gridstor.v1.MetaService/Download: INVALID_ARGUMENT: {NOT_UTF8.format('gridstor.v1.DownloadRequest')}"
        in refusals
    )
    stored(gw, token)


@pytest.mark.parametrize(
    ("header", "message", "error"),
    [
        (None, "no token: send 'authorization: Bearer <token>' (get one from AuthService.Authenticate)", ""),
        ("TOKEN", "the authorization header holds a token without its scheme: send 'Authorization: Bearer <token>'",
         "invalid_request"),
        ("Basic YWxpY2U6cHc=", "the authorization header must be 'Bearer <token>', got the scheme 'Basic'",
         "invalid_request"),
        ("Bearer", "the authorization header says Bearer but carries no token: send 'Authorization: Bearer <token>'",
         "invalid_request"),
        ("Bearer gs1.not.valid", "token is malformed (bad base64)", "invalid_token"),
    ],
)  # fmt: skip
def test_malformed_authorization_says_what_is_wrong(gw: Gateway, header: str | None, message: str, error: str) -> None:
    token = login(gw)
    value = None if header is None else header.replace("TOKEN", token)
    challenge = CHALLENGE + (f', error="{error}"' if error else "")
    # REST: 401 with a WWW-Authenticate challenge
    args = [] if value is None else ["-H", f"Authorization: {value}"]
    r = curl("-X", "POST", *args, "--data-binary", "x", f"{gw.edge}/v1/files?name=x.txt")
    assert (r.status, r.headers.get("www-authenticate"), json.loads(r.body)) == (
        401,
        challenge,
        {"code": 16, "message": message, "details": []},
    )
    # gRPC through the edge: UNAUTHENTICATED with the same words and the challenge as trailing metadata
    metadata = None if value is None else (("authorization", value),)
    err = raw_call(f"127.0.0.1:{gw.envoy_port}", "/gridstor.v1.SshService/HomeSize", b"\x0a\x01x", metadata)
    assert isinstance(err, grpc.Call)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
    assert dict(err.trailing_metadata() or ())["www-authenticate"] == challenge
    stored(gw, token)


@pytest.mark.parametrize("identity", ["ops", "admin", "root"])
def test_a_claimed_identity_is_never_an_admin(gw: Gateway, identity: str) -> None:
    """secret mode: anyone with the secret names themselves; only the gateway's admin token opens admin methods."""
    token = login(gw, identity=identity)
    r = curl("-X", "POST", "-H", f"Authorization: Bearer {token}", "-d", "{}", f"{gw.edge}/v1/maint/scrub")
    assert (r.status, json.loads(r.body)["message"]) == (
        403,
        "Scrub is for the gateway's operators: use a token from `gridstor admin token` on the gateway machine",
    )
    # "admin:ops" is not a name anyone can claim
    r = curl("-X", "POST", "-d", json.dumps({"secret": SECRET, "identity": "admin:ops"}), f"{gw.edge}/v1/auth")
    assert (r.status, json.loads(r.body)["message"]) == (
        400,
        "identity must be 1-64 of letters, digits, '_', '.', '-'",
    )
    r = curl("-X", "POST", "-H", f"Authorization: Bearer {token}", "-d", "{}", f"{gw.edge}/v1/maint/backup")
    assert (r.status, json.loads(r.body)["message"]) == (
        403,
        "Backup is for the gateway's operators: use a token from `gridstor admin token` on the gateway machine",
    )


def test_public_mode_has_no_admins_but_the_admin_token(tmp_path: Path) -> None:
    with run_gateway(tmp_path / "gw", {"tls": {"edge": False}}, maint=True) as gw:  # public mode
        r = curl("-X", "POST", "-d", "{}", f"{gw.edge}/v1/maint/scrub")
        assert (r.status, json.loads(r.body)["message"], r.headers["www-authenticate"]) == (
            401,
            "Scrub is for the gateway's operators: send an admin token (`gridstor admin token` on the gateway machine)",
            CHALLENGE,
        )
        r = curl("-X", "POST", "-d", json.dumps({"identity": "ops"}), f"{gw.edge}/v1/auth")
        token = json.loads(r.body)["token"]
        r = curl("-X", "POST", "-H", f"Authorization: Bearer {token}", "-d", "{}", f"{gw.edge}/v1/maint/scrub")
        assert (r.status, json.loads(r.body)["message"]) == (
            403,
            "Scrub is for the gateway's operators: use a token from `gridstor admin token` on the gateway machine",
        )
        admin = admin_token(signing_key(gw.cfg.data_dir), "ops")
        r = curl(
            "-X", "POST", "-H", f"Authorization: Bearer {admin}", "-d", '{"dry_run": true}', f"{gw.edge}/v1/maint/scrub"
        )
        assert r.status == 200, r.body


def ssh_keygen(tmp: Path, name: str) -> Path:
    key = tmp / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def openssh_proof(key: Path, method: str, username: str, tmp: Path) -> dict[str, Any]:
    """An AccountProof as JSON, signed by `ssh-keygen -Y sign` as a REST user without the CLI makes it."""
    epoch, nonce = int(time.time()), f"rest{time.monotonic_ns()}"
    message = tmp / f"{nonce}.txt"
    message.write_bytes(sshsig.account_message(method, username, epoch, nonce))
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", sshsig.ACCOUNT_NAMESPACE, str(message)],
                   check=True)  # fmt: skip
    return {"epoch": str(epoch), "nonce": nonce, "signature": message.with_name(message.name + ".sig").read_text()}


def test_another_users_ssh_account_over_rest(gw: Gateway, tmp_path: Path) -> None:
    alice_key, mallory_key = ssh_keygen(tmp_path, "alice"), ssh_keygen(tmp_path, "mallory")
    alice, mallory = login(gw, identity="alice"), login(gw, identity="mallory")
    url = f"{gw.edge}/v1/ssh/accounts/alice"

    def put(token: str, key: Path, proof: dict[str, Any] | None = None) -> Any:
        body: dict[str, Any] = {"public_key": key.with_suffix(".pub").read_text(), "max_size_mb": 4}
        if proof is not None:
            body["proof"] = proof
        return curl("-X", "PUT", "-H", f"Authorization: Bearer {token}", "-d", json.dumps(body), url)

    r = put(alice, alice_key)
    assert r.status == 200 and json.loads(r.body)["created"] is True
    r = put(mallory, mallory_key)
    assert (r.status, json.loads(r.body)["message"]) == (
        403,
        "SSH account 'alice' exists and is not yours to change: prove you hold its SSH key (gridstor ssh enable alice"
        " -i KEY, or an AccountProof signed with `ssh-keygen -Y sign -n gridstor-ssh-account`; see docs/security.md),"
        " or use an admin token",
    )
    r = put(mallory, mallory_key, openssh_proof(mallory_key, "EnableAccount", "alice", tmp_path))
    assert (r.status, json.loads(r.body)["message"]) == (
        403,
        "the account proof is signed with another key than SSH account 'alice' has: sign with the private key of its"
        " current public key",
    )
    r = curl("-X", "DELETE", "-H", f"Authorization: Bearer {mallory}", f"{url}?remove_home=true")
    assert r.status == 403 and "is not yours to disable or remove" in json.loads(r.body)["message"]
    # alice proves it with her key, in the query string of a GET
    proof = openssh_proof(alice_key, "HomeSize", "alice", tmp_path)
    query = urllib.parse.urlencode({f"proof.{k}": v for k, v in proof.items()}, quote_via=urllib.parse.quote)
    r = curl("-H", f"Authorization: Bearer {mallory}", f"{url}/size?{query}")  # whoever holds the key: alice
    assert r.status == 200, r.body
    assert json.loads(r.body)["max_bytes"] == str(4 * 1024 * 1024)
    r = curl("-H", f"Authorization: Bearer {alice}", f"{url}/size?{query}")
    assert (r.status, json.loads(r.body)["message"]) == (
        403,
        "this account proof was already used: make a fresh one for each request",
    )


def test_messages_to_clients_carry_no_server_paths(tmp_path: Path) -> None:
    """Refusals built from the gateway's folders name those folders, never their paths (a gateway of its own:
    this test breaks its storage)."""
    key = ssh_keygen(tmp_path, "carol")
    with run_gateway(tmp_path / "gw", {"tls": {"edge": False}}, ssh=True) as gw:  # public mode
        data_dir = str(gw.cfg.data_dir).encode()
        file_id = stored(gw, "")
        body: dict[str, Any] = {"public_key": key.with_suffix(".pub").read_text(), "max_size_mb": 1}
        url = f"{gw.edge}/v1/ssh/accounts/carol"
        assert curl("-X", "PUT", "-d", json.dumps(body), url).status == 200
        home = gw.cfg.ssh.homes_dir / "carol"
        home.rmdir()
        home.write_text("not a folder")
        body["proof"] = openssh_proof(key, "EnableAccount", "carol", tmp_path)
        r = curl("-X", "PUT", "-d", json.dumps(body), url)
        assert (r.status, json.loads(r.body)["message"]) == (
            400,
            "the home of 'carol' exists on the gateway but is not a folder: ask its operator",
        )
        assert data_dir not in r.body
        # the metadata folder gone: the backend's own words name the folder, the client sees its name only
        shutil.rmtree(gw.cfg.data_dir / "meta")
        r = curl(f"{gw.edge}/v1/files/{file_id}/stat")
        assert (r.status, json.loads(r.body)["message"]) == (
            503,
            "dir://<metadata>: get: the folder <metadata> is gone",
        )
        assert data_dir not in r.body


def test_upload_and_process_refusals_keep_ingest_serving(gw: Gateway) -> None:
    """gRPC through the edge: a malformed upload message and a bad header, then a good upload."""
    token = login(gw)
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(f"127.0.0.1:{gw.envoy_port}") as channel:
        upload = channel.stream_unary(
            "/gridstor.v1.IngestService/Upload",
            request_serializer=lambda b: b,
            response_deserializer=ingest_pb2.UploadReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            upload(iter([b"\x0a\x02\xc3\x28"]), metadata=md, timeout=30)
        err = info.value
        assert isinstance(err, grpc.Call) and err.details() == NOT_UTF8.format("gridstor.v1.UploadRequest")
        first = ingest_pb2.UploadRequest(name="fine.txt")
        first.body.data = b"fine"
        reply = upload(iter([first.SerializeToString()]), metadata=md, timeout=30)
        assert reply.size == 4
