"""The storage engine: stream in, hash, encrypt, erasure-code, spread; and back.

Write path, per chunk (``chunk_size`` plaintext bytes, 4 MiB by default):
BLAKE3 of the plaintext is updated, the chunk is encrypted (AES-256-GCM, per
file key, chunk index bound), coded into k data + m parity fragments, and the
k+m fragments go to k+m distinct backends at once (``put_each``). CPU work for
chunk i+1 runs in a worker thread while the shards of chunk i are being
written, and at most ``write_ahead`` chunks are in flight, so memory is
bounded by a few chunks whatever the file size.

Read path: for each chunk the k data shards are fetched; a missing, failing,
slow (``hedge_after``) or corrupt (checksum) shard brings in parity shards,
and the chunk is decoded only then. ``read_ahead`` chunks are fetched ahead of
the consumer so one slow backend does not stall the stream; at most
``read_slots`` chunks are being fetched and decoded in a process at once, for
all its readers together, so memory does not grow with their number.

This module imports no grpc: services wrap it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import blake3

from gridstor.v1 import record_pb2
from services.common import crypto
from services.common.backends.base import MAX_VALUE_SIZE, Backend, put_each
from services.common.erasure import DEFAULT_EC_TYPE, FRAGMENT_HEADER, Coder
from services.common.errors import (
    BackendError,
    BackendUnavailable,
    IntegrityError,
    InvalidInput,
    StoreFailed,
    Unrecoverable,
)
from services.common.ids import HASH_BYTES
from services.common.setting import Int, Number, Size, Text, setting

log = logging.getLogger(__name__)

RECORD_VERSION = 1
CHECKSUM_BYTES = 16
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 4096
# One shard must fit a 0-db value (8 MiB) with pyeclib's header.
MAX_CHUNK_SIZE = 64 * 1024 * 1024

FileRecord = record_pb2.FileRecord


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
    backend_cooldown: float = setting(30.0, "seconds a backend that failed a write is skipped", Number(positive=True))

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


@dataclass
class ChunkHealth:
    """What a check found for one chunk (shard indexes)."""

    index: int
    missing: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)

    @property
    def bad(self) -> list[int]:
        return sorted(self.missing + self.corrupt)


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

    @property
    def damaged(self) -> list[ChunkHealth]:
        return [c for c in self.chunks if c.bad]

    @property
    def unrecoverable(self) -> list[ChunkHealth]:
        return [c for c in self.chunks if len(c.bad) > self.m]

    @property
    def ok(self) -> bool:
        return not self.damaged and self.hash_ok is not False and not self.error


class BackendPool:
    """Named backends plus a short memory of which ones just failed."""

    def __init__(self, backends: dict[str, Backend], cooldown: float = 30.0) -> None:
        if not backends:
            raise InvalidInput("no backends configured")
        self.backends = dict(backends)
        self.cooldown = cooldown
        self._down_until: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return list(self.backends)

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def healthy(self) -> list[str]:
        now = time.monotonic()
        return [n for n in self.backends if self._down_until.get(n, 0.0) <= now]

    def mark_down(self, name: str) -> None:
        self._down_until[name] = time.monotonic() + self.cooldown

    def mark_up(self, name: str) -> None:
        self._down_until.pop(name, None)

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)


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

        On failure every shard already written is deleted (best effort) and
        StoreFailed names the cause, so nothing is left half-registered.
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
                chunk = record.chunks.add(plain_size=len(plain), cipher_size=cipher_size)
                chunk.shards.extend(record_pb2.ShardRef() for _ in range(n))
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
        return record

    async def delete_shards(self, record: FileRecord) -> int:
        """Remove every shard of ``record`` that can be reached; return how many went."""
        refs = [(record.backends[s.backend], s.key) for c in record.chunks for s in c.shards]
        results = await asyncio.gather(*(self._delete_one(name, key) for name, key in refs))
        return sum(results)

    async def _delete_one(self, name: str, key: bytes) -> bool:
        backend = self.pool.get(name)
        if backend is None:
            return False
        try:
            await asyncio.wait_for(backend.delete(key), self.config.shard_timeout)
            return True
        except (BackendError, TimeoutError):
            return False

    # ------------------------------------------------------------------- read

    def _check_record(self, record: FileRecord) -> Coder:
        if record.version != RECORD_VERSION:
            raise IntegrityError(f"metadata record version {record.version} is not supported")
        if record.cipher not in ("", crypto.CIPHER_NAME):
            raise IntegrityError(f"cipher {record.cipher!r} is not supported")
        coder = self.coder(record.k, record.m, record.ec_type or DEFAULT_EC_TYPE)
        nb = len(record.backends)
        for i, c in enumerate(record.chunks):
            if len(c.shards) != coder.n:
                raise IntegrityError(f"chunk {i} lists {len(c.shards)} shards, expected {coder.n}")
            if any(sh.backend >= nb for sh in c.shards):
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

    async def _fetch(self, record: FileRecord, ci: int, si: int) -> bytes | Exception | None:
        """One shard: bytes, None (not stored) or the error that stopped the read."""
        ref = record.chunks[ci].shards[si]
        name = record.backends[ref.backend] if ref.backend < len(record.backends) else "?"
        backend = self.pool.get(name)
        if backend is None:
            return BackendError(name, "backend is not in the current configuration")
        try:
            async with asyncio.timeout(self.config.shard_timeout):
                value = await backend.get(ref.key)
        except TimeoutError:
            self.pool.mark_down(name)
            return BackendError(name, f"no answer within {self.config.shard_timeout}s")
        except BackendUnavailable as exc:
            # Remembered for backend_cooldown: later chunks ask parity first instead of
            # paying a failed fetch and a second round trip per chunk.
            self.pool.mark_down(name)
            return exc
        except BackendError as exc:
            return exc
        self.pool.mark_up(name)
        return value

    async def _gather(
        self, record: FileRecord, coder: Coder, ci: int, *, want: int, hedge: bool = True, verify: bool = True
    ) -> tuple[dict[int, bytes], ChunkHealth]:
        """Fetch shards of chunk ``ci`` until ``want`` verified ones are in hand.

        Data shards first; parity comes in for each failure, and for every
        outstanding data shard once ``hedge_after`` passes.
        """
        chunk = record.chunks[ci]
        health = ChunkHealth(ci)
        good: dict[int, bytes] = {}
        # Shards on backends known to be down go last, so parity is asked for up front.
        healthy = set(self.pool.healthy())
        order = sorted(range(coder.n), key=lambda i: record.backends[chunk.shards[i].backend] not in healthy)
        queue = deque(order[want:]) if want < coder.n else deque()
        pending: dict[asyncio.Task[bytes | Exception | None], int] = {
            asyncio.create_task(self._fetch(record, ci, i)): i for i in order[:want]
        }
        deadline = time.monotonic() + self.config.hedge_after if hedge else None
        try:
            while pending and len(good) < want:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # hedge: data shards are slow, bring in parity for each of them
                    deadline = None
                    for _ in range(len(pending)):
                        if queue:
                            i = queue.popleft()
                            pending[asyncio.create_task(self._fetch(record, ci, i))] = i
                    continue
                for task in done:
                    si = pending.pop(task)
                    value = task.result()
                    if isinstance(value, bytes) and (not verify or shard_checksum(value) == chunk.shards[si].checksum):
                        good[si] = value
                        continue
                    if isinstance(value, bytes):
                        health.corrupt.append(si)
                    else:
                        health.missing.append(si)
                        if isinstance(value, Exception):
                            log.debug("chunk %d shard %d: %s", ci, si, value)
                    if queue:
                        i = queue.popleft()
                        pending[asyncio.create_task(self._fetch(record, ci, i))] = i
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        health.missing.sort()
        health.corrupt.sort()
        return good, health

    # ----------------------------------------------------------------- checks

    async def soft_check(self, record: FileRecord, concurrency: int = 64) -> CheckReport:
        """Every shard present? (EXISTS on each backend; nothing is read.)"""
        coder = self._check_record(record)
        sem = asyncio.Semaphore(concurrency)

        async def present(ci: int, si: int) -> bool:
            ref = record.chunks[ci].shards[si]
            backend = self.pool.get(record.backends[ref.backend])
            if backend is None:
                return False
            async with sem:
                try:
                    return await asyncio.wait_for(backend.exists(ref.key), self.config.shard_timeout)
                except (BackendError, TimeoutError):
                    return False

        report = CheckReport(hard=False, k=coder.k, m=coder.m)
        for ci, chunk in enumerate(record.chunks):
            flags = await asyncio.gather(*(present(ci, si) for si in range(len(chunk.shards))))
            report.chunks.append(ChunkHealth(ci, missing=[si for si, ok in enumerate(flags) if not ok]))
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
            frags, health = await self._gather(record, coder, ci, want=coder.n, hedge=False)
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

    async def repair(self, record: FileRecord, report: CheckReport | None = None) -> tuple[FileRecord, int]:
        """Rebuild bad shards onto healthy backends; return (updated record, shards rewritten).

        Uses ``report`` (a check of this record) or runs a hard check. Raises
        Unrecoverable naming the chunks with fewer than k good shards; no
        chunk is changed in that case. The caller stores the new record.
        """
        coder = self._check_record(record)
        if report is None:
            report = await self.hard_check(record)
        damaged = [h for h in report.chunks if h.bad]
        lost = [h for h in damaged if len(h.bad) > coder.m]
        if lost:
            raise Unrecoverable("cannot repair: " + "; ".join(_unrecoverable_msg(h.index, coder, h) for h in lost[:5]))
        new = FileRecord()
        new.CopyFrom(record)
        rewritten = 0
        writer = _ChunkWriter(self.pool, new, self.config, start=random.randrange(len(self.pool.backends)))
        try:
            for h in damaged:
                frags, health = await self._gather(record, coder, h.index, want=coder.n, hedge=False)
                bad = health.bad
                if not bad:
                    continue
                if len(frags) < coder.k:
                    raise Unrecoverable(_unrecoverable_msg(h.index, coder, health))
                good = {i: frags[i] for i in sorted(frags)[: coder.k]}
                rebuilt = await asyncio.to_thread(coder.reconstruct, good, bad)
                # The corrupt copies are left where they are: a backend that came back
                # empty hands out its keys again, so the key may already hold another
                # file's good shard. Unreferenced shards are garbage, never a risk.
                await writer.rewrite(h.index, rebuilt)
                rewritten += len(rebuilt)
        except BaseException:
            await writer.cleanup()
            raise
        return new, rewritten


def _decode_decrypt(
    coder: Coder, cipher: crypto.ChunkCipher, ci: int, frags: dict[int, bytes], cipher_size: int
) -> bytes:
    ct = coder.decode(frags, cipher_size)
    return cipher.decrypt(ci, ct)


def _unrecoverable_msg(ci: int, coder: Coder, health: ChunkHealth) -> str:
    good = coder.n - len(health.bad)
    return (
        f"chunk {ci} has {good} good shards of {coder.n}, needs {coder.k}"
        f" (missing {health.missing or 'none'}, corrupt {health.corrupt or 'none'})"
    )


class _ChunkWriter:
    """Places the shards of one file's chunks on distinct backends, with spares."""

    def __init__(self, pool: BackendPool, record: FileRecord, cfg: EngineConfig, start: int) -> None:
        self.pool = pool
        self.record = record
        self.cfg = cfg
        self.start = start
        self.written: list[tuple[str, bytes]] = []
        self._index: dict[str, int] = {name: i for i, name in enumerate(record.backends)}

    def _backend_index(self, name: str) -> int:
        idx = self._index.get(name)
        if idx is None:
            idx = self._index[name] = len(self.record.backends)
            self.record.backends.append(name)
        return idx

    def _candidates(self, ci: int, exclude: set[str]) -> list[str]:
        """Healthy backends not in ``exclude``, rotated per chunk to spread load."""
        names = self.pool.names
        n = len(names)
        rot = (self.start + ci * (self.cfg.k + self.cfg.m)) % n
        healthy = set(self.pool.healthy())
        ordered = names[rot:] + names[:rot]
        first = [b for b in ordered if b in healthy and b not in exclude]
        # Backends in cooldown are the last resort: they may be back by now.
        rest = [b for b in ordered if b not in healthy and b not in exclude]
        return first + rest

    async def write_chunk(self, ci: int, frags: Sequence[bytes], sums: Sequence[bytes]) -> None:
        await self._place(ci, dict(enumerate(frags)), sums, exclude=set())

    async def rewrite(self, ci: int, rebuilt: dict[int, bytes]) -> None:
        """Write rebuilt shards of chunk ``ci`` onto backends holding no other shard of it."""
        chunk = self.record.chunks[ci]
        keep = {self.record.backends[s.backend] for si, s in enumerate(chunk.shards) if si not in rebuilt}
        sums = {si: shard_checksum(f) for si, f in rebuilt.items()}
        await self._place(ci, rebuilt, sums, exclude=keep)

    async def _place(
        self, ci: int, frags: dict[int, bytes], sums: Sequence[bytes] | dict[int, bytes], exclude: set[str]
    ) -> None:
        candidates = deque(self._candidates(ci, exclude))
        if len(candidates) < len(frags):
            raise StoreFailed(
                f"chunk {ci}: {len(candidates)} usable backends for {len(frags)} shards"
                f" ({len(exclude)} already hold this chunk's other shards)"
            )
        errors: list[str] = []

        def record(si: int, name: str, key: bytes) -> None:
            self.pool.mark_up(name)
            self.written.append((name, key))
            ref = self.record.chunks[ci].shards[si]
            ref.backend = self._backend_index(name)
            ref.key = key
            ref.checksum = sums[si]

        # Each round puts every shard still unplaced on the next candidate, all
        # at once and through one call (dir backends: one worker thread for the
        # round; a thread hop per shard costs more than the write). Shards
        # refused go to further candidates in the next round. A round ends when
        # every put has, so no write lands after cleanup().
        pending = dict(frags)
        while pending:
            if len(candidates) < len(pending):
                raise StoreFailed(
                    f"chunk {ci}: no backend accepted shard {', '.join(map(str, sorted(pending)))}; fewer than"
                    f" {self.cfg.k + self.cfg.m} backends are usable ({'; '.join(errors[-4:])})"
                )
            tries = [(si, candidates.popleft()) for si in pending]
            results = await put_each(
                [(self.pool.backends[name], pending[si]) for si, name in tries], self.cfg.shard_timeout
            )
            for (si, name), result in zip(tries, results, strict=True):
                if isinstance(result, BackendError):
                    self.pool.mark_down(name)
                    errors.append(str(result))
                    log.warning("shard write refused, trying another backend: %s", result)
                else:
                    record(si, name, result)
                    del pending[si]

    async def cleanup(self) -> None:
        """Delete every shard this writer put (after a failed store or repair)."""

        async def rm(name: str, key: bytes) -> None:
            try:
                await asyncio.wait_for(self.pool.backends[name].delete(key), self.cfg.shard_timeout)
            except (BackendError, TimeoutError) as exc:
                log.warning("could not remove orphan shard on %s: %s", name, exc)

        await asyncio.gather(*(rm(n, k) for n, k in self.written))
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


async def file_source(path: str | os.PathLike[str], block: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
    """Read a file in ``block``-sized pieces without blocking the event loop."""
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            data = await asyncio.to_thread(os.pread, fd, block, offset)
            if not data:
                return
            offset += len(data)
            yield data
    finally:
        os.close(fd)
