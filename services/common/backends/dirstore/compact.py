"""Compaction of a dir backend, segment by segment, so it needs little free space.

The space of deleted and overwritten values is given back one segment at a time
(``DirBackend.compact`` drives it; each step holds the folder's flock, so writers in
every process wait only for that step, and readers never wait):

1. A segment holding no live value is removed at once (no copy, no free space).
2. Otherwise its live values are copied to the end of the current write segment
   (the next one when the segment is the write segment itself), fdatasync'ed, and
   index records pointing at the new places are appended to index.log (same key,
   same order: a relocation, not a new write) and fdatasync'ed; then the old segment
   is removed. It needs free space for that segment's live bytes only (at most
   ``segment_size``), not for the whole backend's; segments are taken cheapest
   first, and one that does not fit in the free space now is skipped and counted.
3. When index.log holds many more records than live keys (relocations, deletes), or
   the write segment must move on without a value to move it, a new index.log with
   one record per live key is written beside it and renamed over it (free space: the
   live records, a few dozen bytes per key); other processes see a new inode and
   reload it.

A crash anywhere leaves the backend consistent: copied values without their records
are dead space, records are appended only once their values are on disk, and a
segment is removed only once the records moving its values away are on disk.
Another process that still reads the old segment does so through a descriptor it
holds (a removed file's bytes stay readable) or finds it gone and re-reads the
index; it drops its descriptors of a segment once its copy of the index says the
segment holds nothing, so the space is given back.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from services.common import errors
from services.common.backends.dirstore.folder import pwrite_all
from services.common.backends.dirstore.format import describe_key

MARGIN = 1024 * 1024  # free space kept beyond what a step writes


@dataclass
class CompactResult:
    """What one compaction did; ``freed`` is what the disk got back (segments removed minus bytes copied)."""

    segments: int = 0  # segments removed
    removed_bytes: int = 0  # their size on disk
    moved_bytes: int = 0  # live bytes copied to other segments
    skipped: int = 0  # segments left because the free space did not fit their live bytes
    index_bytes: int = 0  # index.log bytes given back by rewriting it

    @property
    def freed(self) -> int:
        return self.removed_bytes - self.moved_bytes + self.index_bytes


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fits(path: str, need: int) -> bool:
    """Whether ``need`` bytes (and a margin) fit on the file system of ``path`` now."""
    return free_bytes(path) >= need + MARGIN


def copy_value(name: str, src: int, src_off: int, dst: int, dst_off: int, length: int, key: bytes) -> None:
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
