"""Metadata records in a sequential namespace, plus the dedup index.

``records`` is a seq backend (0-db sequential namespace, or a dir backend that
allocates ids the same way): storing a record returns its id, which becomes
the last 8 hex digits of the file id. ``index`` is a user-key backend mapping
the 24-byte content hash to the record's 8-byte key, so the same content
uploaded twice resolves to the first record. The index is only a shortcut:
every hit is checked against the record itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError

from gridstor.v1 import record_pb2
from services.common.backends.base import MAX_VALUE_SIZE, Backend, Mode, seq_id, seq_key
from services.common.errors import IntegrityError, InvalidInput, NotFound, StoreFailed, ValueTooLarge
from services.common.ids import HASH_BYTES, MAX_META_ID, FileId

FileRecord = record_pb2.FileRecord


class MetaStore:
    """Stores, finds and updates file records; see the module docstring."""

    def __init__(self, records: Backend, index: Backend | None) -> None:
        if records.mode is not Mode.SEQ:
            raise InvalidInput(f"metadata backend {records.name} must be sequential")
        if index is not None and index.mode is not Mode.USER:
            raise InvalidInput(f"dedup index backend {index.name} must use user keys")
        self.records = records
        self.index = index

    @staticmethod
    def encode(record: FileRecord) -> bytes:
        data = record.SerializeToString(deterministic=True)
        if len(data) > MAX_VALUE_SIZE:
            raise ValueTooLarge(
                f"metadata record is {len(data)} bytes, over the {MAX_VALUE_SIZE}-byte limit:"
                f" the file has {len(record.chunks)} chunks; configure a larger chunk_size"
            )
        return data

    @staticmethod
    def decode(meta_id: int, data: bytes) -> FileRecord:
        record = FileRecord()
        try:
            record.ParseFromString(data)
        except DecodeError as exc:
            raise IntegrityError(f"metadata record {meta_id:08x} does not parse: {exc}") from None
        if len(record.hash) != HASH_BYTES:
            raise IntegrityError(f"metadata record {meta_id:08x} has a {len(record.hash)}-byte hash")
        return record

    async def put(self, record: FileRecord) -> int:
        """Store a new record; return its id and point the dedup index at it."""
        key = await self.records.put(self.encode(record))
        meta_id = seq_id(key)
        if meta_id > MAX_META_ID:
            await self.records.delete(key)
            raise StoreFailed(f"metadata namespace {self.records.name} is out of 32-bit ids; start a new one")
        if self.index is not None:
            await self.index.set(bytes(record.hash), key)
        return meta_id

    async def get(self, meta_id: int) -> FileRecord | None:
        """The record with this id, or None."""
        if not 0 <= meta_id <= MAX_META_ID:
            return None
        data = await self.records.get(seq_key(meta_id))
        return None if data is None else self.decode(meta_id, data)

    async def resolve(self, file_id: FileId) -> FileRecord:
        """The record a file id names; NotFound unless its hash matches the id."""
        record = await self.get(file_id.meta_id)
        if record is None or bytes(record.hash) != file_id.hash:
            raise NotFound(f"no file with id {file_id.key}")
        return record

    async def update(self, meta_id: int, record: FileRecord) -> None:
        """Replace record ``meta_id`` (after a repair); the content hash may not change."""
        current = await self.get(meta_id)
        if current is None:
            raise NotFound(f"no metadata record {meta_id:08x}")
        if current.hash != record.hash:
            raise InvalidInput(f"update of record {meta_id:08x} would change its content hash")
        await self.records.set(seq_key(meta_id), self.encode(record))

    async def find_by_hash(self, content_hash: bytes) -> tuple[int, FileRecord] | None:
        """The stored record with this content hash, if the index knows one that still verifies."""
        if self.index is None:
            return None
        key = await self.index.get(bytes(content_hash))
        if key is None or len(key) != 8:
            return None
        meta_id = seq_id(key)
        record = await self.get(meta_id)
        if record is None or record.hash != content_hash:
            return None
        return meta_id, record

    async def scan(self, after: int | None = None) -> AsyncIterator[tuple[int, FileRecord]]:
        """Every record in id order, starting after ``after``."""
        start = None if after is None else seq_key(after)
        async for key in self.records.scan(start):
            data = await self.records.get(key)
            if data is not None:
                meta_id = seq_id(key)
                yield meta_id, self.decode(meta_id, data)

    async def close(self) -> None:
        await self.records.close()
        if self.index is not None:
            await self.index.close()
