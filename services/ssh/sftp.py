"""The SFTP (and SCP) server of a home: chroot with symlink containment, quota, per-user statvfs.

asyncssh's ``chroot=`` maps client paths under the home, but follows symlinks
that already exist there (tried: a link pointing outside let a client read,
put and rename files outside its home). So every path operation checks
that the real path of the parent folder is inside the home, and the
operations that follow the last component (open, stat, setstat, scandir)
check the real path of the whole path too. Creating symlinks and hard links
is refused. Writes count against the home's maximum size and a write
that does not fit fails with "quota exceeded: home is N of M bytes".

Two fixes for stock clients: ``exit`` sends exit status 0 (OpenSSH scp in
SFTP mode exits 1 without it) and FXP_WRITE ignores bytes after the data
(rclone's Go client pads a short last write to 32 KiB). The latter replaces a
handler in asyncssh's private table: asyncssh is pinned (2.24.1) for it.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, cast

import asyncssh
from asyncssh.constants import FXF_APPEND, FXF_CREAT, FXF_EXCL, FXF_READ, FXF_TRUNC, FXF_WRITE, FXP_WRITE
from asyncssh.packet import SSHPacket

from services.ssh.accounts import Home, QuotaExceeded
from services.ssh.audit import SshMetrics, refused

log = logging.getLogger(__name__)


class HomeSFTPServer(asyncssh.SFTPServer):
    """SFTP confined to one home: no way out through ``..``, absolute paths or symlinks."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], home: Home, metrics: SshMetrics) -> None:
        super().__init__(chan, chroot=os.fsencode(home.root))
        self.home = home
        self.metrics = metrics
        self._root = os.fsencode(os.path.realpath(home.root))
        peer = chan.get_extra_info("peername") or ("", 0)
        self._peer = f"{peer[0]}:{peer[1]}"

    # ----------------------------------------------------------- containment

    def _inside(self, real: bytes) -> bool:
        return real == self._root or real.startswith(self._root + b"/")

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
        if pflags & FXF_TRUNC and before is not None and stat.S_ISREG(before.st_mode) and before.st_nlink == 1:
            self.home.release(before.st_size)
        return file_obj

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs) -> object:
        """SFTPv5+ opens are not offered (the server speaks version 3)."""
        raise asyncssh.SFTPOpUnsupported("SFTP version 5+ opens are not supported")

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        """Read with pread (no shared file position)."""
        return os.pread(cast(io.FileIO, file_obj).fileno(), size, offset)

    def write(self, file_obj: object, offset: int, data: bytes) -> int | Awaitable[int]:
        """Write, counting the growth of the file against the home's maximum size."""
        f = cast(io.FileIO, file_obj)
        fd = f.fileno()
        size = os.fstat(fd).st_size
        append = "a" in f.mode
        growth = (size if append else offset) + len(data) - size
        if growth > 0:
            try:
                self.home.reserve(growth)
            except QuotaExceeded as exc:
                if self.home.recount_due:  # files removed behind our back (maint, Process) free room
                    return self._write_after_recount(f, offset, data)
                self._quota_refused(exc)
        try:
            _write_all(fd, data, None if append else offset)
        except BaseException:
            self.home.release(growth)
            raise
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
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            self.home.release(st.st_size)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        """Rename over an existing file: its bytes are freed."""
        old, new = self.map_path(oldpath), self.map_path(newpath)
        try:
            target: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            target = None
        src = os.lstat(old)
        os.replace(old, new)
        if (
            target is not None
            and stat.S_ISREG(target.st_mode)
            and target.st_nlink == 1
            and (target.st_dev, target.st_ino) != (src.st_dev, src.st_ino)
        ):
            self.home.release(target.st_size)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Create a folder; the owner keeps rwx so the gateway can always clean up."""
        os.mkdir(self.map_path(path), _dir_mode(attrs.permissions))

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
        growth = 0 if attrs.size is None else attrs.size - st.st_size
        if growth > 0:
            try:
                self.home.reserve(growth)
            except QuotaExceeded as exc:
                self._quota_refused(exc)
        try:
            apply()  # asyncssh's own setstat: synchronous
        except BaseException:
            self.home.release(growth)
            raise
        if growth < 0 and st.st_nlink == 1:
            self.home.release(-growth)

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


# ------------------------------------------------------- rclone's padded writes


async def _process_write_padded(self: asyncssh.sftp.SFTPServerHandler, packet: SSHPacket) -> object:
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


def install_write_padding_fix() -> None:
    """Replace asyncssh's FXP_WRITE handler (idempotent)."""
    asyncssh.sftp.SFTPServerHandler._packet_handlers[FXP_WRITE] = _process_write_padded
