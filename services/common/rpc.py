"""gRPC plumbing every service shares: error mapping, token checks, limits.

* Domain errors (services.common.errors) become status codes in ONE place,
  ``status_for``; handlers just raise. A caller of another gateway service
  turns a status back into the domain error with ``error_for`` / ``rpc_error``.
* ``GuardInterceptor`` checks tokens locally (ed25519, no call to auth):
  public methods pass; internal methods (service to service) need a token
  whose subject starts with ``service:``; admin methods (repair, scrub,
  backup, restore) need an operator's token in every mode, public included:
  subject ``admin:...`` (minted from the gateway key by ``gridstor admin
  token`` on the gateway machine) or an identity listed in ``admins``; every
  other method needs a valid token unless the gateway runs in ``public``
  mode. The caller's identity is in ``current_identity`` for the handler.
* Limits (services.common.limits): after the token check, every call of a
  client (not of a service or an operator) is counted per identity and per
  client address; Upload also holds a concurrent-upload lease. Over a limit
  answers RESOURCE_EXHAUSTED with the trailer ``retry-after: N``.

Starting and running a server with these is services/common/server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import grpc
from nacl.signing import SigningKey, VerifyKey

from services.common import errors, tokens
from services.common.config import Config
from services.common.keys import signing_key
from services.common.limits import Limiter

log = logging.getLogger(__name__)

SERVICE_SUBJECT_PREFIX = "service:"
ADMIN_SUBJECT_PREFIX = "admin:"

Context = grpc.aio.ServicerContext[Any, Any]

current_identity: contextvars.ContextVar[str] = contextvars.ContextVar("current_identity", default="")

_STATUS: list[tuple[type[errors.GridstorError], grpc.StatusCode]] = [
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),  # before its base class InvalidInput
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.TimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.WrongMasterKey, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.Unrecoverable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreFailed, grpc.StatusCode.UNAVAILABLE),
    (errors.BackendError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a domain error maps to (INTERNAL for anything else)."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the service log"


# The way back, for a caller of the gateway's own services: the class the first row of _STATUS
# gives for each code. UNAVAILABLE and DEADLINE_EXCEEDED are left out: grpc answers them itself
# when a call never reached the service, so they say nothing about the request.
_TRANSPORT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_ERRORS: dict[grpc.StatusCode, type[errors.GridstorError]] = {
    code: cls for cls, code in reversed(_STATUS) if code not in _TRANSPORT
}


def error_for(code: grpc.StatusCode, details: str, service: str) -> errors.GridstorError:
    """The domain error a failed call to the gateway's ``service`` stands for (``status_for`` in reverse).

    A code no domain error maps to (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL ...)
    means the service could not answer: BackendUnavailable naming it.
    """
    cls = _ERRORS.get(code)
    if cls is None:
        return errors.BackendUnavailable(f"{service} service", f"{code.name}: {details or code.name}")
    return cls(details or code.name)


def rpc_error(exc: grpc.RpcError, service: str) -> errors.GridstorError:
    """``error_for`` the code and details of a failed call (UNKNOWN when it carries none)."""
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return error_for(exc.code(), exc.details() or "", service)
    return error_for(grpc.StatusCode.UNKNOWN, str(exc), service)


@dataclass(frozen=True)
class Policy:
    """Which methods of a service need what (method names without the service prefix)."""

    public: frozenset[str] = frozenset()
    internal: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()


@dataclass
class Guard:
    """Token verification settings shared by the interceptor and in-process callers."""

    verify_key: VerifyKey
    mode: str
    policies: dict[str, Policy] = field(default_factory=dict)  # full service name -> policy
    admins: frozenset[str] = frozenset()  # identities whose user tokens may call admin methods
    limiter: Limiter | None = None  # per-client limits; server.start_server sets the config's when None

    @classmethod
    def for_config(cls, cfg: Config, policies: dict[str, Policy]) -> Guard:
        """The guard of a gateway service configured by ``cfg``."""
        return cls(signing_key(cfg.data_dir).verify_key, cfg.mode, policies, frozenset(cfg.admins))

    def check(self, full_method: str, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """Identity allowed to call ``full_method`` with this metadata, or Unauthenticated."""
        service, _, method = full_method.lstrip("/").partition("/")
        policy = self.policies.get(service, Policy())
        if method in policy.public:
            return ""
        token = ""
        for key, value in metadata:
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, rest = text.partition(" ")
                if scheme.lower() == "bearer":
                    token = rest.strip()
        if method in policy.internal:
            claims = tokens.verify(self.verify_key, token)
            if not claims.subject.startswith(SERVICE_SUBJECT_PREFIX):
                raise errors.PermissionDenied(f"{method} is internal to the gateway's services")
            return claims.subject
        if method in policy.admin:
            if not token:
                raise errors.Unauthenticated(
                    f"{method} is for the gateway's operators: send an admin token"
                    " (`gridstor admin token` on the gateway machine)"
                )
            claims = tokens.verify(self.verify_key, token)
            subject = claims.subject
            if not (subject.startswith((ADMIN_SUBJECT_PREFIX, SERVICE_SUBJECT_PREFIX)) or subject in self.admins):
                raise errors.PermissionDenied(
                    f"{method} is for the gateway's operators: use a token from `gridstor admin token` on the"
                    " gateway machine, or an identity listed in the config's admins"
                )
            return subject
        if self.mode == "public" and not token:
            return ""
        return tokens.verify(self.verify_key, token).subject


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks tokens and maps domain errors to status codes for every handler."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method: str = details.method
        # Health and reflection need no token and are never limited; left unwrapped, since grpc's
        # own handlers (Health.Watch) stream with context.write rather than as generators.
        if handler is None or method.startswith("/grpc."):
            return handler
        metadata = tuple(details.invocation_metadata or ())
        guard = self.guard
        limiter = guard.limiter
        if limiter is None:
            return _wrap(handler, lambda: guard.check(method, metadata), _no_limits)

        async def admit(identity: str, context: Context) -> AbstractAsyncContextManager[None]:
            address = await limiter.client_address(context.peer(), metadata)
            return limiter.admit(method, identity, address)

        return _wrap(handler, lambda: guard.check(method, metadata), admit)


Admit = Callable[[str, Context], Awaitable[AbstractAsyncContextManager[None]]]


async def _no_limits(identity: str, context: Context) -> AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in handler", exc_info=exc)
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, errors.RateLimited):
        trailers = (("retry-after", str(exc.retry_after)),)  # seconds, as HTTP's Retry-After
    await context.abort(code, message, trailing_metadata=trailers)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], authorize: Callable[[], str], admit: Admit
) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler

    if h.unary_unary or h.stream_unary:
        inner = h.unary_unary or h.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                identity = authorize()
                current_identity.set(identity)
                async with await admit(identity, context):
                    return await inner(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # domain errors map to codes; anything else is INTERNAL, logged
                await _abort(context, exc)

        make = grpc.unary_unary_rpc_method_handler if h.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)

    inner_s = h.unary_stream or h.stream_stream

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            identity = authorize()
            current_identity.set(identity)
            async with await admit(identity, context):
                async for item in inner_s(request, context):
                    yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc)

    make_s = grpc.unary_stream_rpc_method_handler if h.unary_stream else grpc.stream_stream_rpc_method_handler
    return make_s(streaming, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)


def service_token(key: SigningKey, name: str, ttl: int = 86400) -> str:
    """A token for service-to-service calls (internal methods)."""
    return tokens.issue(key, SERVICE_SUBJECT_PREFIX + name, ttl)[0]


def admin_token(key: SigningKey, name: str, ttl: int = 3600) -> str:
    """An operator's token for admin methods (whoever can read the gateway key may mint one)."""
    return tokens.issue(key, ADMIN_SUBJECT_PREFIX + name, ttl)[0]
