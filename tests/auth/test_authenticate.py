"""Authenticate and PublicKey over real gRPC in each security mode, with a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from nacl.signing import SigningKey, VerifyKey

from gridstor.v1 import auth_pb2
from services.common import tokens
from services.common.keys import key_id
from tests.auth.conftest import SECRET, AuthServer, auth_request, now, sign
from tests.redis_server import RedisProcess

Start = Callable[..., Awaitable[AuthServer]]
REFUSED = "unknown identity or bad signature"


async def refused(call: Awaitable[object], code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> str:
    """The details of an RPC that must fail with ``code``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def verify_key_of(server: AuthServer) -> VerifyKey:
    reply = await server.stub.PublicKey(auth_pb2.PublicKeyRequest())
    return VerifyKey(reply.public_key)


# -- PublicKey -------------------------------------------------------------------


async def test_public_key_verifies_issued_tokens(start_auth: Start) -> None:
    server = await start_auth(mode="public")
    pk = await server.stub.PublicKey(auth_pb2.PublicKeyRequest())
    assert pk.algorithm == "ed25519"
    assert len(pk.public_key) == 32
    assert pk.key_id == key_id(VerifyKey(pk.public_key))
    reply = await server.stub.Authenticate(auth_pb2.AuthenticateRequest(identity="carol"))
    claims = tokens.verify(VerifyKey(pk.public_key), reply.token)
    assert claims.subject == "carol"
    assert claims.key_id == reply.key_id == pk.key_id
    assert claims.expires_at == reply.expires_at


# -- public mode -------------------------------------------------------------------


async def test_public_mode_anonymous_and_named(start_auth: Start) -> None:
    server = await start_auth(mode="public")
    vk = await verify_key_of(server)
    anon = await server.stub.Authenticate(auth_pb2.AuthenticateRequest())
    assert anon.identity == ""
    claims = tokens.verify(vk, anon.token)
    assert claims.subject == "anonymous"
    assert claims.expires_at - claims.issued_at == 86400  # 24 h by default
    named = await server.stub.Authenticate(auth_pb2.AuthenticateRequest(identity="dave"))
    assert named.identity == "dave"
    assert tokens.verify(vk, named.token).subject == "dave"


