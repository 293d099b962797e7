"""gRPC plumbing every service shares: error mapping, token checks, limits, malformed requests.

* Domain errors (services.common.errors) become status codes in ONE place,
  ``status_for``; handlers just raise. A caller of another gateway service
  turns a status back into the domain error with ``error_for`` / ``rpc_error``.
  Refusals (every code but INTERNAL) are logged in one line; INTERNAL with its
  traceback. Refusals carry trailers for clients and the edge:
  ``gridstor-error`` (every domain error: its class name, so ``error_for``
  rebuilds the same class), ``retry-after`` (rate limits, Busy),
  ``www-authenticate`` (UNAUTHENTICATED, which REST answers 401), and for a
  request over a size limit (errors.TooLarge)
  ``grpc-status-details-bin`` (google.rpc BadRequest and ErrorInfo naming the
  limit) plus ``x-gridstor-http-status: 413``, which the edge turns into the
  REST status (services/edge/envoy.py) and strips. A message to a client never
  names a server path: the gateway's folders become names (redact.py).
* A request that cannot be parsed (e.g. a string field that is not UTF-8)
  answers INVALID_ARGUMENT naming the message type, instead of grpc's UNKNOWN
  with a traceback: the handlers' deserializers are wrapped here.
* ``GuardInterceptor`` checks tokens locally (ed25519, no call to auth):
  public methods pass; internal methods (service to service) need a token
  whose subject starts with ``service:``; admin methods (repair, scrub,
  backup, restore) need an operator's token in every mode, public included:
  subject ``admin:...`` (minted from the gateway key by ``gridstor admin
  token`` on the gateway machine) or, in allowlist mode only, an identity listed
  in ``admins``; every other method needs a valid token unless the gateway runs
  in ``public`` mode. A login token must still stand on its grant (the mode,
  secret or allowlist key it was issued on: services/common/grants.py). The
  ``authorization`` header must read ``Bearer <token>``; anything else is
  refused saying what is wrong. The caller is in ``current_caller`` (its
  identity also in ``current_identity``) for the handler.
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
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from nacl.signing import SigningKey, VerifyKey

from services.common import errors, tokens
from services.common.config import Config
from services.common.grants import Grants
from services.common.keys import signing_key
from services.common.limits import Limiter
from services.common.redact import Redactor

log = logging.getLogger(__name__)

SERVICE_SUBJECT_PREFIX = "service:"
ADMIN_SUBJECT_PREFIX = "admin:"

Context = grpc.aio.ServicerContext[Any, Any]

# The REST status the edge answers instead of the code's usual mapping (envoy.py applies it, then strips it).
HTTP_STATUS_TRAILER = "x-gridstor-http-status"
REALM = "gridstor"
ERROR_DOMAIN = "gridstor"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the guard established it."""

    identity: str = ""  # the token's subject; "" without a token (public mode, public methods)
    admin: bool = False  # an operator: an admin (or service) token, or in allowlist mode an identity in admins
    proven: bool = False  # the identity was proven by its key (allowlist mode), so it can own things


NOBODY = Caller()  # no token: public methods, and every method in public mode
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("current_caller", default=NOBODY)
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


ERROR_TRAILER = "gridstor-error"  # the domain error's class name, so a caller can rebuild the same class


def error_for(code: grpc.StatusCode, details: str, service: str, kind: str = "") -> errors.GridstorError:
    """The domain error a failed call to the gateway's ``service`` stands for (``status_for`` in reverse).

    ``kind`` (the ``gridstor-error`` trailer) names the exact class the service raised; it is used
    when it is a subclass of the code's class (e.g. OutOfSpace for RESOURCE_EXHAUSTED). A code no
    domain error maps to (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL ...) means the service could
    not answer: BackendUnavailable naming it.
    """
    cls = _ERRORS.get(code)
    if cls is None:
        return errors.BackendUnavailable(f"{service} service", f"{code.name}: {details or code.name}")
    exact = errors.named(kind) if kind else None
    if exact is not None and issubclass(exact, cls) and not issubclass(exact, errors.BackendError):
        try:
            return exact(details or code.name)
        except TypeError:  # a class whose constructor wants more than a message
            pass
    return cls(details or code.name)


def error_class(code: grpc.StatusCode, kind: str = "") -> type[errors.GridstorError]:
    """The domain error class of a failed call: the one ``kind`` names if a subclass of the code's, else the code's.

    A code no domain error maps to gives BackendUnavailable. Unlike ``error_for`` it names any such
    class, also one that cannot be rebuilt from a message alone.
    """
    cls = _ERRORS.get(code, errors.BackendUnavailable)
    exact = errors.named(kind) if kind else None
    return exact if exact is not None and issubclass(exact, cls) else cls


