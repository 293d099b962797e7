"""Metadata backups: a snapshot of every record, stored in the erasure-coded pool like any file, and restore.

Snapshot format (little-endian)::

    b"GSMETA01"  u64 created            header
    b"R" u32 meta_id u32 length bytes   one per record, ascending meta_id; bytes = the stored value
    b"E" u64 count                      end; a snapshot without it is truncated

The snapshot is stored through the engine and registered with PutRecord, so it
is downloadable, scrubbed and repaired like any file. Its own record cannot be
inside the snapshot (it is made from the snapshot), and after losing every
metadata machine nothing could look it up, so the record is handed back
(BackupReply.record) and written to ``DATA/backups/<UTC time>.record``
(a serialized FileRecord): keep a copy off the metadata machines.

Restore rebuilds a master namespace with the SAME ids. A sequential namespace
allocates ids itself (0-db: updates and deletes use up ids too), so each record
is put exactly when the allocator reaches its id: filler values are put to
move the allocator over the gaps, every returned id is checked, and the
fillers are deleted after the last record (a delete may use up ids past the
last one, which is harmless). The dedup index is rebuilt from the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.backends import Mode, open_backend
from services.common.backends.base import seq_id, seq_key
from services.common.config import Config
from services.common.engine import Engine, FileRecord, file_source
from services.common.errors import BackendError, IntegrityError, InvalidInput, KeyNotFound, Refused
from services.common.ids import HASH_BYTES, MAX_META_ID, parse_file_id
from services.common.metastore import FILLER, MetaStore
from services.common.records import Records

log = logging.getLogger(__name__)

MAGIC = b"GSMETA01"
_HEADER = struct.Struct("<8sQ")
_ENTRY = struct.Struct("<cII")
_END = struct.Struct("<cQ")
SNAPSHOT_EXT = ".gsmeta"
SNAPSHOT_TYPE = "application/x-gridstor-metadata"
BACKUPS_DIR = "backups"
WRITE_BATCH = 1 << 20


@dataclass(frozen=True)
class BackupResult:
    """A stored snapshot."""

    backup_id: str
    records: int
    last_id: int  # -1 when the snapshot holds no record
    size: int
    created: int
    record: FileRecord
    record_path: Path


@dataclass(frozen=True)
class RestoreResult:
    """What a restore wrote."""

    records: int
    last_id: int  # -1 when none


def backups_dir(data_dir: Path) -> Path:
    return data_dir / BACKUPS_DIR


def _stamp(created: int) -> str:
    return dt.datetime.fromtimestamp(created, dt.UTC).strftime("%Y%m%dT%H%M%SZ")


async def write_snapshot(records: Records, path: Path, created: int) -> tuple[int, int]:
    """Write every record from ``records`` into a snapshot file at ``path``; (count, last id)."""
    count, last = 0, -1
    out = await asyncio.to_thread(open, path, "wb")
    try:
        parts: list[bytes] = [_HEADER.pack(MAGIC, created)]
        pending = len(parts[0])
        async for entry in records.list():
            data = MetaStore.encode(entry.record)
            parts += [_ENTRY.pack(b"R", entry.meta_id, len(data)), data]
            pending += _ENTRY.size + len(data)
            count += 1
            last = entry.meta_id
            if pending >= WRITE_BATCH:
                await asyncio.to_thread(out.write, b"".join(parts))
                parts, pending = [], 0
        parts.append(_END.pack(b"E", count))
        await asyncio.to_thread(out.write, b"".join(parts))
        await asyncio.to_thread(out.flush)
        await asyncio.to_thread(os.fsync, out.fileno())
    finally:
        out.close()
    return count, last


async def read_snapshot(stream: AsyncIterable[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (meta id, stored value) from a snapshot stream; IntegrityError when it is not a whole snapshot."""
    buf = bytearray()
    it = aiter(stream)
    done = False

    async def need(n: int) -> bool:
        nonlocal done
        while len(buf) < n and not done:
            try:
                buf.extend(await anext(it))
            except StopAsyncIteration:
                done = True
        return len(buf) >= n

    if not await need(_HEADER.size):
        raise IntegrityError("the backup is not a metadata snapshot (too short)")
    magic, _created = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise IntegrityError("the backup is not a gridstor metadata snapshot (bad magic)")
    del buf[: _HEADER.size]
    count = 0
    last = -1
    while True:
        if not await need(1):
            raise IntegrityError(f"the snapshot is truncated after {count} records (no end marker)")
        tag = bytes(buf[:1])
        if tag == b"E":
            if not await need(_END.size):
                raise IntegrityError("the snapshot's end marker is truncated")
            _, expected = _END.unpack_from(buf)
            if expected != count:
                raise IntegrityError(f"the snapshot says it holds {expected} records, it holds {count}")
            del buf[: _END.size]
            if buf or await need(1):
                raise IntegrityError("the snapshot has data after its end marker")
            return
        if tag != b"R" or not await need(_ENTRY.size):
            raise IntegrityError(f"the snapshot is damaged after {count} records")
        _, meta_id, length = _ENTRY.unpack_from(buf)
        if not await need(_ENTRY.size + length):
            raise IntegrityError(f"the snapshot is truncated inside record {meta_id:08x}")
        data = bytes(buf[_ENTRY.size : _ENTRY.size + length])
        del buf[: _ENTRY.size + length]
        if meta_id <= last:
            raise IntegrityError(f"the snapshot lists record {meta_id:08x} after {last:08x}; ids must ascend")
        last = meta_id
        count += 1
        yield meta_id, data


