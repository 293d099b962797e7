"""Metadata records in a sequential namespace, plus the dedup index.

``records`` is a seq backend (0-db sequential namespace, or a dir backend that
allocates ids the same way): storing a record returns its id, which becomes
the last 8 hex digits of the file id. ``index`` is a user-key backend mapping
the 24-byte content hash to the record's 8-byte key, so the same content
uploaded twice resolves to the first record. The index is only a shortcut:
every hit is checked against the record itself.

Replicas: ``ReplicatedMetaStore`` writes every stored or updated record
through to one or more user-key replica namespaces under the master's 8-byte
id, so ids match exactly. A replica that is down never fails a write: what it
missed is noted (new ids lower its catch-up floor, updates of old ids are kept
in a dirty set) and a background task catches it up by scanning the master
from the replica's cursor, which is persisted in the replica itself under
``REPLICA_CURSOR_KEY`` (not 8 bytes long, so never a record key). A slow full
compare (``verify_interval``) repairs whatever a crash of this process lost.
The replicator lives here, in meta's process, because meta is the only writer
of the master: one per-id lock orders write-throughs and catch-up copies, so a
stale copy can never overwrite a newer write-through.

A ``MetaStore`` over a user-key ``records`` backend reads a replica namespace
(a ``role: replica`` gateway): the same get / resolve / scan, writes refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from google.protobuf.message import DecodeError

from gridstor.v1 import record_pb2
from services.common.backends.base import MAX_VALUE_SIZE, SEQ_KEY_SIZE, Backend, Mode, seq_id, seq_key
from services.common.errors import (
    BackendError,
    IntegrityError,
    InvalidInput,
    KeyNotFound,
    NotFound,
    Refused,
    StoreFailed,
    ValueTooLarge,
)
from services.common.ids import HASH_BYTES, MAX_META_ID, FileId

log = logging.getLogger(__name__)

FileRecord = record_pb2.FileRecord

FILLER = b"gridstor:restore-filler"
"""Value a restore puts to move a sequential namespace's id allocator forward; never a record, deleted afterwards."""

REPLICA_CURSOR_KEY = b"gridstor:replica-cursor"
"""Reserved key in a replica namespace: the master id through which the replica was last verified complete."""

REPLICA_REFUSAL = "this metadata store is a read-only replica namespace"


class MetaStore:
    """Stores, finds and updates file records; see the module docstring."""

    def __init__(self, records: Backend, index: Backend | None) -> None:
        if index is not None and index.mode is not Mode.USER:
            raise InvalidInput(f"dedup index backend {index.name} must use user keys")
        if records.mode is Mode.USER and index is not None:
            raise InvalidInput(f"metadata backend {records.name} is a replica namespace (user keys): it has no index")
        self.records = records
        self.index = index

    @property
    def is_replica(self) -> bool:
        """Whether ``records`` is a replica namespace (user keys = the master's ids): read only."""
        return self.records.mode is Mode.USER

    def _writable(self) -> None:
        if self.is_replica:
            raise Refused(REPLICA_REFUSAL)

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
        self._writable()
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
        return None if data is None or data == FILLER else self.decode(meta_id, data)

    async def resolve(self, file_id: FileId) -> FileRecord:
        """The record a file id names; NotFound unless its hash matches the id."""
        record = await self.get(file_id.meta_id)
        if record is None or bytes(record.hash) != file_id.hash:
            raise NotFound(f"no file with id {file_id.key}")
        return record

    async def update(self, meta_id: int, record: FileRecord) -> None:
        """Replace record ``meta_id`` (after a repair); the content hash may not change."""
        self._writable()
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
        async for meta_id in self.ids(after):
            data = await self.records.get(seq_key(meta_id))
            if data is not None and data != FILLER:
                yield meta_id, self.decode(meta_id, data)

    async def ids(self, after: int | None = None) -> AsyncIterator[int]:
        """The ids of stored values in ascending order after ``after`` (keys only; may include restore fillers)."""
        if not self.is_replica:
            start = None if after is None else seq_key(after)
            async for key in self.records.scan(start):
                yield seq_id(key)
            return
        # A replica is filled in write order (catch-up after write-through), not id order: sort.
        found = sorted([seq_id(k) async for k in self.records.scan() if len(k) == SEQ_KEY_SIZE])
        for meta_id in found:
            if after is None or meta_id > after:
                yield meta_id

    async def close(self) -> None:
        await self.records.close()
        if self.index is not None:
            await self.index.close()


