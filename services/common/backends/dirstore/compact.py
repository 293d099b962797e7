"""Compaction of a dir backend: live values into new segments, a new index.log swapped in by ``rename``.

The backend calls ``compact`` holding the folder's flock, so no writer in any
process runs meanwhile; readers go on, and other processes notice the new
index file (a new inode) and reload it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from services.common import errors
from services.common.backends.dirstore.folder import Segments, fsync_dir, pwrite_all, remove_temp_files
from services.common.backends.dirstore.format import INDEX, SET, TMP_MARK, describe_key, pack_header, pack_record
from services.common.backends.dirstore.index import Entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The index as compaction starts from it, taken under the backend's lock."""

    backend_id: bytes
    generation: int
    next_id: int
    cur_seg: int  # the segment writers append to
    live: list[tuple[bytes, Entry]]  # in write order


def compact(name: str, segments: Segments, segment_size: int, snap: Snapshot, reload: Callable[[], None]) -> int:
    """Rewrite ``snap.live`` into new segments; return the bytes freed.

    ``reload`` makes the backend read the new index, before the old segments go.
    """
    folder = segments.folder
    remove_temp_files(folder)
    old = segments.sizes()
    first = max([snap.cur_seg, *old]) + 1
    created = _rewrite(name, segments, segment_size, snap, first)
    fsync_dir(folder)
    reload()
    for n in old:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segments.path(n))
    fsync_dir(segments.data_dir)
    freed = sum(old.values()) - sum(segments.sizes().values())
    log.info("%s: compacted %d segments into %d, %d bytes freed", name, len(old), len(created), freed)
    return freed


def _rewrite(name: str, segments: Segments, segment_size: int, snap: Snapshot, first: int) -> list[int]:
    """Copy ``snap.live`` into segments numbered from ``first`` and rename a new index.log over the old one.

    Returns the segments created; on failure removes them and the temporary index.
    """
    out_seg, out_fd, out_size = first - 1, -1, 0
    created: list[int] = []
    records: list[bytes] = []
    sources: dict[int, int] = {}
    index_path = os.path.join(segments.folder, INDEX)
    tmp_index = f"{index_path}{TMP_MARK}{os.getpid()}"
    try:
        for key, (n, off, length, order) in snap.live:
            if length == 0:
                records.append(pack_record(SET, key, 0, 0, 0, order))
                continue
            if out_fd < 0 or (out_size > 0 and out_size + length > segment_size):
                if out_fd >= 0:
                    os.fdatasync(out_fd)
                    os.close(out_fd)
                    out_fd = -1
                out_seg += 1
                out_fd = os.open(segments.path(out_seg), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                created.append(out_seg)
                out_size = 0
            src = sources.get(n)
            if src is None:
                src = sources[n] = os.open(segments.path(n), os.O_RDONLY | os.O_CLOEXEC)
            _copy(name, src, off, out_fd, out_size, length, key)
            records.append(pack_record(SET, key, out_seg, out_size, length, order))
            out_size += length
        if out_fd >= 0:
            os.fdatasync(out_fd)
            os.close(out_fd)
            out_fd = -1
        base = out_seg if created else first
        fd = os.open(tmp_index, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            pwrite_all(fd, pack_header(snap.backend_id, snap.generation + 1, base, snap.next_id) + b"".join(records), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(segments.data_dir)
        os.rename(tmp_index, index_path)
    except BaseException:
        if out_fd >= 0:
            os.close(out_fd)
        for n in created:
            with contextlib.suppress(OSError):
                os.unlink(segments.path(n))
        with contextlib.suppress(OSError):
            os.unlink(tmp_index)
        raise
    finally:
        for src in sources.values():
            os.close(src)
    return created


def _copy(name: str, src: int, src_off: int, dst: int, dst_off: int, length: int, key: bytes) -> None:
    """Copy one value between segment files (in the kernel where it can)."""
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
        pwrite_all(dst, data, dst_off + done)
        done += len(data)
    if done != length:
        raise errors.BackendError(name, f"compact: the value of {describe_key(key)} is truncated on disk")
