"""AuthService over grpc.aio: a thin servicer over services.auth.authn."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any

import grpc

from gridstor.v1 import auth_pb2, auth_pb2_grpc
from services.auth.authn import Authenticator, AuthRefused, RedisReplayGuard
from services.common import errors, readiness
from services.common.config import Config
from services.common.keys import signing_key
from services.common.metrics import Registry
from services.common.rpc import Policy
from services.common.server import READY_EVERY, Cleanup, Running, Wiring, create_server

log = logging.getLogger(__name__)

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
POLICY = Policy(public=frozenset({"Authenticate", "PublicKey"}))

Context = grpc.aio.ServicerContext[Any, Any]


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Unpacks requests, calls the Authenticator, counts and logs the outcome."""

    def __init__(self, authn: Authenticator, registry: Registry) -> None:
        self.authn = authn
        self.issued = registry.counter("auth_issued_total", "Tokens issued by Authenticate, by security mode")
        self.refused = registry.counter("auth_refused_total", "Authenticate requests refused, by reason")

    async def Authenticate(self, request: auth_pb2.AuthenticateRequest, context: Context) -> auth_pb2.AuthenticateReply:
        """Exchange credentials for a token."""
        credential = request.WhichOneof("credential")
        try:
            grant = await self.authn.authenticate(
                request.identity,
                request.epoch,
                signature=request.signature if credential == "signature" else None,
                secret=request.secret if credential == "secret" else None,
            )
        except AuthRefused as exc:
            self.refused.inc(reason=exc.reason)
            log.info(
                "authentication refused",
                extra={"identity": request.identity, "reason": exc.reason, "detail": exc.detail},
            )
            raise
        except errors.InvalidInput as exc:
            self.refused.inc(reason="invalid_request")
            log.info("authentication refused", extra={"reason": "invalid_request", "detail": str(exc)})
            raise
        except errors.BackendError as exc:
            self.refused.inc(reason="replay_store_unavailable")
            log.warning("authentication failed", extra={"reason": "replay_store_unavailable", "detail": str(exc)})
            raise
        self.issued.inc(mode=self.authn.mode)
        log.info(
            "token issued",
            extra={"identity": grant.identity, "token_id": grant.token_id, "expires_at": grant.expires_at},
        )
        return auth_pb2.AuthenticateReply(
            token=grant.token, expires_at=grant.expires_at, identity=grant.identity, key_id=grant.key_id
        )

    async def PublicKey(self, request: auth_pb2.PublicKeyRequest, context: Context) -> auth_pb2.PublicKeyReply:
        """The gateway's ed25519 verification key."""
        key, kid, algorithm = self.authn.public_key()
        return auth_pb2.PublicKeyReply(public_key=key, key_id=kid, algorithm=algorithm)


async def build(
    cfg: Config, *, port: int | None = None, registry: Registry | None = None, ready_every: float = READY_EVERY
) -> tuple[Running, Cleanup]:
    """Load (or create) the gateway key, connect the replay store, start the server.

    Serving always, except in allowlist mode while Redis (the replay store) does not answer.
    """

    async def setup(stack: contextlib.AsyncExitStack) -> Wiring:
        key = signing_key(cfg.data_dir)
        replay: RedisReplayGuard | None = None
        ready = None
        if cfg.mode == "allowlist":  # only allowlist mode has signatures to replay, so only it needs Redis
            replay = RedisReplayGuard.from_url(cfg.redis_url)
            stack.push_async_callback(replay.close)
            ready = partial(readiness.redis, replay.client, "replay protection")
        authn = Authenticator.from_config(cfg, key, replay)
        servicer = AuthServicer(authn, registry or Registry())
        log.info("auth started", extra={"mode": cfg.mode, "key_id": authn.key_id, "identities": len(cfg.allowlist)})
        return Wiring(SERVICE_NAME, partial(auth_pb2_grpc.add_AuthServiceServicer_to_server, servicer), POLICY, ready)

    return await create_server(cfg, "auth", setup, port=port, ready_every=ready_every)
