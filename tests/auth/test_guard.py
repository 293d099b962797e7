"""The shared token guard: what protected, internal and public methods accept, checked directly and over gRPC."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from nacl.signing import SigningKey

from gridstor.v1 import auth_pb2
from services.common import errors, tokens
from services.common.config import build_config
from services.common.grants import Grants
from services.common.keys import signing_key
from services.common.rpc import Guard, Policy, admin_token, current_identity, service_token
from services.common.server import start_server
from tests.auth.conftest import SECRET, AuthServer

PROBE = "test.Probe"
POLICY = Policy(public=frozenset({"Open"}), internal=frozenset({"Internal"}))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def make_guard(key: SigningKey, mode: str = "secret", secret: str = SECRET, **settings: Any) -> Guard:
    return Guard(verify_key=key.verify_key, grants=Grants(mode, secret, settings.get("allowlist", {}), key),
                 policies={PROBE: POLICY}, admins=frozenset(settings.get("admins", ())))  # fmt: skip


def user(key: SigningKey, identity: str, mode: str = "secret", secret: str = SECRET, **kw: Any) -> str:
    """A login token as auth issues it for ``identity`` under that mode, secret and allowlist."""
    grant = Grants(mode, secret, kw.pop("allowlist", {}), key).grant_for(identity)
    return tokens.issue(key, identity, kw.pop("ttl", 3600), grant=grant, **kw)[0]


@pytest.fixture
def guard(key: SigningKey) -> Guard:
    return make_guard(key)


# -- Guard.check directly ----------------------------------------------------------


def test_valid_user_token(guard: Guard, key: SigningKey) -> None:
    assert guard.check(f"/{PROBE}/Protected", bearer(user(key, "alice"))) == "alice"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "no token"),
        ((("authorization", "Basic abc"),), "must be 'Bearer <token>', got the scheme 'Basic'"),
        ((("authorization", "gs1.abc.def"),), "a token without its scheme: send 'Authorization: Bearer <token>'"),
        ((("authorization", "Bearer"),), "says Bearer but carries no token"),
        ((("authorization", "Bearer   "),), "says Bearer but carries no token"),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), "send one authorization header, not 2"),
        (bearer("nonsense"), "malformed"),
        (bearer("gs1.abc"), "malformed"),
        (bearer("gs1.!!!.???"), "malformed"),
        (bearer("gs1." + "a" * 2000 + ".b"), "too long"),
    ],
)
def test_missing_and_malformed_tokens(guard: Guard, metadata: tuple[tuple[str, str], ...], message: str) -> None:
    with pytest.raises(errors.Unauthenticated, match=re.escape(message)):
        guard.check(f"/{PROBE}/Protected", metadata)


def test_forged_token(guard: Guard) -> None:
    forged = user(SigningKey.generate(), "alice")
    with pytest.raises(errors.Unauthenticated, match="signature is invalid"):
        guard.check(f"/{PROBE}/Protected", bearer(forged))


def test_tampered_token(guard: Guard, key: SigningKey) -> None:
    token = user(key, "alice")
    head, _, sig = token.split(".")
    other = user(key, "mallory")
    spliced = ".".join([head, other.split(".")[1], sig])  # mallory's claims under alice's signature
    with pytest.raises(errors.Unauthenticated, match="signature is invalid"):
        guard.check(f"/{PROBE}/Protected", bearer(spliced))


def test_expired_token(guard: Guard, key: SigningKey) -> None:
    expired = user(key, "alice", ttl=86400, now=time.time() - 2 * 86400)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        guard.check(f"/{PROBE}/Protected", bearer(expired))


def test_internal_methods_refuse_user_tokens(guard: Guard, key: SigningKey) -> None:
    with pytest.raises(errors.PermissionDenied, match="internal"):
        guard.check(f"/{PROBE}/Internal", bearer(user(key, "alice")))
    assert guard.check(f"/{PROBE}/Internal", bearer(service_token(key, "ingest"))) == "service:ingest"


def test_public_methods_need_no_token(guard: Guard) -> None:
    assert guard.check(f"/{PROBE}/Open", ()) == ""
    assert guard.check(f"/{PROBE}/Open", (("authorization", "Basic abc"),)) == ""  # not even a well-formed one


def test_public_mode_passes_tokenless_calls_but_not_bad_tokens(key: SigningKey) -> None:
    guard = make_guard(key, "public")
    assert guard.check(f"/{PROBE}/Protected", ()) == ""
    with pytest.raises(errors.Unauthenticated, match="malformed"):
        guard.check(f"/{PROBE}/Protected", bearer("junk"))
    with pytest.raises(errors.Unauthenticated, match="got the scheme 'junk'"):
        guard.check(f"/{PROBE}/Protected", (("authorization", "junk"),))
    with pytest.raises(errors.Unauthenticated, match="no token"):
        guard.check(f"/{PROBE}/Internal", ())


def test_auth_methods_are_public() -> None:
    from services.auth.service import POLICY as AUTH_POLICY
    from services.auth.service import SERVICE_NAME

    key = SigningKey.generate()
    guard = Guard(key.verify_key, Grants("allowlist", "", {}, key), policies={SERVICE_NAME: AUTH_POLICY})
    for method in ("Authenticate", "PublicKey"):
        assert guard.check(f"/{SERVICE_NAME}/{method}", ()) == ""


# -- tokens end when their grant ends ------------------------------------------------

ALICE = SigningKey.generate().verify_key.encode().hex()
ALICE_NEW = SigningKey.generate().verify_key.encode().hex()


@pytest.mark.parametrize(
    ("issued", "now", "message"),
    [
        ({"mode": "secret"}, {"mode": "secret", "secret": "another-secret-of-16+"},
         "the gateway's shared secret changed since this token was issued: authenticate again"),
        ({"mode": "secret"}, {"mode": "public"},
         "this token was issued in secret mode and the gateway now runs in public mode: authenticate again"),
        ({"mode": "public"}, {"mode": "secret"},
         "this token was issued in public mode and the gateway now runs in secret mode: authenticate again"),
        ({"mode": "allowlist", "allowlist": {"alice": ALICE}}, {"mode": "allowlist", "allowlist": {"bob": ALICE}},
         "identity 'alice' is no longer in the gateway's allowlist"),
        ({"mode": "allowlist", "allowlist": {"alice": ALICE}},
         {"mode": "allowlist", "allowlist": {"alice": ALICE_NEW}},
         "the key of identity 'alice' changed since this token was issued: authenticate again"),
        ({"mode": "allowlist", "allowlist": {"alice": ALICE}}, {"mode": "secret"},
         "this token was issued in allowlist mode and the gateway now runs in secret mode"),
        ({"mode": "none"}, {"mode": "secret"}, "this token records no grant"),
    ],
)  # fmt: skip
def test_a_token_ends_with_its_grant(
    key: SigningKey, issued: dict[str, Any], now: dict[str, Any], message: str
) -> None:
    if issued["mode"] == "none":
        token = tokens.issue(key, "alice", 3600)[0]  # as this gateway issued tokens before grants
    else:
        token = user(key, "alice", **issued)
    guard = make_guard(key, **now)
    with pytest.raises(tokens.TokenError, match=re.escape(message)):
        guard.check(f"/{PROBE}/Protected", bearer(token))
    # unchanged, the same token passes
    if issued["mode"] != "none":
        assert make_guard(key, **issued).check(f"/{PROBE}/Protected", bearer(token)) == "alice"


def test_grant_carries_a_digest_never_the_secret(key: SigningKey) -> None:
    token = user(key, "alice", "secret", SECRET)
    claims = tokens.verify(key.verify_key, token)
    assert claims.grant.startswith("secret:") and SECRET not in claims.grant
    payload = base64.urlsafe_b64decode(token.split(".")[1] + "==")
    assert SECRET.encode() not in payload
    # keyed by the gateway key: another gateway with the same secret computes another digest
    assert Grants("secret", SECRET, {}, SigningKey.generate()).grant_for("alice") != claims.grant


def test_admins_only_in_allowlist_mode(key: SigningKey) -> None:
    guard = make_guard(key, "allowlist", allowlist={"alice": ALICE, "bob": ALICE_NEW}, admins={"alice"})
    allowlist = {"alice": ALICE, "bob": ALICE_NEW}
    caller = guard.caller(f"/{PROBE}/Protected", bearer(user(key, "alice", "allowlist", allowlist=allowlist)))
    assert (caller.identity, caller.admin, caller.proven) == ("alice", True, True)
    caller = guard.caller(f"/{PROBE}/Protected", bearer(user(key, "bob", "allowlist", allowlist=allowlist)))
    assert (caller.identity, caller.admin, caller.proven) == ("bob", False, True)
    # outside allowlist mode a claimed name proves nothing: for_config never lists admins there
    secret = make_guard(key, "secret", admins=set())
    caller = secret.caller(f"/{PROBE}/Protected", bearer(user(key, "alice")))
    assert (caller.admin, caller.proven) == (False, False)
    caller = secret.caller(f"/{PROBE}/Protected", bearer(admin_token(key, "ops")))
    assert (caller.identity, caller.admin) == ("admin:ops", True)


# -- over gRPC: a tiny probe service behind the guard, with the auth service -------------


async def _whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return current_identity.get().encode()


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, SigningKey]]:
    """A server in secret mode whose Probe service has a protected, an internal and a public method."""
    cfg = build_config({"mode": "secret", "secret": SECRET, "data_dir": str(tmp_path / "gateway")})
    key = signing_key(cfg.data_dir)
    guard = Guard.for_config(cfg, {PROBE: POLICY})
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
    forged = user(SigningKey.generate(), "alice")
    code, msg = await status_of(channel, "Protected", forged)
    assert (code, "signature is invalid" in msg) == (unauth, True)
    expired = user(key, "alice", ttl=60, now=time.time() - 3600)
    code, msg = await status_of(channel, "Protected", expired)
    assert (code, "expired" in msg) == (unauth, True)
    assert await call(channel, "Open") == b""


async def test_grpc_internal_method_refuses_user_token(probe: tuple[grpc.aio.Channel, SigningKey]) -> None:
    channel, key = probe
    code, msg = await status_of(channel, "Internal", user(key, "alice"))
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
