"""The storage engine: stream in, hash, encrypt, erasure-code, spread; and back.

Write path, per chunk (``chunk_size`` plaintext bytes, 4 MiB by default):
BLAKE3 of the plaintext is updated, the chunk is encrypted (AES-256-GCM, per
file key, chunk index bound), coded into k data + m parity fragments, and the
k+m fragments go to k+m distinct backends at once (``put_each``). CPU work for
chunk i+1 runs in a worker thread while the shards of chunk i are being
written, and at most ``write_ahead`` chunks are in flight, so memory is
bounded by a few chunks whatever the file size. A chunk is stored when at
least ``write_quorum`` of its shards are (k+1 by default): the others are
marked ``unwritten`` in the record and maint rebuilds them (docs/engine.md).

Read path: for each chunk the k data shards are fetched; a missing, failing,
slow (``hedge_after``) or corrupt (checksum) shard brings in parity shards,
and the chunk is decoded only then. ``read_ahead`` chunks are fetched ahead of
the consumer so one slow backend does not stall the stream; at most
``read_slots`` chunks are being fetched and decoded in a process at once, for
all its readers together, so memory does not grow with their number. Backends sit
behind circuit breakers (services/common/backends/pool.py): one that fails or
keeps missing ``hedge_after`` is skipped up front until a probe finds it back.

Every record notes the identity of each backend it wrote to: a backend that
now answers with another identity was wiped, so its old shards count as
missing, are never read, and are never deleted (their keys hold other data).

This module imports no grpc: services wrap it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import blake3

from gridstor.v1 import record_pb2
from services.common import crypto
from services.common.backends.base import MAX_VALUE_SIZE, Backend, ReadBatch, put_each
from services.common.backends.pool import BackendPool, is_outage
from services.common.erasure import DEFAULT_EC_TYPE, FRAGMENT_HEADER, Coder
from services.common.errors import (
    BackendError,
    BackendUnavailable,
    IntegrityError,
    InvalidInput,
    KeyNotFound,
    StoreFailed,
    Unrecoverable,
)
from services.common.ids import HASH_BYTES
from services.common.setting import Int, Number, Size, Text, setting

__all__ = [
    "BackendPool",
    "CheckReport",
    "ChunkHealth",
    "Engine",
    "EngineConfig",
    "FileRecord",
    "file_source",
    "read_once",
    "rechunk",
    "shard_checksum",
]

log = logging.getLogger(__name__)

RECORD_VERSION = 1
CHECKSUM_BYTES = 16
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 4096
# One shard must fit a 0-db value (8 MiB) with pyeclib's header.
MAX_CHUNK_SIZE = 64 * 1024 * 1024

FileRecord = record_pb2.FileRecord
ShardRef = record_pb2.ShardRef


def shard_checksum(data: bytes | memoryview) -> bytes:
    """BLAKE3-128 of a stored shard."""
    return blake3.blake3(data).digest(CHECKSUM_BYTES)


@dataclass(frozen=True)
class EngineConfig:
    """Erasure coding and I/O tuning of the engine; every default suits one machine with 20 backends."""

    k: int = setting(16, "data shards per chunk", Int(1))
    m: int = setting(4, "parity shards per chunk: any m of the k+m backends may be lost", Int(1))
    chunk_size: int = setting(DEFAULT_CHUNK_SIZE, "plaintext bytes per chunk (sizes like 4MiB work too)", Size())
    ec_type: str = setting(DEFAULT_EC_TYPE, "erasure code implementation (a pyeclib ec_type)", Text())
    write_ahead: int = setting(2, "chunks being written while the next one is prepared", Int(1))
    read_ahead: int = setting(3, "chunks fetched ahead of a reader", Int(1))
    read_slots: int = setting(
        6, "chunks one process fetches and decodes at once for all its readers (each needs ~3 chunks of memory)",
        Int(1),
    )  # fmt: skip
    hedge_after: float = setting(2.0, "seconds before a slow data shard brings in parity", Number(positive=True))
    shard_timeout: float = setting(30.0, "seconds one shard read or write may take", Number(positive=True))
    backend_cooldown: float = setting(
        30.0,
        "longest wait between probes of a backend whose circuit breaker is open (the first is 1 s, then doubling);"
        " also how long a backend that refused a write (full, read-only) gets no new shards",
        Number(positive=True),
    )
    write_quorum: int = setting(
        0,
        "shards of every chunk that must be written for an upload to succeed, k..k+m; 0 = k+1. Shards not"
        " written are rebuilt by maint once backends return (docs/engine.md: the trade-off of k)",
        Int(0),
    )

    def __post_init__(self) -> None:
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidInput(f"chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
        if self.k < 1 or self.m < 1:
            raise InvalidInput("k and m must be at least 1")
        shard = -(-(self.chunk_size + crypto.TAG_BYTES) // self.k) + FRAGMENT_HEADER
        if shard > MAX_VALUE_SIZE:
            raise InvalidInput(
                f"chunk_size {self.chunk_size} with k={self.k} gives {shard}-byte shards; 0-db takes at most 8 MiB"
            )
        if self.write_ahead < 1 or self.read_ahead < 1:
            raise InvalidInput("write_ahead and read_ahead must be at least 1")
        if self.write_quorum and not self.k <= self.write_quorum <= self.k + self.m:
            raise InvalidInput(
                f"write_quorum must be between k={self.k} and k+m={self.k + self.m} (0 = k+1), got {self.write_quorum}"
            )

    @property
    def quorum(self) -> int:
        """Shards of a chunk that must be written for a store to succeed (``write_quorum``, 0 = k+1)."""
        return self.write_quorum or min(self.k + 1, self.k + self.m)


@dataclass
class ChunkHealth:
    """What a check found for one chunk (shard indexes).

    ``missing``, ``corrupt`` and ``unwritten`` shards are lost and rebuilt by a
    repair; ``unreachable`` ones are on backends that do not answer now and may
    come back with them.
    """

    index: int
    missing: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    unreachable: list[int] = field(default_factory=list)
    unwritten: list[int] = field(default_factory=list)

    @property
    def bad(self) -> list[int]:
        """Lost shards: what a repair rebuilds."""
        return sorted(self.missing + self.corrupt + self.unwritten)

    @property
    def absent(self) -> list[int]:
        """Shards not readable now: lost or unreachable."""
        return sorted(self.bad + self.unreachable)

    def sort(self) -> None:
        for part in (self.missing, self.corrupt, self.unreachable, self.unwritten):
            part.sort()


@dataclass
class CheckReport:
    """Result of a soft or hard check of one file."""

    hard: bool
    k: int
    m: int
    chunks: list[ChunkHealth] = field(default_factory=list)
    # Hard check only: did the decrypted content hash to the record's hash?
    hash_ok: bool | None = None
    error: str = ""
    unreachable_backends: set[str] = field(default_factory=set)
    replaced_backends: set[str] = field(default_factory=set)

    @property
    def damaged(self) -> list[ChunkHealth]:
        """Chunks with a shard lost, unwritten or unreachable."""
        return [c for c in self.chunks if c.absent]

    @property
    def unrecoverable(self) -> list[ChunkHealth]:
        """Chunks that lost more than m shards: data is gone, whatever comes back."""
        return [c for c in self.chunks if len(c.bad) > self.m]

    @property
    def unreadable(self) -> list[ChunkHealth]:
        """Chunks with fewer than k shards readable now (lost or unreachable)."""
        return [c for c in self.chunks if len(c.absent) > self.m]

    @property
    def lost(self) -> int:
        return sum(len(c.bad) for c in self.chunks)

    @property
    def unreachable(self) -> int:
        return sum(len(c.unreachable) for c in self.chunks)

    @property
    def ok(self) -> bool:
        return not self.damaged and self.hash_ok is not False and not self.error


def unwritten_shards(record: FileRecord) -> int:
    """Shards the record marks unwritten (a degraded write, or a repair that found no backend)."""
    return sum(1 for c in record.chunks for s in c.shards if s.unwritten)


def backend_identity(record: FileRecord, index: int) -> bytes:
    """The identity the record noted for its backend entry ``index`` (b"" = unknown)."""
    return bytes(record.backend_ids[index]) if index < len(record.backend_ids) else b""


async def delete_if_same(backend: Backend, key: bytes, identity: bytes, timeout: float) -> bool:  # noqa: ASYNC109
    """Delete ``key`` unless ``backend`` now holds another data set than ``identity``; whether it was deleted.

    A look at the key first brings the backend's idea of its identity up to date
    (a replacement is noticed on the next call), then the identities are
    compared: after a wipe the same key names another file's shard.
    """
    async with asyncio.timeout(timeout):
        if await backend.length(key) is None:
            return False
        if identity and backend.identity and backend.identity != identity:
            return False
        try:
            await backend.delete(key)
        except KeyNotFound:
            return False
    return True


class _Replaced(BackendError):
    """The backend answers with another identity than the record's: the shard went with the old data set."""


