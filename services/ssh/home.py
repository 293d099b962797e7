"""What a home holds and may hold: the size and entry limits every session of a user shares.

A home holds the blocks allocated to everything below it (services/common/homes.py
counts them: a sparse file counts its blocks, a small file its whole block,
folders theirs), plus the files removed over SFTP while a handle still keeps
them open (the disk keeps them until the handle closes), plus what the files
rsync is writing have grown by. ``Home`` keeps that count for the quota checks:
a full count when it is stale, changes in between.

* SFTP and SCP ask before each write (``check``) and report what really changed
  afterwards (``changed``, from the file's allocated blocks before and after).
* rsync writes in its own processes: services/ssh/guard.py stops each of them
  before it opens a file for writing and asks for a ``Grant``: the file may grow
  by its share of the free space (``RLIMIT_FSIZE`` of the rsync process, set by
  the kernel-enforced offset limit), and the share shrinks as others use space.
  What a grant's file has grown by counts at once (``held``).
* Entries (files, folders, links) are limited to ``max_entries`` per home.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import resource
import stat
import time
from pathlib import Path

from services.common import errors, homes

log = logging.getLogger(__name__)

SCAN_MAX_AGE = 30.0  # seconds a count is trusted before a new session recounts
RECOUNT_AFTER = 5.0  # a write over a limit recounts first when the last count is older than this
GRANT_MARGIN = 8 * 1024  # free bytes a file rsync writes is not given: block rounding and extent blocks
# The documented bound: no client (sftp, scp, rsync, rclone, restic) takes a home more than this past its
# limit. Measured: 0 for rsync (the margin above), at most a block for SFTP (docs/ssh.md).
OVERSHOOT_BOUND = 64 * 1024
DIR_ESTIMATE = 4096  # what a new folder (or long symlink) made by rsync is counted as until the next count


class QuotaExceeded(errors.LimitExceeded):
    """A write (or a new file or folder) does not fit in the home."""


class Grant:
    """A file an rsync process is writing, held through our own descriptor, and the room it has."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        st = os.fstat(fd)
        self.ident = homes.ident(st)
        self.base = homes.blocks_of(st)  # allocated bytes already counted (at the grant or the last count)
        self.holes = max(0, st.st_size - self.base)  # holes below the end: filling them is not size growth
        try:
            self.hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
        except (ProcessLookupError, PermissionError):
            self.hard = resource.RLIM_INFINITY
        self.limit = -1

    def blocks(self) -> int:
        return homes.blocks_of(os.fstat(self.fd))

    def counted(self) -> int:
        """What a full count of the home sees of this file now: its blocks, or nothing once it has no name."""
        st = os.fstat(self.fd)
        return homes.blocks_of(st) if st.st_nlink else 0

    def growth(self) -> int:
        return self.blocks() - self.base

    def set_room(self, room: int) -> None:
        """Let the file grow by at most ``room`` bytes from now (never below its size)."""
        size = os.fstat(self.fd).st_size
        limit = size + max(0, room - self.holes)
        if limit == self.limit:
            return
        try:
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (limit, self.hard))
            self.limit = limit
        except (ProcessLookupError, PermissionError):
            pass  # the process is gone; its grant goes when the session ends

    def close(self) -> int:
        """Stop watching the file; what the home holds more (or less) since it was counted.

        A file removed while rsync wrote it is held open by this grant until now: it was still counted; from
        here on it is gone.
        """
        try:
            st = os.fstat(self.fd)
            blocks = homes.blocks_of(st)
            return blocks - self.base if st.st_nlink else -self.base
        finally:
            os.close(self.fd)


