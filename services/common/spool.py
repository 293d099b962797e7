"""An upload on its way to disk: a private temp file, hashed and counted as bytes arrive.

Messages are gathered into batches of about ``BATCH_BYTES`` and written (and
hashed) in a worker thread with one batch in flight, so the event loop only
appends to a list while the disk and BLAKE3 work overlaps the next receive.
While receiving, the file is ``up-<random>.part`` (mode 0600) and its writer
holds an flock on it; once the job is recorded it is renamed to ``<job>.spool``,
so a sweep can tell abandoned partial uploads (no writer holds them: the process
died) from uploads arriving and from queued work.

Durability: ``finish`` fsyncs the file, and ``fsync_dir`` the spool folder after
the rename, before the upload is acknowledged, so an acknowledged upload survives
a power cut. Every SYNC_EVERY bytes an fdatasync of what arrived so far starts in
a thread of its own (one at a time), so that last fsync has little left to write
(100 MiB at once took ~70 ms here) while the writes go on: the receive never waits
for the disk until ``finish``.
A full disk is ``OutOfSpace`` ("the gateway's spool disk is full"), never a limit
the client went over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

from services.common import errors
from services.common.ids import HASH_BYTES, ext_from_name
from services.common.mime import MAX_CONTENT_TYPE, content_type_for

log = logging.getLogger(__name__)

BATCH_BYTES = 1024 * 1024
SYNC_EVERY = 8 * 1024 * 1024  # bytes written between fdatasyncs while receiving, so the final fsync is short
BATCH_PARTS = 256  # below IOV_MAX (1024) for writev
PART_PREFIX = "up-"
PART_SUFFIX = ".part"
JOB_SUFFIX = ".spool"
PART_GRACE = 60.0  # seconds a partial upload nobody writes stays before a sweep removes it
SPOOL_FULL = "the gateway's spool disk is full; try again later"
MAX_NAME = 1024
# A form-encoded type is what curl -d sends by default, not what the file is.
_IGNORED_TYPES = frozenset({"application/x-www-form-urlencoded"})


@dataclass(frozen=True)
class UploadHeader:
    """What the first message of an upload says about the file."""

    name: str
    ext: str
    content_type: str
    declared_size: int | None

    @classmethod
    def parse(
        cls, name: str, content_type: str, body_content_type: str, declared_size: int | None, limit: int
    ) -> UploadHeader:
        """Validate the header fields; InvalidInput (TooLarge over the limit) says what is wrong."""
        if len(name) > MAX_NAME:
            raise errors.InvalidInput(f"name is {len(name)} characters; at most {MAX_NAME} are allowed")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise errors.InvalidInput("name must not contain control characters")
        if declared_size is not None:
            if declared_size < 0:
                raise errors.InvalidInput(f"declared_size must not be negative, got {declared_size}")
            if declared_size > limit:
                raise errors.TooLarge(
                    f"declared_size {declared_size} bytes is over the upload limit of {limit} bytes",
                    limit,
                    "declared_size",
                )
        ext = ext_from_name(name)
        given = content_type.strip()
        if not given:
            body_type = body_content_type.strip()
            if body_type.split(";", 1)[0].strip().lower() not in _IGNORED_TYPES:
                given = body_type
        if len(given) > MAX_CONTENT_TYPE:
            raise errors.InvalidInput(f"content_type is {len(given)} characters; at most {MAX_CONTENT_TYPE}")
        return cls(name=name, ext=ext, content_type=content_type_for(given, ext), declared_size=declared_size)


@dataclass(frozen=True)
class Spooled:
    """A complete upload on disk."""

    path: Path
    size: int
    hash: bytes


class Spool:
    """One upload being written; ``write`` the pieces, then ``finish``; ``discard`` on any failure."""

    def __init__(self, directory: Path, limit: int) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix=PART_PREFIX, suffix=PART_SUFFIX, dir=directory)  # mode 0600
        except OSError as exc:
            raise disk_error(exc, "create the spool file") from None
        hold(fd)
        self.path = Path(name)
        self.limit = limit
        self.size = 0
        self._fd = fd
        self._hasher = blake3.blake3()
        self._parts: list[bytes] = []
        self._buffered = 0
        self._pending: asyncio.Future[None] | None = None  # the batch being written
        self._syncing: asyncio.Future[None] | None = None  # the fdatasync running beside the writes
        self._closed = False
        self._unsynced = 0  # bytes written since the last fdatasync started (the writer thread's)

    async def write(self, data: bytes) -> None:
        """Append ``data``; TooLarge once the upload passes the limit."""
        if not data:
            return
        self.size += len(data)
        if self.size > self.limit:
            raise errors.TooLarge(f"the upload is over the upload limit of {self.limit} bytes", self.limit)
        self._parts.append(data)
        self._buffered += len(data)
        if self._buffered >= BATCH_BYTES or len(self._parts) >= BATCH_PARTS:
            await self._flush()

    async def _flush(self) -> None:
        """Hand the gathered parts to a thread, after the previous batch is in the file."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        loop = asyncio.get_running_loop()
        self._start_sync(loop)
        if not self._parts:
            return
        parts, self._parts, self._buffered = self._parts, [], 0
        self._pending = loop.run_in_executor(None, self._write_parts, parts)

    def _start_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once SYNC_EVERY bytes are written unsynced, fdatasync them in a thread beside the writes (one at a time).

        Syncing as the bytes arrive leaves the fsync before the reply little to write; running it
        beside the writes keeps the receive from waiting for the disk meanwhile. A failed sync is
        raised here (at the next batch) or by ``finish``.
        """
        if self._syncing is not None:
            if not self._syncing.done():
                return
            syncing, self._syncing = self._syncing, None
            syncing.result()
        if self._unsynced >= SYNC_EVERY:
            self._unsynced = 0
            self._syncing = loop.run_in_executor(None, self._datasync)

    def _write_parts(self, parts: Sequence[bytes]) -> None:
        for p in parts:
            self._hasher.update(p)
        try:
            _write_all(self._fd, parts)
        except OSError as exc:
            raise disk_error(exc, "write the spool file") from None
        self._unsynced += sum(len(p) for p in parts)

    def _datasync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise disk_error(exc, "sync the spool file") from None

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise disk_error(exc, "sync the spool file") from None

    async def sync(self) -> None:
        """Wait until every byte written so far is in the file (readable by another process)."""
        await self._flush()
        await self._flush()  # waits for the batch the first call started

    async def finish(self) -> Spooled:
        """Write what is left, fsync and close the file; the caller owns it from here."""
        await self._flush()
        await self._flush()  # waits for the batch the first call started
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            await syncing
        await asyncio.to_thread(self._sync)
        self._closed = True
        os.close(self._fd)
        return Spooled(self.path, self.size, self._hasher.digest(HASH_BYTES))

    def discard(self) -> None:
        """Remove the file now; its descriptor closes once a write in flight has finished."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._closed:
            return
        self._closed = True
        fd = self._fd
        running = [f for f in (self._pending, self._syncing) if f is not None]
        self._pending = self._syncing = None
        left = [len(running)]

        def close(fut: asyncio.Future[None]) -> None:
            if not fut.cancelled():
                fut.exception()  # retrieved: the upload failed for another reason anyway
            left[0] -= 1
            if not left[0]:
                os.close(fd)

        if not running:
            os.close(fd)
        for fut in running:
            if fut.done():
                close(fut)
            else:
                fut.add_done_callback(close)


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    """``writev`` every part, resuming after short writes."""
    views = [memoryview(p) for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def disk_error(exc: OSError, what: str) -> errors.GridstorError:
    """The error a failed spool write stands for: OutOfSpace for a full disk, StoreFailed otherwise."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.OutOfSpace(SPOOL_FULL)
    return errors.StoreFailed(f"cannot {what}: {exc.strerror}")


def hold(fd: int) -> None:
    """Mark a partial upload as being written (an flock, gone with the process), so sweeps leave it."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def abandoned(path: str) -> bool:
    """Whether no process holds the partial upload at ``path`` (its writer died); False when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the probe's own lock
    return True


def fsync_dir(directory: Path) -> None:
    """fsync the spool folder, so a spool file's new name survives a power cut (blocking)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise disk_error(exc, "sync the spool folder") from None
    finally:
        os.close(fd)


def job_path(directory: Path, job: str) -> Path:
    """Where the spool file of a recorded job lives."""
    return directory / f"{job}{JOB_SUFFIX}"


def prepare_dir(directory: Path) -> None:
    """Create the spool folder, private to the gateway's user."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        directory.chmod(0o700)


def sweep_partials(directory: Path, older_than: float = PART_GRACE) -> int:
    """Remove partial uploads no process writes (left by a crash) untouched for ``older_than`` seconds.

    A writer holds an flock on its partial file (``hold``), which the kernel drops when
    the process dies; the age keeps a file just created (not yet locked) and writers
    that do not lock. Returns how many went.
    """
    removed = 0
    cutoff = time.time() - older_than
    for entry in os.scandir(directory):
        if entry.name.startswith(PART_PREFIX) and entry.name.endswith(PART_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff and abandoned(entry.path):
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        log.info("removed %d abandoned partial uploads from %s", removed, directory)
    return removed
