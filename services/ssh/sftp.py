"""The SFTP (and SCP) server of a home: chroot with symlink containment, quota, per-user statvfs.

asyncssh's ``chroot=`` maps client paths under the home, but follows symlinks
that already exist there (tried: a link pointing outside let a client read,
put and rename files outside its home). So every path operation checks
that the real path of the parent folder is inside the home, and the
operations that follow the last component (open, stat, setstat, scandir)
check the real path of the whole path too. Creating symlinks and hard links
is refused; so is a path with a NUL byte.

What a home holds (services/ssh/home.py) is kept up to date: a write is
checked first against the blocks it can add (past the end of the file, or
holes it fills) and counted afterwards with the blocks the file really
gained; a write that does not fit fails with "quota exceeded: home holds N of
M bytes". New files and folders count against the entry limit; a file removed
while a handle keeps it open counts until the last handle closes.

The server protects itself: a READ returns at most ``MAX_READ`` bytes (as
OpenSSH), a session holds at most ``MAX_HANDLES`` open files and folders, and
it stops reading requests while ``REPLY_BUFFER`` bytes of replies wait for the
client (so a client that pipelines reads without reading the answers holds a
bounded amount of memory). Errors name paths as the client sees them (SCP
puts them in its messages), never the server's.

Fixes for stock clients: ``exit`` sends exit status 0 (OpenSSH scp in SFTP
mode exits 1 without it) and FXP_WRITE ignores bytes after the data (rclone's
Go client pads a short last write to 32 KiB). These and the limits above
replace handlers in asyncssh's private table: asyncssh is pinned (2.24.1) for it.
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import asyncssh
from asyncssh.constants import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READ,
    FXP_WRITE,
)
from asyncssh.packet import SSHPacket
from asyncssh.sftp import MAX_SFTP_PACKET_LEN, MAX_SFTP_WRITE_LEN, SFTPServerHandler

from services.common.homes import blocks_of, ident, inside
from services.ssh.audit import SshMetrics, refused
from services.ssh.home import Home, QuotaExceeded

log = logging.getLogger(__name__)

MAX_READ = 256 * 1024  # bytes one READ returns at most (OpenSSH's sftp-server caps the same)
MAX_HANDLES = 256  # open files and folders per SFTP session
REPLY_BUFFER = 2 * 1024 * 1024  # replies waiting for the client before a session stops reading requests


class HomeSFTPServer(asyncssh.SFTPServer):
    """SFTP confined to one home: no way out through ``..``, absolute paths or symlinks."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], home: Home, metrics: SshMetrics) -> None:
        super().__init__(chan, chroot=os.fsencode(home.root))
        self.home = home
        self.metrics = metrics
        self._root = os.fsencode(os.path.realpath(home.root))
        self._roots = sorted({self._root, os.fsencode(home.root)}, key=len, reverse=True)
        peer = chan.get_extra_info("peername") or ("", 0)
        self._peer = f"{peer[0]}:{peer[1]}"
        chan.set_write_buffer_limits(high=REPLY_BUFFER)

    def client_path(self, local: str | bytes) -> bytes:
        """A local path as the client sees it ("/..." in its home); "?" for anything outside."""
        raw = os.fsencode(local)
        for root in self._roots:
            if raw == root:
                return b"/"
            if raw.startswith(root + b"/"):
                return raw[len(root) :]
        return b"?"

    def hide_paths(self, exc: OSError) -> OSError:
        """``exc`` with its file names as the client sees them (SCP shows them; they must not be the server's)."""
        if exc.filename is not None:
            exc.filename = self.client_path(exc.filename)
        if exc.filename2 is not None:
            exc.filename2 = self.client_path(exc.filename2)
        return exc

    # ----------------------------------------------------------- containment

    def _inside(self, real: bytes) -> bool:
        return inside(self._root, real)

    def _deny(self, op: str, path: bytes, why: str) -> NoReturn:
        refused(
            self.metrics,
            "escape",
            why,
            user=self.home.username,
            peer=self._peer,
            op=op,
            path=path.decode(errors="replace"),
        )
        raise asyncssh.SFTPPermissionDenied(f"permission denied: {why}")

    def map_path(self, path: bytes) -> bytes:
        """The local path under the home; refused when its folder is reached through a symlink out."""
        if b"\0" in path:
            raise asyncssh.SFTPInvalidFilename("the path holds a NUL byte")
        mapped = super().map_path(path).rstrip(b"/") or b"/"
        if mapped == self._root:
            return mapped
        if not self._inside(os.path.realpath(posixpath.dirname(mapped))):
            self._deny("path", path, "the path leads outside the home through a symlink")
        return mapped

    def _followed(self, op: str, path: bytes) -> bytes:
        """``map_path`` for operations that follow the last component: its target must be inside too."""
        mapped = self.map_path(path)
        if not self._inside(os.path.realpath(mapped)):
            self._deny(op, path, "the path is a symlink that points outside the home")
        return mapped

    # ----------------------------------------------------------------- files

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        """Open a regular file in the home (O_NOFOLLOW unless the last part is a symlink checked above)."""
        mapped = self._followed("open", path)
        flags, mode = _open_flags(pflags)
        try:
            before: os.stat_result | None = os.lstat(mapped)
        except FileNotFoundError:
            before = None
        if before is None or not stat.S_ISLNK(before.st_mode):
            flags |= os.O_NOFOLLOW  # a symlink planted after the check cannot redirect the open
        if before is None and flags & os.O_CREAT:
            try:
                self.home.check_entry()
            except QuotaExceeded as exc:
                self._quota_refused(exc)
        # O_NONBLOCK: a FIFO (rsync can make one) must not block the event loop; it is refused below.
        fd = os.open(mapped, flags | os.O_NONBLOCK | os.O_CLOEXEC, _file_mode(attrs.permissions))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise asyncssh.SFTPFailure("not a regular file")
            os.set_blocking(fd, True)
            file_obj = io.FileIO(fd, mode, closefd=True)
        except BaseException:
            os.close(fd)
            raise
        if before is None:
            self.home.changed(blocks_of(st), 1)
        elif flags & os.O_TRUNC and stat.S_ISREG(before.st_mode):
            self.home.changed(blocks_of(st) - blocks_of(before))
        self.home.opened(file_obj, st)
        return file_obj

    def close(self, file_obj: object) -> None:
        """Close a handle; a file removed while it was open stops counting with its last handle."""
        f = cast(io.FileIO, file_obj)
        try:
            self.home.closing(f)
        finally:
            f.close()

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs) -> object:
        """SFTPv5+ opens are not offered (the server speaks version 3)."""
        raise asyncssh.SFTPOpUnsupported("SFTP version 5+ opens are not supported")

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        """Read with pread (no shared file position), at most MAX_READ bytes whatever the client asks."""
        data = os.pread(cast(io.FileIO, file_obj).fileno(), min(size, MAX_READ), offset)
        self.metrics.bytes_read.inc(len(data))
        return data

    def write(self, file_obj: object, offset: int, data: bytes) -> int | Awaitable[int]:
        """Write, checking first the blocks it can add, counting afterwards the blocks it did."""
        f = cast(io.FileIO, file_obj)
        fd = f.fileno()
        before = os.fstat(fd)
        append = "a" in f.mode
        start = before.st_size if append else offset
        end = start + len(data)
        home = self.home
        try:
            home.check_size(end)
            need = _new_blocks(fd, before, start, end)
            if need > 0 and home.held + need > home.max_bytes and home.recount_due:
                return self._write_after_recount(f, offset, data)  # files removed elsewhere (maint, Process) free room
            home.check(need)
        except QuotaExceeded as exc:
            self._quota_refused(exc)
        try:
            _write_all(fd, data, None if append else offset)
        finally:
            grown = blocks_of(os.fstat(fd)) - blocks_of(before)
            if grown:
                home.changed(grown)
        self.metrics.bytes_written.inc(len(data))
        return len(data)

    async def _write_after_recount(self, f: io.FileIO, offset: int, data: bytes) -> int:
        await self.home.refresh(force=True)
        result = self.write(f, offset, data)
        assert isinstance(result, int)  # a fresh count is not due again
        return result

    def _quota_refused(self, exc: QuotaExceeded) -> NoReturn:
        self.metrics.quota.inc()
        log.info("write refused: %s", exc, extra={"user": self.home.username, "peer": self._peer})
        raise asyncssh.SFTPQuotaExceeded(str(exc)) from None

    def remove(self, path: bytes) -> None:
        """Remove a file or symlink (the symlink itself, never its target)."""
        mapped = self.map_path(path)
        st = os.lstat(mapped)
        os.remove(mapped)
        self.home.removed(st)

    def rmdir(self, path: bytes) -> None:
        """Remove an empty folder (never the home itself)."""
        mapped = self.map_path(path)
        if mapped == self._root:
            self._deny("rmdir", path, "the home folder cannot be removed")
        st = os.lstat(mapped)
        os.rmdir(mapped)
        self.home.removed(st)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        """Rename over an existing file: what it held goes."""
        old, new = self.map_path(oldpath), self.map_path(newpath)
        try:
            target: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            target = None
        src = os.lstat(old)
        os.replace(old, new)
        if target is not None and ident(target) != ident(src):
            self.home.removed(target)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Create a folder (counted); the owner keeps rwx so the gateway can always clean up."""
        mapped = self.map_path(path)
        try:
            self.home.check_entry()
            self.home.check(os.statvfs(mapped.rsplit(b"/", 1)[0] or b"/").f_bsize)
        except QuotaExceeded as exc:
            self._quota_refused(exc)
        os.mkdir(mapped, _dir_mode(attrs.permissions))
        self.home.changed(blocks_of(os.lstat(mapped)), 1)

    # ------------------------------------------------------------ attributes

    def stat(self, path: bytes) -> os.stat_result:
        return os.stat(self._followed("stat", path))

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        mapped = self._followed("setstat", path)
        self._with_attrs(path, mapped, attrs, lambda: super(HomeSFTPServer, self).setstat(path, attrs))

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        mapped = self._followed("lsetstat", path)
        self._with_attrs(path, mapped, attrs, lambda: super(HomeSFTPServer, self).lsetstat(path, attrs))

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        fd = cast(io.FileIO, file_obj).fileno()
        self._with_attrs(b"<open file>", fd, attrs, lambda: super(HomeSFTPServer, self).fsetstat(file_obj, attrs))

    def _with_attrs(
        self, path: bytes, target: bytes | int, attrs: asyncssh.SFTPAttrs, apply: Callable[[], object]
    ) -> None:
        """Apply ``attrs`` with ownership ignored, modes kept owner-usable, size changes counted."""
        attrs.uid = attrs.gid = None
        attrs.owner = attrs.group = None
        st = os.stat(target)
        if attrs.permissions is not None:
            if target == self._root:
                self._deny("setstat", path, "the home folder's permissions are fixed")
            is_dir = stat.S_ISDIR(st.st_mode)
            attrs.permissions = _dir_mode(attrs.permissions) if is_dir else _file_mode(attrs.permissions)
        if attrs.size is not None:
            try:
                self.home.check_size(attrs.size)
            except QuotaExceeded as exc:
                self._quota_refused(exc)
        try:
            apply()  # asyncssh's own setstat: synchronous
        finally:
            if attrs.size is not None:
                grown = blocks_of(os.stat(target)) - blocks_of(st)
                if grown:
                    self.home.changed(grown)

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        self._followed("scandir", path)
        async for name in super().scandir(path):
            yield name

    def readlink(self, path: bytes) -> bytes:
        """The link's target as the client sees it; links that leave the home read as missing."""
        mapped = self.map_path(path)
        target = os.readlink(mapped)
        real = os.path.realpath(posixpath.join(posixpath.dirname(mapped), target))
        if not self._inside(real):
            raise asyncssh.SFTPNoSuchFile("the link points outside the home")
        return self.reverse_map_path(real)

    def symlink(self, oldpath: bytes, newpath: bytes) -> NoReturn:
        refused(
            self.metrics,
            "symlink",
            "symlinks cannot be created in SSH homes",
            user=self.home.username,
            peer=self._peer,
            path=newpath.decode(errors="replace"),
        )
        raise asyncssh.SFTPOpUnsupported("symlinks cannot be created in SSH homes")

    def link(self, oldpath: bytes, newpath: bytes) -> NoReturn:
        refused(
            self.metrics,
            "link",
            "hard links cannot be created in SSH homes",
            user=self.home.username,
            peer=self._peer,
            path=newpath.decode(errors="replace"),
        )
        raise asyncssh.SFTPOpUnsupported("hard links cannot be created in SSH homes")

    # ------------------------------------------------------- space and exit

    def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        self.map_path(path)
        return self._vfs()

    def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        return self._vfs()

    def _vfs(self) -> asyncssh.SFTPVFSAttrs:
        """The file system as this user sees it: the home's maximum size, and what is left of it."""
        real = os.statvfs(self._root)
        frsize = real.f_frsize or 4096
        free = min(self.home.free, real.f_bavail * frsize)
        return asyncssh.SFTPVFSAttrs(
            bsize=real.f_bsize or frsize,
            frsize=frsize,
            blocks=self.home.max_bytes // frsize,
            bfree=free // frsize,
            bavail=free // frsize,
            files=real.f_files,
            ffree=real.f_ffree,
            favail=real.f_favail,
            fsid=0,
            flags=real.f_flag,
            namemax=real.f_namemax,
        )

    def exit(self) -> None:
        """End of an SFTP session: send exit status 0 (OpenSSH scp in SFTP mode exits 1 without one)."""
        chan = self.channel
        if chan.get_subsystem() == "sftp":  # SCP sessions send their own status
            chan.exit(0)


