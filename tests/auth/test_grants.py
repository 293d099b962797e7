"""Tokens end when their grant ends: real auth, ingest and Envoy restarted on the same data dir (same gateway key)
with a changed secret, mode or allowlist; a token issued before is refused saying why, a fresh login works."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import grpc
import pytest
from nacl.signing import SigningKey

from gridstor.v1 import auth_pb2, auth_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.auth.conftest import sign
from tests.gateway import Curl, Gateway, curl, run_gateway

S1, S2 = "the-first-shared-secret", "the-second-shared-secret"


def upload(gw: Gateway, token: str | None) -> Curl:
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    return curl("-X", "POST", *auth, "--data-binary", "grant test", f"{gw.edge}/v1/files?name=g.txt")


def refused_with(r: Curl, message: str) -> None:
    assert (r.status, json.loads(r.body)["message"]) == (401, message), r.body
    assert r.headers["www-authenticate"] == 'Bearer realm="gridstor", error="invalid_token"'


Start = Callable[..., AbstractContextManager[Gateway]]


@pytest.fixture
def gateways(tmp_path: Path) -> Start:
    """``with gateways(settings) as gw``: a gateway on the test's one data dir (one gateway key), own redis each."""
    runs = iter(range(100))

    def start(settings: dict[str, Any], *, envoy: bool = True) -> AbstractContextManager[Gateway]:
        extra = {"data_dir": str(tmp_path / "data"), "tls": {"edge": False}, **settings}
        return run_gateway(tmp_path / f"run{next(runs)}", extra, envoy=envoy)

    return start


def test_secret_change_and_mode_change_end_rest_tokens(gateways: Start) -> None:
    with gateways({"mode": "secret", "secret": S1}) as gw:
        r = curl("-X", "POST", "-d", json.dumps({"secret": S1, "identity": "alice"}), f"{gw.edge}/v1/auth")
        old = json.loads(r.body)["token"]
        assert upload(gw, old).status == 200
    with gateways({"mode": "secret", "secret": S2}) as gw:
        refused_with(
            upload(gw, old), "the gateway's shared secret changed since this token was issued: authenticate again"
        )
        r = curl("-X", "POST", "-d", json.dumps({"secret": S1}), f"{gw.edge}/v1/auth")
        assert (r.status, json.loads(r.body)["message"]) == (401, "wrong shared secret")
        assert r.headers["www-authenticate"] == 'Bearer realm="gridstor"'
        r = curl("-X", "POST", "-d", json.dumps({"secret": S2, "identity": "alice"}), f"{gw.edge}/v1/auth")
        new = json.loads(r.body)["token"]
        assert upload(gw, new).status == 200  # the service keeps serving
    with gateways({}) as gw:  # public mode now
        refused_with(
            upload(gw, new),
            "this token was issued in secret mode and the gateway now runs in public mode: authenticate again",
        )
        assert upload(gw, None).status == 200


def authenticate(gw: Gateway, key: SigningKey, identity: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{gw.cfg.ports['auth']}") as channel:
        epoch = int(time.time())
        request = auth_pb2.AuthenticateRequest(identity=identity, epoch=epoch, signature=sign(key, identity, epoch))
        return str(auth_pb2_grpc.AuthServiceStub(channel).Authenticate(request, timeout=30).token)


def grpc_upload(gw: Gateway, token: str) -> str:
    """Upload over gRPC straight to ingest: the job id, or the details of its UNAUTHENTICATED refusal."""
    with grpc.insecure_channel(f"127.0.0.1:{gw.cfg.ports['ingest']}") as channel:
        first = ingest_pb2.UploadRequest(name="g.txt")
        first.body.data = b"grant test"
        try:
            reply = ingest_pb2_grpc.IngestServiceStub(channel).Upload(
                iter([first]), metadata=(("authorization", f"Bearer {token}"),), timeout=30
            )
        except grpc.RpcError as err:
            assert isinstance(err, grpc.Call)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return str(err.details())
        return str(reply.job)


def test_allowlist_changes_end_grpc_tokens(gateways: Start) -> None:
    alice, bob, alice2 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()

    def allowlist(**keys: SigningKey) -> dict[str, Any]:
        return {"mode": "allowlist", "allowlist": {n: k.verify_key.encode().hex() for n, k in keys.items()}}

    with gateways(allowlist(alice=alice, bob=bob), envoy=False) as gw:
        alice_token, bob_token = authenticate(gw, alice, "alice"), authenticate(gw, bob, "bob")
        assert len(grpc_upload(gw, alice_token)) == 32
    with gateways(allowlist(bob=bob), envoy=False) as gw:  # alice removed
        assert grpc_upload(gw, alice_token) == "identity 'alice' is no longer in the gateway's allowlist"
        assert len(grpc_upload(gw, bob_token)) == 32  # bob's grant stands: his token still works
    with gateways(allowlist(alice=alice2, bob=bob), envoy=False) as gw:  # alice's new key
        assert grpc_upload(gw, alice_token) == (
            "the key of identity 'alice' changed since this token was issued: authenticate again"
        )
        assert len(grpc_upload(gw, authenticate(gw, alice2, "alice"))) == 32
