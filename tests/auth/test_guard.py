"""The shared token guard: what protected, internal and public methods accept, checked directly and over gRPC."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from nacl.signing import SigningKey

from gridstor.v1 import auth_pb2
from services.common import errors, tokens
from services.common.config import build_config
from services.common.keys import signing_key
from services.common.rpc import Guard, Policy, current_identity, service_token
from services.common.server import start_server
from tests.auth.conftest import SECRET, AuthServer

PROBE = "test.Probe"
POLICY = Policy(public=frozenset({"Open"}), internal=frozenset({"Internal"}))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def guard(key: SigningKey) -> Guard:
    return Guard(verify_key=key.verify_key, mode="secret", policies={PROBE: POLICY})


# -- Guard.check directly ----------------------------------------------------------


def test_valid_user_token(guard: Guard, key: SigningKey) -> None:
    token, _ = tokens.issue(key, "alice", 3600)
    assert guard.check(f"/{PROBE}/Protected", bearer(token)) == "alice"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "no token"),
        ((("authorization", "Basic abc"),), "no token"),
        (bearer("nonsense"), "malformed"),
        (bearer("gs1.abc"), "malformed"),
        (bearer("gs1.!!!.???"), "malformed"),
        (bearer("gs1." + "a" * 2000 + ".b"), "too long"),
    ],
)
def test_missing_and_malformed_tokens(guard: Guard, metadata: tuple[tuple[str, str], ...], message: str) -> None:
    with pytest.raises(errors.Unauthenticated, match=message):
        guard.check(f"/{PROBE}/Protected", metadata)


def test_forged_token(guard: Guard) -> None:
    forged, _ = tokens.issue(SigningKey.generate(), "alice", 3600)
    with pytest.raises(errors.Unauthenticated, match="signature is invalid"):
        guard.check(f"/{PROBE}/Protected", bearer(forged))


def test_tampered_token(guard: Guard, key: SigningKey) -> None:
    token, _ = tokens.issue(key, "alice", 3600)
    head, _, sig = token.split(".")
    other, _ = tokens.issue(key, "mallory", 3600)
    spliced = ".".join([head, other.split(".")[1], sig])  # mallory's claims under alice's signature
    with pytest.raises(errors.Unauthenticated, match="signature is invalid"):
        guard.check(f"/{PROBE}/Protected", bearer(spliced))


def test_expired_token(guard: Guard, key: SigningKey) -> None:
    expired, _ = tokens.issue(key, "alice", 86400, now=time.time() - 2 * 86400)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        guard.check(f"/{PROBE}/Protected", bearer(expired))


def test_internal_methods_refuse_user_tokens(guard: Guard, key: SigningKey) -> None:
    user, _ = tokens.issue(key, "alice", 3600)
    with pytest.raises(errors.PermissionDenied, match="internal"):
        guard.check(f"/{PROBE}/Internal", bearer(user))
    assert guard.check(f"/{PROBE}/Internal", bearer(service_token(key, "ingest"))) == "service:ingest"


def test_public_methods_need_no_token(guard: Guard) -> None:
    assert guard.check(f"/{PROBE}/Open", ()) == ""


def test_public_mode_passes_tokenless_calls_but_not_bad_tokens(key: SigningKey) -> None:
    guard = Guard(verify_key=key.verify_key, mode="public", policies={PROBE: POLICY})
    assert guard.check(f"/{PROBE}/Protected", ()) == ""
    with pytest.raises(errors.Unauthenticated, match="malformed"):
        guard.check(f"/{PROBE}/Protected", bearer("junk"))
    with pytest.raises(errors.Unauthenticated, match="no token"):
        guard.check(f"/{PROBE}/Internal", ())


def test_auth_methods_are_public() -> None:
    from services.auth.service import POLICY as AUTH_POLICY
    from services.auth.service import SERVICE_NAME

    guard = Guard(verify_key=SigningKey.generate().verify_key, mode="allowlist", policies={SERVICE_NAME: AUTH_POLICY})
    for method in ("Authenticate", "PublicKey"):
        assert guard.check(f"/{SERVICE_NAME}/{method}", ()) == ""


# -- over gRPC: a tiny probe service behind the guard, with the auth service -------------


async def _whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return current_identity.get().encode()


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, SigningKey]]:
    """A server in secret mode whose Probe service has a protected, an internal and a public method."""
    cfg = build_config({"mode": "secret", "secret": SECRET, "data_dir": str(tmp_path / "gateway")})
    key = signing_key(cfg.data_dir)
    guard = Guard(verify_key=key.verify_key, mode=cfg.mode, policies={PROBE: POLICY})
    handlers = {name: grpc.unary_unary_rpc_method_handler(_whoami) for name in ("Protected", "Internal", "Open")}

    def register(server: grpc.aio.Server) -> list[str]:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, handlers),))
        return [PROBE]

    running = await start_server(cfg, guard, register, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield channel, key
    await channel.close(None)
    await running.server.stop(None)


async def call(channel: grpc.aio.Channel, method: str, token: str | None = None) -> bytes:
    metadata = bearer(token) if token is not None else None
    result: bytes = await channel.unary_unary(f"/{PROBE}/{method}", None, None)(b"", metadata=metadata)
    return result


async def status_of(channel: grpc.aio.Channel, method: str, token: str | None = None) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel, method, token)
    return info.value.code(), info.value.details() or ""


async def test_grpc_protected_method_refusals(probe: tuple[grpc.aio.Channel, SigningKey]) -> None:
    channel, key = probe
    unauth = grpc.StatusCode.UNAUTHENTICATED
    code, msg = await status_of(channel, "Protected")
    assert (code, "no token" in msg) == (unauth, True)
    code, msg = await status_of(channel, "Protected", "gs1.not-a-token")
    assert (code, "malformed" in msg) == (unauth, True)
    forged, _ = tokens.issue(SigningKey.generate(), "alice", 3600)
    code, msg = await status_of(channel, "Protected", forged)
    assert (code, "signature is invalid" in msg) == (unauth, True)
    expired, _ = tokens.issue(key, "alice", 60, now=time.time() - 3600)
    code, msg = await status_of(channel, "Protected", expired)
    assert (code, "expired" in msg) == (unauth, True)
    assert await call(channel, "Open") == b""


async def test_grpc_internal_method_refuses_user_token(probe: tuple[grpc.aio.Channel, SigningKey]) -> None:
    channel, key = probe
    user, _ = tokens.issue(key, "alice", 3600)
    code, msg = await status_of(channel, "Internal", user)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "internal" in msg
    assert await call(channel, "Internal", service_token(key, "meta")) == b"service:meta"


async def test_grpc_token_from_auth_opens_protected_method(
    probe: tuple[grpc.aio.Channel, SigningKey],
    start_auth: Callable[..., Awaitable[AuthServer]],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """A token from a secret-mode auth server on the same data dir (same gateway key) is accepted."""
    channel, _ = probe
    assert data_dir == tmp_path / "gateway"
    auth: AuthServer = await start_auth(mode="secret", secret=SECRET)
    reply = await auth.stub.Authenticate(auth_pb2.AuthenticateRequest(secret=SECRET, identity="frank"))
    assert await call(channel, "Protected", reply.token) == b"frank"
