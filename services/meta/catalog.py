"""The file catalog: records behind file ids, dedup on store, compare-and-swap updates.

This is meta's domain logic over ``MetaStore``; it imports no grpc.

Dedup is atomic inside this process: every ``put`` and ``update`` of a content
hash runs under that hash's asyncio lock, so two workers storing the same
content at once get one record between them. One meta process serves a
metadata namespace, so a process-local lock is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from gridstor.v1 import common_pb2
from services.common.crypto import TAG_BYTES
from services.common.engine import CHECKSUM_BYTES, RECORD_VERSION, unwritten_shards
from services.common.errors import Conflict, InvalidInput, NotFound, Refused
from services.common.ids import HASH_BYTES, FileId, check_ext, parse_file_id
from services.common.metastore import FileRecord, MetaStore
from services.common.mime import MAX_CONTENT_TYPE, content_type_for

REPLICA_REFUSAL = "this gateway is a read-only replica"
MAX_OTHER_EXTS = 32  # extensions a record keeps beyond its first (FileRecord.other_types)


@dataclass(frozen=True)
class Entry:
    """A stored record with its metadata id."""

    meta_id: int
    record: FileRecord

    @property
    def file_id(self) -> str:
        """Canonical file id: hash hex, metadata id hex and the stored extension."""
        return canonical_id(self.meta_id, self.record)


def canonical_id(meta_id: int, record: FileRecord) -> str:
    """The file id of ``record`` stored as ``meta_id``, with its stored extension."""
    return str(FileId(hash=bytes(record.hash), meta_id=meta_id, ext=record.ext))


class KeyedLocks:
    """One asyncio lock per key, dropped again once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        """Hold the lock of ``key`` for the body of the ``async with``."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def check_record(record: FileRecord) -> None:
    """Refuse a record that could not be read back; InvalidInput names the first problem."""
    if record.version != RECORD_VERSION:
        raise InvalidInput(f"record version {record.version} is not supported (expected {RECORD_VERSION})")
    if len(record.hash) != HASH_BYTES:
        raise InvalidInput(f"record hash must be {HASH_BYTES} bytes (BLAKE3-192), got {len(record.hash)}")
    if record.ext:
        check_ext(record.ext)
    if len(record.other_types) > MAX_OTHER_EXTS:
        raise InvalidInput(f"record lists {len(record.other_types)} other extensions; at most {MAX_OTHER_EXTS}")
    for ext, kind in record.other_types.items():
        check_ext(ext)
        if len(kind) > MAX_CONTENT_TYPE:
            raise InvalidInput(f"record content type for {ext} is over {MAX_CONTENT_TYPE} characters")
    if record.k < 1 or record.m < 1:
        raise InvalidInput(f"record coding k={record.k} m={record.m}: both must be at least 1")
    if record.chunk_size < 1:
        raise InvalidInput("record chunk_size must be at least 1")
    if not record.wrapped_key:
        raise InvalidInput("record has no wrapped file key")
    expected_chunks = -(-record.size // record.chunk_size)
    if len(record.chunks) != expected_chunks:
        raise InvalidInput(
            f"record of {record.size} bytes in {record.chunk_size}-byte chunks needs {expected_chunks} chunks,"
            f" it lists {len(record.chunks)}"
        )
    n = record.k + record.m
    if len(record.backend_ids) > len(record.backends):
        raise InvalidInput(
            f"record lists {len(record.backend_ids)} backend identities for {len(record.backends)} backends"
        )
    for i, chunk in enumerate(record.chunks):
        want = record.chunk_size if i < expected_chunks - 1 else record.size - record.chunk_size * i
        if chunk.plain_size != want:
            raise InvalidInput(f"record chunk {i} holds {chunk.plain_size} plaintext bytes, expected {want}")
        if chunk.cipher_size != chunk.plain_size + TAG_BYTES:
            raise InvalidInput(f"record chunk {i} cipher_size {chunk.cipher_size} is not plain_size + {TAG_BYTES}")
        if len(chunk.shards) != n:
            raise InvalidInput(f"record chunk {i} lists {len(chunk.shards)} shards, expected k+m = {n}")
        written = 0
        for si, shard in enumerate(chunk.shards):
            if shard.unwritten:
                if shard.key or shard.checksum:
                    raise InvalidInput(f"record chunk {i} shard {si} is marked unwritten but has a key or checksum")
                continue
            written += 1
            if shard.backend >= len(record.backends):
                raise InvalidInput(f"record chunk {i} shard {si} names backend #{shard.backend}, which is not listed")
            if not shard.key:
                raise InvalidInput(f"record chunk {i} shard {si} has no key")
            if len(shard.checksum) != CHECKSUM_BYTES:
                raise InvalidInput(f"record chunk {i} shard {si} checksum must be {CHECKSUM_BYTES} bytes")
        if written < record.k:
            raise InvalidInput(f"record chunk {i} has {written} shards written; at least k = {record.k} are needed")


def file_info(entry: Entry) -> common_pb2.FileInfo:
    """The public facts about a stored file."""
    r = entry.record
    return common_pb2.FileInfo(
        id=entry.file_id,
        size=r.size,
        hash=r.hash.hex(),
        ext=r.ext,
        content_type=content_type_for(r.content_type, r.ext),
        created=r.created,
        meta_id=entry.meta_id,
        k=r.k,
        m=r.m,
        chunk_size=r.chunk_size,
        chunks=len(r.chunks),
        unwritten_shards=unwritten_shards(r),
    )


class Catalog:
    """Reads and writes file records; ``read_only`` (a replica) refuses every write."""

    def __init__(self, store: MetaStore, *, read_only: bool = False) -> None:
        self.store = store
        self.read_only = read_only
        self._locks = KeyedLocks()

    def _writable(self) -> None:
        if self.read_only:
            raise Refused(REPLICA_REFUSAL)

    async def resolve(self, fid: FileId) -> Entry:
        """The record a parsed file id names; NotFound unless its hash matches the id."""
        return Entry(fid.meta_id, await self.store.resolve(fid))

    async def lookup(self, text: str) -> Entry:
        """The record a file id names: InvalidFileId if malformed (nothing read), else NotFound unless it matches."""
        return await self.resolve(parse_file_id(text))

    async def exists(self, text: str) -> Entry | None:
        """Like ``lookup``, but None for a well-formed id that names no stored file."""
        try:
            return await self.lookup(text)
        except NotFound:
            return None

    async def find_by_hash(self, content_hash: bytes) -> Entry | None:
        """The record holding this content, if any."""
        if len(content_hash) != HASH_BYTES:
            raise InvalidInput(f"hash must be {HASH_BYTES} raw bytes (BLAKE3-192), got {len(content_hash)}")
        found = await self.store.find_by_hash(content_hash)
        return None if found is None else Entry(*found)

    async def put(self, record: FileRecord) -> tuple[Entry, bool]:
        """Store ``record`` unless its content is stored already; return (entry, deduplicated)."""
        self._writable()
        check_record(record)
        content_hash = bytes(record.hash)
        async with self._locks.hold(content_hash):
            existing = await self.store.find_by_hash(content_hash)
            if existing is not None:
                return Entry(*existing), True
            new = FileRecord()
            new.CopyFrom(record)
            if not new.created:
                new.created = int(time.time())
            meta_id = await self.store.put(new)
            return Entry(meta_id, new), False

    async def update(self, text: str, record: FileRecord, expected: FileRecord | None = None) -> Entry:
        """Replace the record behind a file id; with ``expected``, only if the stored one still equals it."""
        self._writable()
        fid = parse_file_id(text)
        check_record(record)
        async with self._locks.hold(fid.hash):
            current = await self.store.resolve(fid)
            if bytes(record.hash) != bytes(current.hash):
                raise InvalidInput(f"update of {fid.key} would change its content hash; the hash cannot change")
            if expected is not None and current != expected:
                raise Conflict(f"record {fid.key} changed since it was read; read it again and retry")
            await self.store.update(fid.meta_id, record)
        return Entry(fid.meta_id, record)

    async def add_extension(self, text: str, ext: str, content_type: str = "") -> str:
        """Record that the content behind a file id was uploaded as ``ext`` too; the file id to answer.

        ``<key><ext>`` then downloads as ``content_type`` (the extension's type when
        empty or not a MIME type). The first type recorded for an extension stays;
        a record that lists MAX_OTHER_EXTS already is left alone and the answer
        carries its stored extension.
        """
        self._writable()
        fid = parse_file_id(text)
        if ext:
            check_ext(ext)
        if len(content_type) > MAX_CONTENT_TYPE:
            raise InvalidInput(f"content_type is {len(content_type)} characters; at most {MAX_CONTENT_TYPE}")
        async with self._locks.hold(fid.hash):
            current = await self.store.resolve(fid)
            if not ext or ext == current.ext or ext in current.other_types:
                return str(FileId(fid.hash, fid.meta_id, ext or current.ext))
            if len(current.other_types) >= MAX_OTHER_EXTS:
                return str(FileId(fid.hash, fid.meta_id, current.ext))
            record = FileRecord()
            record.CopyFrom(current)
            record.other_types[ext] = content_type_for(content_type, ext)
            await self.store.update(fid.meta_id, record)
        return str(FileId(fid.hash, fid.meta_id, ext))

    async def scan(self, after: int | None = None, limit: int = 0) -> AsyncGenerator[Entry, None]:
        """Records in metadata id order after ``after``; at most ``limit`` (0: all)."""
        count = 0
        records = self.store.scan(after)
        try:
            async for meta_id, record in records:
                yield Entry(meta_id, record)
                count += 1
                if limit and count >= limit:
                    return
        finally:
            aclose = getattr(records, "aclose", None)
            if aclose is not None:
                await aclose()