class _Unwritten(Exception):
    """The record marks the shard unwritten: nothing to fetch."""


UNWRITTEN = _Unwritten()
_V = TypeVar("_V")


@dataclass
class _Batch:
    """Shards of a chunk read in one ``get_batch`` (``Engine._batches``): the read and their indices."""

    read: ReadBatch
    shards: list[int]
    settled: set[int] = field(default_factory=set)  # positions in ``shards`` taken (or left to a read of their own)


def _classify(health: ChunkHealth, report: CheckReport | None, si: int, value: object, name: str) -> None:
    """File shard ``si`` of a chunk under the category its fetch result stands for."""
    if isinstance(value, _Unwritten):
        health.unwritten.append(si)
    elif isinstance(value, bytes) or value is WRONG_SIZE:
        health.corrupt.append(si)
    elif isinstance(value, BackendError | TimeoutError) and is_outage(value):
        health.unreachable.append(si)
        if report is not None:
            report.unreachable_backends.add(name)
    else:
        health.missing.append(si)
        if report is not None and isinstance(value, _Replaced):
            report.replaced_backends.add(name)


class Engine:
    """Stores and reads files on a pool of backends; see the module docstring."""

    def __init__(self, pool: BackendPool, master_key: bytes, config: EngineConfig | None = None) -> None:
        self.pool = pool
        self.config = config or EngineConfig()
        crypto._check_key(master_key, "master key")
        self._master_key = master_key
        self._coders: dict[tuple[int, int, str], Coder] = {}
        self.coder(self.config.k, self.config.m, self.config.ec_type)
        # Fetching and decoding a chunk holds its shards, ciphertext and plaintext at once: so many at a time,
        # whatever the number of readers (the memory of 100 concurrent downloads stays bounded).
        self._read_slots = asyncio.Semaphore(self.config.read_slots)

    def coder(self, k: int, m: int, ec_type: str) -> Coder:
        key = (k, m, ec_type)
        coder = self._coders.get(key)
        if coder is None:
            coder = self._coders[key] = Coder(k, m, ec_type)
        return coder

    # ------------------------------------------------------------------ write

    async def store(
        self,
        source: AsyncIterable[bytes] | Iterable[bytes],
        *,
        ext: str = "",
        content_type: str = "",
    ) -> FileRecord:
        """Store the bytes of ``source``; return the record (not yet in any metadata store).

        Each chunk needs ``write_quorum`` of its k+m shards written; the rest are
        marked unwritten. On failure every shard already written is deleted
        (best effort) and StoreFailed names the cause, so nothing is left
        half-registered.
        """
        cfg = self.config
        n = cfg.k + cfg.m
        if len(self.pool.backends) < n:
            raise StoreFailed(f"{len(self.pool.backends)} backends configured; {cfg.k}+{cfg.m} coding needs {n}")
        file_key = crypto.new_file_key()
        cipher = crypto.ChunkCipher(file_key)
        hasher = blake3.blake3()
        coder = self.coder(cfg.k, cfg.m, cfg.ec_type)
        record = FileRecord(
            version=RECORD_VERSION,
            ext=ext,
            content_type=content_type,
            chunk_size=cfg.chunk_size,
            k=cfg.k,
            m=cfg.m,
            ec_type=cfg.ec_type,
            cipher=crypto.CIPHER_NAME,
            created=int(time.time()),
        )
        writer = _ChunkWriter(self.pool, record, cfg, start=random.randrange(len(self.pool.backends)))
        size = 0
        index = 0
        tasks: deque[asyncio.Task[None]] = deque()

        def prepare(i: int, plain: bytes) -> tuple[int, list[bytes], list[bytes]]:
            hasher.update(plain)
            ct = cipher.encrypt(i, plain)
            frags = coder.encode(ct)
            return len(ct), frags, [shard_checksum(f) for f in frags]

        try:
            async for plain in rechunk(source, cfg.chunk_size):
                cipher_size, frags, sums = await asyncio.to_thread(prepare, index, plain)
                chunk = record.chunks.add(plain_size=len(plain), cipher_size=cipher_size, shard_size=len(frags[0]))
                chunk.shards.extend(ShardRef() for _ in range(n))
                tasks.append(asyncio.create_task(writer.write_chunk(index, frags, sums)))
                size += len(plain)
                index += 1
                while len(tasks) >= cfg.write_ahead:
                    await tasks.popleft()
            while tasks:
                await tasks.popleft()
        except BaseException:
            # Source error, refused placement or cancellation: leave no orphan shards.
            # In-flight writes are awaited, not cancelled (each is bounded by
            # shard_timeout), so every shard that lands is known and removed.
            await asyncio.gather(*tasks, return_exceptions=True)
            await writer.cleanup()
            raise
        record.hash = hasher.digest(HASH_BYTES)
        record.size = size
        record.wrapped_key = crypto.wrap_key(self._master_key, file_key)
        if writer.unwritten:
            log.warning(
                "stored with %d of %d shards unwritten (backends down); maint rebuilds them",
                writer.unwritten,
                n * index,
            )
        return record

    async def delete_shards(self, record: FileRecord) -> int:
        """Remove every shard of ``record`` that can be reached; return how many went.

        A shard on a backend that now has another identity is left alone: its
        key may hold another file's shard.
        """
        refs = [s for c in record.chunks for s in c.shards if not s.unwritten]
        results = await asyncio.gather(*(self.delete_ref(record, ref) for ref in refs))
        return sum(results)

    async def delete_ref(self, record: FileRecord, ref: ShardRef) -> bool:
        """Delete one shard of ``record`` if its backend still holds the record's data set; whether it went."""
        if ref.unwritten or ref.backend >= len(record.backends):
            return False
        name = record.backends[ref.backend]
        backend = self.pool.get(name)
        if backend is None:
            return False
        try:
            return await delete_if_same(
                backend, ref.key, backend_identity(record, ref.backend), self.config.shard_timeout
            )
        except (BackendError, TimeoutError) as exc:
            self.pool.failed(name, exc)
            return False

    # ------------------------------------------------------------------- read

    def _check_record(self, record: FileRecord) -> Coder:
        if record.version != RECORD_VERSION:
            raise IntegrityError(f"metadata record version {record.version} is not supported")
        if record.cipher not in ("", crypto.CIPHER_NAME):
            raise IntegrityError(f"cipher {record.cipher!r} is not supported")
        coder = self.coder(record.k, record.m, record.ec_type or DEFAULT_EC_TYPE)
        nb = len(record.backends)
        if len(record.backend_ids) > nb:
            raise IntegrityError(f"record lists {len(record.backend_ids)} backend identities for {nb} backends")
        for i, c in enumerate(record.chunks):
            if len(c.shards) != coder.n:
                raise IntegrityError(f"chunk {i} lists {len(c.shards)} shards, expected {coder.n}")
            if any(sh.backend >= nb and not sh.unwritten for sh in c.shards):
                raise IntegrityError(f"chunk {i} names a backend the record does not list")
        return coder

    def file_cipher(self, record: FileRecord) -> crypto.ChunkCipher:
        """The chunk cipher of ``record`` (WrongMasterKey if the master key does not fit)."""
        return crypto.ChunkCipher(crypto.unwrap_key(self._master_key, record.wrapped_key))

    async def read(
        self,
        record: FileRecord,
        offset: int = 0,
        length: int | None = None,
        *,
        ahead: Callable[[], int] | None = None,
    ) -> AsyncIterator[bytes]:
        """Yield the plaintext of ``record`` from ``offset`` for ``length`` bytes (to the end if None).

        A range past the end is clamped to the end; an offset beyond the size
        is InvalidInput. ``ahead`` says how many chunks may be fetched ahead, asked
        before each fetch (default: ``read_ahead``): a caller sharing a memory budget
        among many readers gives each fewer while many run.
        """
        coder = self._check_record(record)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidInput("offset and length must not be negative")
        if offset > record.size:
            raise InvalidInput(f"offset {offset} is beyond the end of the file ({record.size} bytes)")
        end = record.size if length is None else min(record.size, offset + length)
        if end <= offset:
            return
        cipher = self.file_cipher(record)
        cs = record.chunk_size
        first, last = offset // cs, (end - 1) // cs
        depth_of = ahead
        fetching: deque[asyncio.Task[bytes]] = deque()
        nxt = first
        try:
            while nxt <= last or fetching:
                depth = self.config.read_ahead if depth_of is None else max(1, depth_of())
                while nxt <= last and len(fetching) < depth:
                    fetching.append(asyncio.create_task(self._read_chunk(record, coder, cipher, nxt)))
                    nxt += 1
                ci = nxt - len(fetching)
                plain = await fetching.popleft()
                lo = offset - ci * cs if ci == first else 0
                hi = end - ci * cs if ci == last else len(plain)
                yield plain if (lo == 0 and hi == len(plain)) else plain[lo:hi]
        finally:
            for t in fetching:
                t.cancel()
            if fetching:
                await asyncio.gather(*fetching, return_exceptions=True)

    async def _read_chunk(self, record: FileRecord, coder: Coder, cipher: crypto.ChunkCipher, ci: int) -> bytes:
        async with self._read_slots:
            return await self._fetch_chunk(record, coder, cipher, ci)

    async def _fetch_chunk(self, record: FileRecord, coder: Coder, cipher: crypto.ChunkCipher, ci: int) -> bytes:
        chunk = record.chunks[ci]
        # Fast path: trust the shards and let AES-GCM's tag vouch for the result.
        # Only when it fails are shard checksums computed to find the bad ones.
        frags, health = await self._gather(record, coder, ci, want=coder.k, verify=False)
        if len(frags) >= coder.k:
            try:
                return await asyncio.to_thread(_decode_decrypt, coder, cipher, ci, frags, chunk.cipher_size)
            except (IntegrityError, Unrecoverable):
                log.info("chunk %d failed authentication; locating corrupt shards by checksum", ci)
        frags, health = await self._gather(record, coder, ci, want=coder.k)
        if len(frags) < coder.k:
            raise Unrecoverable(_unrecoverable_msg(ci, coder, health))
        return await asyncio.to_thread(_decode_decrypt, coder, cipher, ci, frags, chunk.cipher_size)

    def _where(self, record: FileRecord, ref: ShardRef) -> str:
        return record.backends[ref.backend] if ref.backend < len(record.backends) else "?"

    async def _fetch(self, record: FileRecord, ci: int, si: int, force: bool = False) -> object:
        """One shard: bytes, None (not stored) or why not (``_Unwritten``, ``_Replaced``, a BackendError).

        A backend whose circuit breaker is open is not asked unless ``force``
        (the chunk cannot be read without it).
        """
        ref = record.chunks[ci].shards[si]
        return await self._ask(record, ref, lambda backend: backend.get(ref.key), force)

    async def _ask(
        self, record: FileRecord, ref: ShardRef, call: Callable[[Backend], Awaitable[_V]], force: bool = False
    ) -> _V | Exception:
        """``call`` on the backend of shard ``ref`` within ``shard_timeout``: its answer, or why there is none.

        Told to the backend's circuit breaker (``_fetched``); not asked at all for the reasons of ``_target``.
        """
        backend = self._target(record, ref, force)
        if not isinstance(backend, Backend):
            return backend
        try:
            async with asyncio.timeout(self.config.shard_timeout):
                value: _V | BackendError = await call(backend)
        except TimeoutError:
            return self._no_answer(self._where(record, ref))
        except BackendError as exc:
            value = exc
        return self._fetched(record, ref, value)

    def _target(self, record: FileRecord, ref: ShardRef, force: bool = False) -> Backend | Exception:
        """The backend to ask for shard ``ref``, or why none is asked (unwritten, unknown, breaker open).

        A backend whose circuit breaker is open is asked only with ``force``.
        """
        if ref.unwritten:
            return UNWRITTEN
        name = self._where(record, ref)
        backend = self.pool.get(name)
        if backend is None:
            return BackendError(name, "backend is not in the current configuration")
        if not force and not self.pool.usable(name):
            return BackendUnavailable(name, "circuit breaker open (the backend failed lately)")
        return backend

    def _no_answer(self, name: str) -> BackendUnavailable:
        """A shard read from ``name`` ran out of ``shard_timeout``: told to its circuit breaker."""
        exc = BackendUnavailable(name, f"no answer within {self.config.shard_timeout}s")
        self.pool.failed(name, exc)
        return exc

    async def _read_batch(self, batch: _Batch) -> bool:
        """``get_batch`` of ``batch`` within ``shard_timeout``; True when it ran out (the rest then has no answer)."""
        try:
            async with asyncio.timeout(self.config.shard_timeout):
                await type(batch.read.items[0][0]).get_batch(batch.read)
        except TimeoutError:
            batch.read.stop = True
            return True
        return False

    def _fetched(self, record: FileRecord, ref: ShardRef, value: _V | BackendError) -> _V | BackendError:
        """What a shard's read (or look) came to, told to its backend's circuit breaker: ``value``, or why not."""
        name = self._where(record, ref)
        if isinstance(value, BackendError):
            self.pool.failed(name, value)
            return value
        self.pool.succeeded(name)
        backend = self.pool.get(name)
        expected = backend_identity(record, ref.backend)
        if expected and backend is not None and backend.identity and backend.identity != expected:
            return _Replaced(name, "the backend was wiped and set up again since this shard was written")
        return value

    def _batches(
        self, record: FileRecord, ci: int, shards: Sequence[int], ranks: dict[int, int]
    ) -> tuple[list[_Batch], list[int]]:
        """``shards`` of chunk ``ci`` as batch reads where their backends read batches, and the rest.

        A shard goes into its driver class's batch (``Backend.batch_reads``: dir backends, a
        chunk's shards from one worker thread) when its rank (``_gather``) is 0: written, and
        its backend's breaker closed. A class with one such shard reads it alone.
        """
        groups: dict[type[Backend], tuple[list[tuple[Backend, bytes]], list[int]]] = {}
        singles: list[int] = []
        for si in shards:
            ref = record.chunks[ci].shards[si]
            backend = self.pool.get(self._where(record, ref))
            target = backend.batch_target() if backend is not None else None
            if ranks[si] != 0 or target is None or not target.batch_reads:
                singles.append(si)
                continue
            items, where = groups.setdefault(type(target), ([], []))
            items.append((target, ref.key))
            where.append(si)
        batches = []
        for items, where in groups.values():
            if len(where) == 1:
                singles += where
            else:
                batches.append(_Batch(ReadBatch(items), where))
        return batches, singles

    async def _gather(
        self,
        record: FileRecord,
        coder: Coder,
        ci: int,
        *,
        want: int,
        hedge: bool = True,
        verify: bool = True,
        report: CheckReport | None = None,
    ) -> tuple[dict[int, bytes], ChunkHealth]:
        """Fetch shards of chunk ``ci`` until ``want`` verified ones are in hand.

        Data shards first; parity comes in for each failure, and for every
        outstanding data shard once ``hedge_after`` passes (each such backend
        gets a slow strike: a hung one is soon skipped up front).
        """
        chunk = record.chunks[ci]
        health = ChunkHealth(ci)
        good: dict[int, bytes] = {}

        def rank(i: int) -> int:
            ref = chunk.shards[i]
            if ref.unwritten:
                return 2
            return 0 if self.pool.usable(self._where(record, ref)) else 1

        # Shards on backends known to be down go last, so parity is asked for up front; they are
        # asked anyway (through their open breaker) only when the chunk cannot be read without them.
        ranks = {i: rank(i) for i in range(coder.n)}
        order = sorted(range(coder.n), key=ranks.__getitem__)
        queue = deque(order[want:]) if want < coder.n else deque()

        def fetch(i: int) -> asyncio.Task[object]:
            return asyncio.create_task(self._fetch(record, ci, i, force=ranks[i] == 1))

        def more() -> None:  # the next shard in line, if any, in place of one that failed or is slow
            if queue:
                i = queue.popleft()
                pending[fetch(i)] = i

        def settle(si: int, value: object) -> None:
            if isinstance(value, bytes) and (not verify or shard_checksum(value) == chunk.shards[si].checksum):
                good[si] = value
                return
            _classify(health, report, si, value, self._where(record, chunk.shards[si]))
            if isinstance(value, Exception) and not isinstance(value, _Unwritten):
                log.debug("chunk %d shard %d: %s", ci, si, value)
            more()

        def settle_batch(batch: _Batch, timed_out: bool = False) -> None:
            for j, (si, value) in enumerate(zip(batch.shards, batch.read.results, strict=True)):
                if j in batch.settled:
                    continue
                if value is None or isinstance(value, bytes | BackendError):
                    outcome = self._fetched(record, chunk.shards[si], value)
                elif timed_out:
                    outcome = self._no_answer(self._where(record, chunk.shards[si]))
                else:
                    continue  # still being read
                batch.settled.add(j)
                settle(si, outcome)

        # The first shards: each batch-reading driver class's share in one read, the rest one by one.
        batches, singles = self._batches(record, ci, order[:want], ranks) if hedge else ([], order[:want])
        pending: dict[asyncio.Task[object], int] = {fetch(i): i for i in singles}
        reading: dict[asyncio.Task[object], _Batch] = {asyncio.create_task(self._read_batch(b)): b for b in batches}
        deadline = time.monotonic() + self.config.hedge_after if hedge else None
        try:
            while (pending or reading) and len(good) < want:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait([*pending, *reading], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # hedge: data shards are slow, bring in parity for each of them
                    deadline = None
                    slow = list(pending.values())
                    for batch in reading.values():
                        # A batch starts no further read: what it read counts, the shards it is
                        # reading are slow, and those it did not reach are fetched on their own.
                        batch.read.stop = True
                        settle_batch(batch)
                        for j, si in enumerate(batch.shards):
                            if j in batch.settled:
                                continue
                            if j < batch.read.started:
                                slow.append(si)
                            else:
                                batch.settled.add(j)
                                pending[fetch(si)] = si
                    for si in slow:
                        self.pool.slow(self._where(record, chunk.shards[si]))
                    for _ in range(len(slow)):
                        more()
                    continue
                for task in done:
                    if task in reading:
                        settle_batch(reading.pop(task), timed_out=bool(task.result()))
                    else:
                        settle(pending.pop(task), task.result())
        finally:
            for batch in reading.values():
                batch.read.stop = True
            tasks = [*pending, *reading]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        health.sort()
        return good, health

    # ----------------------------------------------------------------- checks

    async def soft_check(self, record: FileRecord, concurrency: int = 64) -> CheckReport:
        """Every shard present and of the size the record says, on a backend of the record's identity?

        Nothing is read: LENGTH (0-db) or the index (dir) of each shard's key.
        A backend that does not answer is reported unreachable, not missing.
        """
        coder = self._check_record(record)
        sem = asyncio.Semaphore(concurrency)
        report = CheckReport(hard=False, k=coder.k, m=coder.m)

        async def look(ci: int, si: int) -> object:
            ref = record.chunks[ci].shards[si]
            async with sem:
                size = await self._ask(record, ref, lambda backend: backend.length(ref.key))
            if size is None or isinstance(size, Exception):
                return size
            want = record.chunks[ci].shard_size
            if want and size != want:
                return WRONG_SIZE  # another file's shard under a reused key: counted as corrupt
            return PRESENT

        for ci, chunk in enumerate(record.chunks):
            health = ChunkHealth(ci)
            results = await asyncio.gather(*(look(ci, si) for si in range(len(chunk.shards))))
            for si, value in enumerate(results):
                if value is not PRESENT:
                    _classify(health, report, si, value, self._where(record, chunk.shards[si]))
            health.sort()
            report.chunks.append(health)
        return report

    async def hard_check(self, record: FileRecord) -> CheckReport:
        """Fetch every shard, verify checksums, decrypt every chunk and compare the file hash."""
        coder = self._check_record(record)
        report = CheckReport(hard=True, k=coder.k, m=coder.m)
        cipher: crypto.ChunkCipher | None = None
        try:
            cipher = self.file_cipher(record)
        except IntegrityError as exc:
            report.error = str(exc)
        hasher = blake3.blake3()
        size = 0
        decodable = True
        for ci, chunk in enumerate(record.chunks):
            frags, health = await self._gather(record, coder, ci, want=coder.n, hedge=False, report=report)
            report.chunks.append(health)
            if cipher is None or report.error or len(frags) < coder.k:
                decodable = False
                continue
            try:
                plain = await asyncio.to_thread(_decode_decrypt, coder, cipher, ci, frags, chunk.cipher_size)
            except (IntegrityError, Unrecoverable) as exc:
                report.error = f"chunk {ci}: {exc}"
                decodable = False
                continue
            hasher.update(plain)
            size += len(plain)
        if decodable:
            report.hash_ok = size == record.size and hasher.digest(HASH_BYTES) == record.hash
            if not report.hash_ok:
                report.error = "content hash does not match the record"
        return report

    async def repair(
        self,
        record: FileRecord,
        report: CheckReport | None = None,
        *,
        rebuild_unreachable: Collection[str] = (),
    ) -> tuple[FileRecord, int]:
        """Rebuild lost shards onto healthy backends; return (updated record, shards rewritten).

        Lost = missing, corrupt or unwritten; shards on ``rebuild_unreachable``
        backends (down too long) too; other unreachable shards are left where
        they are (their backend may come back). Uses ``report`` (a check of this
        record) or runs a hard check. A rebuilt shard no backend can take now is
        marked unwritten (the file stays under-replicated); a chunk with fewer
        than k shards readable now is left for later. Raises Unrecoverable
        naming the chunks that lost more than m shards; no chunk is changed
        then. The caller stores the new record.
        """
        coder = self._check_record(record)
        if report is None:
            report = await self.hard_check(record)
        rebuild = set(rebuild_unreachable)

        def far(health: ChunkHealth) -> list[int]:
            chunk = record.chunks[health.index]
            return [si for si in health.unreachable if self._where(record, chunk.shards[si]) in rebuild]

        def todo(health: ChunkHealth) -> list[int]:
            return sorted(health.bad + far(health))

        lost = [h for h in report.chunks if len(todo(h)) > coder.m]
        if lost:
            raise Unrecoverable("cannot repair: " + "; ".join(_unrecoverable_msg(h.index, coder, h) for h in lost[:5]))

        new = FileRecord()
        new.CopyFrom(record)
        rewritten = 0
        writer = _ChunkWriter(self.pool, new, self.config, start=random.randrange(len(self.pool.backends)))
        try:
            for h in report.chunks:
                if not todo(h):
                    continue
                frags, health = await self._gather(record, coder, h.index, want=coder.n, hedge=False)
                bad = todo(health)
                if not bad:
                    continue
                k = coder.k
                if len(frags) < k:
                    if len(bad) > coder.m:
                        raise Unrecoverable(_unrecoverable_msg(h.index, coder, health))
                    log.info("chunk %d: %d shards readable now, %d needed: left for later", h.index, len(frags), k)
                    continue
                good = {i: frags[i] for i in sorted(frags)[: coder.k]}
                rebuilt = await asyncio.to_thread(coder.reconstruct, good, bad)
                # The corrupt copies are left where they are: a backend that came back
                # empty hands out its keys again, so the key may already hold another
                # file's good shard. Unreferenced shards are collected as orphans.
                rewritten += await writer.rewrite(h.index, rebuilt, keep_old=set(far(health)))
        except BaseException:
            await writer.cleanup()
            raise
        return new, rewritten


PRESENT = object()  # soft_check: the shard is there, of the right size
WRONG_SIZE = object()  # soft_check: something of another size is stored under the shard's key


def _decode_decrypt(
    coder: Coder, cipher: crypto.ChunkCipher, ci: int, frags: dict[int, bytes], cipher_size: int
) -> bytes:
    ct = coder.decode(frags, cipher_size)
    return cipher.decrypt(ci, ct)


def _unrecoverable_msg(ci: int, coder: Coder, health: ChunkHealth) -> str:
    good = coder.n - len(health.absent)
    parts = [f"missing {health.missing or 'none'}", f"corrupt {health.corrupt or 'none'}"]
    if health.unwritten:
        parts.append(f"unwritten {health.unwritten}")
    if health.unreachable:
        parts.append(f"unreachable {health.unreachable}")
    return f"chunk {ci} has {good} good shards of {coder.n}, needs {coder.k} ({', '.join(parts)})"


class _ChunkWriter:
    """Places the shards of one file's chunks on distinct backends, with spares."""

    def __init__(self, pool: BackendPool, record: FileRecord, cfg: EngineConfig, start: int) -> None:
        self.pool = pool
        self.record = record
        self.cfg = cfg
        self.start = start
        self.written: list[tuple[str, bytes, bytes]] = []  # (backend, key, its identity then)
        self.unwritten = 0
        self._index: dict[tuple[str, bytes], int] = {
            (name, backend_identity(record, i)): i for i, name in enumerate(record.backends)
        }

    def _backend_index(self, name: str, identity: bytes) -> int:
        """The record's entry for (backend, identity), added when new (identities kept parallel)."""
        idx = self._index.get((name, identity))
        if idx is None:
            rec = self.record
            if identity and len(rec.backend_ids) < len(rec.backends):  # an older record: pad as unknown
                rec.backend_ids.extend(b"" for _ in range(len(rec.backends) - len(rec.backend_ids)))
            idx = self._index[(name, identity)] = len(rec.backends)
            rec.backends.append(name)
            if identity or rec.backend_ids:
                rec.backend_ids.append(identity)
        return idx

    def _candidates(self, ci: int, exclude: set[str], *, writable: bool = True) -> list[str]:
        """Backends not in ``exclude``, rotated per chunk: those taking writes now (breaker closed, no recent
        refusal), or with ``writable=False`` the others (the last resort)."""
        names = self.pool.names
        n = len(names)
        rot = (self.start + ci * (self.cfg.k + self.cfg.m)) % n
        ordered = names[rot:] + names[:rot]
        return [b for b in ordered if b not in exclude and self.pool.writable(b) == writable]

    async def write_chunk(self, ci: int, frags: Sequence[bytes], sums: Sequence[bytes]) -> None:
        await self._place(ci, dict(enumerate(frags)), sums, exclude=set(), need=self.cfg.quorum)

    async def rewrite(self, ci: int, rebuilt: dict[int, bytes], keep_old: Collection[int] = ()) -> int:
        """Write rebuilt shards of chunk ``ci`` onto backends holding no other shard of it; how many were placed.

        A shard no backend can take now is marked unwritten, unless it is in
        ``keep_old`` (on an unreachable backend: its old copy may come back).
        """
        chunk = self.record.chunks[ci]
        kept = [s for si, s in enumerate(chunk.shards) if si not in rebuilt and not s.unwritten]
        keep = {self.record.backends[s.backend] for s in kept}
        sums = {si: shard_checksum(f) for si, f in rebuilt.items()}
        return await self._place(ci, rebuilt, sums, exclude=keep, need=0, keep_old=keep_old)

    async def _place(
        self,
        ci: int,
        frags: dict[int, bytes],
        sums: Sequence[bytes] | dict[int, bytes],
        exclude: set[str],
        need: int,
        keep_old: Collection[int] = (),
    ) -> int:
        """Put each fragment on its own backend; at least ``need`` of the chunk's shards must end up stored.

        Backends that take writes now come first; the others only when those
        cannot reach ``need``. Returns how many of ``frags`` were placed; the
        others are marked unwritten (those in ``keep_old`` keep their old reference).
        """
        candidates = deque(self._candidates(ci, exclude))
        stored_before = len(self.record.chunks[ci].shards) - len(frags)  # rewrite: the shards kept
        if stored_before + len(candidates) < need:
            # Too few backends take writes to reach the quorum: try the skipped ones too (they may be back
            # before their breaker's probe says so). Never otherwise: a hung one costs its timeout.
            candidates.extend(self._candidates(ci, exclude, writable=False))
        errors: list[str] = []

        def record(si: int, name: str, key: bytes) -> None:
            identity = self.pool.backends[name].identity
            self.written.append((name, key, identity))
            ref = self.record.chunks[ci].shards[si]
            ref.backend = self._backend_index(name, identity)
            ref.key = key
            ref.checksum = sums[si]
            ref.unwritten = False

        # Each round puts every shard still unplaced on the next candidate, all
        # at once and through one call (dir backends: one worker thread for the
        # round; a thread hop per shard costs more than the write). Shards
        # refused go to further candidates in the next round. A round ends when
        # every put has, so no write lands after cleanup().
        pending = dict(frags)
        while pending and candidates:
            tries = [(si, candidates.popleft()) for si in list(pending)[: len(candidates)]]
            results = await put_each(
                [(self.pool.backends[name], pending[si]) for si, name in tries], self.cfg.shard_timeout
            )
            for (si, name), result in zip(tries, results, strict=True):
                if isinstance(result, BackendError):
                    self.pool.refused_write(name, result)
                    errors.append(str(result))
                    log.warning("shard write refused, trying another backend: %s", result)
                else:
                    self.pool.succeeded(name)
                    record(si, name, result)
                    del pending[si]
        if not pending:
            return len(frags)
        stored = stored_before + len(frags) - len(pending)
        if stored < need:
            usable = len(self._candidates(ci, set()))
            raise StoreFailed(
                f"chunk {ci}: {stored} of {self.cfg.k + self.cfg.m} shards written, write_quorum is {need}"
                f" ({usable} of {len(self.pool.names)} backends take writes now"
                + (f"; {'; '.join(errors[-4:])})" if errors else ")")
            )
        for si in pending:
            if si in keep_old:
                continue
            ref = self.record.chunks[ci].shards[si]
            ref.Clear()
            ref.unwritten = True
            self.unwritten += 1
        return len(frags) - len(pending)

    async def cleanup(self) -> None:
        """Delete every shard this writer put (after a failed store or repair)."""

        async def rm(name: str, key: bytes, identity: bytes) -> None:
            try:
                await delete_if_same(self.pool.backends[name], key, identity, self.cfg.shard_timeout)
            except (BackendError, TimeoutError) as exc:
                log.warning("could not remove orphan shard on %s (maint's orphan collection will): %s", name, exc)

        await asyncio.gather(*(rm(n, k, i) for n, k, i in self.written))
        self.written.clear()


async def rechunk(source: AsyncIterable[bytes] | Iterable[bytes], size: int) -> AsyncIterator[bytes]:
    """Re-cut a stream of byte strings into pieces of exactly ``size`` (the last may be shorter).

    Pieces are collected in a list and joined once per chunk: one copy per byte.
    """
    parts: list[bytes] = []
    have = 0

    async def pieces() -> AsyncIterator[bytes]:
        if isinstance(source, AsyncIterable):
            async for p in source:
                yield p
        else:
            for p in source:
                yield p

    async for piece in pieces():
        if not piece:
            continue
        parts.append(piece)
        have += len(piece)
        while have >= size:
            if len(parts) == 1 and have == size:
                out = parts[0]
                parts, have = [], 0
            else:
                joined = b"".join(parts)
                out, rest = joined[:size], joined[size:]
                parts, have = ([rest] if rest else []), len(rest)
            yield bytes(out)
    if have:
        yield b"".join(parts)


def read_once(fd: int, size: int, offset: int) -> bytes:
    """``pread`` ``size`` bytes at ``offset`` of a file read once, dropping the pages before ``offset`` from the cache.

    For a spool file, read once and removed: the clean pages already read go back to the
    kernel at once (dirty ones stay until written back), so the bytes still arriving and
    the shards being written take them rather than new pages. New pages cost far more than
    the copy into them on a virtual machine whose host takes free memory back (measured by
    bench/e2e.py: 440-520 against about 10,000 MB/s here), and a file read once should not push
    other data out of the cache anyway.
    """
    data = os.pread(fd, size, offset)
    if offset:
        os.posix_fadvise(fd, 0, offset, os.POSIX_FADV_DONTNEED)
    return data


async def file_source(
    path: str | os.PathLike[str], block: int = DEFAULT_CHUNK_SIZE, *, once: bool = False
) -> AsyncIterator[bytes]:
    """Read a file in ``block``-sized pieces without blocking the event loop (``once``: see ``read_once``)."""
    read = read_once if once else os.pread
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            data = await asyncio.to_thread(read, fd, block, offset)
            if not data:
                return
            offset += len(data)
            yield data
    finally:
        os.close(fd)
