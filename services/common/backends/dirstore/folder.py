"""The folder behind a dir backend: setting it up, its lock and meta.json, segment files, OS errors.

Every function here runs on a worker thread and raises ``OSError`` or the
``BackendError`` family; ``backend_call`` turns the former into the latter.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, TypeVar

from services.common import errors
from services.common.backends.base import Mode
from services.common.backends.dirstore.format import (
    DATA,
    FORMAT_VERSION,
    INDEX,
    LOCK,
    META,
    OWN_NAMES,
    SEG_SUFFIX,
    TMP_MARK,
    pack_header,
    seg_name,
)

T = TypeVar("T")

_MAX_CACHED_FDS: Final = 64


class ModeMismatch(errors.BackendUnavailable):
    """The folder holds a backend of the other mode (seq vs user) than the one asked for."""


# -- plain file IO ---------------------------------------------------------------


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - a regular file never does this
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def fsync_dir(path: str) -> None:
    """fsync a folder, so the names created or removed in it are on stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(folder: str, name: str, data: bytes) -> None:
    """Write ``folder/name`` as temp file + fsync + rename + fsync(folder)."""
    tmp = os.path.join(folder, f"{name}{TMP_MARK}{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(folder, name))
    fsync_dir(folder)


def copy_out(src: int, start: int, end: int, path: str, chunk: int) -> None:
    """Copy bytes ``start``..``end`` of descriptor ``src`` into a new file ``path`` (fsync'ed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        offset = start
        while offset < end:
            data = os.pread(src, min(chunk, end - offset), offset)
            if not data:
                break
            pwrite_all(fd, data, offset - start)
            offset += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- OS errors -----------------------------------------------------------------------


def backend_call(name: str, folder: str, op: str, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)``, turning OS errors into the ``BackendError`` family."""
    try:
        return fn(*args)
    except OSError as exc:
        raise os_error(name, folder, op, exc) from exc


def is_full(exc: OSError) -> bool:
    """Whether ``exc`` says the file system (or the user's quota on it) is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def os_error(name: str, folder: str, op: str, exc: OSError) -> errors.BackendError:
    """The ``BackendError`` an OS error during ``op`` on ``folder`` stands for."""
    code = exc.errno
    detail = exc.strerror or str(exc)
    if code in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        if not os.path.isdir(folder):
            return errors.BackendUnavailable(name, f"{op}: the folder {folder} is gone")
        where = f" ({exc.filename})" if exc.filename else ""
        return errors.BackendUnavailable(name, f"{op}: part of the backend is missing{where}: {detail}")
    if is_full(exc):
        return errors.NamespaceFull(name, f"{op}: no space left on {folder}: {detail}")
    if code == errno.EROFS:
        return errors.ReadOnly(name, f"{op}: {folder} is on a read-only file system")
    if code in (errno.EACCES, errno.EPERM):
        return errors.AccessDenied(name, f"{op}: permission denied on {exc.filename or folder}")
    return errors.BackendUnavailable(name, f"{op}: {detail}")


# -- setting a folder up ----------------------------------------------------------------


def prepare_folder(name: str, folder: str, mode: Mode, create: bool) -> tuple[bytes, int]:
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
    meta_path = os.path.join(folder, META)
    if not os.path.exists(meta_path):
        check_blank(name, folder)
    try:
        lock_fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
        lock_fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            meta = read_meta(name, meta_path)
            if meta is None:
                meta = initialise(folder, mode)
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
        if not os.path.exists(os.path.join(folder, INDEX)):
            raise errors.BackendUnavailable(name, f"{folder} has {META} but no {INDEX}: damaged or half removed")
    except BaseException:
        os.close(lock_fd)
        raise
    return backend_id, lock_fd


def check_blank(name: str, folder: str) -> None:
    """Refuse to turn a folder holding other things into a backend."""
    foreign = sorted(n for n in os.listdir(folder) if n not in OWN_NAMES and TMP_MARK not in n)
    if foreign:
        raise errors.BackendError(
            name, f"{folder} is not empty ({', '.join(foreign[:3])} ...) and holds no {META}: not a dir backend"
        )


def read_meta(name: str, path: str) -> dict[str, object] | None:
    """meta.json as a dict; None when there is none."""
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


def initialise(folder: str, mode: Mode) -> dict[str, object]:
    """Create an empty backend in ``folder`` (flock held); meta.json last marks it complete."""
    backend_id = uuid.uuid4().bytes
    with contextlib.suppress(FileExistsError):
        os.mkdir(os.path.join(folder, DATA), 0o755)
    write_atomic(folder, INDEX, pack_header(backend_id, 0, 0, 0))
    meta: dict[str, object] = {
        "format": FORMAT_VERSION,
        "kind": "gridstor-dir-backend",
        "mode": mode.value,
        "id": backend_id.hex(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(folder, META, json.dumps(meta, indent=1).encode() + b"\n")
    return meta


def remove_temp_files(folder: str) -> None:
    """Remove what an interrupted atomic write or compaction left in ``folder``."""
    for name in os.listdir(folder):
        if TMP_MARK in name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


# -- segment files ------------------------------------------------------------------------


class Seg:
    """A cached read-only segment descriptor; closed once retired and unused."""

    __slots__ = ("fd", "refs", "retired")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.retired = False

    def retire(self) -> None:
        """Close the descriptor now, or when its last reader releases it."""
        self.retired = True
        if self.refs == 0:
            os.close(self.fd)


class Segments:
    """The data folder's segment files: cached read descriptors and the one being appended to.

    Not thread-safe: the backend calls it holding its lock (``sync`` and
    ``sizes`` excepted, which only look at the folder).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.data_dir = os.path.join(folder, DATA)
        self._cache: OrderedDict[int, Seg] = OrderedDict()
        self.wseg = -1  # the segment being appended to (-1: none open)
        self.wfd = -1

    def path(self, n: int) -> str:
        return os.path.join(self.data_dir, seg_name(n))

    def acquire(self, n: int) -> Seg:
        """A read descriptor for segment ``n``; give it back with ``release``."""
        seg = self._cache.get(n)
        if seg is None:
            seg = Seg(os.open(self.path(n), os.O_RDONLY | os.O_CLOEXEC))
            self._cache[n] = seg
            if len(self._cache) > _MAX_CACHED_FDS:
                for old_n, old in list(self._cache.items())[: len(self._cache) - _MAX_CACHED_FDS]:
                    del self._cache[old_n]
                    old.retire()
        else:
            self._cache.move_to_end(n)
        seg.refs += 1
        return seg

    @staticmethod
    def release(seg: Seg) -> None:
        seg.refs -= 1
        if seg.retired and seg.refs == 0:
            os.close(seg.fd)

    def open_write(self, n: int) -> bool:
        """Make segment ``n`` the one appended to; True when this created its file."""
        self.close_write()
        path = self.path(n)
        created = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.wfd, self.wseg = fd, n
        return created

    def close_write(self) -> None:
        if self.wfd >= 0:
            with contextlib.suppress(OSError):  # Linux frees the descriptor even when close reports an error
                os.close(self.wfd)
        self.wfd, self.wseg = -1, -1

    def drop(self, n: int) -> None:
        """Stop holding segment ``n`` open (it holds nothing live; a compaction may remove it)."""
        seg = self._cache.pop(n, None)
        if seg is not None:
            seg.retire()
        if self.wseg == n:
            self.close_write()

    def forget(self) -> None:
        """Drop every descriptor (a new index may name other segments); reads in flight keep theirs."""
        for seg in self._cache.values():
            seg.retire()
        self._cache.clear()
        self.close_write()

    def sizes(self) -> dict[int, int]:
        """Segment number -> file size; empty when the folder is there but its data folder is not."""
        sizes: dict[int, int] = {}
        if not os.path.isdir(self.data_dir) and os.path.isdir(self.folder):
            return sizes
        with os.scandir(self.data_dir) as it:
            for item in it:
                stem, dot, ext = item.name.partition(".")
                if dot and "." + ext == SEG_SUFFIX and stem.isdigit():
                    with contextlib.suppress(FileNotFoundError):
                        sizes[int(stem)] = item.stat(follow_symlinks=False).st_size
        return sizes

    def sync(self, numbers: list[int]) -> None:
        """fdatasync segments ``numbers`` (those compacted away meanwhile are skipped)."""
        for n in numbers:
            try:
                fd = os.open(self.path(n), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # compacted away; its live values were synced in their new segment
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
