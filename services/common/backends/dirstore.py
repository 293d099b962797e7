"""The embedded ``dir://`` backend: a folder that behaves like one 0-db namespace.

Values live in append-only segment files with an append-only index beside
them, like 0-db's own data and index files; creating one file per value costs
more than writing the value on ext4.

Layout::

    <folder>/meta.json          {"format": 1, "mode": "seq"|"user", "id": ...}, written once, atomically
    <folder>/lock               writers hold flock(LOCK_EX) on it for the short append
    <folder>/index.log          48-byte header, then one record per set / delete
    <folder>/data/NNNNNNNN.seg  raw values, appended; a new segment past ``segment_size``

An index record is ``crc32 u32 | kind u8 | key length u8 | segment u32 |
offset u64 | length u32 | order u64 | key``, little-endian; the CRC covers
everything after itself. ``order`` is the seq id in seq mode and a counter
taken at each write in user mode, so ``scan`` walks keys in write order (seq:
ascending id; user: order of each key's last write). The header holds a magic,
the backend's random id (also in meta.json), a generation bumped by
``compact``, the first segment number writers may use and the next free id.

Several processes may open the same folder. A writer takes the flock, reads
the index records others appended since it last looked, allocates the next id
(ids start at 0 and only grow; deleted ids are never reused, updates and
deletes consume none; only a record lost to a crash can see its id again),
appends the value to the current segment, appends the index record and
releases the lock. Readers never lock: every get / exists /
scan first reads the index tail (one ``stat`` when nothing changed), so a
read sees every write that returned before it began, in any process. A record
cut short or failing its CRC at the tail (a crash mid-append) is ignored by
readers and cut off by the next writer; value bytes without their record are
dead space, never visible. ``compact`` rewrites the live values into new
segments and swaps in a new index with one ``rename``; other processes notice
the new index file (a new inode) and reload it.

A folder that disappears while open (removed, moved away, an unmounted disk)
gives ``BackendUnavailable`` and is never recreated; ``open`` creates a missing
folder only when its parent exists (``create=False``: never). A folder that
comes back empty (a replaced disk) reads as an empty backend, and the next
write sets a new backend up in it, as ``open`` would; a folder that now holds
another backend is used if it has the same mode (``ModeMismatch`` otherwise).

``fsync`` (a constructor option) decides what is on stable storage when a
write returns. Every mode survives a crash of the process (the data is in the
OS page cache, visible to every process); they differ on power loss / kernel
crash:

* ``"always"``: the value is fdatasync'ed, then its index record is appended and
  fdatasync'ed (and the folder, when a segment was created), all before
  ``put`` / ``set`` / ``delete`` return: an acknowledged write survives power
  loss. Costs two fsyncs per write (about 1 ms here).
* ``"batch"`` (default): writes are not synced inline; a background flush
  fdatasyncs the written segments, then the index, at most ``fsync_interval``
  seconds (1 s) after a write, and ``sync()`` / ``close()`` flush at once.
  Power loss can drop writes of the last interval; a record whose value did
  not reach the disk can then return stale bytes, which shard checksums catch.
* ``"never"``: no fsync except on ``sync()``; the kernel writes back when it likes
  (about 30 s). For tests, benchmarks and scratch data.

Why ``"batch"`` is the default: it is what 0-db itself does (it syncs each write
only with ``--sync``), and each shard is one of k+m on separate disks with a
checksum in its record, so maint repairs what a power cut drops, while
``"always"`` would double the cost of every shard write. Call ``sync()`` on
the backends a file went to before acknowledging it if a hard guarantee is needed.

Blocking IO runs in worker threads (``asyncio.to_thread``, one hop per call;
``put_blocking`` for callers already on a worker thread); values are read with
``os.pread`` from cached read-only descriptors. Each process keeps the whole
index in memory, like 0-db: 16 bytes per id ever issued in seq mode (arrays),
a dict entry per key in user mode; opening parses about a million records per
2 s on this machine.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import struct
import threading
import time
import uuid
import zlib
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from services.common import errors
from services.common.backends.base import (
    MAX_VALUE_SIZE,
    SEQ_KEY_SIZE,
    Backend,
    BackendInfo,
    Mode,
    seq_id,
    seq_key,
)
from services.common.backends.uri import DirURI

__all__ = ["DEFAULT_SEGMENT_SIZE", "FSYNC_POLICIES", "DirBackend", "DirUsage", "ModeMismatch"]

log = logging.getLogger(__name__)

T = TypeVar("T")

FORMAT_VERSION: Final = 1
DEFAULT_SEGMENT_SIZE: Final = 256 * 1024 * 1024
FSYNC_POLICIES: Final = ("batch", "always", "never")

_META: Final = "meta.json"
_INDEX: Final = "index.log"
_LOCK: Final = "lock"
_DATA: Final = "data"
_SEG_SUFFIX: Final = ".seg"
_TMP_MARK: Final = ".tmp-"
_OWN_NAMES: Final = frozenset({_META, _INDEX, _LOCK, _DATA, "lost+found"})  # a fresh ext4 disk has lost+found

_MAGIC: Final = b"GSDIRIX1"
# magic, backend id, generation, first usable segment, next free id, crc32
_HEADER: Final = struct.Struct("<8s16sQIQI")
# crc32, kind, key length, segment, offset, length, order
_REC: Final = struct.Struct("<IBBIQIQ")
_SET: Final = 1
_DEL: Final = 2
_CHUNK: Final = 1 << 20
_MAX_CACHED_FDS: Final = 64
_KEEP_TORN_OVER: Final = 64 * 1024
_ABSENT: Final = 0xFFFFFFFF
_MAX_ID_GAP: Final = 1 << 32


class ModeMismatch(errors.BackendUnavailable):
    """The folder holds a backend of the other mode (seq vs user) than the one asked for."""


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


class _Seg:
    """A cached read-only segment descriptor; closed once retired and unused."""

    __slots__ = ("fd", "refs", "retired")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.retired = False


# (segment, offset, length, order)
_Entry = tuple[int, int, int, int]


def _seg_name(n: int) -> str:
    return f"{n:08d}{_SEG_SUFFIX}"


def _pack_header(backend_id: bytes, generation: int, base_seg: int, next_id: int) -> bytes:
    body = _HEADER.pack(_MAGIC, backend_id, generation, base_seg, next_id, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _pack_record(kind: int, key: bytes, seg: int, off: int, length: int, order: int) -> bytes:
    body = _REC.pack(0, kind, len(key), seg, off, length, order)[4:] + key
    return struct.pack("<I", zlib.crc32(body)) + body


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - a regular file never does this
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(folder: str, name: str, data: bytes) -> None:
    """Write ``folder/name`` as temp file + fsync + rename + fsync(folder)."""
    tmp = os.path.join(folder, f"{name}{_TMP_MARK}{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(folder, name))
    _fsync_dir(folder)


def _describe_key(key: bytes) -> str:
    if len(key) == SEQ_KEY_SIZE:
        return f"key {key.hex()} (id {seq_id(key)})"
    return f"key {key[:32]!r}{'...' if len(key) > 32 else ''}"


class _SeqIndex:
    """Seq mode: arrays indexed by id, 16 bytes per id ever issued (a dict would take ~10x that)."""

    __slots__ = ("count", "offs", "segs", "sizes")

    def __init__(self) -> None:
        self.segs = array("I")
        self.offs = array("Q")
        self.sizes = array("I")  # _ABSENT: never stored, or deleted
        self.count = 0

    def get(self, key: bytes) -> _Entry | None:
        if len(key) != SEQ_KEY_SIZE:
            return None
        i = int.from_bytes(key, "little")
        if i >= len(self.sizes) or (size := self.sizes[i]) == _ABSENT:
            return None
        return self.segs[i], self.offs[i], size, i

    def store(self, key: bytes, seg: int, off: int, length: int, order: int) -> int | None:
        """Record key -> (seg, off, length); return the replaced value's length."""
        if len(key) != SEQ_KEY_SIZE:
            return None  # cannot happen through this module; ignored rather than trusted
        i = int.from_bytes(key, "little")
        have = len(self.sizes)
        if i == have:  # the common case: the next id
            self.segs.append(seg)
            self.offs.append(off)
            self.sizes.append(length)
            self.count += 1
            return None
        if i > have:
            if i - have > _MAX_ID_GAP:
                raise ValueError(f"index record for id {i} is far beyond the last id {have - 1}")
            grow = i + 1 - have
            self.segs.extend(array("I", [0]) * grow)
            self.offs.extend(array("Q", [0]) * grow)
            self.sizes.extend(array("I", [_ABSENT]) * grow)
        old = self.sizes[i]
        self.segs[i], self.offs[i], self.sizes[i] = seg, off, length
        if old == _ABSENT:
            self.count += 1
            return None
        return old

    def remove(self, key: bytes) -> int | None:
        entry = self.get(key)
        if entry is None:
            return None
        self.sizes[entry[3]] = _ABSENT
        self.count -= 1
        return entry[2]

    def cursor(self, after: bytes) -> int | None:
        return int.from_bytes(after, "little") if len(after) == SEQ_KEY_SIZE else None

    def batch(self, cursor: int, n: int) -> tuple[list[bytes], int | None]:
        keys: list[bytes] = []
        sizes = self.sizes
        end = len(sizes)
        i = max(cursor + 1, 0)
        while i < end and len(keys) < n:
            if sizes[i] != _ABSENT:
                keys.append(seq_key(i))
            i += 1
        return keys, (i - 1 if i < end else None)

    def live(self) -> list[tuple[bytes, _Entry]]:
        return [
            (seq_key(i), (self.segs[i], self.offs[i], size, i)) for i, size in enumerate(self.sizes) if size != _ABSENT
        ]


