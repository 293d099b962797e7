"""``DirBackend``: the ``Backend`` interface over one folder; see the package docstring for the design.

This module holds the backend's state (the in-memory index, the dirty files
awaiting fsync) and its operations; the bytes on disk are in ``format``, the
folder's files in ``folder``, compaction in ``compact``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Self, TypeVar

from services.common import errors
from services.common.backends.base import SEQ_KEY_SIZE, Backend, BackendInfo, Mode, ReadBatch, seq_key
from services.common.backends.dirstore.compact import CompactResult, copy_value, fits, free_bytes
from services.common.backends.dirstore.folder import (
    ModeMismatch,
    Segments,
    backend_call,
    check_blank,
    copy_out,
    fsync_dir,
    initialise,
    is_full,
    prepare_folder,
    pwrite_all,
    read_meta,
    remove_temp_files,
)
from services.common.backends.dirstore.format import (
    DEL,
    HEADER,
    INDEX,
    LOCK,
    META,
    REC,
    SET,
    TMP_MARK,
    apply_records,
    describe_key,
    pack_header,
    pack_record,
    seg_name,
    unpack_header,
)
from services.common.backends.dirstore.index import Entry, SeqIndex, UserIndex, new_index
from services.common.backends.uri import DirURI

__all__ = ["DEFAULT_SEGMENT_SIZE", "FSYNC_POLICIES", "CompactResult", "DirBackend", "DirUsage"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SEGMENT_SIZE: Final = 256 * 1024 * 1024
FSYNC_POLICIES: Final = ("batch", "always", "never")

_CHUNK: Final = 1 << 20  # index bytes read at a time
_KEEP_TORN_OVER: Final = 64 * 1024  # a torn index tail longer than this is kept aside, not just cut
_INDEX_SLACK: Final = 1024 * 1024  # index.log is rewritten once it is this much and twice its live records


@dataclass(frozen=True)
class DirUsage:
    """Disk use of a dir backend; ``dead_bytes`` is what ``compact`` would give back."""

    entries: int
    live_bytes: int
    segment_bytes: int
    segments: int
    index_bytes: int

    @property
    def dead_bytes(self) -> int:
        return max(0, self.segment_bytes - self.live_bytes)


class DirBackend(Backend):
    """One folder used as a 0-db-like namespace; see the package docstring."""

    def __init__(
        self,
        *,
        name: str,
        folder: str,
        mode: Mode,
        backend_id: bytes,
        lock_fd: int,
        fsync: str,
        fsync_interval: float,
        segment_size: int,
    ) -> None:
        """Use ``DirBackend.open``; this only sets fields."""
        self.name = name
        self.mode = mode
        self.path = folder
        self._segments = Segments(folder)
        self._index_path = os.path.join(folder, INDEX)
        self._id = backend_id
        self._lock_fd = lock_fd
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        self._segment_size = segment_size

        self._lock = threading.Lock()  # in-memory state and descriptors
        self._wlock = threading.Lock()  # one writer thread per process (flock is per descriptor)
        self._closed = False

        self._ifd = -1
        self._ino = -1
        self._readonly = False
        self._pos = 0  # end of the last valid index record parsed
        self._generation = 0
        self._index: SeqIndex | UserIndex = new_index(mode)
        self._next = 0
        self._cur_seg = 0
        self._live = 0
        self._seg_live: dict[int, int] = {}  # live value bytes per segment

        self._dirty_segs: set[int] = set()
        self._dirty_index = False
        self._dirty_dir = False
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flushes: set[asyncio.Future[None]] = set()

    # -- opening ------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        uri: DirURI,
        mode: Mode,
        *,
        fsync: str = "batch",
        fsync_interval: float = 1.0,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        create: bool = True,
    ) -> DirBackend:
        """Open (or, with ``create`` and an existing parent folder, create) the backend in ``uri.path``.

        Raises ``BackendUnavailable`` when the folder (or its parent, when
        creating) is missing, ``ModeMismatch`` when it holds the other mode, and
        ``BackendError`` when it is not a gridstor dir backend.
        """
        name = uri.redacted
        if fsync not in FSYNC_POLICIES:
            raise errors.InvalidInput(f"{name}: fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if not fsync_interval > 0:
            raise errors.InvalidInput(f"{name}: fsync_interval must be > 0 seconds, got {fsync_interval}")
        if segment_size < 1:
            raise errors.InvalidInput(f"{name}: segment_size must be > 0 bytes, got {segment_size}")
        folder = uri.path

        def prepare() -> DirBackend:
            folder = os.path.abspath(uri.path)
            backend_id, lock_fd = prepare_folder(name, folder, mode, create)
            backend = cls(
                name=name,
                folder=folder,
                mode=mode,
                backend_id=backend_id,
                lock_fd=lock_fd,
                fsync=fsync,
                fsync_interval=fsync_interval,
                segment_size=segment_size,
            )
            try:
                with backend._lock:
                    backend._refresh()
            except BaseException:
                backend._close_fds()
                raise
            return backend

        return await asyncio.to_thread(backend_call, name, folder, "open", prepare)

    # -- Backend ------------------------------------------------------------

    @property
    def identity(self) -> bytes:
        """The folder's backend id (meta.json); a wiped folder set up again has a new one."""
        return self._id

    async def put(self, value: bytes) -> bytes:
        self._check_put(value)
        key = await self._thread("put", self._write, SET, None, value)
        self._after_write()
        return key

    @classmethod
    async def put_batch(
        cls, items: Sequence[tuple[Self, bytes]], put_timeout: float | None = None
    ) -> list[bytes | errors.BackendError]:
        """Write the whole batch from one worker thread: a thread hop per value costs more than the write.

        ``put_timeout`` is not applied: a write on a worker thread cannot be
        abandoned, and one landing after its caller gave up would be an orphan.
        """
        for backend, value in items:
            backend._check_put(value)

        def write_all() -> list[bytes | errors.BackendError]:
            out: list[bytes | errors.BackendError] = []
            for backend, value in items:
                try:
                    backend._check_open("put")
                    out.append(backend_call(backend.name, backend.path, "put", backend._write, SET, None, value))
                except errors.BackendError as exc:
                    out.append(exc)
            return out

        results = await asyncio.to_thread(write_all)
        for backend, _ in items:
            backend._after_write()
        return results

    batch_reads = True

    @classmethod
    async def get_batch(cls, batch: ReadBatch) -> None:
        """Read the batch from one worker thread, key after key: a thread hop per value costs more than its read.

        ``batch.started`` counts the reads begun, and ``batch.stop`` ends the batch before the next one.
        """

        def read_all() -> None:
            for i, (backend, key) in enumerate(batch.items):
                if batch.stop:
                    break
                assert isinstance(backend, DirBackend)
                batch.started = i + 1
                try:
                    backend._check_open("get")
                    found = backend._is_possible_key(key)
                    value = backend_call(backend.name, backend.path, "get", backend._get, bytes(key)) if found else None
                    batch.results[i] = value
                except errors.BackendError as exc:
                    batch.results[i] = exc

        await asyncio.to_thread(read_all)

    async def set(self, key: bytes, value: bytes) -> None:
        self._check_value(value)
        if not self._is_possible_key(key):
            raise errors.KeyNotFound(
                self.name, f"cannot update {describe_key(key)}: a sequential key has {SEQ_KEY_SIZE} bytes"
            )
        await self._thread("set", self._write, SET, bytes(key), value)
        self._after_write()

    async def get(self, key: bytes) -> bytes | None:
        if not self._is_possible_key(key):
            return None
        return await self._thread("get", self._get, bytes(key))

    async def exists(self, key: bytes) -> bool:
        if not self._is_possible_key(key):
            return False
        return await self._thread("exists", self._exists, bytes(key))

    async def length(self, key: bytes) -> int | None:
        if not self._is_possible_key(key):
            return None
        return await self._thread("length", self._length, bytes(key))

    async def high_water(self) -> int:
        """The next id the folder's allocator hands out (deleted ids are never reused)."""
        return await self._thread("high_water", self._high_water)

    async def delete(self, key: bytes) -> None:
        if not self._is_possible_key(key):
            raise errors.KeyNotFound(self.name, f"cannot delete {describe_key(key)}: not stored")
        await self._thread("delete", self._write, DEL, bytes(key), None)
        self._after_write()

    async def scan(self, after: bytes | None = None, *, batch: int = 1024) -> AsyncIterator[bytes]:
        """Yield keys in write order (seq: ascending id; user: order of last write) after ``after``.

        In seq mode ``after`` may be a deleted id; in user mode it must be
        stored (``KeyNotFound`` otherwise). Writes made during the scan are
        seen when they land after the cursor.
        """
        if after is not None:
            self._check_key(after)
            after = bytes(after)
        cursor: int | None = await self._thread("scan", self._scan_start, after)
        while cursor is not None:
            keys, cursor = await self._thread("scan", self._scan_batch, cursor, batch)
            for key in keys:
                yield key

    async def info(self) -> BackendInfo:
        return await self._thread("info", self._info)

    async def close(self) -> None:
        if self._closed:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        loop = asyncio.get_running_loop()
        pending = [fut for fut in self._flushes if fut.get_loop() is loop]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.to_thread(self._close)

    # -- extras -------------------------------------------------------------

    async def sync(self) -> None:
        """Put every write this process made on stable storage now (any fsync policy)."""
        await self._thread("sync", self._flush, True)

    async def usage(self) -> DirUsage:
        """Entries, live bytes, bytes in segment files (live + dead) and the index size."""
        return await self._thread("usage", self._usage)

    async def compact(self, min_dead: float = 0.0) -> CompactResult:
        """Give back the space of deleted and overwritten values, segment by segment (see ``compact``).

        Only segments whose dead share is at least ``min_dead`` (0: any dead byte) are
        rewritten. Writers (in every process) wait for one segment at a time; readers
        do not wait. Other processes drop their descriptors of removed segments on
        their next call; one that stays idle keeps that space allocated until then.
        """
        return await self._thread("compact", self._compact, min_dead)

    # -- plumbing -----------------------------------------------------------

    async def _thread(self, op: str, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise errors.BackendUnavailable(self.name, f"{op}: the backend is closed")
        return await asyncio.to_thread(backend_call, self.name, self.path, op, fn, *args)

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise errors.BackendUnavailable(self.name, f"{op}: the backend is closed")

    def _after_write(self) -> None:
        """Arm the background flush (fsync="batch") on the running loop."""
        if self._fsync != "batch" or self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._flush_handle is not None and self._flush_loop is loop:
            return
        self._flush_loop = loop
        self._flush_handle = loop.call_later(self._fsync_interval, self._on_flush_timer)

    def _on_flush_timer(self) -> None:
        self._flush_handle = None
        if self._closed:
            return
        fut = asyncio.get_running_loop().run_in_executor(None, self._flush_quietly)
        self._flushes.add(fut)
        fut.add_done_callback(self._flushes.discard)

    def _flush_quietly(self) -> None:
        try:
            self._flush(False)
        except Exception as exc:
            if self._closed:
                return
            log.error("%s: background fsync failed: %s", self.name, exc)

    # -- index --------------------------------------------------------------

    def _refresh(self, writer: bool = False) -> None:
        """Catch up on index records appended by others (call with ``_lock`` held).

        A writer (holding the flock) also cuts off an invalid tail.
        """
        self._check_open("read")
        try:
            st = os.stat(self._index_path)
        except FileNotFoundError:
            if not self._is_blank():
                raise
            # The folder was emptied (a replaced disk): readers see an empty
            # backend; a writer, holding the folder's current lock, sets it up.
            if not writer:
                if self._ino != 0:
                    self._reset(-1, 0, False, 0, 0, 0)
                return
            check_blank(self.name, self.path)
            self._id = bytes.fromhex(str(initialise(self.path, self.mode)["id"]))
            log.warning("%s: the folder was emptied; initialised a new backend in it", self.name)
            st = os.stat(self._index_path)
        if st.st_ino != self._ino or st.st_size < self._pos:
            self._reload()
        elif st.st_size == self._pos:
            return
        else:
            self._parse_tail()
        if writer and not self._readonly:
            size = os.fstat(self._ifd).st_size
            if size > self._pos:
                self._cut_tail(size)

    def _reload(self) -> None:
        """(Re)open index.log, a new file after a compaction, and rebuild the in-memory index."""
        try:
            fd = os.open(self._index_path, os.O_RDWR | os.O_CLOEXEC)
            readonly = False
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES):
                raise
            fd = os.open(self._index_path, os.O_RDONLY | os.O_CLOEXEC)
            readonly = True
        try:
            try:
                header = unpack_header(os.pread(fd, HEADER.size, 0))
            except ValueError as exc:
                raise errors.BackendError(self.name, f"{self._index_path} {exc}") from None
            if header.backend_id != self._id:
                self._adopt(header.backend_id)
            ino = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            raise
        self._reset(fd, ino, readonly, header.generation, header.base_seg, header.next_id)
        self._parse_tail()

    def _reset(self, fd: int, ino: int, readonly: bool, generation: int, base_seg: int, next_id: int) -> None:
        """Start over from an empty in-memory index on index descriptor ``fd`` (-1: no index file)."""
        if self._ifd >= 0:
            os.close(self._ifd)
        self._ifd, self._ino, self._readonly = fd, ino, readonly
        self._pos = HEADER.size
        self._generation = generation
        self._index = new_index(self.mode)
        self._next, self._cur_seg, self._live = next_id, base_seg, 0
        self._seg_live = {}
        self._segments.forget()

    def _adopt(self, backend_id: bytes) -> None:
        """The folder now holds another backend (a replaced disk): use it if it has our mode."""
        meta_path = os.path.join(self.path, META)
        meta = read_meta(self.name, meta_path)
        if meta is None or meta.get("id") != backend_id.hex():
            raise errors.BackendUnavailable(self.name, f"{self.path} is being replaced; try again")
        if meta.get("mode") != self.mode.value:
            raise ModeMismatch(
                self.name, f"{self.path} now holds a {meta.get('mode')!r}-mode backend, not {self.mode.value!r}"
            )
        log.warning("%s: the folder now holds another backend (id %s), using it", self.name, backend_id.hex())
        self._id = backend_id

    def _is_blank(self) -> bool:
        """Whether the folder exists but holds no backend (no meta.json, no index.log)."""
        return os.path.isdir(self.path) and not os.path.exists(os.path.join(self.path, META))

    def _parse_tail(self) -> bool:
        """Apply complete, valid records after ``_pos``; False when invalid bytes follow."""
        pos = self._pos
        carry = b""
        while True:
            chunk = os.pread(self._ifd, _CHUNK, pos + len(carry))
            if not chunk:
                return not carry
            buf = carry + chunk if carry else chunk
            used, ok = apply_records(buf, self._apply)
            pos += used
            self._pos = pos
            if not ok:
                return False
            carry = buf[used:]

    def _apply(self, kind: int, key: bytes, seg: int, off: int, length: int, order: int) -> None:
        if kind == SET:
            try:
                old = self._index.store(key, seg, off, length, order)
            except ValueError as exc:
                raise errors.BackendError(self.name, f"{self._index_path}: {exc}") from None
            if seg > self._cur_seg:
                self._cur_seg = seg
            self._live += length
            if length:
                self._seg_live[seg] = self._seg_live.get(seg, 0) + length
            if old is not None:
                self._forget_value(old)
            if order >= self._next:
                self._next = order + 1
        else:
            old = self._index.remove(key)
            if old is not None:
                self._forget_value(old)

    def _forget_value(self, old: Entry) -> None:
        """A value was deleted or replaced; a sealed segment left with nothing live is no longer read here."""
        seg, _, length, _ = old
        self._live -= length
        if not length:
            return
        left = self._seg_live.get(seg, 0) - length
        if left > 0:
            self._seg_live[seg] = left
            return
        self._seg_live.pop(seg, None)
        if seg < self._cur_seg:
            self._segments.drop(seg)  # a compaction may remove it: hold no descriptor that keeps its space

    def _cut_tail(self, size: int) -> None:
        """Drop invalid bytes at the end of the index (a torn append); keep big tails aside."""
        cut = size - self._pos
        if cut > _KEEP_TORN_OVER:
            keep = f"{self._index_path}.torn-{self._generation}-{self._pos}"
            copy_out(self._ifd, self._pos, size, keep, _CHUNK)
            log.error("%s: %d invalid bytes in the index after offset %d, kept in %s", self.name, cut, self._pos, keep)
        else:
            log.warning("%s: cutting a torn index tail of %d bytes at offset %d", self.name, cut, self._pos)
        os.ftruncate(self._ifd, self._pos)
        if self._fsync == "always":
            os.fdatasync(self._ifd)
        else:
            self._dirty_index = True

    # -- segments -----------------------------------------------------------

    def _open_wseg(self, n: int) -> None:
        """Make segment ``n`` the write segment (writer critical section, ``_lock`` held)."""
        if self._segments.open_write(n):
            if self._fsync == "always":
                fsync_dir(self._segments.data_dir)
            else:
                self._dirty_dir = True

    def _reserve(self, length: int) -> tuple[int, int]:
        """Where the next value goes: (segment, offset)."""
        segments = self._segments
        if segments.wseg != self._cur_seg or segments.wfd < 0:
            self._open_wseg(self._cur_seg)
        size = os.fstat(segments.wfd).st_size
        if size > 0 and size + length > self._segment_size:
            self._cur_seg += 1
            self._open_wseg(self._cur_seg)
            size = os.fstat(segments.wfd).st_size
        return self._cur_seg, size

    # -- operations (worker threads) ----------------------------------------

    def _exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` holding the folder's flock (and this process's writer lock)."""
        with self._wlock:
            for _ in range(3):
                self._check_open("write")
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    if self._lock_is_current():
                        return fn()
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                self._relock()
            raise errors.BackendUnavailable(self.name, f"{self.path} keeps changing; try again")

    def _lock_is_current(self) -> bool:
        try:
            on_disk = os.stat(os.path.join(self.path, LOCK))
        except FileNotFoundError:
            return False
        held = os.fstat(self._lock_fd)
        return (on_disk.st_ino, on_disk.st_dev) == (held.st_ino, held.st_dev)

    def _relock(self) -> None:
        """The lock file was replaced with the folder: lock the new one (initialising an emptied folder)."""
        backend_id, lock_fd = prepare_folder(self.name, self.path, self.mode, create=False)
        with self._lock:
            os.close(self._lock_fd)
            self._lock_fd = lock_fd
            if backend_id != self._id:
                log.warning(
                    "%s: the folder was emptied or replaced; now using backend id %s", self.name, backend_id.hex()
                )
                self._id = backend_id
                self._ino = -1  # reload on the next look at the index

    def _write(self, kind: int, key: bytes | None, value: bytes | None) -> bytes:
        return self._exclusive(lambda: self._write_locked(kind, key, value))

    def _write_locked(self, kind: int, key: bytes | None, value: bytes | None) -> bytes:
        length = 0
        seg = off = order = 0
        with self._lock:
            self._refresh(writer=True)
            if self._readonly:
                raise errors.ReadOnly(self.name, f"{self._index_path} is not writable")
            if kind == DEL:
                assert key is not None
                if self._index.get(key) is None:
                    raise errors.KeyNotFound(self.name, f"cannot delete {describe_key(key)}: not stored")
            else:
                assert value is not None
                if key is None:
                    order = self._next
                    key = seq_key(order)
                elif self.mode is Mode.SEQ:
                    entry = self._index.get(key)
                    if entry is None:
                        raise errors.KeyNotFound(self.name, f"cannot update {describe_key(key)}: not stored")
                    order = entry[3]
                else:
                    order = self._next
                length = value.nbytes if isinstance(value, memoryview) else len(value)
                if length:
                    seg, off = self._reserve(length)
            rec_pos = self._pos
            wfd = self._segments.wfd
        if length:
            assert value is not None
            pwrite_all(wfd, value, off)
            if self._fsync == "always":
                os.fdatasync(wfd)
        record = pack_record(kind, key, seg, off, length, order)
        try:
            pwrite_all(self._ifd, record, rec_pos)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._ifd, rec_pos)
            raise
        if self._fsync == "always":
            os.fdatasync(self._ifd)
        with self._lock:
            if self._pos == rec_pos:  # else a reader of this process already parsed it
                self._apply(kind, key, seg, off, length, order)
                self._pos = rec_pos + len(record)
            if self._fsync != "always":
                self._dirty_index = True
                if length:
                    self._dirty_segs.add(seg)
        return key

    def _get(self, key: bytes) -> bytes | None:
        for attempt in range(3):
            with self._lock:
                self._refresh()
                entry = self._index.get(key)
                if entry is None:
                    return None
                n, off, length, _ = entry
                if length == 0:
                    return b""
                try:
                    seg = self._segments.acquire(n)
                except FileNotFoundError:
                    # A compaction in another process may have just swapped the
                    # index and removed this segment: look again.
                    if attempt < 2:
                        continue
                    if not os.path.isdir(self._segments.data_dir):
                        raise
                    raise errors.BackendError(
                        self.name, f"segment {seg_name(n)} holding {describe_key(key)} is missing"
                    ) from None
            try:
                data = os.pread(seg.fd, length, off)
            finally:
                with self._lock:
                    self._segments.release(seg)
            if len(data) != length:
                raise errors.BackendError(
                    self.name,
                    f"segment {seg_name(n)} is truncated: {describe_key(key)} wants {length} bytes "
                    f"at offset {off}, got {len(data)}",
                )
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def _exists(self, key: bytes) -> bool:
        with self._lock:
            self._refresh()
            return self._index.get(key) is not None

    def _length(self, key: bytes) -> int | None:
        with self._lock:
            self._refresh()
            entry = self._index.get(key)
            return None if entry is None else entry[2]

    def _high_water(self) -> int:
        with self._lock:
            self._refresh()
            return self._next

    def _scan_start(self, after: bytes | None) -> int:
        with self._lock:
            self._refresh()
            if after is None:
                return -1
            cursor = self._index.cursor(after)
            if cursor is None:
                raise errors.KeyNotFound(self.name, f"cannot resume a scan after {describe_key(after)}: not stored")
            return cursor

    def _scan_batch(self, cursor: int, batch: int) -> tuple[list[bytes], int | None]:
        with self._lock:
            self._refresh()
            return self._index.batch(cursor, batch)

    def _info(self) -> BackendInfo:
        with self._lock:
            self._refresh()
            entries, live = self._index.count, self._live
        return BackendInfo(entries=entries, used_bytes=live, free_bytes=free_bytes(self.path))

    def _usage(self) -> DirUsage:
        with self._lock:
            self._refresh()
            entries, live = self._index.count, self._live
            index_bytes = os.fstat(self._ifd).st_size if self._ifd >= 0 else 0
        sizes = self._segments.sizes()
        return DirUsage(
            entries=entries,
            live_bytes=live,
            segment_bytes=sum(sizes.values()),
            segments=len(sizes),
            index_bytes=index_bytes,
        )

    def _flush(self, force: bool) -> None:
        """fdatasync what this process wrote: data segments first, then the folder, then the index."""
        with self._lock:
            self._check_open("sync")
            segs, sync_dir, sync_index = self._take_dirty(force)
            index_fd = os.dup(self._ifd) if sync_index and self._ifd >= 0 else -1
        try:
            self._sync_written(segs, sync_dir, index_fd)
        finally:
            if index_fd >= 0:
                os.close(index_fd)

    def _take_dirty(self, force: bool) -> tuple[list[int], bool, bool]:
        segs = sorted(self._dirty_segs)
        wseg = self._segments.wseg
        if force and wseg >= 0 and wseg not in self._dirty_segs:
            segs.append(wseg)
        sync_dir, sync_index = force or self._dirty_dir, force or self._dirty_index
        self._dirty_segs = set()
        self._dirty_dir = self._dirty_index = False
        return segs, sync_dir, sync_index

    def _sync_written(self, segs: list[int], sync_dir: bool, index_fd: int) -> None:
        self._segments.sync(segs)
        if sync_dir:
            fsync_dir(self._segments.data_dir)
        if index_fd >= 0:
            os.fdatasync(index_fd)

    # -- compaction (see compact.py) ------------------------------------------------

    def _compact(self, min_dead: float) -> CompactResult:
        result = CompactResult()
        plan = self._exclusive(lambda: self._compact_plan(min_dead))
        for n, keys in plan:
            try:
                self._exclusive(lambda n=n, keys=keys: self._compact_segment(n, keys, result))  # type: ignore[misc]
            except OSError as exc:
                if not is_full(exc):
                    raise
                result.skipped += 1  # the disk filled up meanwhile: what was copied is dead space, nothing lost
                log.warning("%s: compaction stopped, the disk is full: %s", self.name, exc.strerror)
                break
        self._exclusive(lambda: self._compact_index(result))
        if result.segments or result.index_bytes or result.skipped:
            log.info(
                "%s: compacted %d segments, %d bytes freed (%d moved), %d skipped for lack of space",
                self.name,
                result.segments,
                result.freed,
                result.moved_bytes,
                result.skipped,
            )
        return result

    def _compact_plan(self, min_dead: float) -> list[tuple[int, list[bytes]]]:
        """The segments worth compacting, cheapest (fewest live bytes) first, with their live keys then."""
        with self._lock:
            self._refresh(writer=True)
            if self._readonly:
                raise errors.ReadOnly(self.name, f"{self._index_path} is not writable")
            remove_temp_files(self.path)
            cur = self._cur_seg
            picked: list[tuple[int, int]] = []
            for n, size in self._segments.sizes().items():
                live = self._seg_live.get(n, 0)
                if n > cur or size <= live or (size - live) < min_dead * size:
                    continue
                picked.append((live, n))
            picked.sort()
            sealed = {n for _, n in picked if n < cur}
            keys = self._index.in_segments(sealed) if sealed else {}
        # The write segment's keys are listed again under the lock of its own step: writers add to it.
        return [(n, keys.get(n, [])) for _, n in picked]

    def _compact_segment(self, n: int, keys: list[bytes], result: CompactResult) -> None:
        """Move segment ``n``'s live values to the write segment, then remove ``n`` (flock held)."""
        path = self._segments.path(n)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        with self._lock:
            self._refresh(writer=True)
            if n > self._cur_seg:
                return
            if n == self._cur_seg:
                keys = self._index.in_segments({n})[n]
            entries = [(key, e) for key in keys if (e := self._index.get(key)) is not None and e[0] == n and e[2]]
            if n == self._cur_seg:
                if not entries:
                    return  # nothing to move the writers on with: the index rewrite does (_compact_index)
                self._cur_seg = n + 1  # the values (and with their records, every writer) go to a new segment
        need = sum(e[2] for _, e in entries)
        if need and not fits(self.path, need):
            result.skipped += 1
            return
        if entries:
            self._relocate(n, entries)
        with self._lock:
            if self._seg_live.get(n, 0):
                log.error("%s: segment %s still holds live values after compaction; kept", self.name, seg_name(n))
                return
            self._segments.drop(n)
        os.unlink(path)
        fsync_dir(self._segments.data_dir)
        result.segments += 1
        result.removed_bytes += size
        result.moved_bytes += need

    def _relocate(self, n: int, entries: list[tuple[bytes, Entry]]) -> None:
        """Copy the values to the write segment, then append their relocation records (all synced)."""
        src = os.open(self._segments.path(n), os.O_RDONLY | os.O_CLOEXEC)
        records: list[bytes] = []
        touched: set[int] = set()
        try:
            for key, (_, off, length, order) in entries:
                with self._lock:
                    seg, dst_off = self._reserve(length)
                    wfd = self._segments.wfd
                copy_value(self.name, src, off, wfd, dst_off, length, key)
                records.append(pack_record(SET, key, seg, dst_off, length, order))
                touched.add(seg)
        finally:
            os.close(src)
        self._segments.sync(sorted(touched))
        fsync_dir(self._segments.data_dir)  # a new segment's name, before records point into it
        with self._lock:
            pos = self._pos
            data = b"".join(records)
            try:
                pwrite_all(self._ifd, data, pos)
                os.fdatasync(self._ifd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._ifd, pos)
                raise
            self._parse_tail()

    def _compact_index(self, result: CompactResult) -> None:
        """Rewrite index.log when it is mostly stale records, or to move writers off an empty write segment."""
        with self._lock:
            self._refresh(writer=True)
            cur = self._cur_seg
            cur_bytes = 0  # bytes of the write segment when no live value is in it (then writers move on)
            if not self._seg_live.get(cur, 0):
                with contextlib.suppress(FileNotFoundError):
                    cur_bytes = os.stat(self._segments.path(cur)).st_size
            size = os.fstat(self._ifd).st_size
            if not cur_bytes and size <= _INDEX_SLACK:
                return  # the whole index is built below only when a rewrite may be due
            live = self._index.live()
            needed = HEADER.size + sum(REC.size + len(key) for key, _ in live)
            if not cur_bytes and size <= 2 * needed:
                return
            if not fits(self.path, needed):
                result.skipped += 1
                return
            base = cur + 1 if cur_bytes else cur
            body = b"".join(pack_record(SET, key, seg, off, length, order) for key, (seg, off, length, order) in live)
            tmp = f"{self._index_path}{TMP_MARK}{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                pwrite_all(fd, pack_header(self._id, self._generation + 1, base, self._next) + body, 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.close(fd)
            os.rename(tmp, self._index_path)
            fsync_dir(self.path)
            self._reload()
            result.index_bytes += max(0, size - os.fstat(self._ifd).st_size)
        if base > cur:  # the empty write segment is sealed now: nobody appends to it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._segments.path(cur))
                fsync_dir(self._segments.data_dir)
                result.segments += 1
                result.removed_bytes += cur_bytes

    def _close(self) -> None:
        with self._wlock, self._lock:
            if self._closed:
                return
            try:
                if self._fsync != "never":
                    segs, sync_dir, sync_index = self._take_dirty(False)
                    with contextlib.suppress(OSError):
                        self._sync_written(segs, sync_dir, self._ifd if sync_index and self._ifd >= 0 else -1)
            finally:
                self._closed = True
                self._close_fds()

    def _close_fds(self) -> None:
        self._segments.forget()
        for fd in (self._ifd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._ifd = self._lock_fd = -1