def trailer(call: grpc.RpcError, key: str) -> str:
    """The value of trailing metadata ``key`` of a failed call ("" when absent or not readable)."""
    if not isinstance(call, grpc.Call | grpc.aio.AioRpcError):
        return ""
    try:
        pairs: Any = call.trailing_metadata() or ()  # grpc.Call: tuples; grpc.aio: a Metadata of pairs
    except NotImplementedError:  # a Call that carries no metadata
        return ""
    for name, value in pairs:
        if name == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def rpc_error(exc: grpc.RpcError, service: str) -> errors.GridstorError:
    """``error_for`` the code, details and error trailer of a failed call (UNKNOWN when it carries none)."""
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return error_for(exc.code(), exc.details() or "", service, trailer(exc, ERROR_TRAILER))
    return error_for(grpc.StatusCode.UNKNOWN, str(exc), service)


@dataclass(frozen=True)
class Policy:
    """Which methods of a service need what (method names without the service prefix)."""

    public: frozenset[str] = frozenset()
    internal: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token of the ``authorization: Bearer <token>`` header ("" without one); TokenError for a malformed one."""
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        return ""
    if len(values) > 1:
        raise tokens.TokenError(f"send one authorization header, not {len(values)}", error="invalid_request")
    value = values[0]
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    scheme, _, rest = text.strip().partition(" ")
    if scheme.lower() != "bearer":
        if scheme.startswith(tokens.PREFIX + "."):
            raise tokens.TokenError(
                "the authorization header holds a token without its scheme: send 'Authorization: Bearer <token>'",
                error="invalid_request",
            )
        shown = scheme if len(scheme) <= 20 else scheme[:20] + "..."
        raise tokens.TokenError(
            f"the authorization header must be 'Bearer <token>', got the scheme {shown!r}", error="invalid_request"
        )
    token = rest.strip()
    if not token:
        raise tokens.TokenError(
            "the authorization header says Bearer but carries no token: send 'Authorization: Bearer <token>'",
            error="invalid_request",
        )
    return token


@dataclass
class Guard:
    """Token verification settings shared by the interceptor and in-process callers."""

    verify_key: VerifyKey
    grants: Grants  # the mode and what login tokens must still stand on
    policies: dict[str, Policy] = field(default_factory=dict)  # full service name -> policy
    admins: frozenset[str] = frozenset()  # allowlist mode: identities whose login tokens may call admin methods
    limiter: Limiter | None = None  # per-client limits; server.start_server sets the config's when None
    redact: Redactor = field(default_factory=Redactor)  # server paths out of the messages clients get

    @classmethod
    def for_config(cls, cfg: Config, policies: dict[str, Policy]) -> Guard:
        """The guard of a gateway service configured by ``cfg``."""
        key = signing_key(cfg.data_dir)
        # Config.validate refuses admins outside allowlist mode; the guard holds to that on its own too.
        admins = frozenset(cfg.admins) if cfg.mode == "allowlist" else frozenset()
        return cls(key.verify_key, Grants.from_config(cfg, key), policies, admins, redact=Redactor.for_config(cfg))

    @property
    def mode(self) -> str:
        return self.grants.mode

    def check(self, full_method: str, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """Identity allowed to call ``full_method`` with this metadata, or Unauthenticated / PermissionDenied."""
        return self.caller(full_method, metadata).identity

    def caller(self, full_method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
        """The caller allowed to call ``full_method`` with this metadata, or Unauthenticated / PermissionDenied."""
        service, _, method = full_method.lstrip("/").partition("/")
        policy = self.policies.get(service, Policy())
        if method in policy.public:
            return NOBODY
        token = bearer_token(metadata)
        if method in policy.internal:
            claims = tokens.verify(self.verify_key, token)
            if not claims.subject.startswith(SERVICE_SUBJECT_PREFIX):
                raise errors.PermissionDenied(f"{method} is internal to the gateway's services")
            return Caller(claims.subject, admin=True)
        if method in policy.admin:
            if not token:
                raise tokens.TokenError(
                    f"{method} is for the gateway's operators: send an admin token"
                    " (`gridstor admin token` on the gateway machine)",
                    error="",
                )
            caller = self._verified(token)
            if not caller.admin:
                raise errors.PermissionDenied(
                    f"{method} is for the gateway's operators: use a token from `gridstor admin token` on the"
                    " gateway machine"
                    + (", or log in as an identity listed in the config's admins" if self.mode == "allowlist" else "")
                )
            return caller
        if self.mode == "public" and not token:
            return NOBODY
        return self._verified(token)

    def _verified(self, token: str) -> Caller:
        """The caller a token speaks for: signed by the gateway key, unexpired, and its grant still standing."""
        claims = tokens.verify(self.verify_key, token)
        subject = claims.subject
        if subject.startswith((ADMIN_SUBJECT_PREFIX, SERVICE_SUBJECT_PREFIX)):
            return Caller(subject, admin=True)
        self.grants.check(subject, claims.grant)
        allowlist = self.mode == "allowlist"
        return Caller(subject, admin=allowlist and subject in self.admins, proven=allowlist)


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
            return _wrap(handler, method, lambda: guard.caller(method, metadata), _no_limits, guard.redact)

        async def admit(identity: str, context: Context) -> AbstractAsyncContextManager[None]:
            address = await limiter.client_address(context.peer(), metadata)
            return limiter.admit(method, identity, address)

        return _wrap(handler, method, lambda: guard.caller(method, metadata), admit, guard.redact)


Admit = Callable[[str, Context], Awaitable[AbstractAsyncContextManager[None]]]


async def _no_limits(identity: str, context: Context) -> AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


def _any(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def error_trailers(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata a refusal carries besides its code and message (see the module docstring)."""
    named: tuple[tuple[str, str | bytes], ...] = ()
    if isinstance(exc, errors.GridstorError):
        named = ((ERROR_TRAILER, type(exc).__name__),)  # the cause, e.g. OutOfSpace, not any RESOURCE_EXHAUSTED
    return named + _cause_trailers(exc, code, message)


