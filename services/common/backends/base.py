"""The one small interface every storage backend implements.

A backend is a key/value namespace addressed by a URI. It works in one of two
modes, mirroring 0-db:

* ``seq`` (sequential): ``put(value)`` allocates the next key, an 8-byte
  little-endian integer, and returns it. ``set(key, value)`` may only update an
  existing key. Shards and metadata records live in seq backends.
* ``user``: the caller picks the key (at most 255 bytes) with ``set``; ``put``
  is refused. The dedup index (content hash -> metadata id) lives in one.

Every method is a coroutine. Errors are the ``BackendError`` family from
``services.common.errors``; a missing key is ``None`` from ``get`` (not an
error), but ``KeyNotFound`` from ``delete`` and from ``set`` in seq mode.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.common.errors import InvalidInput, ValueTooLarge

MAX_VALUE_SIZE = 8 * 1024 * 1024
"""0-db's hard value limit (8 MiB); every driver enforces it so data can move between kinds."""

MAX_KEY_SIZE = 255
SEQ_KEY_SIZE = 8


class Mode(enum.Enum):
    SEQ = "seq"
    USER = "user"


def seq_key(n: int) -> bytes:
    """Encode a sequential id as 0-db does: 8 bytes, little-endian."""
    return n.to_bytes(SEQ_KEY_SIZE, "little")


def seq_id(key: bytes) -> int:
    """Decode an 8-byte little-endian sequential key."""
    if len(key) != SEQ_KEY_SIZE:
        raise ValueError(f"a sequential key has {SEQ_KEY_SIZE} bytes, got {len(key)}")
    return int.from_bytes(key, "little")


@dataclass(frozen=True)
class BackendInfo:
    """What a backend says about itself (for health, placement and metrics)."""

    entries: int
    used_bytes: int
    free_bytes: int | None  # None: unknown / unlimited


class Backend(abc.ABC):
    """A key/value namespace; see the module docstring for the contract."""

    #: The URI without any password, safe for logs and error messages.
    name: str
    mode: Mode

    @abc.abstractmethod
    async def put(self, value: bytes) -> bytes:
        """Store a new value (seq mode) and return its new key."""

    @abc.abstractmethod
    async def set(self, key: bytes, value: bytes) -> None:
        """Write ``value`` at ``key`` (user mode) or update an existing key (seq mode)."""

    @abc.abstractmethod
    async def get(self, key: bytes) -> bytes | None:
        """Return the value at ``key``, or None when it is not stored."""

    @abc.abstractmethod
    async def exists(self, key: bytes) -> bool:
        """Whether ``key`` is stored."""

    @abc.abstractmethod
    async def delete(self, key: bytes) -> None:
        """Remove ``key``; ``KeyNotFound`` when it is not stored."""

    @abc.abstractmethod
    def scan(self, after: bytes | None = None) -> AsyncIterator[bytes]:
        """Yield stored keys in write order, starting after ``after`` (all when None)."""

    @abc.abstractmethod
    async def info(self) -> BackendInfo:
        """Entries, bytes used and bytes free (raises BackendUnavailable when down)."""

    def _check_key(self, key: bytes) -> None:
        """InvalidInput unless ``key`` is 1 to MAX_KEY_SIZE bytes."""
        if not isinstance(key, bytes | bytearray):
            raise InvalidInput(f"{self.name}: a key is bytes, got {type(key).__name__}")
        if not 1 <= len(key) <= MAX_KEY_SIZE:
            raise InvalidInput(f"{self.name}: a key has 1 to {MAX_KEY_SIZE} bytes, got {len(key)}")

    def _check_value(self, value: bytes) -> None:
        """InvalidInput unless bytes; ValueTooLarge over MAX_VALUE_SIZE (checked before anything is sent)."""
        if not isinstance(value, bytes | bytearray | memoryview):
            raise InvalidInput(f"{self.name}: a value is bytes, got {type(value).__name__}")
        size = value.nbytes if isinstance(value, memoryview) else len(value)
        if size > MAX_VALUE_SIZE:
            raise ValueTooLarge(f"{self.name}: value of {size} bytes is over the {MAX_VALUE_SIZE} byte limit (0-db's)")

    def _is_possible_key(self, key: bytes) -> bool:
        """Whether ``key`` could be stored here (a seq namespace only has 8-byte keys)."""
        self._check_key(key)
        return self.mode is Mode.USER or len(key) == SEQ_KEY_SIZE

    #: True when ``put_blocking`` works (local storage): the engine may then write
    #: several backends' shards from one worker thread instead of one hop each.
    local: bool = False

    def put_blocking(self, value: bytes) -> bytes:
        """``put`` for a caller on a worker thread; call ``after_blocking_put`` on the loop afterwards."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking put")

    def after_blocking_put(self) -> None:  # noqa: B027 - an optional hook; most backends need nothing here
        """Loop-side bookkeeping after ``put_blocking`` calls (e.g. arm a background flush)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections / file handles. The backend is unusable afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.mode.value}>"