class _UserIndex:
    """User mode: a dict, plus the write order (with stale items, pruned now and then) for scan."""

    __slots__ = ("entries", "keys", "orders", "stale")

    def __init__(self) -> None:
        self.entries: dict[bytes, _Entry] = {}
        self.orders: list[int] = []  # ascending
        self.keys: list[bytes] = []
        self.stale = 0

    @property
    def count(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> _Entry | None:
        return self.entries.get(key)

    def store(self, key: bytes, seg: int, off: int, length: int, order: int) -> int | None:
        old = self.entries.get(key)
        self.entries[key] = (seg, off, length, order)
        if old is None or old[3] != order:
            if old is not None:
                self._stale()
            if self.orders and order < self.orders[-1]:
                i = bisect.bisect_right(self.orders, order)
                self.orders.insert(i, order)
                self.keys.insert(i, key)
            else:
                self.orders.append(order)
                self.keys.append(key)
        return None if old is None else old[2]

    def remove(self, key: bytes) -> int | None:
        old = self.entries.pop(key, None)
        if old is None:
            return None
        self._stale()
        return old[2]

    def _stale(self) -> None:
        self.stale += 1
        if self.stale > 4096 and self.stale > len(self.entries):
            pairs = [
                (o, k)
                for o, k in zip(self.orders, self.keys, strict=True)
                if (e := self.entries.get(k)) is not None and e[3] == o
            ]
            self.orders = [o for o, _ in pairs]
            self.keys = [k for _, k in pairs]
            self.stale = 0

    def cursor(self, after: bytes) -> int | None:
        entry = self.entries.get(after)
        return None if entry is None else entry[3]

    def batch(self, cursor: int, n: int) -> tuple[list[bytes], int | None]:
        keys: list[bytes] = []
        i = bisect.bisect_right(self.orders, cursor)
        end = len(self.orders)
        while i < end and len(keys) < n:
            order, key = self.orders[i], self.keys[i]
            entry = self.entries.get(key)
            if entry is not None and entry[3] == order:
                keys.append(key)
            cursor = order
            i += 1
        return keys, (cursor if i < end else None)

    def live(self) -> list[tuple[bytes, _Entry]]:
        return sorted(self.entries.items(), key=lambda item: item[1][3])


class DirBackend(Backend):
    """One folder used as a 0-db-like namespace; see the module docstring."""

    local = True  # put_blocking works: the engine may write several backends from one thread

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
        self._data_dir = os.path.join(folder, _DATA)
        self._index_path = os.path.join(folder, _INDEX)
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
        self._index: _SeqIndex | _UserIndex = self._new_index()
        self._next = 0
        self._cur_seg = 0
        self._live = 0

        self._segs: OrderedDict[int, _Seg] = OrderedDict()
        self._wseg = -1
        self._wfd = -1
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
            backend_id, lock_fd = _prepare_folder(name, folder, mode, create)
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

        return await asyncio.to_thread(_backend_call, name, folder, "open", prepare)

    # -- Backend ------------------------------------------------------------

    async def put(self, value: bytes) -> bytes:
        if self.mode is not Mode.SEQ:
            raise errors.InvalidInput(f"{self.name}: put() allocates keys and needs a seq backend; use set(key, value)")
        self._check_value(value)
        key = await self._thread("put", self._write, _SET, None, value)
        self._after_write()
        return key

    def put_blocking(self, value: bytes) -> bytes:
        if self.mode is not Mode.SEQ:
            raise errors.InvalidInput(f"{self.name}: put() allocates keys and needs a seq backend; use set(key, value)")
        self._check_value(value)
        self._check_open("put")
        return _backend_call(self.name, self.path, "put", self._write, _SET, None, value)

    def after_blocking_put(self) -> None:
        self._after_write()

    async def set(self, key: bytes, value: bytes) -> None:
        self._check_value(value)
        if not self._is_possible_key(key):
            raise errors.KeyNotFound(
                self.name, f"cannot update {_describe_key(key)}: a sequential key has {SEQ_KEY_SIZE} bytes"
            )
        await self._thread("set", self._write, _SET, bytes(key), value)
        self._after_write()

    async def get(self, key: bytes) -> bytes | None:
        if not self._is_possible_key(key):
            return None
        return await self._thread("get", self._get, bytes(key))

    async def exists(self, key: bytes) -> bool:
        if not self._is_possible_key(key):
            return False
        return await self._thread("exists", self._exists, bytes(key))

    async def delete(self, key: bytes) -> None:
        if not self._is_possible_key(key):
            raise errors.KeyNotFound(self.name, f"cannot delete {_describe_key(key)}: not stored")
        await self._thread("delete", self._write, _DEL, bytes(key), None)
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

    async def compact(self) -> int:
        """Rewrite the live values into new segments, drop the old ones; return the bytes freed.

        Writers (in every process) wait while it runs; readers do not. Other
        processes pick the new index up on their next call; a process that
        stays idle keeps the old segments' space allocated until then.
        """
        return await self._thread("compact", self._compact)

    # -- plumbing -----------------------------------------------------------

    async def _thread(self, op: str, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise errors.BackendUnavailable(self.name, f"{op}: the backend is closed")
        return await asyncio.to_thread(_backend_call, self.name, self.path, op, fn, *args)

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
            _check_blank(self.name, self.path)
            self._id = bytes.fromhex(str(_initialise(self.path, self.mode)["id"]))
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
            raw = os.pread(fd, _HEADER.size, 0)
            if len(raw) != _HEADER.size:
                raise errors.BackendError(self.name, f"{self._index_path} is shorter than its header")
            magic, backend_id, generation, base_seg, next_id, crc = _HEADER.unpack(raw)
            if magic != _MAGIC or crc != zlib.crc32(raw[:-4]):
                raise errors.BackendError(self.name, f"{self._index_path} has a damaged header")
            if backend_id != self._id:
                self._adopt(backend_id)
            ino = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            raise
        self._reset(fd, ino, readonly, generation, base_seg, next_id)
        self._parse_tail()

    def _reset(self, fd: int, ino: int, readonly: bool, generation: int, base_seg: int, next_id: int) -> None:
        """Start over from an empty in-memory index on index descriptor ``fd`` (-1: no index file)."""
        if self._ifd >= 0:
            os.close(self._ifd)
        self._ifd, self._ino, self._readonly = fd, ino, readonly
        self._pos = _HEADER.size
        self._generation = generation
        self._index = self._new_index()
        self._next, self._cur_seg, self._live = next_id, base_seg, 0
        for seg in self._segs.values():
            self._retire(seg)
        self._segs.clear()
        if self._wfd >= 0:
            os.close(self._wfd)
        self._wfd, self._wseg = -1, -1

    def _adopt(self, backend_id: bytes) -> None:
        """The folder now holds another backend (a replaced disk): use it if it has our mode."""
        meta_path = os.path.join(self.path, _META)
        meta = _read_meta(self.name, meta_path)
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
        return os.path.isdir(self.path) and not os.path.exists(os.path.join(self.path, _META))

    def _parse_tail(self) -> bool:
        """Apply complete, valid records after ``_pos``; False when invalid bytes follow."""
        pos = self._pos
        carry = b""
        while True:
            chunk = os.pread(self._ifd, _CHUNK, pos + len(carry))
            if not chunk:
                return not carry
            buf = carry + chunk if carry else chunk
            used, ok = self._apply_records(buf, pos)
            pos += used
            self._pos = pos
            if not ok:
                return False
            carry = buf[used:]

    def _apply_records(self, buf: bytes, base: int) -> tuple[int, bool]:
        """Apply the records in ``buf``; return (bytes used, False if an invalid record stopped it)."""
        view = memoryview(buf)
        size = len(buf)
        p = 0
        head = _REC.size
        unpack, crc32, apply = _REC.unpack_from, zlib.crc32, self._apply
        while size - p >= head:
            crc, kind, klen, seg, off, length, order = unpack(buf, p)
            if kind not in (_SET, _DEL) or klen == 0 or length > MAX_VALUE_SIZE:
                return p, False
            end = p + head + klen
            if end > size:
                break
            if crc32(view[p + 4 : end]) != crc:
                return p, False
            apply(kind, buf[p + head : end], seg, off, length, order)
            p = end
        return p, True

    def _apply(self, kind: int, key: bytes, seg: int, off: int, length: int, order: int) -> None:
        if kind == _SET:
            try:
                old = self._index.store(key, seg, off, length, order)
            except ValueError as exc:
                raise errors.BackendError(self.name, f"{self._index_path}: {exc}") from None
            self._live += length - (old or 0)
            if order >= self._next:
                self._next = order + 1
            if seg > self._cur_seg:
                self._cur_seg = seg
        else:
            self._live -= self._index.remove(key) or 0

    def _new_index(self) -> _SeqIndex | _UserIndex:
        return _SeqIndex() if self.mode is Mode.SEQ else _UserIndex()

    def _cut_tail(self, size: int) -> None:
        """Drop invalid bytes at the end of the index (a torn append); keep big tails aside."""
        cut = size - self._pos
        if cut > _KEEP_TORN_OVER:
            keep = f"{self._index_path}.torn-{self._generation}-{self._pos}"
            fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                offset = self._pos
                while offset < size:
                    chunk = os.pread(self._ifd, min(_CHUNK, size - offset), offset)
                    if not chunk:
                        break
                    _pwrite_all(fd, chunk, offset - self._pos)
                    offset += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            log.error("%s: %d invalid bytes in the index after offset %d, kept in %s", self.name, cut, self._pos, keep)
        else:
            log.warning("%s: cutting a torn index tail of %d bytes at offset %d", self.name, cut, self._pos)
        os.ftruncate(self._ifd, self._pos)
        if self._fsync == "always":
            os.fdatasync(self._ifd)
        else:
            self._dirty_index = True

    # -- segments -----------------------------------------------------------

    def _seg_path(self, n: int) -> str:
        return os.path.join(self._data_dir, _seg_name(n))

    def _acquire(self, n: int) -> _Seg:
        """A read descriptor for segment ``n`` (``_lock`` held); release it with ``_release``."""
        seg = self._segs.get(n)
        if seg is None:
            seg = _Seg(os.open(self._seg_path(n), os.O_RDONLY | os.O_CLOEXEC))
            self._segs[n] = seg
            if len(self._segs) > _MAX_CACHED_FDS:
                for old_n, old in list(self._segs.items())[: len(self._segs) - _MAX_CACHED_FDS]:
                    del self._segs[old_n]
                    self._retire(old)
        else:
            self._segs.move_to_end(n)
        seg.refs += 1
        return seg

    def _release(self, seg: _Seg) -> None:
        seg.refs -= 1
        if seg.retired and seg.refs == 0:
            os.close(seg.fd)

    @staticmethod
    def _retire(seg: _Seg) -> None:
        seg.retired = True
        if seg.refs == 0:
            os.close(seg.fd)

    def _open_wseg(self, n: int) -> None:
        """Make segment ``n`` the write segment (writer critical section, ``_lock`` held)."""
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd, self._wseg = -1, -1
        path = self._seg_path(n)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        else:
            if self._fsync == "always":
                _fsync_dir(self._data_dir)
            else:
                self._dirty_dir = True
        self._wfd, self._wseg = fd, n

    def _reserve(self, length: int) -> tuple[int, int]:
        """Where the next value goes: (segment, offset)."""
        if self._wseg != self._cur_seg or self._wfd < 0:
            self._open_wseg(self._cur_seg)
        size = os.fstat(self._wfd).st_size
        if size > 0 and size + length > self._segment_size:
            self._cur_seg += 1
            self._open_wseg(self._cur_seg)
            size = os.fstat(self._wfd).st_size
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
            on_disk = os.stat(os.path.join(self.path, _LOCK))
        except FileNotFoundError:
            return False
        held = os.fstat(self._lock_fd)
        return (on_disk.st_ino, on_disk.st_dev) == (held.st_ino, held.st_dev)

    def _relock(self) -> None:
        """The lock file was replaced with the folder: lock the new one (initialising an emptied folder)."""
        backend_id, lock_fd = _prepare_folder(self.name, self.path, self.mode, create=False)
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
            if kind == _DEL:
                assert key is not None
                if self._index.get(key) is None:
                    raise errors.KeyNotFound(self.name, f"cannot delete {_describe_key(key)}: not stored")
            else:
                assert value is not None
                if key is None:
                    order = self._next
                    key = seq_key(order)
                elif self.mode is Mode.SEQ:
                    entry = self._index.get(key)
                    if entry is None:
                        raise errors.KeyNotFound(self.name, f"cannot update {_describe_key(key)}: not stored")
                    order = entry[3]
                else:
                    order = self._next
                length = value.nbytes if isinstance(value, memoryview) else len(value)
                if length:
                    seg, off = self._reserve(length)
            rec_pos = self._pos
            wfd = self._wfd
        if length:
            assert value is not None
            _pwrite_all(wfd, value, off)
            if self._fsync == "always":
                os.fdatasync(wfd)
        record = _pack_record(kind, key, seg, off, length, order)
        try:
            _pwrite_all(self._ifd, record, rec_pos)
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
                    seg = self._acquire(n)
                except FileNotFoundError:
                    # A compaction in another process may have just swapped the
                    # index and removed this segment: look again.
                    if attempt < 2:
                        continue
                    if not os.path.isdir(self._data_dir):
                        raise
                    raise errors.BackendError(
                        self.name, f"segment {_seg_name(n)} holding {_describe_key(key)} is missing"
                    ) from None
            try:
                data = os.pread(seg.fd, length, off)
            finally:
                with self._lock:
                    self._release(seg)
            if len(data) != length:
                raise errors.BackendError(
                    self.name,
                    f"segment {_seg_name(n)} is truncated: {_describe_key(key)} wants {length} bytes "
                    f"at offset {off}, got {len(data)}",
                )
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def _exists(self, key: bytes) -> bool:
        with self._lock:
            self._refresh()
            return self._index.get(key) is not None

    def _scan_start(self, after: bytes | None) -> int:
        with self._lock:
            self._refresh()
            if after is None:
                return -1
            cursor = self._index.cursor(after)
            if cursor is None:
                raise errors.KeyNotFound(self.name, f"cannot resume a scan after {_describe_key(after)}: not stored")
            return cursor

    def _scan_batch(self, cursor: int, batch: int) -> tuple[list[bytes], int | None]:
        with self._lock:
            self._refresh()
            return self._index.batch(cursor, batch)

    def _info(self) -> BackendInfo:
        with self._lock:
            self._refresh()
            entries, live = self._index.count, self._live
        st = os.statvfs(self.path)
        return BackendInfo(entries=entries, used_bytes=live, free_bytes=st.f_bavail * st.f_frsize)

    def _usage(self) -> DirUsage:
        with self._lock:
            self._refresh()
            entries, live = self._index.count, self._live
            index_bytes = os.fstat(self._ifd).st_size if self._ifd >= 0 else 0
        sizes = self._segment_sizes()
        return DirUsage(
            entries=entries,
            live_bytes=live,
            segment_bytes=sum(sizes.values()),
            segments=len(sizes),
            index_bytes=index_bytes,
        )

    def _segment_sizes(self) -> dict[int, int]:
        sizes: dict[int, int] = {}
        if not os.path.isdir(self._data_dir) and os.path.isdir(self.path):
            return sizes
        with os.scandir(self._data_dir) as it:
            for item in it:
                stem, dot, ext = item.name.partition(".")
                if dot and "." + ext == _SEG_SUFFIX and stem.isdigit():
                    with contextlib.suppress(FileNotFoundError):
                        sizes[int(stem)] = item.stat(follow_symlinks=False).st_size
        return sizes

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
        if force and self._wseg >= 0 and self._wseg not in self._dirty_segs:
            segs.append(self._wseg)
        sync_dir, sync_index = force or self._dirty_dir, force or self._dirty_index
        self._dirty_segs = set()
        self._dirty_dir = self._dirty_index = False
        return segs, sync_dir, sync_index

    def _sync_written(self, segs: list[int], sync_dir: bool, index_fd: int) -> None:
        for n in segs:
            try:
                fd = os.open(self._seg_path(n), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # compacted away; its live values were synced in their new segment
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        if sync_dir:
            _fsync_dir(self._data_dir)
        if index_fd >= 0:
            os.fdatasync(index_fd)

    def _compact(self) -> int:
        return self._exclusive(self._compact_locked)

    def _compact_locked(self) -> int:
        with self._lock:
            self._refresh(writer=True)
            if self._readonly:
                raise errors.ReadOnly(self.name, f"{self._index_path} is not writable")
            live = self._index.live()
            generation, next_id, cur_seg = self._generation, self._next, self._cur_seg
        for name in os.listdir(self.path):
            if _TMP_MARK in name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
        old = self._segment_sizes()
        first = max([cur_seg, *old]) + 1
        out_seg, out_fd, out_size = first - 1, -1, 0
        created: list[int] = []
        records: list[bytes] = []
        sources: dict[int, int] = {}
        tmp_index = os.path.join(self.path, f"{_INDEX}{_TMP_MARK}{os.getpid()}")
        try:
            for key, (n, off, length, order) in live:
                if length == 0:
                    records.append(_pack_record(_SET, key, 0, 0, 0, order))
                    continue
                if out_fd < 0 or (out_size > 0 and out_size + length > self._segment_size):
                    if out_fd >= 0:
                        os.fdatasync(out_fd)
                        os.close(out_fd)
                        out_fd = -1
                    out_seg += 1
                    out_fd = os.open(
                        self._seg_path(out_seg), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                    )
                    created.append(out_seg)
                    out_size = 0
                src = sources.get(n)
                if src is None:
                    src = sources[n] = os.open(self._seg_path(n), os.O_RDONLY | os.O_CLOEXEC)
                self._copy(src, off, out_fd, out_size, length, key)
                records.append(_pack_record(_SET, key, out_seg, out_size, length, order))
                out_size += length
            if out_fd >= 0:
                os.fdatasync(out_fd)
                os.close(out_fd)
                out_fd = -1
            base = out_seg if created else first
            fd = os.open(tmp_index, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                _pwrite_all(fd, _pack_header(self._id, generation + 1, base, next_id) + b"".join(records), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self._data_dir)
            os.rename(tmp_index, self._index_path)
        except BaseException:
            if out_fd >= 0:
                os.close(out_fd)
            for n in created:
                with contextlib.suppress(OSError):
                    os.unlink(self._seg_path(n))
            with contextlib.suppress(OSError):
                os.unlink(tmp_index)
            raise
        finally:
            for src in sources.values():
                os.close(src)
        _fsync_dir(self.path)
        with self._lock:
            self._reload()
        for n in old:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._seg_path(n))
        _fsync_dir(self._data_dir)
        new_total = sum(self._segment_sizes().values())
        freed = sum(old.values()) - new_total
        log.info("%s: compacted %d segments into %d, %d bytes freed", self.name, len(old), len(created), freed)
        return freed

    def _copy(self, src: int, src_off: int, dst: int, dst_off: int, length: int, key: bytes) -> None:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, length - done, src_off + done)
            _pwrite_all(dst, data, dst_off + done)
            done += len(data)
        if done != length:
            raise errors.BackendError(self.name, f"compact: the value of {_describe_key(key)} is truncated on disk")

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
        for seg in self._segs.values():
            self._retire(seg)
        self._segs.clear()
        for fd in (self._wfd, self._ifd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wfd = self._ifd = self._lock_fd = -1
        self._wseg = -1


def _backend_call(name: str, folder: str, op: str, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)``, turning OS errors into the ``BackendError`` family."""
    try:
        return fn(*args)
    except OSError as exc:
        raise _os_error(name, folder, op, exc) from exc


def _os_error(name: str, folder: str, op: str, exc: OSError) -> errors.BackendError:
    code = exc.errno
    detail = exc.strerror or str(exc)
    if code in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        if not os.path.isdir(folder):
            return errors.BackendUnavailable(name, f"{op}: the folder {folder} is gone")
        where = f" ({exc.filename})" if exc.filename else ""
        return errors.BackendUnavailable(name, f"{op}: part of the backend is missing{where}: {detail}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return errors.NamespaceFull(name, f"{op}: no space left on {folder}: {detail}")
    if code == errno.EROFS:
        return errors.ReadOnly(name, f"{op}: {folder} is on a read-only file system")
    if code in (errno.EACCES, errno.EPERM):
        return errors.AccessDenied(name, f"{op}: permission denied on {exc.filename or folder}")
    return errors.BackendUnavailable(name, f"{op}: {detail}")


def _prepare_folder(name: str, folder: str, mode: Mode, create: bool) -> tuple[bytes, int]:
    """Check or initialise ``folder``; return (backend id, open lock descriptor)."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        if not create:
            raise errors.BackendUnavailable(name, f"the folder {folder} does not exist") from None
        parent = os.path.dirname(folder)
        if not os.path.isdir(parent):
            raise errors.BackendUnavailable(
                name, f"the parent folder {parent} does not exist (a lost disk?); not creating {folder}"
            ) from None
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o755)
        st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise errors.BackendError(name, f"{folder} is not a folder")
    meta_path = os.path.join(folder, _META)
    if not os.path.exists(meta_path):
        _check_blank(name, folder)
    try:
        lock_fd = os.open(os.path.join(folder, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
        lock_fd = os.open(os.path.join(folder, _LOCK), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            meta = _read_meta(name, meta_path)
            if meta is None:
                meta = _initialise(folder, mode)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
        if meta.get("format") != FORMAT_VERSION:
            raise errors.BackendError(
                name, f"{meta_path}: format {meta.get('format')!r} is not supported (this code reads {FORMAT_VERSION})"
            )
        stored = meta.get("mode")
        if stored != mode.value:
            raise ModeMismatch(name, f"{folder} holds a {stored!r}-mode backend, but {mode.value!r} mode was asked for")
        try:
            backend_id = bytes.fromhex(str(meta["id"]))
        except (KeyError, ValueError):
            raise errors.BackendError(name, f"{meta_path} has no valid backend id") from None
        if len(backend_id) != 16:
            raise errors.BackendError(name, f"{meta_path} has no valid backend id")
        if not os.path.exists(os.path.join(folder, _INDEX)):
            raise errors.BackendUnavailable(name, f"{folder} has {_META} but no {_INDEX}: damaged or half removed")
    except BaseException:
        os.close(lock_fd)
        raise
    return backend_id, lock_fd


def _check_blank(name: str, folder: str) -> None:
    """Refuse to turn a folder holding other things into a backend."""
    foreign = sorted(n for n in os.listdir(folder) if n not in _OWN_NAMES and _TMP_MARK not in n)
    if foreign:
        raise errors.BackendError(
            name, f"{folder} is not empty ({', '.join(foreign[:3])} ...) and holds no {_META}: not a dir backend"
        )


def _read_meta(name: str, path: str) -> dict[str, object] | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise errors.BackendError(name, f"{path} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise errors.BackendError(name, f"{path} is not a JSON object")
    return meta


def _initialise(folder: str, mode: Mode) -> dict[str, object]:
    """Create an empty backend in ``folder`` (flock held); meta.json last marks it complete."""
    backend_id = uuid.uuid4().bytes
    with contextlib.suppress(FileExistsError):
        os.mkdir(os.path.join(folder, _DATA), 0o755)
    _write_atomic(folder, _INDEX, _pack_header(backend_id, 0, 0, 0))
    meta: dict[str, object] = {
        "format": FORMAT_VERSION,
        "kind": "gridstor-dir-backend",
        "mode": mode.value,
        "id": backend_id.hex(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(folder, _META, json.dumps(meta, indent=1).encode() + b"\n")
    return meta
