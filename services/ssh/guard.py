"""rsync under watch: its processes ask this service before they create or grow anything.

rsync's server side writes files in its own processes, outside the SFTP hooks.
It starts through services/ssh/jail.py, which installs a seccomp filter that
stops each process of the transfer at every call that opens a file for
writing, makes, removes or renames an entry, changes a mode or sets an
extended attribute, and hands this service the filter's listener before it
execs rrsync. ``Watch`` answers the stopped calls on the event loop (Linux
5.14 or later, x86_64 or aarch64; ``probe`` says whether this kernel can):

* open for writing: this service opens the file itself (only inside the home,
  never through a symlink at the last component, never a FIFO or device), asks
  the home for a ``Grant`` and gives the descriptor to rsync
  (SECCOMP_IOCTL_NOTIF_ADDFD). The grant sets the process's RLIMIT_FSIZE: the
  kernel refuses any write past the file's share of the free space, rsync
  reports "File too large" and stops. No room at all: "Disk quota exceeded".
* mkdir: made by this service (mode without set-id or sticky bits), counted;
  symlink, link: counted, then run. "Disk quota exceeded" past the entry limit
  (or, for a folder, when the home is full).
* chmod: the home's own mode is kept (the call is answered "done" without
  effect); a mode with set-id or sticky bits is applied by this service without
  them; other modes run as asked. fchmod of a file this service opened for
  rsync (its descriptor numbered from GRANTED_FDS up) runs without a stop.
* unlink, rmdir, rename: done by this service, so what they free (a file
  replaced by rsync's new copy, --delete) is counted at once, exactly.
* setxattr: only ``user.*`` attributes are stored (security.*, trusted.* and
  ACLs are answered "done" without effect); refused while the home is over.
* In the filter itself: chown and its relatives succeed without effect (no
  foreign owners), fallocate fails with EOPNOTSUPP (it can allocate past the
  size limit), mknod, io_uring and open_by_handle_at fail with EPERM, openat2
  with ENOSYS (callers fall back to openat). Everything else runs untouched.

A write outside the home (rsync is confined by rrsync; this is the second line)
is refused with EACCES and logged, except to character devices (/dev/null).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import platform
import posixpath
import resource
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

from services.common import homes
from services.ssh.home import DIR_ESTIMATE, Home, QuotaExceeded

log = logging.getLogger(__name__)

# --------------------------------------------------------------- constants

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_ADDFD_FLAG_SEND = 1 << 1
# Files this service opens for rsync get descriptor numbers from here up: a fchmod of one of them (rsync sets
# each file's mode twice) runs without a stop, as it cannot be the home itself. Below the usual soft
# RLIMIT_NOFILE (1024); where rsync's limit is lower, they get the lowest free number (and a stop each).
GRANTED_FDS = 512
GRANTED_FDS_SPAN = 256
X32_SYSCALL_BIT = 0x40000000


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


NOTIF_SIZE = 80  # struct seccomp_notif: id, pid, flags, seccomp_data (nr, arch, ip, args[6])
NOTIF_RECV = _ioc(3, 0, NOTIF_SIZE)
NOTIF_SEND = _ioc(3, 1, 24)
NOTIF_ID_VALID = _ioc(1, 2, 8)
NOTIF_ADDFD = _ioc(1, 3, 24)

# BPF (classic): load word, jump if equal / greater-or-equal / bits set, return
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
SPECIAL_BITS = 0o7000  # set-uid, set-gid, sticky
SETFL_BITS = os.O_APPEND | getattr(os, "O_DIRECT", 0) | getattr(os, "O_NOATIME", 0)  # what F_SETFL sets, but O_NONBLOCK
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
AT_FDCWD = -100
AT_REMOVEDIR = 0x200
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_EMPTY_PATH = 0x1000
PATH_MAX = 4096

# the calls that matter, per architecture (absent ones do not exist there)
_X86_64 = {
    "open": 2, "creat": 85, "openat": 257, "openat2": 437, "mkdir": 83, "mkdirat": 258, "symlink": 88,
    "symlinkat": 266, "link": 86, "linkat": 265, "mknod": 133, "mknodat": 259, "chmod": 90, "fchmod": 91,
    "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "setxattr": 188,
    "lsetxattr": 189, "fsetxattr": 190, "setxattrat": 463, "fallocate": 285, "io_uring_setup": 425,
    "open_by_handle_at": 304, "seccomp": 317, "rename": 82, "renameat": 264, "renameat2": 316, "unlink": 87,
    "unlinkat": 263, "rmdir": 84,
}  # fmt: skip
_AARCH64 = {
    "openat": 56, "openat2": 437, "mkdirat": 34, "symlinkat": 36, "linkat": 37, "mknodat": 33, "fchmod": 52,
    "fchmodat": 53, "fchmodat2": 452, "fchown": 55, "fchownat": 54, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7,
    "setxattrat": 463, "fallocate": 47, "io_uring_setup": 425, "open_by_handle_at": 265, "seccomp": 277,
    "renameat": 38, "renameat2": 276, "unlinkat": 35,
}  # fmt: skip
_ARCHES = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}
ARCH, SYSCALLS = _ARCHES.get(platform.machine(), (0, {}))
NAMES = {nr: name for name, nr in SYSCALLS.items()}

# what the filter does with each call: ("notify", 0), ("errno", code), ("flags", index of the open flags argument:
# notify when it asks for writing), ("below", index of a descriptor argument: notify when it is below GRANTED_FDS,
# where rsync's own descriptors are: those this service opened for it are given numbers from GRANTED_FDS up)
_RULES: dict[str, tuple[str, int]] = {
    "open": ("flags", 1), "openat": ("flags", 2), "creat": ("notify", 0), "openat2": ("errno", errno.ENOSYS),
    "mkdir": ("notify", 0), "mkdirat": ("notify", 0), "symlink": ("notify", 0), "symlinkat": ("notify", 0),
    "link": ("notify", 0), "linkat": ("notify", 0), "chmod": ("notify", 0), "fchmod": ("below", 0),
    "fchmodat": ("notify", 0), "fchmodat2": ("notify", 0), "setxattr": ("notify", 0), "lsetxattr": ("notify", 0),
    "fsetxattr": ("notify", 0), "setxattrat": ("notify", 0), "chown": ("errno", 0), "fchown": ("errno", 0),
    "lchown": ("errno", 0), "fchownat": ("errno", 0), "fallocate": ("errno", errno.EOPNOTSUPP),
    "mknod": ("errno", errno.EPERM), "mknodat": ("errno", errno.EPERM), "io_uring_setup": ("errno", errno.EPERM),
    "open_by_handle_at": ("errno", errno.EPERM), "rename": ("notify", 0), "renameat": ("notify", 0),
    "renameat2": ("notify", 0), "unlink": ("notify", 0), "unlinkat": ("notify", 0), "rmdir": ("notify", 0),
}  # fmt: skip


def _umask(pid: int) -> int:
    """The process's umask (0o022 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program() -> bytes:
    """The BPF filter for this architecture (empty when unsupported)."""
    if not SYSCALLS:
        return b""
    out = [_ins(LD_W_ABS, 0, 0, 4), _ins(JEQ_K, 1, 0, ARCH), _ins(RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)]
    out.append(_ins(LD_W_ABS, 0, 0, 0))
    if platform.machine() == "x86_64":  # the x32 ABI numbers its calls differently: not for rsync
        out += [_ins(JGE_K, 0, 1, X32_SYSCALL_BIT), _ins(RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    for name, (action, value) in _RULES.items():
        nr = SYSCALLS.get(name)
        if nr is None:
            continue
        if action == "flags":
            low_word = 16 + 8 * value  # seccomp_data.args[value], little-endian
            out += [
                _ins(JEQ_K, 0, 4, nr),
                _ins(LD_W_ABS, 0, 0, low_word),
                _ins(JSET_K, 0, 1, WRITE_FLAGS),
                _ins(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
                _ins(RET_K, 0, 0, SECCOMP_RET_ALLOW),
            ]
        elif action == "below":
            low_word = 16 + 8 * value
            out += [
                _ins(JEQ_K, 0, 4, nr),
                _ins(LD_W_ABS, 0, 0, low_word),
                _ins(JGE_K, 1, 0, GRANTED_FDS),  # unsigned: a negative descriptor is high, and runs (EBADF)
                _ins(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
                _ins(RET_K, 0, 0, SECCOMP_RET_ALLOW),
            ]
        elif action == "notify":
            out += [_ins(JEQ_K, 0, 1, nr), _ins(RET_K, 0, 0, SECCOMP_RET_USER_NOTIF)]
        else:
            out += [_ins(JEQ_K, 0, 1, nr), _ins(RET_K, 0, 0, SECCOMP_RET_ERRNO | value)]
    out.append(_ins(RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(out)


JAIL = Path(__file__).with_name("jail.py")
_PROGRAM = program()
_libc = ctypes.CDLL(None, use_errno=True)


def jail_command(sock: socket.socket) -> list[str]:
    """The argv prefix that runs a program under the filter, its listener sent over ``sock`` (pass its fd on)."""
    return [sys.executable, "-I", "-S", str(JAIL), str(sock.fileno()), _PROGRAM.hex(), "--"]


def _recv_listener(sock: socket.socket, wait: float) -> int:
    sock.settimeout(wait)
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    except TimeoutError:
        fds = []
    if not fds:
        raise OSError(errno.EPROTO, "the seccomp listener did not arrive (the filter could not be installed)")
    return fds[0]


async def receive_listener(sock: socket.socket, wait: float = 10.0) -> int:
    """The listener the jail sends before it execs the program."""
    return await asyncio.to_thread(_recv_listener, sock, wait)


def probe() -> str | None:
    """None when this kernel can watch rsync, else why not."""
    if not _PROGRAM:
        return f"unsupported architecture {platform.machine()!r} (x86_64 or aarch64)"
    true = shutil.which("true") or "/bin/true"
    parent, child = socket.socketpair()
    listener = -1
    try:
        with child:
            done = subprocess.run(
                [*jail_command(child), true], pass_fds=(child.fileno(),), capture_output=True, timeout=30, check=False
            )
        if done.returncode != 0:
            return done.stderr.decode(errors="replace").strip() or f"the jail exited {done.returncode}"
        listener = _recv_listener(parent, 5)
        try:  # ADDFD with SEND (Linux 5.14): a bogus id answers ENOENT, an older kernel EINVAL
            addfd = struct.pack("QIIII", 0xFFFFFFFF, SECCOMP_ADDFD_FLAG_SEND, 0, 0, 0)
            fcntl.ioctl(listener, NOTIF_ADDFD, bytearray(addfd))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                return f"SECCOMP_IOCTL_NOTIF_ADDFD with SEND is not available ({exc.strerror}); Linux 5.14 or later"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"seccomp user notification is not available: {exc}"
    finally:
        parent.close()
        if listener >= 0:
            os.close(listener)


# ------------------------------------------------------------------ watch


_NOTIF = struct.Struct("QIIiIQ6Q")  # struct seccomp_notif
_RESP = struct.Struct("QqiI")  # struct seccomp_notif_resp


class _Notif:
    __slots__ = ("args", "id", "nr", "pid", "recounted")

    def __init__(self, buf: bytearray) -> None:
        fields = _NOTIF.unpack(buf)
        self.id, self.pid, self.nr = fields[0], fields[1], fields[3]
        self.args = fields[6:]
        self.recounted = False

    def fd_arg(self, i: int) -> int:
        return ctypes.c_int(self.args[i] & 0xFFFFFFFF).value


class Watch:
    """Answers the stopped calls of one rsync process tree writing into one home."""

    def __init__(self, listener: int, home: Home, peer: str = "") -> None:
        self.fd = listener
        self.home = home
        self.peer = peer
        self.root = os.fsencode(os.path.realpath(home.root))
        root_st = os.stat(self.root)
        self.root_ident = homes.ident(root_st)
        self.quota_refusals = 0  # opens and folders refused for the quota or the entry limit
        self.outside = 0  # writes outside the home refused
        self.pids: set[int] = set()
        self._mem: dict[int, int] = {}  # pid -> its /proc/PID/mem, kept open
        self._fd_room: dict[int, int] = {}  # pid -> how many numbers from GRANTED_FDS up it can have
        self._reading = False
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self._ready)
        self._reading = True

    def close(self) -> None:
        """Stop answering (calls still stopped fail with ENOSYS) and count what rsync's files hold now."""
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._reading = False
        for task in self._tasks:
            task.cancel()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for mem in self._mem.values():
            os.close(mem)
        self._mem.clear()
        for pid in self.pids:
            self.home.finish(pid)
        self.pids.clear()

    # ------------------------------------------------------------- plumbing

    def _ready(self) -> None:
        buf = bytearray(NOTIF_SIZE)
        try:
            fcntl.ioctl(self.fd, NOTIF_RECV, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN) and not self._hung_up():
                return  # the caller went away before we read its call
            asyncio.get_running_loop().remove_reader(self.fd)
            self._reading = False  # every process of the tree is gone
            return
        self._dispatch(_Notif(buf))

    def _dispatch(self, n: _Notif) -> None:
        try:
            self._handle(n)
        except Exception:
            log.exception("answering rsync's %s failed", NAMES.get(n.nr, n.nr), extra=self._extra)
            self._answer(n, errno.EPERM)

    def _hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return any(ev & select.POLLHUP and not ev & select.POLLIN for _, ev in poller.poll(0))

    def _answer(self, n: _Notif, error: int = 0, *, proceed: bool = False) -> None:
        """Let the call run (``proceed``), or finish it with ``error`` (0: success without doing it)."""
        resp = _RESP.pack(n.id, 0, -error, SECCOMP_USER_NOTIF_FLAG_CONTINUE if proceed else 0)
        try:
            fcntl.ioctl(self.fd, NOTIF_SEND, resp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller was killed meanwhile
                raise

    def _valid(self, n: _Notif) -> bool:
        try:
            fcntl.ioctl(self.fd, NOTIF_ID_VALID, bytearray(struct.pack("Q", n.id)))
            return True
        except OSError:
            return False

    def _read_path(self, n: _Notif, addr: int) -> bytes | None:
        """The NUL-terminated string at ``addr`` in the caller's memory (None when it cannot be read)."""
        for fresh in (False, True):
            fd = self._mem.get(n.pid, -1)
            if fresh or fd < 0:
                if fd >= 0:
                    os.close(fd)  # opened before the process exec'd: its old memory is gone
                try:
                    fd = self._mem[n.pid] = os.open(f"/proc/{n.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self._mem.pop(n.pid, None)
                    return None
            out = b""
            try:
                while len(out) <= PATH_MAX:
                    chunk = os.pread(fd, 4096 - (addr + len(out)) % 4096, addr + len(out))
                    if not chunk:
                        break
                    end = chunk.find(b"\0")
                    if end >= 0:
                        return out + chunk[:end]
                    out += chunk
            except OSError:
                pass
        return None

    @staticmethod
    def _base(n: _Notif, dirfd: int, path: bytes) -> tuple[int, bytes]:
        """(descriptor of the folder ``path`` starts from as the caller sees it, ``path``); the caller closes it.

        An absolute path starts from "/" (the caller's /proc/self is its own /proc/<pid>), a relative
        one from the caller's cwd or ``dirfd``.
        """
        if path.startswith(b"/"):
            for alias in (b"/proc/self/", b"/proc/thread-self/"):
                if path.startswith(alias):
                    path = b"/proc/%d/" % n.pid + path[len(alias) :]
            return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), path
        where = f"/proc/{n.pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{n.pid}/fd/{dirfd}"
        return os.open(where, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), path

    def _parent(self, n: _Notif, dirfd: int, path: bytes) -> tuple[int, bytes, bool]:
        """(descriptor of the folder holding the path's last part, that part, whether the folder is in the home)."""
        base, path = self._base(n, dirfd, path)
        try:
            stripped = path.rstrip(b"/") or path
            parent, name = posixpath.split(stripped)
            if name in (b".", b".."):
                parent, name = stripped, b""
            pfd = os.open(parent or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=base)
        finally:
            os.close(base)
        real = os.readlink(b"/proc/self/fd/%d" % pfd)
        return pfd, name, self._inside(real)

    # -------------------------------------------------------------- answers

    def _handle(self, n: _Notif) -> None:
        name = NAMES.get(n.nr, "")
        a = n.args
        if name == "openat":
            self._open(n, n.fd_arg(0), a[1], a[2] & 0xFFFFFFFF, a[3] & 0o7777)
        elif name == "open":
            self._open(n, AT_FDCWD, a[0], a[1] & 0xFFFFFFFF, a[2] & 0o7777)
        elif name == "creat":
            self._open(n, AT_FDCWD, a[0], os.O_CREAT | os.O_WRONLY | os.O_TRUNC, a[1] & 0o7777)
        elif name == "mkdir":
            self._mkdir(n, AT_FDCWD, a[0], a[1] & 0o7777)
        elif name == "mkdirat":
            self._mkdir(n, n.fd_arg(0), a[1], a[2] & 0o7777)
        elif name in ("symlink", "link"):
            self._link(n, AT_FDCWD, a[1])
        elif name == "symlinkat":
            self._link(n, n.fd_arg(1), a[2])
        elif name == "linkat":
            self._link(n, n.fd_arg(2), a[3])
        elif name == "fchmod":
            self._chmod(n, n.fd_arg(0), None, a[1] & 0o7777, AT_EMPTY_PATH)
        elif name == "chmod":
            self._chmod(n, AT_FDCWD, a[0], a[1] & 0o7777, 0)
        elif name in ("fchmodat", "fchmodat2"):
            self._chmod(n, n.fd_arg(0), a[1], a[2] & 0o7777, a[3] & 0xFFFFFFFF if name == "fchmodat2" else 0)
        elif name in ("setxattr", "lsetxattr", "fsetxattr", "setxattrat"):
            self._setxattr(n, a[3] if name == "setxattrat" else a[1])
        elif name == "rename":
            self._rename(n, AT_FDCWD, a[0], AT_FDCWD, a[1], 0)
        elif name in ("renameat", "renameat2"):
            self._rename(n, n.fd_arg(0), a[1], n.fd_arg(2), a[3], a[4] & 0xFFFFFFFF if name == "renameat2" else 0)
        elif name in ("unlink", "rmdir"):
            self._unlink(n, AT_FDCWD, a[0], AT_REMOVEDIR if name == "rmdir" else 0)
        elif name == "unlinkat":
            self._unlink(n, n.fd_arg(0), a[1], a[2] & 0xFFFFFFFF)
        else:
            self._answer(n, proceed=True)

    def _refuse_quota(self, n: _Notif, why: str) -> None:
        """EDQUOT; first a recount when files were written since the last one (their old copies may be gone)."""
        if not n.recounted and (self.home.recount_due or self.home.written_since_count):
            n.recounted = True
            task = asyncio.create_task(self._recount_and_retry(n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self.quota_refusals += 1
        if self.quota_refusals == 1:
            log.info("rsync refused: %s", why, extra=self._extra)
        self._answer(n, errno.EDQUOT)

    async def _recount_and_retry(self, n: _Notif) -> None:
        await self.home.refresh(force=True)  # the caller waits, stopped in its call
        if self.fd >= 0:
            self._dispatch(n)

    def _refuse_outside(self, n: _Notif, path: bytes) -> None:
        self.outside += 1
        log.warning(
            "rsync tried to write outside the home: refused",
            extra={**self._extra, "call": NAMES.get(n.nr, n.nr), "path": path.decode(errors="replace")[:300]},
        )
        self._answer(n, errno.EACCES)

    def _path(self, n: _Notif, addr: int) -> bytes | None:
        """The path argument at ``addr``; None (and the call answered) when it cannot be read or is gone."""
        path = self._read_path(n, addr)
        if path is None or not self._valid(n):
            self._answer(n, errno.EFAULT if path is None else errno.ESRCH)
            return None
        if not path:
            self._answer(n, errno.ENOENT)
            return None
        return path

    def _located(self, n: _Notif, dirfd: int, addr: int, missing: int) -> tuple[int, bytes, bool, bytes] | None:
        """(parent descriptor, last part, whether the parent is in the home, path) of a path argument;
        None when the call was answered already (``missing``: the error when the parent cannot be opened)."""
        path = self._path(n, addr)
        if path is None:
            return None
        try:
            pfd, name, inside = self._parent(n, dirfd, path)
        except OSError as exc:
            self._answer(n, exc.errno or missing)
            return None
        return pfd, name, inside, path

    def _inside(self, real: bytes) -> bool:
        return homes.inside(self.root, real)

    def _open(self, n: _Notif, dirfd: int, addr: int, flags: int, mode: int) -> None:
        if flags & O_TMPFILE == O_TMPFILE:
            self._answer(n, errno.EOPNOTSUPP)
            return
        located = self._located(n, dirfd, addr, errno.EACCES)
        if located is None:
            return
        pfd, name, inside, path = located
        try:
            if not name:
                self._answer(n, errno.EISDIR)
                return
            if not inside:
                try:
                    target = os.stat(name, dir_fd=pfd)
                except OSError:
                    target = None
                if target is not None and stat.S_ISCHR(target.st_mode):
                    self._answer(n, proceed=True)  # /dev/null and the like
                else:
                    self._refuse_outside(n, path)
                return
            self._open_inside(n, pfd, name, flags, mode)
        finally:
            os.close(pfd)

    def _open_inside(self, n: _Notif, pfd: int, name: bytes, flags: int, mode: int) -> None:
        try:
            before: os.stat_result | None = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            before = None
        if before is None:
            if flags & os.O_CREAT:
                try:
                    self.home.check_entry()
                except QuotaExceeded as exc:
                    self._refuse_quota(n, str(exc))
                    return
        elif stat.S_ISDIR(before.st_mode):
            self._answer(n, errno.EISDIR)
            return
        elif not stat.S_ISREG(before.st_mode):
            self._answer(n, errno.ELOOP if stat.S_ISLNK(before.st_mode) else errno.EACCES)
            return
        try:
            fd = os.open(
                name,
                (flags & ~os.O_CLOEXEC) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                mode & 0o777,  # never set-id or sticky
                dir_fd=pfd,
            )
        except OSError as exc:
            self._answer(n, exc.errno or errno.EACCES)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EACCES, "not a regular file")
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & SETFL_BITS)
        except OSError as exc:
            os.close(fd)
            self._answer(n, exc.errno or errno.EACCES)
            return
        if before is None:
            self.home.changed(0, 1)
        elif flags & os.O_TRUNC:
            self.home.changed(homes.blocks_of(st) - homes.blocks_of(before))
        try:
            self.home.grant(n.pid, fd)  # the grant owns fd from here
        except QuotaExceeded as exc:
            os.close(fd)
            if before is None:
                try:
                    os.unlink(name, dir_fd=pfd)
                    self.home.changed(0, -1)
                except OSError:
                    pass
            self._refuse_quota(n, str(exc))
            return
        self.pids.add(n.pid)
        number = self._free_granted_fd(n.pid)
        how = SECCOMP_ADDFD_FLAG_SEND | (SECCOMP_ADDFD_FLAG_SETFD if number else 0)
        addfd = struct.pack("QIIII", n.id, how, fd, number, os.O_CLOEXEC if flags & os.O_CLOEXEC else 0)
        try:
            fcntl.ioctl(self.fd, NOTIF_ADDFD, bytearray(addfd))
        except OSError as exc:
            self.home.finish(n.pid)
            if exc.errno != errno.ENOENT:
                raise

    def _free_granted_fd(self, pid: int) -> int:
        """A free descriptor number from GRANTED_FDS up in ``pid`` (0: none; then the lowest free one is used)."""
        room = self._fd_room.get(pid)
        if room is None:
            try:
                soft = resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
            except OSError:
                soft = 0
            room = self._fd_room[pid] = (
                0 if soft != resource.RLIM_INFINITY and soft < GRANTED_FDS + GRANTED_FDS_SPAN else GRANTED_FDS_SPAN
            )
        for number in range(GRANTED_FDS, GRANTED_FDS + room):
            if not os.path.lexists(f"/proc/{pid}/fd/{number}"):
                return number
        return 0

    def _new_entry(self, n: _Notif, dirfd: int, addr: int) -> tuple[int, bytes] | None:
        """(parent descriptor, name) of an entry about to be made in the home; None when answered already."""
        located = self._located(n, dirfd, addr, errno.EACCES)
        if located is None:
            return None
        pfd, name, inside, path = located
        try:
            os.stat(name or b".", dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            if inside:
                return pfd, name
            os.close(pfd)
            self._refuse_outside(n, path)
            return None
        except OSError as exc:
            os.close(pfd)
            self._answer(n, exc.errno or errno.EACCES)
            return None
        os.close(pfd)
        self._answer(n, errno.EEXIST)  # as the call itself would (rsync makes /proc/self/fd/N's parts, existing)
        return None

    def _mkdir(self, n: _Notif, dirfd: int, addr: int, mode: int) -> None:
        """Make the folder here (the mode without set-id or sticky bits, the caller's umask), counted."""
        made = self._new_entry(n, dirfd, addr)
        if made is None:
            return
        pfd, name = made
        try:
            try:
                self.home.check_entry()
                self.home.check(DIR_ESTIMATE)
            except QuotaExceeded as exc:
                self._refuse_quota(n, str(exc))
                return
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
                os.chmod(name, mode & 0o777 & ~_umask(n.pid), dir_fd=pfd)
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                self._answer(n, exc.errno or errno.EACCES)
                return
            self.home.changed(homes.blocks_of(st), 1)
            self._answer(n, 0)
        finally:
            os.close(pfd)

    def _link(self, n: _Notif, dirfd: int, addr: int) -> None:
        """symlink and link: counted against the entry limit, then made by the call itself."""
        made = self._new_entry(n, dirfd, addr)
        if made is None:
            return
        pfd, _ = made
        os.close(pfd)
        try:
            self.home.check_entry()
        except QuotaExceeded as exc:
            self._refuse_quota(n, str(exc))
            return
        self.home.changed(0, 1)
        self._answer(n, proceed=True)

    def _chmod(self, n: _Notif, dirfd: int, addr: int | None, mode: int, flags: int) -> None:
        """Change a mode here: the home's own is kept (answered "done"), set-id and sticky bits are dropped."""
        if addr is None:
            path = b""
        else:
            read = self._read_path(n, addr)
            if read is None:
                self._answer(n, errno.EFAULT)
                return
            path = read
        nofollow = bool(flags & AT_SYMLINK_NOFOLLOW)
        if not mode & SPECIAL_BITS:
            # the usual case, cheaply: not the home itself? then the call runs as it is
            try:
                if addr is None or (not path and flags & AT_EMPTY_PATH):
                    st = os.stat(f"/proc/{n.pid}/fd/{dirfd}")
                else:
                    st = self._stat_at(n, dirfd, path, nofollow)
            except OSError as exc:
                self._answer(n, exc.errno or errno.ENOENT)
                return
            if homes.ident(st) != self.root_ident:
                self._answer(n, proceed=True)
                return
        if addr is not None and not self._valid(n):
            self._answer(n, errno.ESRCH)
            return
        try:
            if not path and (flags & AT_EMPTY_PATH or addr is None):
                target = os.open(f"/proc/{n.pid}/fd/{dirfd}", os.O_PATH | os.O_CLOEXEC)
            else:
                pfd, name, _ = self._parent(n, dirfd, path)
                try:
                    target = os.open(
                        name or b".", os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0), dir_fd=pfd
                    )
                finally:
                    os.close(pfd)
        except OSError as exc:
            self._answer(n, exc.errno or errno.ENOENT)
            return
        try:
            st = os.fstat(target)
            if homes.ident(st) == self.root_ident:
                self._answer(n, 0)  # the home keeps its mode: "done", without doing it
                return
            if not self._inside(os.readlink(b"/proc/self/fd/%d" % target)):
                self._refuse_outside(n, path)
                return
            if stat.S_ISLNK(st.st_mode):
                self._answer(n, errno.EOPNOTSUPP)  # as Linux answers for a symlink
                return
            os.chmod(f"/proc/self/fd/{target}", mode & 0o777)  # without set-id and sticky bits
            self._answer(n, 0)
        except OSError as exc:
            self._answer(n, exc.errno or errno.EACCES)
        finally:
            os.close(target)

    def _stat_at(self, n: _Notif, dirfd: int, path: bytes, nofollow: bool) -> os.stat_result:
        """stat of ``path`` as the caller sees it (relative to its cwd or ``dirfd``)."""
        base, path = self._base(n, dirfd, path)
        try:
            return os.stat(path, dir_fd=base, follow_symlinks=not nofollow)
        finally:
            os.close(base)

    def _entry_at(self, n: _Notif, dirfd: int, addr: int) -> tuple[int, bytes, bytes] | None:
        """(parent descriptor, name, path) of an existing entry in the home; None when answered already."""
        located = self._located(n, dirfd, addr, errno.ENOENT)
        if located is None:
            return None
        pfd, name, inside, path = located
        if not inside:
            os.close(pfd)
            self._refuse_outside(n, path)
            return None
        if not name:
            os.close(pfd)
            self._answer(n, errno.EBUSY)  # ".", "..": not something to remove or rename here
            return None
        return pfd, name, path

    def _unlink(self, n: _Notif, dirfd: int, addr: int, flags: int) -> None:
        """unlink, rmdir: done here, so what they free is counted exactly."""
        found = self._entry_at(n, dirfd, addr)
        if found is None:
            return
        pfd, name, _ = found
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if flags & AT_REMOVEDIR:
                os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
        except OSError as exc:
            self._answer(n, exc.errno or errno.EACCES)
            return
        finally:
            os.close(pfd)
        self.home.removed(st)
        self._answer(n, 0)

    def _rename(self, n: _Notif, olddirfd: int, oldaddr: int, newdirfd: int, newaddr: int, flags: int) -> None:
        """rename (rsync's temp file over the old copy): done here, so what the old copy held is counted as freed."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            self._answer(n, errno.EINVAL)  # RENAME_WHITEOUT: not for a home
            return
        old = self._entry_at(n, olddirfd, oldaddr)
        if old is None:
            return
        new = self._entry_at(n, newdirfd, newaddr)
        if new is None:
            os.close(old[0])
            return
        (opfd, oldname, _), (npfd, newname, _) = old, new
        try:
            src = os.stat(oldname, dir_fd=opfd, follow_symlinks=False)
            try:
                target: os.stat_result | None = os.stat(newname, dir_fd=npfd, follow_symlinks=False)
            except FileNotFoundError:
                target = None
            if flags:
                if _libc.renameat2(opfd, oldname, npfd, newname, flags) != 0:
                    raise OSError(ctypes.get_errno(), "renameat2")
            else:
                os.rename(oldname, newname, src_dir_fd=opfd, dst_dir_fd=npfd)
        except OSError as exc:
            self._answer(n, exc.errno or errno.EACCES)
            return
        finally:
            os.close(opfd)
            os.close(npfd)
        same = target is not None and homes.ident(target) == homes.ident(src)
        if target is not None and not same and not flags & RENAME_EXCHANGE:
            self.home.removed(target)
        self._answer(n, 0)

    def _setxattr(self, n: _Notif, name_addr: int) -> None:
        """Only user.* attributes are stored (others are answered "done" without effect), and not over quota."""
        attr = self._read_path(n, name_addr)
        if attr is None or not self._valid(n):
            self._answer(n, errno.EFAULT if attr is None else errno.ESRCH)
            return
        if not attr.startswith(b"user."):
            self._answer(n, 0)  # security.*, trusted.*, ACLs: never on a home's files
        elif self.home.held > self.home.max_bytes:
            self._refuse_quota(n, self.home.message())
        else:
            self._answer(n, proceed=True)

    @property
    def _extra(self) -> dict[str, object]:
        return {"user": self.home.username, "peer": self.peer}
