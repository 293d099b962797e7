"""What the CLI tells a shell user when something fails: one line, and an exit code.

0 ok, 1 the operation failed (not found, job error, gateway unreachable ...),
2 a usage error (bad option or value, unreadable config), 130 interrupted.
"""

from __future__ import annotations

import grpc

from services.common import errors, rpc

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Friendly words for the domain error a status stands for (services.common.rpc.error_for);
# the server's message follows them.
_FRIENDLY: dict[type[errors.GridstorError], str] = {
    errors.NotFound: "not found",
    errors.OutOfRange: "out of range",
    errors.TooLarge: "too large",
    errors.InvalidInput: "invalid request",
    errors.Unauthenticated: "not authenticated",
    errors.PermissionDenied: "permission denied",
    errors.LimitExceeded: "too large",
    errors.OutOfSpace: "gateway out of space",
    errors.Busy: "gateway busy",
    errors.Refused: "refused",
    errors.Conflict: "conflict, try again",
    errors.IntegrityError: "data integrity error",
}
# ... and for the codes that stand for no domain error (the gateway could not answer).
_FRIENDLY_CODES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.ALREADY_EXISTS: "already exists",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timed out",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.UNIMPLEMENTED: "not supported by this gateway",
    grpc.StatusCode.INTERNAL: "gateway error",
    grpc.StatusCode.UNKNOWN: "gateway error",
}

# Substrings of grpc's messages when a TLS handshake failed.
_TLS_FAILURE = ("handshake failed", "ssl_error", "certificate_verify_failed", "tsi_", "ssl routines")
# What the edge answers a plain-text client on its TLS port (services/edge/envoy.py PLAINTEXT_MESSAGE).
PLAINTEXT_REFUSED = "speaks TLS only"
# Substrings of grpc's own messages when no connection could be made at all.
_NO_CONNECTION = ("failed to connect to all addresses", "connection refused", "dns resolution failed", "connect failed")


class CliFailure(Exception):
    """An operation failed; ``str()`` is the one-line message (without the ``gridstor:`` prefix)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def retry_after(err: grpc.RpcError) -> str:
    """The ``retry-after`` trailer of a call refused for a rate or concurrency limit ("" if none)."""
    return rpc.trailer(err, "retry-after")


def is_tls_failure(details: str) -> bool:
    """Whether grpc's message says a TLS handshake failed (a certificate problem, usually)."""
    text = details.lower()
    return any(s in text for s in _TLS_FAILURE)


def describe_rpc_error(err: grpc.RpcError, what: str, address: str) -> str:
    """One line for a failed call to service ``what`` at ``address``."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else "") or ""
    if code is grpc.StatusCode.UNAVAILABLE and PLAINTEXT_REFUSED in details:
        return f"the gateway at {address} speaks TLS only: use --gateway https://{address} (and --ca FILE for its CA)"
    if code is grpc.StatusCode.UNAVAILABLE and is_tls_failure(details):
        return f"TLS with the {what} service at {address} failed: {details}"
    if code is grpc.StatusCode.UNAVAILABLE and any(s in details.lower() for s in _NO_CONNECTION):
        return (
            f"cannot reach the {what} service at {address}: is the gateway running? (start it with `make up`;"
            " choose the address with --gateway HOST:PORT or --config FILE)"
        )
    cls = rpc.error_class(code, rpc.trailer(err, rpc.ERROR_TRAILER))  # the exact cause, when the trailer names it
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after(err) and not issubclass(cls, errors.Busy):
        return f"over a limit: {details}"
    message = f"{_words(cls, code)}: {details or code.name}"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        message += " (run `gridstor login`)"
    return message


def _words(error: type[errors.GridstorError], code: grpc.StatusCode) -> str:
    """A few words for what the status means, from the domain error it stands for (its cause, when named)."""
    for cls in error.__mro__:
        if cls in _FRIENDLY:
            return _FRIENDLY[cls]
    return _FRIENDLY_CODES.get(code, code.name.lower())


def rpc_failure(err: grpc.RpcError, what: str, address: str) -> CliFailure:
    """A CliFailure (exit 1) for a failed call."""
    return CliFailure(describe_rpc_error(err, what, address))