def _cause_trailers(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[tuple[str, str | bytes], ...]:
    if isinstance(exc, errors.RateLimited):
        return (("retry-after", str(exc.retry_after)),)  # seconds, as HTTP's Retry-After
    if isinstance(exc, errors.Unauthenticated):
        challenge = f'Bearer realm="{REALM}"'
        error = getattr(exc, "error", "")
        if error:
            challenge += f', error="{error}"'  # RFC 6750: invalid_request / invalid_token
        return (("www-authenticate", challenge),)
    if isinstance(exc, errors.TooLarge):
        status = status_pb2.Status(
            code=code.value[0],
            message=message,
            details=[
                _any(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=message)
                        ]
                    )
                ),
                _any(
                    error_details_pb2.ErrorInfo(
                        reason="TOO_LARGE", domain=ERROR_DOMAIN, metadata={"limit_bytes": str(exc.limit)}
                    )
                ),
            ],
        )
        return (("grpc-status-details-bin", status.SerializeToString()), (HTTP_STATUS_TRAILER, "413"))
    return ()


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str, redact: Redactor
) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in handler", exc_info=exc, extra={"method": method})
    else:  # a refusal: the client's doing (or a backend's state), one line without a traceback
        log.info("refused %s: %s: %s", method, code.name, message, extra={"caller": current_identity.get()})
    message = redact(message)  # the log above keeps the server's paths; the client gets their names
    await context.abort(code, message, trailing_metadata=error_trailers(exc, code, message))


@dataclass(frozen=True)
class _Unreadable:
    """Stands in for a request message that could not be parsed; the handler wrapper refuses it."""

    message: str


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize``, but a message it cannot parse becomes an _Unreadable instead of grpc's UNKNOWN."""
    if deserialize is None:
        return None

    def read(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or RuntimeError from some protobuf backends
            return _Unreadable(_unreadable_message(deserialize, exc))

    return read


def _unreadable_message(deserialize: Callable[[bytes], Any], exc: BaseException) -> str:
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "") or "message"
    detail = str(exc)
    if "utf-8" in detail.lower():
        return f"the request is not a valid {name}: a text field (such as a file id or a name) is not valid UTF-8"
    return f"the request is not a valid {name} (protobuf could not parse it)"


def _readable(request: Any) -> Any:
    if isinstance(request, _Unreadable):
        raise errors.InvalidInput(request.message)
    return request


async def _readable_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _readable(request)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    authorize: Callable[[], Caller],
    admit: Admit,
    redact: Redactor,
) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler
    deserializer = _lenient(h.request_deserializer)

    def enter() -> Caller:
        caller = authorize()
        current_caller.set(caller)
        current_identity.set(caller.identity)
        return caller

    if h.unary_unary or h.stream_unary:
        inner = h.unary_unary or h.stream_unary
        streamed_in = h.stream_unary is not None

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                caller = enter()
                request = _readable_stream(request) if streamed_in else _readable(request)
                async with await admit(caller.identity, context):
                    return await inner(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # domain errors map to codes; anything else is INTERNAL, logged
                await _abort(context, exc, method, redact)

        make = grpc.unary_unary_rpc_method_handler if h.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary, request_deserializer=deserializer, response_serializer=h.response_serializer)

    inner_s = h.unary_stream or h.stream_stream
    streamed_in_s = h.stream_stream is not None

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            caller = enter()
            request = _readable_stream(request) if streamed_in_s else _readable(request)
            async with await admit(caller.identity, context):
                async for item in inner_s(request, context):
                    yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, method, redact)

    make_s = grpc.unary_stream_rpc_method_handler if h.unary_stream else grpc.stream_stream_rpc_method_handler
    return make_s(streaming, request_deserializer=deserializer, response_serializer=h.response_serializer)


def service_token(key: SigningKey, name: str, ttl: int = 86400) -> str:
    """A token for service-to-service calls (internal methods)."""
    return tokens.issue(key, SERVICE_SUBJECT_PREFIX + name, ttl)[0]


def admin_token(key: SigningKey, name: str, ttl: int = 3600) -> str:
    """An operator's token for admin methods (whoever can read the gateway key may mint one)."""
    return tokens.issue(key, ADMIN_SUBJECT_PREFIX + name, ttl)[0]