class _IdLocks:
    """One asyncio lock per metadata id, dropped once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, meta_id: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(meta_id, (asyncio.Lock(), 0))
        self._locks[meta_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[meta_id]
            if users <= 1:
                del self._locks[meta_id]
            else:
                self._locks[meta_id] = (lock, users - 1)


class Replica:
    """One replica namespace as meta's write-through and catch-up see it."""

    def __init__(self, uri: str, name: str, backend: Backend | None = None) -> None:
        self.uri = uri  # may hold a password: never logged; ``name`` is the redacted form
        self.name = name
        self.backend = backend
        self.synced = False  # verified complete through ``high``, and nothing failed since
        self.high = -1  # highest new id written through successfully
        self.floor: int | None = None  # catch-up must restart at or below this id (a new id was missed)
        self.dirty: set[int] = set()  # old ids whose update was missed
        self.failures = 0  # bumped on every missed write, so a catch-up knows whether it raced one
        self.down_until = 0.0  # write-through skips the replica until then (it just failed)
        self.saved: int | None = None  # cursor last persisted in the replica
        self.error = ""
        self.copied = 0  # records written by catch-up (for tests and logs)

    def missed(self, meta_id: int, update: bool) -> None:
        """Note a write the replica did not get."""
        self.synced = False
        self.failures += 1
        if update:
            self.dirty.add(meta_id)
        else:
            self.floor = meta_id - 1 if self.floor is None else min(self.floor, meta_id - 1)


Opener = Callable[[str, Mode], Awaitable[Backend]]