async def backup(
    engine: Engine, records: Records, data_dir: Path, *, clock: Callable[[], float] = time.time
) -> BackupResult:
    """Snapshot every record into the pool; keep the snapshot's record in ``DATA/backups/<time>.record``."""
    created = int(clock())
    folder = backups_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / f".snapshot-{created}-{os.getpid()}.tmp"
    try:
        count, last = await write_snapshot(records, tmp, created)
        size = tmp.stat().st_size
        record = await engine.store(file_source(tmp, once=True), ext=SNAPSHOT_EXT, content_type=SNAPSHOT_TYPE)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    try:
        entry, deduplicated = await records.put(record)
    except BaseException:
        await engine.delete_shards(record)
        raise
    if deduplicated:  # the same snapshot bytes are stored already: keep that copy
        await engine.delete_shards(record)
        entry = await records.get(entry.file_id)
    path = folder / f"{_stamp(created)}.record"
    path.write_bytes(entry.record.SerializeToString(deterministic=True))
    os.chmod(path, 0o600)
    log.info(
        "metadata backup stored",
        extra={"backup_id": entry.file_id, "records": count, "size": size, "record_file": str(path)},
    )
    return BackupResult(entry.file_id, count, last, size, created, entry.record, path)


def load_record_file(path: Path) -> FileRecord:
    """A snapshot record written by ``backup`` (DATA/backups/<time>.record); InvalidInput when it is not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the backup record {path}: {exc.strerror}") from None
    record = FileRecord()
    try:
        record.ParseFromString(data)
    except Exception:
        raise InvalidInput(f"{path} is not a backup record (it does not parse)") from None
    if len(record.hash) != HASH_BYTES or not record.version or not record.wrapped_key:
        raise InvalidInput(f"{path} is not a backup record (no content hash or file key)")
    return record


def snapshot_record(backup_id: str, record: FileRecord | None) -> FileRecord | None:
    """Check that ``record`` is the one ``backup_id`` names (when both are given); the record or None."""
    if backup_id:
        fid = parse_file_id(backup_id)
        if record is not None and bytes(record.hash) != fid.hash:
            raise InvalidInput(f"the backup record's hash does not match backup id {fid.key}")
    return record


async def newest_backup_time(data_dir: Path) -> float:
    """Unix time of the newest local backup record; 0 when there is none."""
    folder = backups_dir(data_dir)
    try:
        return max((p.stat().st_mtime for p in folder.glob("*.record")), default=0.0)
    except OSError:
        return 0.0


class _Placer:
    """Puts values into a sequential namespace at chosen ids (see the module docstring)."""

    def __init__(self, store: MetaStore) -> None:
        self.records = store.records
        self.next: int | None = None  # the id the namespace's next put returns, when known
        self.fillers: list[bytes] = []

    async def _put(self, value: bytes) -> int:
        got = seq_id(await self.records.put(value))
        if self.next is not None and got != self.next:
            raise Refused(
                f"metadata namespace {self.records.name} allocated id {got:08x} where {self.next:08x} was due:"
                " something else is writing to it; stop meta's writers (ingest) and restore again"
            )
        self.next = got + 1
        return got

    async def place(self, meta_id: int, data: bytes, *, force: bool) -> None:
        key = seq_key(meta_id)
        if force and await self.records.exists(key):
            await self.records.set(key, data)
            self.next = None  # 0-db: an update uses up an id
            return
        if self.next is None and meta_id > 0:
            got = await self._put(FILLER)  # find where the allocator stands
            if got >= meta_id:
                await self.records.delete(seq_key(got))
                raise Refused(
                    f"metadata namespace {self.records.name} has allocated ids up to {got:08x} already, so record"
                    f" {meta_id:08x} cannot get its id back; restore into an empty (new) namespace"
                )
            self.fillers.append(seq_key(got))
        while self.next is not None and self.next < meta_id:
            self.fillers.append(seq_key(await self._put(FILLER)))
        if self.next is not None and self.next > meta_id:
            raise Refused(
                f"metadata namespace {self.records.name} is past id {meta_id:08x}; restore into an empty namespace"
            )
        got = await self._put(data)
        if got != meta_id:
            raise Refused(
                f"record {meta_id:08x} got id {got:08x} in {self.records.name}; restore into an empty namespace"
            )

    async def drop_fillers(self) -> None:
        for key in self.fillers:
            with contextlib.suppress(KeyNotFound):
                await self.records.delete(key)
        self.fillers.clear()


async def open_master_store(cfg: Config) -> MetaStore:
    """The master records namespace and dedup index of ``cfg``, opened directly (no replicator)."""
    assert cfg.metadata is not None
    if cfg.metadata.mode != "seq":
        raise Refused("restore writes a master (sequential) metadata namespace; this config names a replica")
    records = await open_backend(cfg.metadata.uri, Mode.SEQ)
    try:
        index = await open_backend(cfg.metadata.index_uri, Mode.USER)
    except BaseException:
        await records.close()
        raise
    return MetaStore(records, index)


async def restore(engine: Engine, store: MetaStore, record: FileRecord, *, force: bool = False) -> RestoreResult:
    """Rebuild ``store`` (a master namespace and its dedup index) from the snapshot ``record`` names."""
    if store.is_replica:
        raise Refused("restore writes a master (sequential) metadata namespace, not a replica")
    info = await store.records.info()
    if info.entries and not force:
        raise Refused(
            f"metadata namespace {store.records.name} holds {info.entries} values; restore needs an empty one"
            " (or force, which replaces the records with the snapshot's ids)"
        )
    placer = _Placer(store)
    count, last = 0, -1
    try:
        async for meta_id, data in read_snapshot(engine.read(record)):
            if meta_id > MAX_META_ID:
                raise IntegrityError(f"the snapshot holds id {meta_id}, beyond 32 bits")
            decoded = MetaStore.decode(meta_id, data)
            await placer.place(meta_id, data, force=force)
            if store.index is not None:
                await store.index.set(bytes(decoded.hash), seq_key(meta_id))
            count += 1
            last = meta_id
    finally:
        with contextlib.suppress(BackendError):
            await placer.drop_fillers()
    log.info("metadata restored", extra={"records": count, "last_id": last, "namespace": store.records.name})
    return RestoreResult(count, last)
