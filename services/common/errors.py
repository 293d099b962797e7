"""Domain errors shared by every gridstor service.

Nothing here imports grpc: the services map these classes to status codes in
one place (``status_for`` in services/common/rpc.py, and back with ``error_for``;
the class's name travels in the trailer ``gridstor-error``, so a caller gets the
same class back, e.g. OutOfSpace rather than any RESOURCE_EXHAUSTED).

    GridstorError
    ├── InvalidInput            bad id, URI, config value, range ... (INVALID_ARGUMENT)
    │   ├── InvalidFileId
    │   ├── InvalidURI
    │   ├── ValueTooLarge       a value over a backend's size limit
    │   ├── TooLarge            a request over a gateway limit (max_upload): never worth retrying;
    │   │                       REST answers 413, gRPC INVALID_ARGUMENT with the limit in BadRequest details
    │   └── OutOfRange          a read offset past the end of a file (OUT_OF_RANGE)
    ├── NotFound                no such file / key / namespace (NOT_FOUND)
    ├── IntegrityError          data present but wrong: bad key, tampered record (DATA_LOSS)
    │   └── WrongMasterKey
    ├── Unrecoverable           fewer than k good shards for a chunk (UNAVAILABLE)
    ├── StoreFailed             a write could not place every shard (UNAVAILABLE)
    ├── Unauthenticated         no / bad / expired token or credentials (UNAUTHENTICATED)
    ├── PermissionDenied        authenticated, but not allowed (PERMISSION_DENIED)
    ├── LimitExceeded           over a size, quota or rate limit (RESOURCE_EXHAUSTED)
    │   ├── RateLimited         too many requests or uploads now; ``retry_after`` seconds (trailer retry-after)
    │   │   └── Busy            every slot of a per-process cap is taken (downloads, uploads); retry soon
    │   └── OutOfSpace          the gateway's own disk is full (the upload spool), not the client's fault
    ├── TimedOut                a client stopped sending, e.g. a stalled upload (DEADLINE_EXCEEDED)
    ├── Refused                 not possible in this state, e.g. writes on a replica (FAILED_PRECONDITION)
    ├── Conflict                a compare-and-swap lost: the stored value changed (ABORTED)
    └── BackendError            one backend misbehaved; the engine routes around it
        ├── BackendUnavailable  cannot connect / folder gone / timed out
        ├── NamespaceFull       0-db quota reached ("No space left on this namespace")
        ├── ReadOnly            namespace locked, frozen or selected read-only
        ├── AccessDenied        wrong password, private namespace, not admin
        └── KeyNotFound         the key is not (or no longer) stored
"""

from __future__ import annotations


class GridstorError(Exception):
    """Base of every error gridstor raises on purpose."""


class InvalidInput(GridstorError, ValueError):
    """The caller passed something malformed; the message says what."""


class InvalidFileId(InvalidInput):
    """A string that does not follow the file id grammar."""


class InvalidURI(InvalidInput):
    """A backend URI that cannot be parsed or names an unknown scheme."""


class ValueTooLarge(InvalidInput):
    """A value larger than the backend accepts."""


class TooLarge(InvalidInput):
    """A request over a size limit of the gateway (an upload over ``max_upload``); ``limit`` in bytes.

    Unlike LimitExceeded (a quota or rate that may free up), sending the same again can never succeed.
    """

    def __init__(self, message: str, limit: int, field: str = "body") -> None:
        super().__init__(message)
        self.limit = limit
        self.field = field


class OutOfRange(InvalidInput):
    """A position past the end of the data, e.g. a read offset beyond the file size."""


class NotFound(GridstorError):
    """The thing asked for does not exist."""


class IntegrityError(GridstorError):
    """Stored data exists but does not verify."""


class WrongMasterKey(IntegrityError):
    """The gateway master key does not unwrap this file's key."""


class Unrecoverable(GridstorError):
    """Too few good shards remain to rebuild a chunk."""


class StoreFailed(GridstorError):
    """A file could not be stored; nothing was registered."""


class Unauthenticated(GridstorError):
    """Credentials or token missing, malformed, forged or expired."""


class PermissionDenied(GridstorError):
    """The caller is known but may not do this."""


class LimitExceeded(GridstorError):
    """A size, quota or rate limit was hit."""


class RateLimited(LimitExceeded):
    """Over a per-client rate or concurrency limit; retrying after ``retry_after`` seconds may succeed."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Busy(RateLimited):
    """Every slot of a per-process cap (concurrent downloads, uploads) stayed taken while the call waited."""


class OutOfSpace(LimitExceeded):
    """The gateway's own disk (the upload spool) is full: nothing the client sent is at fault; retry later."""


class TimedOut(GridstorError):
    """The client went quiet for longer than allowed (a stalled upload); what it sent is dropped."""


class Refused(GridstorError):
    """The request cannot be served in the gateway's current state or role."""


class Conflict(GridstorError):
    """A conditional update found the stored value changed; re-read and retry."""


class BackendError(GridstorError):
    """A single backend failed; ``backend`` names it (never with a password)."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.reason = message


class BackendUnavailable(BackendError):
    """The backend cannot be reached."""


class NamespaceFull(BackendError):
    """The backend has no space left."""


class ReadOnly(BackendError):
    """The backend refuses writes."""


class AccessDenied(BackendError):
    """The backend refuses our credentials."""


class KeyNotFound(BackendError):
    """The key does not exist on that backend."""


def named(name: str) -> type[GridstorError] | None:
    """The GridstorError class called ``name`` (this module's classes and their subclasses anywhere), or None."""
    todo: list[type[GridstorError]] = [GridstorError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None
