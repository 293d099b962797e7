"""Process: a file or folder of a home becomes an ordinary upload job of the ingest pipeline.

* The path is resolved inside the home without following symlinks (every folder
  is opened with O_NOFOLLOW from the home's descriptor), so ``..``, a symlink
  out or a folder swapped for a symlink cannot reach outside. A missing path, a
  symlink, or something that is not a file or folder is a clear error.
* A file is copied into the ingest spool while hashed; a folder is streamed
  as a .tar.gz straight into the spool (no temporary copy of the tree; any
  depth, walked without recursion by services/common/homes.py; symlinks are
  stored as symlinks, never followed; FIFOs and devices are skipped). Then,
  exactly like an upload, the spool file is renamed to ``<job>.spool`` and
  the job is queued with ``JobStore.submit``; ingest's workers store it.
  Over ``max_upload`` is errors.TooLarge (INVALID_ARGUMENT; 413 over REST).
* With remove, a watcher waits for the job (``Notifier.wait``). Only when it
  is DONE are the processed entries removed, and only those that are unchanged
  since they were archived (same inode, size and mtime): a file added or
  rewritten meanwhile is kept. A failed job removes nothing. Pending removals
  are kept in ``DATA/ssh/pending/<job>.json`` so a restart resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import io
import json
import logging
import os
import posixpath
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from services.common import errors, homes, jobs, spool
from services.common.ids import HASH_BYTES
from services.common.jobs import JobStore, Notifier
from services.ssh.accounts import write_atomic
from services.ssh.audit import SshMetrics
from services.ssh.server import SshGateway

log = logging.getLogger(__name__)

BLOCK = 1024 * 1024
GZIP_LEVEL = 6  # tarfile's "w|gz" is fixed at 9: ~3x slower for a few percent smaller archives
WAIT_STEP = 600.0  # seconds per Status long-poll of a watched job
# kind, inode, size, mtime_ns
Entry = tuple[str, int, int, int]


@dataclass
class Packed:
    """A path of a home written to a spool file."""

    rel: str
    directory: bool
    name: str
    spool: Path
    size: int
    hash_hex: str
    manifest: dict[str, Entry] = field(default_factory=dict)  # relative path ("" = the path itself)


@dataclass(frozen=True)
class Processed:
    job: str
    rel: str
    directory: bool
    name: str


def split_path(raw: str) -> list[str]:
    """The components of a home-relative path ("/" or "." is the home); InvalidInput for '..' and junk."""
    if not raw:
        raise errors.InvalidInput("path is empty: give a file or folder in the home ('/' is the home itself)")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise errors.InvalidInput("path must not contain control characters")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise errors.InvalidInput(f"path {raw!r} must stay inside the home ('..' is not allowed)")
    return parts


def _kind(mode: int) -> str:
    return "d" if stat.S_ISDIR(mode) else "f" if stat.S_ISREG(mode) else "l" if stat.S_ISLNK(mode) else "o"


def _entry(st: os.stat_result) -> Entry:
    return (_kind(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns)


def _symlink_error(root: Path, parts: list[str]) -> errors.GridstorError:
    rel = "/".join(parts)
    real = os.path.realpath(root / rel)
    inside = real == str(root) or real.startswith(str(root) + "/")
    if not inside:
        return errors.PermissionDenied(f"{rel} is a symlink pointing outside the home")
    return errors.InvalidInput(f"{rel} is a symlink; Process takes the file or folder itself, not a link")


def open_parent(root: Path, parts: list[str]) -> int:
    """A descriptor of the folder holding ``parts[-1]`` (the home for the home), reached without symlinks."""
    try:
        fd = os.open(root, homes.DIR_FLAGS)
    except FileNotFoundError:
        raise errors.NotFound(f"the home folder {root.name} does not exist") from None
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, homes.DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise errors.NotFound(f"no such folder in the home: {'/'.join(parts[: i + 1])}") from None
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise _symlink_error(root, parts[: i + 1]) from None
                raise errors.InvalidInput(f"{'/'.join(parts[: i + 1])} is a file, not a folder") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


class _SpoolWriter(io.RawIOBase):
    """The spool file being written: hashed, counted, buffered, refused past the limit."""

    def __init__(self, fd: int, limit: int, what: str) -> None:
        super().__init__()
        self.fd = fd
        self.limit = limit
        self.what = what
        self.size = 0
        self.hasher = blake3.blake3()
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = len(data)
        self.size += n
        if self.size > self.limit:
            raise errors.TooLarge(f"{self.what} is over the upload limit of {self.limit} bytes", self.limit, "path")
        self._buf += data
        if len(self._buf) >= BLOCK:
            self.drain()
        return n

    def drain(self) -> None:
        if self._buf:
            self.hasher.update(self._buf)
            view = memoryview(self._buf)
            while view:
                view = view[os.write(self.fd, view) :]
            del view
            self._buf.clear()


def pack(root: Path, parts: list[str], username: str, spool_dir: Path, limit: int) -> Packed:
    """Write the file or folder at ``parts`` of the home into a new spool part file (blocking)."""
    rel = "/".join(parts)
    parent = open_parent(root, parts)
    try:
        if parts:
            name = parts[-1]
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise errors.NotFound(f"no such file or folder in the home: {rel}") from None
            if stat.S_ISLNK(st.st_mode):
                raise _symlink_error(root, parts)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise errors.InvalidInput(f"{rel} is not a regular file or folder")
            flags = homes.DIR_FLAGS if stat.S_ISDIR(st.st_mode) else os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(name, flags | os.O_CLOEXEC, dir_fd=parent)
        else:
            name = username
            fd = os.dup(parent)
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        directory = stat.S_ISDIR(st.st_mode)
        if not directory and not stat.S_ISREG(st.st_mode):
            raise errors.InvalidInput(f"{rel} is not a regular file or folder")
        if not directory and st.st_size > limit:
            raise errors.TooLarge(f"{rel} is {st.st_size} bytes, over the upload limit of {limit} bytes", limit, "path")
        stored = name + ".tar.gz" if directory else name
        stored = stored.encode("utf-8", "replace").decode("utf-8")  # a label: odd bytes become U+FFFD
        out_fd, out_name = tempfile.mkstemp(prefix=spool.PART_PREFIX, suffix=spool.PART_SUFFIX, dir=spool_dir)
        spool.hold(out_fd)  # a spool sweep leaves a partial file whose writer is alive
        try:
            what = f"folder {rel or '/'} as .tar.gz" if directory else f"file {rel}"
            writer = _SpoolWriter(out_fd, limit, what)
            manifest = _write_tar(fd, name, writer) if directory else _copy_file(fd, writer)
            writer.drain()
        except BaseException as exc:
            os.close(out_fd)
            os.unlink(out_name)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.OutOfSpace(spool.SPOOL_FULL) from None
            raise
        os.close(out_fd)
    finally:
        os.close(fd)
    return Packed(
        rel=rel,
        directory=directory,
        name=stored,
        spool=Path(out_name),
        size=writer.size,
        hash_hex=writer.hasher.digest(HASH_BYTES).hex(),
        manifest=manifest,
    )


def _copy_file(fd: int, writer: _SpoolWriter) -> dict[str, Entry]:
    os.set_blocking(fd, True)
    before = os.fstat(fd)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        writer.write(view[:n])
    after = os.fstat(fd)
    if writer.size != after.st_size or after.st_mtime_ns != before.st_mtime_ns:
        raise errors.Conflict("the file changed while it was being read; try again once it is complete")
    return {"": _entry(after)}


def _tarinfo(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = 0  # the gateway's own ids mean nothing to whoever unpacks it
    info.uname = info.gname = ""
    return info


def _write_tar(dir_fd: int, top: str, writer: _SpoolWriter) -> dict[str, Entry]:
    """Stream the folder as .tar.gz into ``writer``; return what was archived (for the removal)."""
    manifest: dict[str, Entry] = {"": _entry(os.fstat(dir_fd))}
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=writer, compresslevel=GZIP_LEVEL, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(_tarinfo(top, os.fstat(dir_fd), tarfile.DIRTYPE))
        # any depth, without recursion; symlinks are never followed, each folder re-checked as it is entered
        for item in homes.walk(dir_fd, sort=True):
            assert isinstance(item, homes.Entry)  # no Left events without leave=True
            rel = item.path
            arc = posixpath.join(top, rel)
            st = item.st
            if stat.S_ISDIR(st.st_mode):
                tar.addfile(_tarinfo(arc, st, tarfile.DIRTYPE))
            elif stat.S_ISLNK(st.st_mode):
                info = _tarinfo(arc, st, tarfile.SYMTYPE)
                info.linkname = os.readlink(item.name, dir_fd=item.fd)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                st = _add_file(tar, item.fd, item.name, arc)
            else:
                log.info("Process: skipping %s (not a file, folder or symlink)", arc)
                continue
            manifest[rel] = _entry(st)
    return manifest


def _add_file(tar: tarfile.TarFile, dfd: int, name: str, arc: str) -> os.stat_result:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.Conflict(f"{arc} changed while it was being archived; try again")
        os.set_blocking(fd, True)
        info = _tarinfo(arc, st, tarfile.REGTYPE)
        info.size = st.st_size
        try:
            tar.addfile(info, f)
        except OSError as exc:
            if "unexpected end of data" in str(exc):
                raise errors.Conflict(f"{arc} shrank while it was being archived; try again") from None
            raise
    return st


# ------------------------------------------------------------------- removal


def remove_processed(root: Path, parts: list[str], directory: bool, manifest: dict[str, Entry]) -> int:
    """Remove what was archived and is unchanged since; return how many entries went."""
    try:
        parent = open_parent(root, parts)
    except errors.GridstorError as exc:
        log.warning("not removing %s: %s", "/".join(parts) or "/", exc)
        return 0
    removed = 0
    try:
        if not directory:
            return _unlink_if_same(parent, parts[-1], manifest.get(""))
        if parts:
            try:
                fd = os.open(parts[-1], homes.DIR_FLAGS, dir_fd=parent)
            except OSError:
                return 0
        else:
            fd = os.dup(parent)
        try:
            if _entry(os.fstat(fd))[:2] != (manifest.get("") or ("", 0))[:2]:
                log.warning("not removing %s: it was replaced after Process", "/".join(parts) or "/")
                return 0
            # files as they are met, each folder once the walk has left it (emptied, unless something was added)
            for item in homes.walk(fd, leave=True):
                if isinstance(item, homes.Left):
                    removed += _unlink_if_same(item.fd, item.folder.name, manifest.get(item.folder.path))
                elif not stat.S_ISDIR(item.st.st_mode):
                    removed += _unlink_if_same(item.fd, item.name, manifest.get(item.path))
        finally:
            os.close(fd)
        if parts:
            with contextlib.suppress(OSError):  # not empty: something new was added meanwhile
                os.rmdir(parts[-1], dir_fd=parent)
                removed += 1
    finally:
        os.close(parent)
    return removed


def _unlink_if_same(dfd: int, name: str, entry: Entry | None) -> int:
    if entry is None:
        return 0
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    now = _entry(st)
    if now[0] != entry[0] or now[1] != entry[1]:
        return 0
    try:
        if now[0] == "d":
            os.rmdir(name, dir_fd=dfd)
        elif now == entry:
            os.unlink(name, dir_fd=dfd)
        else:
            return 0  # rewritten since it was archived
    except OSError:
        return 0
    return 1


# ----------------------------------------------------------------- processor


@dataclass
class Pending:
    """A removal waiting for its job."""

    job: str
    username: str
    parts: list[str]
    directory: bool
    manifest: dict[str, Entry]

    def to_json(self) -> bytes:
        doc = {
            "job": self.job,
            "username": self.username,
            "parts": self.parts,
            "directory": self.directory,
            "manifest": self.manifest,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Pending:
        raw = json.loads(data)
        return cls(
            job=jobs.check_job_id(str(raw["job"])),
            username=str(raw["username"]),
            parts=[str(p) for p in raw["parts"]],
            directory=bool(raw["directory"]),
            manifest={str(k): (str(v[0]), int(v[1]), int(v[2]), int(v[3])) for k, v in raw["manifest"].items()},
        )


class Processor:
    """Queues jobs for paths of homes and removes the paths once their jobs succeeded."""

    def __init__(
        self,
        *,
        spool_dir: Path,
        state_dir: Path,
        limit: int,
        store: JobStore,
        notifier: Notifier,
        homes: SshGateway,
        metrics: SshMetrics,
    ) -> None:
        self.spool_dir = spool_dir
        self.pending_dir = state_dir / "pending"
        self.limit = limit
        self.store = store
        self.notifier = notifier
        self.homes = homes
        self.metrics = metrics
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def process(self, username: str, path: str, *, remove: bool) -> Processed:
        """Spool the path and queue its job; with ``remove``, watch the job to remove the path after."""
        home = self.homes.home(username)
        parts = split_path(path)
        packed = await asyncio.to_thread(pack, home.root, parts, username, self.spool_dir, self.limit)
        job = jobs.new_job_id()
        final = spool.job_path(self.spool_dir, job)
        try:
            header = spool.UploadHeader.parse(packed.name, "", "", None, self.limit)
            os.rename(packed.spool, final)
            await self.store.submit(
                job,
                path=str(final),
                size=packed.size,
                hash_hex=packed.hash_hex,
                name=header.name,
                ext=header.ext,
                content_type=header.content_type,
                identity=f"ssh:{username}",
                remove=True,  # the spool copy, not the home's path
            )
        except BaseException:
            for p in (packed.spool, final):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            raise
        self.metrics.processed.inc(kind="folder" if packed.directory else "file")
        log.info(
            "Process queued a job",
            extra={"user": username, "path": packed.rel or "/", "job": job, "size": packed.size, "remove": remove},
        )
        if remove:
            pending = Pending(job, username, parts, packed.directory, packed.manifest)
            self.pending_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            await asyncio.to_thread(write_atomic, self._pending_path(job), pending.to_json())
            self._watch(pending)
        return Processed(job=job, rel=packed.rel, directory=packed.directory, name=header.name)

    def _pending_path(self, job: str) -> Path:
        return self.pending_dir / f"{job}.json"

    def resume(self) -> int:
        """Watch again the jobs whose removal was pending when the service stopped."""
        if not self.pending_dir.is_dir():
            return 0
        n = 0
        for entry in sorted(self.pending_dir.glob("*.json")):
            try:
                pending = Pending.from_json(entry.read_bytes())
            except (OSError, ValueError, KeyError, TypeError, IndexError, errors.InvalidInput) as exc:
                log.warning("dropping unreadable pending removal %s: %s", entry.name, exc)
                entry.unlink(missing_ok=True)
                continue
            self._watch(pending)
            n += 1
        return n

    def _watch(self, pending: Pending) -> None:
        if pending.job not in self._tasks:
            task = asyncio.create_task(self._follow(pending), name=f"ssh-remove-{pending.job}")
            self._tasks[pending.job] = task
            task.add_done_callback(lambda _t: self._tasks.pop(pending.job, None))

    @property
    def watching(self) -> list[str]:
        return sorted(self._tasks)

    async def _follow(self, pending: Pending) -> None:
        delay = 0.5
        while True:
            try:
                job, timed_out = await self.notifier.wait(self.store, pending.job, WAIT_STEP)
            except errors.NotFound:
                log.warning("job %s is unknown (expired?); not removing its path", pending.job)
                self._forget(pending.job)
                return
            except errors.StoreFailed as exc:
                log.warning("cannot follow job %s (%s); retrying in %.1fs", pending.job, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if not timed_out:
                break
        path = "/".join(pending.parts) or "/"
        if job.state != jobs.DONE:
            log.info("job %s ended %s; keeping %s", pending.job, job.state, path, extra={"user": pending.username})
            self._forget(pending.job)
            return
        try:
            home = self.homes.home(pending.username)
        except errors.NotFound:
            self._forget(pending.job)
            return
        removed = await asyncio.to_thread(
            remove_processed, home.root, pending.parts, pending.directory, pending.manifest
        )
        home.invalidate()
        self.metrics.removed.inc()
        log.info(
            "removed %s after job %s (%d entries)",
            path,
            pending.job,
            removed,
            extra={"user": pending.username, "file_id": job.file_id},
        )
        self._forget(pending.job)

    def _forget(self, job: str) -> None:
        self._pending_path(job).unlink(missing_ok=True)

    async def stop(self) -> None:
        """Stop watching (pending removals stay on disk and resume at the next start)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