class ReplicatedMetaStore(MetaStore):
    """A master MetaStore that keeps replica namespaces in step; see the module docstring."""

    def __init__(
        self,
        records: Backend,
        index: Backend | None,
        replicas: Sequence[Replica],
        *,
        opener: Opener,
        sync_interval: float = 10.0,
        verify_interval: float = 86400.0,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(records, index)
        if self.is_replica:
            raise InvalidInput(f"metadata backend {records.name} must be sequential to have replicas")
        self.replicas = list(replicas)
        self.opener = opener
        self.sync_interval = sync_interval
        self.verify_interval = verify_interval
        self.timeout = timeout
        self._locks = _IdLocks()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()

    # -- writes ---------------------------------------------------------------

    async def put(self, record: FileRecord) -> int:
        meta_id = await super().put(record)
        async with self._locks.hold(meta_id):
            # Re-read under the id's lock: an update that slipped in since is what must go out.
            data = await self.records.get(seq_key(meta_id))
            if data is not None:
                await self._push(meta_id, data, update=False)
        return meta_id

    async def update(self, meta_id: int, record: FileRecord) -> None:
        async with self._locks.hold(meta_id):
            await super().update(meta_id, record)
            await self._push(meta_id, self.encode(record), update=True)

    async def _push(self, meta_id: int, data: bytes, *, update: bool) -> None:
        await asyncio.gather(*(self._push_one(r, meta_id, data, update) for r in self.replicas))

    async def _push_one(self, r: Replica, meta_id: int, data: bytes, update: bool) -> None:
        if r.backend is None or time.monotonic() < r.down_until:
            r.missed(meta_id, update)
            return
        try:
            async with asyncio.timeout(self.timeout):
                await r.backend.set(seq_key(meta_id), data)
        except (BackendError, TimeoutError) as exc:
            self._failed(r, exc)
            r.missed(meta_id, update)
            self._wake.set()
            return
        if not update:
            r.high = max(r.high, meta_id)

    def _failed(self, r: Replica, exc: BaseException) -> None:
        first = not r.error
        r.error = str(exc) or f"{r.name}: no answer within {self.timeout}s"
        r.down_until = time.monotonic() + self.sync_interval
        if first:
            log.warning("metadata replica %s is behind (it will be caught up): %s", r.name, r.error)

    # -- catch-up ---------------------------------------------------------------

    def start(self) -> None:
        """Start the background catch-up task (meta's process only: it is the master's one writer)."""
        if self._task is None and self.replicas:
            self._wake.set()  # a first round at once: catch up whatever happened while meta was down
            self._task = asyncio.create_task(self._run(), name="metadata-replicator")

    async def _run(self) -> None:
        next_verify = time.monotonic() + self.verify_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.sync_interval)
            self._wake.clear()
            full = self.verify_interval > 0 and time.monotonic() >= next_verify
            await self.sync_all(full=full)
            if full:
                next_verify = time.monotonic() + self.verify_interval

    async def sync_all(self, *, full: bool = False) -> None:
        """One catch-up round over every replica; a replica that fails stays behind until the next."""
        for r in self.replicas:
            try:
                await self.sync(r, full=full)
            except (BackendError, TimeoutError) as exc:
                self._failed(r, exc)
                await self._reopen_later(r)
            except Exception:  # a replica must never stop the replicator
                log.exception("metadata replica %s: catch-up failed", r.name)

    async def _reopen_later(self, r: Replica) -> None:
        """Drop a failing replica's handle: the next round opens it afresh (e.g. a replaced, empty disk)."""
        backend, r.backend = r.backend, None
        r.synced = False
        if backend is not None:
            with contextlib.suppress(BackendError):
                await backend.close()

    async def sync(self, r: Replica, *, full: bool = False) -> int:
        """Bring one replica up to the master (from its cursor; ``full``: compare everything); records copied."""
        async with self._sync_lock:
            if r.backend is None:
                r.backend = await self.opener(r.uri, Mode.USER)
                r.saved = None
            if r.synced and not full and not r.dirty:
                if r.saved is None or await load_cursor(r.backend) == r.saved:
                    if r.high > (r.saved if r.saved is not None else -1):
                        await self._save_cursor(r, r.high)
                    return 0
                # Its cursor is gone: the replica was wiped (a new, empty namespace). Rebuild it.
                log.warning("metadata replica %s lost its cursor (wiped?); copying every record again", r.name)
                r.synced = False
                r.saved = None
            failures = r.failures
            saved = r.saved = await load_cursor(r.backend)
            start = saved
            if r.floor is not None:
                start = r.floor if start is None else min(start, r.floor)
            if full or (start is not None and start < 0):
                start = None
            dirty, r.dirty = r.dirty, set()
            copied = 0
            last = -1 if start is None else start
            try:
                async for meta_id in self.ids(start):
                    copied += await self._copy(r, meta_id)
                    dirty.discard(meta_id)
                    last = meta_id
                    if copied and copied % 256 == 0:
                        await self._save_cursor(r, last)
                for meta_id in sorted(dirty):
                    copied += await self._copy(r, meta_id)
                    dirty.discard(meta_id)
            finally:
                r.dirty |= dirty
                r.copied += copied
            if r.failures == failures:
                r.synced = True
                r.floor = None
                r.down_until = 0.0
                if r.error:
                    log.info("metadata replica %s caught up (%d records copied)", r.name, copied)
                r.error = ""
                r.high = max(r.high, last)
                await self._save_cursor(r, r.high)
            return copied

    async def _copy(self, r: Replica, meta_id: int) -> int:
        """Make the replica's copy of ``meta_id`` equal the master's; 1 when something was written."""
        assert r.backend is not None
        key = seq_key(meta_id)
        async with self._locks.hold(meta_id):
            data = await self.records.get(key)
            current = await r.backend.get(key)
            if data is None or data == FILLER:
                if current is not None:
                    with contextlib.suppress(KeyNotFound):
                        await r.backend.delete(key)
                    return 1
                return 0
            if current == data:
                return 0
            await r.backend.set(key, data)
            return 1

    async def _save_cursor(self, r: Replica, cursor: int) -> None:
        assert r.backend is not None
        if cursor < 0 or cursor == r.saved:
            return
        await r.backend.set(REPLICA_CURSOR_KEY, seq_key(cursor))
        r.saved = cursor

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for r in self.replicas:
            if r.backend is not None:
                with contextlib.suppress(BackendError, TimeoutError):
                    if r.synced:
                        await self._save_cursor(r, r.high)
                with contextlib.suppress(BackendError):
                    await r.backend.close()
        await super().close()


async def load_cursor(replica: Backend) -> int | None:
    """The catch-up cursor persisted in a replica namespace, or None when it has none."""
    value = await replica.get(REPLICA_CURSOR_KEY)
    if value is None or len(value) != SEQ_KEY_SIZE:
        return None
    return seq_id(value)