async def test_claimed_identity_cannot_pose_as_a_service(start_auth: Start) -> None:
    server = await start_auth(mode="public")
    msg = await refused(
        server.stub.Authenticate(auth_pb2.AuthenticateRequest(identity="service:meta")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "identity must be" in msg


async def test_token_ttl_is_configurable(start_auth: Start) -> None:
    server = await start_auth(mode="public", token_ttl=3600)
    reply = await server.stub.Authenticate(auth_pb2.AuthenticateRequest())
    claims = tokens.verify(await verify_key_of(server), reply.token)
    assert claims.expires_at - claims.issued_at == 3600


# -- secret mode -------------------------------------------------------------------


async def test_secret_mode_right_secret(start_auth: Start) -> None:
    server = await start_auth(mode="secret", secret=SECRET)
    reply = await server.stub.Authenticate(auth_pb2.AuthenticateRequest(secret=SECRET, identity="erin"))
    assert tokens.verify(await verify_key_of(server), reply.token).subject == "erin"
    anon = await server.stub.Authenticate(auth_pb2.AuthenticateRequest(secret=SECRET))
    assert tokens.verify(await verify_key_of(server), anon.token).subject == "anonymous"


@pytest.mark.parametrize("wrong", [SECRET[:-1], SECRET + "x", "x" * len(SECRET), SECRET.upper()])
async def test_secret_mode_wrong_secret(start_auth: Start, wrong: str) -> None:
    server = await start_auth(mode="secret", secret=SECRET)
    msg = await refused(server.stub.Authenticate(auth_pb2.AuthenticateRequest(secret=wrong)))
    assert msg == "wrong shared secret"
    assert SECRET not in msg


async def test_secret_mode_missing_secret(start_auth: Start, alice: SigningKey) -> None:
    server = await start_auth(mode="secret", secret=SECRET)
    msg = await refused(server.stub.Authenticate(auth_pb2.AuthenticateRequest()))
    assert "secret mode: send the shared secret" in msg
    msg = await refused(server.stub.Authenticate(auth_request(alice, "alice")))
    assert "does not use allowlist mode" in msg


async def test_secret_mode_refuses_token_of_another_gateway_key(start_auth: Start) -> None:
    server = await start_auth(mode="secret", secret=SECRET)
    other = SigningKey.generate()
    foreign, _ = tokens.issue(other, "erin", 3600)
    with pytest.raises(tokens.TokenError, match="signature is invalid"):
        tokens.verify(await verify_key_of(server), foreign)


# -- allowlist mode ----------------------------------------------------------------


async def test_allowlist_ok(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    reply = await server.stub.Authenticate(auth_request(alice, "alice"))
    assert reply.identity == "alice"
    claims = tokens.verify(await verify_key_of(server), reply.token)
    assert claims.subject == "alice"
    assert reply.key_id == claims.key_id


async def test_allowlist_epoch_inside_skew_window(
    start_auth: Start, allowlist: dict[str, str], alice: SigningKey
) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist, auth_skew=60)
    for epoch in (now() - 30, now() + 30):
        await server.stub.Authenticate(auth_request(alice, "alice", epoch))


async def test_forged_signature(start_auth: Start, allowlist: dict[str, str]) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    mallory = SigningKey.generate()
    msg = await refused(server.stub.Authenticate(auth_request(mallory, "alice")))
    assert msg == REFUSED


async def test_wrong_identity(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    """alice's key cannot speak for bob, whether she signs bob's name or her own."""
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    assert await refused(server.stub.Authenticate(auth_request(alice, "bob"))) == REFUSED
    epoch = now()
    mixed = auth_pb2.AuthenticateRequest(identity="bob", epoch=epoch, signature=sign(alice, "alice", epoch))
    assert await refused(server.stub.Authenticate(mixed)) == REFUSED


async def test_unknown_identity_looks_like_bad_signature(start_auth: Start, allowlist: dict[str, str]) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    mallory = SigningKey.generate()
    assert await refused(server.stub.Authenticate(auth_request(mallory, "mallory"))) == REFUSED


async def test_signature_over_another_epoch(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    epoch = now()
    req = auth_pb2.AuthenticateRequest(identity="alice", epoch=epoch - 1, signature=sign(alice, "alice", epoch))
    assert await refused(server.stub.Authenticate(req)) == REFUSED


async def test_epoch_too_old(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist, auth_skew=30)
    msg = await refused(server.stub.Authenticate(auth_request(alice, "alice", now() - 300)))
    assert "s old" in msg
    assert "30 s either side" in msg


async def test_epoch_in_the_future(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist, auth_skew=30)
    msg = await refused(server.stub.Authenticate(auth_request(alice, "alice", now() + 300)))
    assert "in the future" in msg


async def test_replayed_signature(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    req = auth_request(alice, "alice")
    await server.stub.Authenticate(req)
    msg = await refused(server.stub.Authenticate(req))
    assert "already used" in msg


async def test_replay_across_two_auth_servers(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    one = await start_auth(mode="allowlist", allowlist=allowlist)
    two = await start_auth(mode="allowlist", allowlist=allowlist)
    req = auth_request(alice, "alice")
    await one.stub.Authenticate(req)
    assert "already used" in await refused(two.stub.Authenticate(req))


async def test_concurrent_replays_one_winner(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    """The same signed request raced through two servers succeeds exactly once."""
    servers = [await start_auth(mode="allowlist", allowlist=allowlist) for _ in range(2)]
    req = auth_request(alice, "alice")
    calls = [servers[i % 2].stub.Authenticate(req) for i in range(12)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if isinstance(r, auth_pb2.AuthenticateReply)]
    errs = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1
    assert len(errs) == 11
    assert all(e.code() == grpc.StatusCode.UNAUTHENTICATED and "already used" in (e.details() or "") for e in errs)


async def test_allowlist_needs_a_signature(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    msg = await refused(server.stub.Authenticate(auth_pb2.AuthenticateRequest(identity="alice", epoch=now())))
    assert "allowlist mode" in msg
    msg = await refused(server.stub.Authenticate(auth_pb2.AuthenticateRequest(secret=SECRET)))
    assert "does not use secret mode" in msg
    epoch = now()
    nameless = auth_pb2.AuthenticateRequest(epoch=epoch, signature=sign(alice, "", epoch))
    assert "needs the identity" in await refused(server.stub.Authenticate(nameless))
    short = auth_pb2.AuthenticateRequest(identity="alice", epoch=now(), signature=b"\0" * 10)
    assert "64 bytes" in await refused(server.stub.Authenticate(short))


async def test_replay_store_down_fails_closed(
    start_auth: Start, allowlist: dict[str, str], alice: SigningKey, redis_server: RedisProcess
) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    redis_server.stop()
    msg = await refused(server.stub.Authenticate(auth_request(alice, "alice")), grpc.StatusCode.UNAVAILABLE)
    assert "replay-protection store unreachable" in msg


async def test_metrics_count_outcomes(start_auth: Start, allowlist: dict[str, str], alice: SigningKey) -> None:
    server = await start_auth(mode="allowlist", allowlist=allowlist)
    req = auth_request(alice, "alice")
    await server.stub.Authenticate(req)
    await refused(server.stub.Authenticate(req))
    await refused(server.stub.Authenticate(auth_request(alice, "alice", now() - 3600)))
    text = server.registry.render()
    assert 'gridstor_auth_issued_total{mode="allowlist"} 1' in text
    assert 'gridstor_auth_refused_total{reason="replayed"} 1' in text
    assert 'gridstor_auth_refused_total{reason="epoch_too_old"} 1' in text
