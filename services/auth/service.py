"""AuthService over grpc.aio: a thin servicer over services.auth.authn."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gridstor.v1 import auth_pb2, auth_pb2_grpc
from services.auth.authn import Authenticator, AuthRefused, RedisReplayGuard, ReplayGuard
from services.common import errors
from services.common.config import Config
from services.common.keys import signing_key
from services.common.metrics import Registry
from services.common.rpc import Guard, Policy, Running, start_server

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
    cfg: Config, *, port: int | None = None, registry: Registry | None = None
) -> tuple[Running, Callable[[], Awaitable[None]]]:
    """Load (or create) the gateway key, connect the replay store, start the server."""
    key = signing_key(cfg.data_dir)
    # Only allowlist mode has signatures to replay, so only it needs Redis.
    replay: ReplayGuard | None = RedisReplayGuard.from_url(cfg.redis_url) if cfg.mode == "allowlist" else None
    try:
        authn = Authenticator.from_config(cfg, key, replay)
        guard = Guard.for_config(cfg, {SERVICE_NAME: POLICY})
        servicer = AuthServicer(authn, registry or Registry())

        def register(server: grpc.aio.Server) -> list[str]:
            auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
            return [SERVICE_NAME]

        running = await start_server(cfg, guard, register, port=cfg.ports["auth"] if port is None else port)
    except BaseException:
        if replay is not None:
            await replay.close()
        raise
    log.info("auth ready", extra={"mode": cfg.mode, "key_id": authn.key_id, "identities": len(cfg.allowlist)})

    async def cleanup() -> None:
        if replay is not None:
            await replay.close()

    return running, cleanup
