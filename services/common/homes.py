"""SSH home folders on disk: one walk for counting, cleaning and archiving a home.

A home is ``<ssh.homes_dir>/<username>`` (services/common/accounts.py). The ssh
service counts it (quota), archives folders of it (Process) and removes what
Process stored; maint's cleanup removes its oldest files. They all walk it
with ``walk``, which

* reaches any depth without recursion, holding one folder descriptor at a time
  (it goes back up through ``..`` and checks it arrives where it came from, so a
  folder moved while it is walked raises ``TreeChanged`` instead of leading
  elsewhere);
* never follows a symlink: every folder is opened with ``O_NOFOLLOW`` relative to
  its parent's descriptor, and a folder swapped for another since it was listed
  is skipped;
* skips other file systems mounted inside the home.

What a home holds is ``Usage``: the blocks allocated to everything below its
root (``st_blocks * 512``: a sparse file counts its blocks, a small file its
whole block, folders and long symlinks theirs; an inode with several hard
links once) and the number of entries (files, folders, links, anything).

``plan_cleanup`` / ``enforce_quota``: while a home holds more than its limit,
its regular files go oldest first (mtime), until it does not. Folders, symlinks
and special files are never removed; a file with several hard links goes with
all of them. The ssh service shows the plan when a home is resized below what
it holds; maint applies it (services/maint/cleanup.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from services.common import errors

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
BLOCK = 512  # the unit of st_blocks
RETRIES = 3  # walks restarted when a folder moves under them
T = TypeVar("T")


class TreeChanged(errors.Conflict):
    """A folder was moved while it was being walked."""


def open_root(home: Path) -> int | None:
    """A descriptor of the home folder itself (None when it is missing or not a plain folder)."""
    try:
        return os.open(home, DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            log.warning("home %s is not a plain folder (a symlink?); leaving it alone", home)
            return None
        if exc.errno == errno.ENOENT:
            return None
        raise


@dataclass(eq=False)
class Folder:
    """A folder met by a walk: its name in its parent (the root is "" with no parent)."""

    name: str
    parent: Folder | None

    def parts(self) -> tuple[str, ...]:
        """Path components from the root (computed on demand: deep trees keep one name per folder)."""
        names: list[str] = []
        node: Folder | None = self
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
        return tuple(reversed(names))

    def join(self, name: str) -> str:
        """``name`` in this folder, relative to the root."""
        return "/".join((*self.parts(), name))

    @property
    def path(self) -> str:
        """This folder relative to the root ("" for the root)."""
        return "/".join(self.parts())


@dataclass(frozen=True)
class Entry:
    """An entry of ``folder``; ``fd`` is that folder's descriptor, valid until the walk moves on."""

    folder: Folder
    name: str
    st: os.stat_result
    fd: int

    @property
    def path(self) -> str:
        return self.folder.join(self.name)


@dataclass(frozen=True)
class Left:
    """The walk is done with ``folder`` (all below it was visited) and is back in its parent (``fd``)."""

    folder: Folder
    fd: int


def ident(st: os.stat_result) -> tuple[int, int]:
    """An inode's identity: (device, inode number)."""
    return st.st_dev, st.st_ino


_Sub = tuple[Folder, tuple[int, int]]  # a subfolder still to visit and its identity


def _entries(fd: int, folder: Folder, dev: int, sort: bool, subs: list[_Sub]) -> Iterator[Entry]:
    """The entries of one folder (each stat'ed as it is reached); its subfolders are added to ``subs``."""
    with os.scandir(fd) as it:
        names = [e.name for e in it]
    if sort:
        names.sort()
    for name in names:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != dev:
                continue  # another file system mounted inside: not part of the home
            subs.append((Folder(name, folder), ident(st)))
        yield Entry(folder, name, st, fd)


