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

Identity: a shard backend carries a random marker written when it is first
set up (``identity``; dir: the id in meta.json, 0-db: a marker value, the
namespace's first key, see zdb.py). A backend wiped and set up again gets a
new one, so records, which note the identity of each backend they wrote to,
can tell that their old shards are gone even though sequential keys restart
from 0 and the same keys now hold other data. ``b""`` = unknown.

``put_each`` stores one value in each of several backends at once, the way
the engine spreads a chunk's shards: each driver class writes its share with
its ``put_batch`` (by default ``put`` concurrently; dir backends override it to
write the whole share from one worker thread). Reads go the same way where a
driver sets ``batch_reads``: ``get_batch`` reads a ``ReadBatch`` (dir backends:
a chunk's shards from one worker thread, one after another, results filling in
as they come, so a caller that stops waiting knows which read is stuck).
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self, cast

from services.common.errors import BackendError, BackendUnavailable, InvalidInput, ValueTooLarge

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


class _Pending:
    """A ``ReadBatch`` result not read yet."""

    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()


class ReadBatch:
    """Keys to read from several backends of one class at once (``Backend.get_batch``).

    ``results[i]`` is the value of ``items[i]`` (``None``: not stored), its BackendError, or
    PENDING until it is read. ``started`` counts the items whose read has begun (a driver reading
    them one after another raises it as it goes; one reading them all at once sets it to all), and
    a driver starts no further item once ``stop`` is set: its caller reads those another way.
    """

    def __init__(self, items: Sequence[tuple[Backend, bytes]]) -> None:
        self.items = items
        self.results: list[bytes | BackendError | _Pending | None] = [PENDING] * len(items)
        self.started = 0
        self.stop = False


class Backend(abc.ABC):
    """A key/value namespace; see the module docstring for the contract."""

    #: The URI without any password, safe for logs and error messages.
    name: str
    mode: Mode

    @property
    def identity(self) -> bytes:
        """The marker of the data set this backend holds now (see the module docstring); b"" = unknown."""
        return b""

    @property
    def marker_key(self) -> bytes | None:
        """The key holding the identity marker, when it is a stored value (never a shard, never collected)."""
        return None

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

    async def length(self, key: bytes) -> int | None:
        """Bytes stored at ``key``, or None when it is not stored (soft checks compare it with the record)."""
        value = await self.get(key)
        return None if value is None else len(value)

    async def high_water(self) -> int:
        """Seq mode: a number every key allocated from now on is at least (as a little-endian id).

        The orphan collector keeps every key at or above the high water mark it
        noted before an upload in flight began. This default scans every key;
        drivers answer from their allocator.
        """
        top = -1
        async for key in self.scan():
            if len(key) == SEQ_KEY_SIZE:
                top = max(top, seq_id(key))
        return top + 1

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

    def _check_put(self, value: bytes) -> None:
        """What ``put`` refuses before writing: InvalidInput in user mode, then ``_check_value``."""
        if self.mode is not Mode.SEQ:
            raise InvalidInput(f"{self.name}: put() allocates keys and needs a seq backend; use set(key, value)")
        self._check_value(value)

    def _is_possible_key(self, key: bytes) -> bool:
        """Whether ``key`` could be stored here (a seq namespace only has 8-byte keys)."""
        self._check_key(key)
        return self.mode is Mode.USER or len(key) == SEQ_KEY_SIZE

    @classmethod
    async def put_batch(
        cls, items: Sequence[tuple[Self, bytes]], put_timeout: float | None = None
    ) -> list[bytes | BackendError]:
        """``put`` each value into its backend (all of this class); the new key or the BackendError, in order.

        Raises InvalidInput / ValueTooLarge before anything is written when a
        value or a backend's mode is wrong. This default runs the puts
        concurrently, each within ``put_timeout`` seconds (BackendUnavailable after
        that); a driver overrides it when it can write a batch more cheaply.
        """
        for backend, value in items:
            backend._check_put(value)

        async def one(backend: Self, value: bytes) -> bytes | BackendError:
            try:
                async with asyncio.timeout(put_timeout):
                    return await backend.put(value)
            except BackendError as exc:
                return exc
            except TimeoutError:
                return BackendUnavailable(backend.name, f"put: no answer within {put_timeout:g} s")

        results = await asyncio.gather(*(one(backend, value) for backend, value in items), return_exceptions=True)
        for result in results:
            if not isinstance(result, bytes | BackendError):
                raise result  # not a refusal but a bug: raised once every other put has ended
        return cast(list[bytes | BackendError], results)

    batch_reads: ClassVar[bool] = False
    """Whether ``get_batch`` reads a batch more cheaply than a ``get`` per key (the engine batches only then)."""

    @classmethod
    async def get_batch(cls, batch: ReadBatch) -> None:
        """Fill in ``batch.results`` (the backends are all of this class); this default ``get``s concurrently."""

        async def one(i: int, backend: Backend, key: bytes) -> None:
            try:
                batch.results[i] = await backend.get(key)
            except BackendError as exc:
                batch.results[i] = exc

        batch.started = len(batch.items)
        await asyncio.gather(*(one(i, backend, key) for i, (backend, key) in enumerate(batch.items)))

    def batch_target(self) -> Backend:
        """The backend whose class's ``put_batch`` / ``get_batch`` takes its keys (a wrapper gives what it wraps)."""
        return self

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections / file handles. The backend is unusable afterwards."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.mode.value}>"


async def put_each(
    items: Sequence[tuple[Backend, bytes]], put_timeout: float | None = None
) -> list[bytes | BackendError]:
    """Store each value in its own backend, all at once; the new key or the BackendError per item, in order.

    Items are grouped by the class of each backend's ``batch_target`` and each
    group goes through that class's ``put_batch``; the groups run concurrently.
    ``put_timeout`` bounds each put where the driver can abandon one (not dir
    backends: a write on a worker thread always runs to its end).
    """
    targets = [(backend.batch_target(), value) for backend, value in items]
    groups: dict[type[Backend], list[int]] = {}
    for i, (target, value) in enumerate(targets):
        target._check_put(value)  # every group's caller errors before any group writes
        groups.setdefault(type(target), []).append(i)
    done = await asyncio.gather(
        *(cls.put_batch([targets[i] for i in where], put_timeout) for cls, where in groups.items()),
        return_exceptions=True,  # no group is still writing when this returns or raises
    )
    results: list[bytes | BackendError] = [b""] * len(items)
    for where, group in zip(groups.values(), done, strict=True):
        if isinstance(group, BaseException):
            raise group
        for i, result in zip(where, group, strict=True):
            results[i] = result
    return results