def _new_blocks(fd: int, st: os.stat_result, start: int, end: int) -> int:
    """Bytes of new blocks a write of [start, end) can allocate: past the file's end, and holes it covers."""
    bs = st.st_blksize or 4096
    size = st.st_size
    need = 0
    if end > size:
        first = max(start, size)  # a gap between the end and start stays a hole
        need = -(-end // bs) * bs - max(-(-size // bs) * bs, first // bs * bs)
    overlap = min(end, size) - start
    if overlap > 0 and blocks_of(st) < size:  # the file has holes: does this write fill some?
        try:
            hole = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            hole = start
        if hole < start + overlap:
            need += -(-overlap // bs) * bs + bs
    return max(0, need)


def _write_all(fd: int, data: bytes, offset: int | None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def _open_flags(pflags: int) -> tuple[int, str]:
    """os.open flags and an io.FileIO mode for SFTPv3 open flags (as asyncssh maps them)."""
    append = bool(pflags & FXF_APPEND)
    read, write = bool(pflags & FXF_READ), bool(pflags & FXF_WRITE) or append
    flags = os.O_RDWR if read and write else os.O_WRONLY if write else os.O_RDONLY
    if append:
        flags |= os.O_APPEND
    if pflags & FXF_CREAT:
        flags |= os.O_CREAT
    if pflags & FXF_TRUNC:
        flags |= os.O_TRUNC
    if pflags & FXF_EXCL:
        flags |= os.O_EXCL
    # io.FileIO on a descriptor only takes readable/writable/append from the mode (it never truncates)
    if append:
        mode = "a+b" if read else "ab"
    elif write:
        mode = "r+b" if read else "wb"
    else:
        mode = "rb"
    return flags, mode


def _file_mode(permissions: int | None) -> int:
    """A file mode without setuid/setgid/sticky, always readable and writable by the gateway."""
    return (0o666 if permissions is None else stat.S_IMODE(permissions) & 0o777) | 0o600


def _dir_mode(permissions: int | None) -> int:
    """A folder mode without special bits, always usable by the gateway (owner rwx)."""
    return (0o777 if permissions is None else stat.S_IMODE(permissions) & 0o777) | 0o700


# ------------------------------------------------ asyncssh's handlers, bounded

_HANDLERS: dict[int | bytes, Any] = dict(SFTPServerHandler._packet_handlers)  # asyncssh's own, before any change
_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[object]])


async def _process_write_padded(self: SFTPServerHandler, packet: SSHPacket) -> object:
    """FXP_WRITE that ignores trailing bytes after the data string, as OpenSSH's sftp-server does."""
    handle = packet.get_string()
    offset = packet.get_uint64()
    data = packet.get_string()
    # Go's sftp client pads a short last write to its 32 KiB buffer; the padding is not data.
    file_obj = self._file_handles.get(handle)
    if not file_obj:
        raise asyncssh.SFTPInvalidHandle("Invalid file handle")
    result = self._server.write(file_obj, offset, data)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _process_read_paced(self: SFTPServerHandler, packet: SSHPacket) -> object:
    """FXP_READ once the replies already waiting for the client are under REPLY_BUFFER."""
    writer = self._writer
    if writer is not None:
        await writer.drain()
    return await _HANDLERS[FXP_READ](self, packet)


def _capped(original: _Handler) -> _Handler:
    """An open handler that refuses a handle past MAX_HANDLES in one session."""

    @functools.wraps(original)
    async def handler(self: SFTPServerHandler, packet: SSHPacket) -> object:
        if len(self._file_handles) + len(self._dir_handles) >= MAX_HANDLES:
            raise asyncssh.SFTPFailure(f"too many open files and folders in this session (at most {MAX_HANDLES})")
        return await original(self, packet)

    return cast(_Handler, handler)


async def _process_limits(self: SFTPServerHandler, packet: SSHPacket) -> asyncssh.SFTPLimits:
    """limits@openssh.com: the read cap and the handle cap of this server."""
    packet.check_end()
    return asyncssh.SFTPLimits(MAX_SFTP_PACKET_LEN, MAX_READ, MAX_SFTP_WRITE_LEN, MAX_HANDLES)


def install_sftp_fixes() -> None:
    """Replace asyncssh's FXP_WRITE, FXP_READ, open and limits handlers (idempotent)."""
    table = SFTPServerHandler._packet_handlers
    table[FXP_WRITE] = _process_write_padded
    table[FXP_READ] = _process_read_paced
    table[FXP_OPEN] = _capped(_HANDLERS[FXP_OPEN])
    table[FXP_OPENDIR] = _capped(_HANDLERS[FXP_OPENDIR])
    table[b"limits@openssh.com"] = _process_limits


# ------------------------------------------------------- server paths out of errors

_PATH_METHODS = (
    "open", "close", "remove", "rmdir", "rename", "posix_rename", "mkdir", "stat", "lstat", "setstat", "lsetstat",
    "fsetstat", "readlink", "realpath", "statvfs",
)  # fmt: skip


def _hiding(name: str) -> None:
    original = getattr(HomeSFTPServer, name)

    @functools.wraps(original)
    def method(self: HomeSFTPServer, *args: Any) -> Any:
        try:
            result = original(self, *args)
        except OSError as exc:
            raise self.hide_paths(exc) from None
        if inspect.isawaitable(result):
            return _awaited(self, result)
        return result

    setattr(HomeSFTPServer, name, method)


async def _awaited(server: HomeSFTPServer, result: Awaitable[Any]) -> Any:
    try:
        return await result
    except OSError as exc:
        raise server.hide_paths(exc) from None


for _name in _PATH_METHODS:
    _hiding(_name)
_scandir = HomeSFTPServer.scandir


async def _scandir_hiding(self: HomeSFTPServer, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
    try:
        async for name in _scandir(self, path):
            yield name
    except OSError as exc:
        raise self.hide_paths(exc) from None


HomeSFTPServer.scandir = _scandir_hiding  # type: ignore[method-assign]