def walk(root_fd: int, *, sort: bool = False, leave: bool = False) -> Iterator[Entry | Left]:
    """Every entry below ``root_fd`` (a folder's entries before what is inside its subfolders).

    ``sort``: names in byte order, subfolders in the same order. ``leave``: also a ``Left`` after
    each subfolder's contents, from its parent (so it can be removed). TreeChanged when a folder
    being walked was moved elsewhere.
    """
    dev = os.fstat(root_fd).st_dev
    fd = os.dup(root_fd)
    stack: list[tuple[Folder, tuple[int, int], list[_Sub]]] = []  # per level: folder, identity, subfolders left
    try:
        top = Folder("", None)
        subs: list[_Sub] = []
        yield from _entries(fd, top, dev, sort, subs)
        subs.reverse()
        stack.append((top, ident(os.fstat(fd)), subs))
        while stack:
            folder, _, pending = stack[-1]
            if pending:
                sub, sub_ident = pending.pop()
                try:
                    nfd = os.open(sub.name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # removed, swapped for a symlink, or unreadable
                if ident(os.fstat(nfd)) != sub_ident:
                    os.close(nfd)  # replaced by another folder since it was listed
                    continue
                os.close(fd)
                fd = nfd
                subs = []
                yield from _entries(fd, sub, dev, sort, subs)
                subs.reverse()
                stack.append((sub, sub_ident, subs))
                continue
            stack.pop()
            if not stack:
                break
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            if ident(os.fstat(up)) != stack[-1][1]:
                os.close(up)
                raise TreeChanged(f"folder {folder.path!r} was moved while the home was being read; try again")
            os.close(fd)
            fd = up
            if leave:
                yield Left(folder, fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------- usage


@dataclass(frozen=True)
class Usage:
    """What a home holds: allocated bytes, entries, regular files."""

    bytes: int = 0
    entries: int = 0
    files: int = 0


def count(root_fd: int) -> Usage:
    """The usage below ``root_fd`` (one walk; TreeChanged when a folder moves meanwhile)."""
    return _tally(root_fd)


def _tally(root_fd: int, found: dict[tuple[int, int], _File] | None = None) -> Usage:
    """``count``; with ``found``, also every regular file (each of its hard links in the home) by identity.

    A file with several hard links counts its blocks once.
    """
    used = entries = files = 0
    seen: set[tuple[int, int]] = set()
    for item in walk(root_fd):
        if isinstance(item, Left):
            continue
        st = item.st
        entries += 1
        regular = stat.S_ISREG(st.st_mode)
        files += regular
        key = ident(st)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if key in seen:
                if regular and found is not None:
                    found[key].links.append((item.folder, item.name))
                continue
            seen.add(key)
        if regular and found is not None:
            found[key] = _File([(item.folder, item.name)], st.st_size, st.st_blocks * BLOCK, st.st_mtime, key)
        used += st.st_blocks * BLOCK
    return Usage(used, entries, files)


def _retried(walker: Callable[[int], T], root: int) -> T:
    """``walker(root)``, walked again when a folder moves under it (TreeChanged after RETRIES tries)."""
    for attempt in range(RETRIES):
        try:
            return walker(root)
        except TreeChanged:
            if attempt == RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _at_root(home: Path, missing: T, fn: Callable[[int], T]) -> T:
    """``fn`` of a descriptor of the home at ``home`` (closed afterwards); ``missing`` when there is no home."""
    root = open_root(home)
    if root is None:
        return missing
    try:
        return fn(root)
    finally:
        os.close(root)


def usage(home: Path) -> Usage:
    """What ``home`` holds (zeros when it is missing); retried when folders move during the walk."""
    return _at_root(home, Usage(), lambda root: _retried(count, root))


# --------------------------------------------------------------------- cleanup


@dataclass(frozen=True)
class Removed:
    """A file cleanup removes (or would): its path relative to the home, size, bytes on disk, mtime."""

    path: str
    size: int
    mtime: float
    allocated: int = 0


@dataclass
class _File:
    links: list[tuple[Folder, str]]  # every hard link of the inode inside the home
    size: int
    allocated: int
    mtime: float
    ident: tuple[int, int]
    first: str = ""  # the first link's path, for ordering and reporting

    def name_first(self) -> None:
        self.first = min(folder.join(name) for folder, name in self.links)

    def removed(self) -> Removed:
        return Removed(self.first, self.size, self.mtime, self.allocated)


@dataclass
class Plan:
    """What a cleanup of a home to ``max_bytes`` removes: its files, oldest first."""

    used: int
    max_bytes: int
    files: list[_File] = field(default_factory=list)

    @property
    def removes(self) -> list[Removed]:
        return [f.removed() for f in self.files]

    @property
    def freed(self) -> int:
        return sum(f.allocated for f in self.files)


def plan_cleanup(root_fd: int, max_bytes: int) -> Plan:
    """The files to remove, oldest first, until the home holds at most ``max_bytes``."""
    if max_bytes < 0:
        raise errors.InvalidInput(f"max_bytes must not be negative, got {max_bytes}")
    found: dict[tuple[int, int], _File] = {}
    used = _tally(root_fd, found).bytes
    plan = Plan(used, max_bytes)
    if used <= max_bytes:
        return plan
    for f in found.values():
        f.name_first()
    left = used
    for f in sorted(found.values(), key=lambda f: (f.mtime, f.first)):
        if left <= max_bytes:
            break
        plan.files.append(f)
        left -= f.allocated
    return plan


def preview_cleanup(home: Path, max_bytes: int) -> Plan:
    """``plan_cleanup`` of the home at ``home`` (an empty plan when it is missing)."""
    return _at_root(home, Plan(0, max_bytes), lambda root: _retried(lambda fd: plan_cleanup(fd, max_bytes), root))


def enforce_quota(home: Path, max_bytes: int) -> list[Removed]:
    """Remove the oldest files of ``home`` until it holds at most ``max_bytes``; what went, oldest first."""
    if max_bytes < 0:
        raise errors.InvalidInput(f"max_bytes must not be negative, got {max_bytes}")

    def enforce(root: int) -> list[Removed]:
        try:
            plan = _retried(lambda fd: plan_cleanup(fd, max_bytes), root)
        except TreeChanged:
            log.warning("home %s keeps changing while it is read; cleaning it at the next sweep", home)
            return []
        removed: list[Removed] = []
        left = plan.used
        for f in plan.files:
            if _remove(root, f):
                left -= f.allocated
                removed.append(f.removed())
                log.info(
                    "home over its limit: removed %s",
                    f.first,
                    extra={"home": str(home), "size": f.size, "mtime": int(f.mtime), "limit": max_bytes},
                )
        if left > max_bytes:
            log.warning("home %s is still over its limit after cleanup (%d > %d bytes)", home, left, max_bytes)
        return removed

    return _at_root(home, [], enforce)


def _remove(root: int, f: _File) -> bool:
    """Unlink every link of ``f``, checking each is still the same regular file; whether any went."""
    any_removed = False
    for folder, name in f.links:
        fd = open_folder(root, folder.parts())
        if fd is None:
            continue
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or ident(st) != f.ident:
                continue  # replaced since the walk: leave it
            os.unlink(name, dir_fd=fd)
            any_removed = True
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove %s from a home: %s", folder.join(name), exc.strerror)
        finally:
            os.close(fd)
    return any_removed


def open_folder(root: int, parts: tuple[str, ...] | list[str]) -> int | None:
    """A descriptor of the folder ``parts`` below ``root``, opened one component at a time without following links."""
    fd = os.dup(root)
    for name in parts:
        try:
            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = sub
    return fd


def inside(root: bytes, real: bytes) -> bool:
    """Whether the resolved path ``real`` is the home ``root`` or below it."""
    return real == root or real.startswith(root + b"/")


def blocks_of(st: os.stat_result) -> int:
    """Bytes allocated to the inode ``st`` describes."""
    return int(st.st_blocks) * BLOCK