class Home:
    """A home's root, limits and what it holds (one object per user, shared by every session)."""

    def __init__(self, username: str, root: Path, max_bytes: int, max_entries: int) -> None:
        self.username = username
        self.root = root
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.used = 0  # allocated bytes at the last count, plus changes since
        self.entries = 0
        self.files = 0
        self.scanned_at: float | None = None  # monotonic time of the last full count
        self.grants: dict[int, Grant] = {}  # rsync pid -> the file it writes
        self.written_since_count = 0  # files rsync finished since the last count (their old copies may be gone)
        self.peak = 0  # the most it held at any change seen (what a client took past the limit: peak - max_bytes)
        self._scan: asyncio.Task[None] | None = None
        self._delta_bytes = 0  # changes seen while a count runs (added to its result)
        self._delta_entries = 0
        self._open: dict[tuple[int, int], list[io.FileIO]] = {}  # SFTP handles by inode
        self._handles: dict[int, tuple[int, int]] = {}  # id(handle) -> inode
        self._orphans: set[tuple[int, int]] = set()  # removed while open: counted until the last handle closes

    # ------------------------------------------------------------- counting

    @property
    def stale(self) -> bool:
        return self.scanned_at is None or time.monotonic() - self.scanned_at > SCAN_MAX_AGE

    @property
    def recount_due(self) -> bool:
        """Whether a refused write should recount first (the count may miss removals made elsewhere)."""
        return self.scanned_at is None or time.monotonic() - self.scanned_at > RECOUNT_AFTER

    def invalidate(self) -> None:
        """Something outside these hooks changed the home (rsync, Process, maint): recount next time."""
        self.scanned_at = None

    async def refresh(self, *, force: bool = False) -> None:
        """Recount when stale (or ``force``); concurrent callers share one count."""
        if not force and not self.stale:
            return
        if self._scan is None or self._scan.done():
            self._scan = asyncio.create_task(self._rescan())
        await asyncio.shield(self._scan)

    async def _rescan(self) -> None:
        self._delta_bytes = self._delta_entries = 0
        self.written_since_count = 0
        bases = {pid: (g, g.counted()) for pid, g in self.grants.items()}
        try:
            found = await asyncio.to_thread(homes.usage, self.root)
        except homes.TreeChanged:
            log.warning("home keeps changing while it is counted; keeping the last count", extra=self._extra)
            return
        # Changes during the count may or may not have been seen; counting them again errs on the safe side.
        self.used = max(0, found.bytes + self._orphan_bytes() + self._delta_bytes)
        self.entries = max(0, found.entries + self._delta_entries)
        self.files = found.files
        for pid, (grant, blocks) in bases.items():
            if self.grants.get(pid) is grant:
                grant.base = blocks  # the count includes what the file held when it started
        self.scanned_at = time.monotonic()
        self.peak = max(self.peak, self.held)
        self._regrant()

    def _orphan_bytes(self) -> int:
        total = 0
        for ident in self._orphans:
            handles = self._open.get(ident)
            if handles:
                total += homes.blocks_of(os.fstat(handles[0].fileno()))
        return total

    @property
    def held(self) -> int:
        """Bytes the home holds now, what rsync's open files have grown by included."""
        if not self.grants:
            return self.used  # the usual case, on every SFTP write: cheap
        return self.used + sum(g.growth() for g in self.grants.values())

    @property
    def free(self) -> int:
        return max(0, self.max_bytes - self.held)

    def message(self) -> str:
        return f"quota exceeded: home holds {self.held} of {self.max_bytes} bytes"

    def entries_message(self) -> str:
        return f"entry limit reached: home has {self.entries} of {self.max_entries} files and folders"

    def refusal(self) -> str:
        """Why a new file or folder is refused now: the entry limit, else the size."""
        return self.entries_message() if self.entries >= self.max_entries else self.message()

    @property
    def _extra(self) -> dict[str, object]:
        return {"user": self.username, "used": self.used, "max_bytes": self.max_bytes}

    # ------------------------------------------------------ SFTP and SCP

    def check(self, growth: int) -> None:
        """QuotaExceeded when ``growth`` more bytes do not fit."""
        if growth > 0 and self.held + growth > self.max_bytes:
            raise QuotaExceeded(self.message())

    def check_size(self, size: int) -> None:
        """QuotaExceeded when one file of ``size`` bytes could not fit in the home even empty."""
        if size > self.max_bytes:
            raise QuotaExceeded(f"a file cannot be larger than the home ({self.max_bytes} bytes)")

    def check_entry(self) -> None:
        """QuotaExceeded when one more file or folder does not fit."""
        if self.entries >= self.max_entries:
            raise QuotaExceeded(self.entries_message())

    def changed(self, nbytes: int, entries: int = 0) -> None:
        """Count bytes (allocated) and entries that came or went."""
        self._delta_bytes += nbytes
        if entries:
            self.entries = max(0, self.entries + entries)
            self._delta_entries += entries
        if nbytes < 0:
            self.used = max(0, self.used + nbytes)
        elif nbytes > 0:
            self.used += nbytes
            held = self.held
            if held > self.peak:
                self.peak = held
            if self.grants:
                self._regrant()

    def opened(self, handle: io.FileIO, st: os.stat_result) -> None:
        """An SFTP handle on a regular file."""
        ident = homes.ident(st)
        self._open.setdefault(ident, []).append(handle)
        self._handles[id(handle)] = ident

    def closing(self, handle: io.FileIO) -> None:
        """An SFTP handle is about to close: a file removed meanwhile stops counting with its last handle."""
        ident = self._handles.pop(id(handle), None)
        if ident is None:
            return
        handles = self._open.get(ident, [])
        if handle in handles:
            handles.remove(handle)
        if handles:
            return
        self._open.pop(ident, None)
        if ident in self._orphans:
            self._orphans.discard(ident)
            st = os.fstat(handle.fileno())
            if st.st_nlink == 0:
                self.changed(-homes.blocks_of(st))

    def removed(self, st: os.stat_result) -> None:
        """A name went (``st``: what it named, before): its blocks go with the inode's last name and handle."""
        self.peak = max(self.peak, self.held)  # e.g. rsync's new copy and the old one it replaces, both
        self.changed(0, -1)
        if stat.S_ISDIR(st.st_mode):
            self.changed(-homes.blocks_of(st))
            return
        if st.st_nlink > 1:
            return  # other names keep the inode
        ident = homes.ident(st)
        if ident in self._open:
            self._orphans.add(ident)  # still on disk until its handles close
            return
        if any(g.ident == ident for g in self.grants.values()):
            return  # rsync is writing it: it goes when the grant is finished
        self.changed(-homes.blocks_of(st))

    # ----------------------------------------------------------------- rsync

    def grant(self, pid: int, fd: int) -> Grant:
        """Watch the file ``fd`` that rsync process ``pid`` opened for writing; QuotaExceeded when there is no room."""
        self.finish(pid)
        grant = Grant(pid, fd)
        share = self._share(len(self.grants) + 1)
        if share <= grant.holes or self.held >= self.max_bytes:
            raise QuotaExceeded(self.message())  # the caller closes fd
        self.grants[pid] = grant
        self._regrant()
        return grant

    def finish(self, pid: int) -> None:
        """rsync process ``pid`` is done with its file (it opens the next one, or ends)."""
        grant = self.grants.get(pid)
        if grant is not None:
            self.peak = max(self.peak, self.held)  # what the file reached, before it may go
            del self.grants[pid]
            self.written_since_count += 1
            grown = grant.close()
            self.changed(grown)
            if grown <= 0:  # else changed() gave the others their new shares already
                self._regrant()

    def _share(self, writers: int) -> int:
        return (self.max_bytes - self.held) // max(1, writers) - GRANT_MARGIN

    def _regrant(self) -> None:
        """Give every file rsync writes its share of what is free now (lowering or raising its limit)."""
        if not self.grants:
            return
        share = max(0, self._share(len(self.grants)))
        for grant in self.grants.values():
            grant.set_room(share)
