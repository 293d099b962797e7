"""Home cleanup: keep a folder under its size limit by removing the oldest files first.

``enforce_quota`` is a pure function of a folder and a limit (no accounts, no
config): the size of a home is the sum of its regular files' sizes, a file with
several hard links counted once (as the ssh service counts it). When the sum
is over ``max_bytes``, files go in mtime order, oldest first, until it is not.

It never leaves the home: the walk and every unlink go through directory file
descriptors opened with ``O_NOFOLLOW`` relative to the home's own descriptor,
so a symlink (or a folder swapped for a symlink while we work) is never
followed, and other file systems mounted inside are skipped. Symlinks, sockets,
fifos and devices are neither counted nor removed; folders are kept.

``sweep_homes`` applies it to every SSH account (services/common/accounts.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common import accounts
from services.common.config import Config
from services.common.errors import InvalidInput

log = logging.getLogger(__name__)

MAX_DEPTH = 256  # deeper folders are not walked (and logged): a home is not a maze
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Removed:
    """One file cleanup removed: its path relative to the home, size and mtime."""

    path: str
    size: int
    mtime: float


@dataclass
class _File:
    paths: list[tuple[str, ...]]  # every hard link of the inode inside the home, as path components
    size: int
    mtime: float
    ident: tuple[int, int]


def enforce_quota(home: Path, max_bytes: int) -> list[Removed]:
    """Remove the oldest files of ``home`` until its files take at most ``max_bytes``; what went, oldest first."""
    if max_bytes < 0:
        raise InvalidInput(f"max_bytes must not be negative, got {max_bytes}")
    try:
        root = os.open(home, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            log.warning("home %s is not a plain folder (a symlink?); not cleaning it", home)
            return []
        if exc.errno == errno.ENOENT:
            return []
        raise
    try:
        root_dev = os.fstat(root).st_dev
        files = list(_walk(root, (), root_dev, 0, home))
        total = sum(f.size for f in files)
        if total <= max_bytes:
            return []
        removed: list[Removed] = []
        for f in sorted(files, key=lambda f: (f.mtime, f.paths[0])):
            if total <= max_bytes:
                break
            if _remove(root, f):
                total -= f.size
                rel = "/".join(f.paths[0])  # a file with several hard links is one entry, under its first name
                removed.append(Removed(rel, f.size, f.mtime))
                log.info(
                    "home over its limit: removed %s",
                    rel,
                    extra={"home": str(home), "size": f.size, "mtime": int(f.mtime), "limit": max_bytes},
                )
        if total > max_bytes:
            log.warning("home %s is still over its limit after cleanup (%d > %d bytes)", home, total, max_bytes)
        return removed
    finally:
        os.close(root)


def home_usage(home: Path) -> int:
    """Bytes the regular files of ``home`` take (hard links once), walked as ``enforce_quota`` walks it."""
    try:
        root = os.open(home, _DIR_FLAGS)
    except OSError:
        return 0
    try:
        return sum(f.size for f in _walk(root, (), os.fstat(root).st_dev, 0, home))
    finally:
        os.close(root)


def _walk(dir_fd: int, parts: tuple[str, ...], dev: int, depth: int, home: Path) -> Iterator[_File]:
    """Regular files under ``dir_fd`` (hard links merged), never crossing a symlink or a mount."""
    found: dict[tuple[int, int], _File] = {}
    stack: list[tuple[int, tuple[str, ...], int]] = [(os.dup(dir_fd), parts, depth)]
    try:
        while stack:
            fd, here, level = stack.pop()
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
                for entry in entries:
                    try:
                        st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue  # gone meanwhile
                    path = (*here, entry.name)
                    if stat.S_ISDIR(st.st_mode):
                        if st.st_dev != dev:
                            continue  # another file system mounted inside: not ours to clean
                        if level + 1 > MAX_DEPTH:
                            log.warning(
                                "home %s: not walking below %s (over %d levels)", home, "/".join(path), MAX_DEPTH
                            )
                            continue
                        try:
                            sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                        except OSError:
                            continue  # swapped for a symlink, removed, or unreadable
                        stack.append((sub, path, level + 1))
                    elif stat.S_ISREG(st.st_mode):
                        ident = (st.st_dev, st.st_ino)
                        if ident in found:
                            found[ident].paths.append(path)
                        else:
                            found[ident] = _File([path], st.st_size, st.st_mtime, ident)
            finally:
                os.close(fd)
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    for f in found.values():
        f.paths.sort()
        yield f


def _remove(root: int, f: _File) -> bool:
    """Unlink every link of ``f``, checking each is still the same regular file; whether any went."""
    any_removed = False
    for parts in f.paths:
        fd = _open_parent(root, parts[:-1])
        if fd is None:
            continue
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != f.ident:
                continue  # replaced since the walk: leave it
            os.unlink(parts[-1], dir_fd=fd)
            any_removed = True
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove %s from a home: %s", "/".join(parts), exc.strerror)
        finally:
            os.close(fd)
    return any_removed


def _open_parent(root: int, parts: tuple[str, ...]) -> int | None:
    """A descriptor of the folder ``parts`` below ``root``, opened one component at a time without following links."""
    fd = os.dup(root)
    for name in parts:
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = sub
    return fd


def sweep_homes(cfg: Config) -> dict[str, list[Removed]]:
    """Enforce every SSH account's limit on its home; removed files per user (only users with removals).

    The accounts are a snapshot of the ssh service's accounts file (it replaces
    the file whole, so the snapshot is the old or the new one); nothing is written to it.
    """
    out: dict[str, list[Removed]] = {}
    for account in accounts.read_accounts(cfg.ssh_state_dir / accounts.ACCOUNTS_FILE).values():
        home = accounts.home_path(cfg.ssh.homes_dir, account.username)
        with contextlib.suppress(FileNotFoundError):
            removed = enforce_quota(home, account.max_bytes)
            if removed:
                out[account.username] = removed
                log.info(
                    "home of %s was over its limit: %d files removed",
                    account.username,
                    len(removed),
                    extra={"user": account.username, "bytes": sum(r.size for r in removed)},
                )
    return out
