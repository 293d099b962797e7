"""SSH accounts and their homes: the writer of the accounts file, home folders, usage counting.

The account record and the file's format are in services/common/accounts.py
(maint reads the file too); ``AccountStore`` is its one writer, rewriting it
atomically (temp file, fsync, rename) on every change. A home is
``HOMES/<username>`` (0700). ``Home`` keeps the bytes used by a home for the
quota checks of SFTP writes: a full scan when it is stale, deltas in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from services.common import errors
from services.common.accounts import (
    ACCOUNTS_FILE,
    Account,
    encode_accounts,
    home_path,
    parse_public_key,
    read_accounts,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_SIZE_MB = 1 << 30  # 1 PiB: a typo guard, not a policy
SCAN_MAX_AGE = 30.0  # seconds a usage scan is trusted before a new session rescans
RECOUNT_AFTER = 5.0  # a write over the limit recounts first when the last count is older than this


class AccountStore:
    """The accounts file: loaded once, rewritten atomically on each change (one writer: this process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._accounts: dict[str, Account] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> AccountStore:
        """Load ``state_dir/accounts.json`` (an empty store when missing); InvalidInput when unreadable."""
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = cls(state_dir / ACCOUNTS_FILE)
        store._accounts = read_accounts(store.path)
        return store

    def get(self, username: str) -> Account | None:
        return self._accounts.get(username)

    def __iter__(self) -> Iterator[Account]:
        return iter(list(self._accounts.values()))

    def _unchanged(self, username: str, expect: Account | None) -> Account | None:
        """The account as stored, or Conflict when it is no longer ``expect`` (what the caller was allowed on)."""
        current = self._accounts.get(username)
        if current != expect:
            what = "was created" if expect is None else "was removed" if current is None else "changed"
            raise errors.Conflict(f"SSH account {username!r} {what} while this request was checked; try again")
        return current

    async def enable(
        self, username: str, public_key: str, max_bytes: int | None, *, expect: Account | None, owner: str | None = None
    ) -> tuple[Account, bool]:
        """Create or update (key, size; re-enable) an account: (account, created).

        ``expect`` is the account as the caller's permission was checked on (None: it must not exist yet);
        Conflict if it changed meanwhile. ``max_bytes`` None keeps the size; ``owner`` None keeps the owner.
        """
        line, blob = parse_public_key(public_key)
        async with self._lock:
            now = time.time()
            old = self._unchanged(username, expect)
            if old is None:
                if max_bytes is None:
                    raise errors.InvalidInput("a new account needs max_bytes")
                acct = Account(username, line, blob, max_bytes, True, now, now, owner or "")
            else:
                size = old.max_bytes if max_bytes is None else max_bytes
                acct = replace(
                    old,
                    public_key=line,
                    key_blob=blob,
                    max_bytes=size,
                    enabled=True,
                    updated=now,
                    owner=old.owner if owner is None else owner,
                )
            await self._save({**self._accounts, username: acct})
            return acct, old is None

    async def disable(self, username: str, *, forget: bool, expect: Account | None) -> Account | None:
        """Refuse logins (``forget``: drop the account); the account as it was, None when unknown.

        ``expect``: the account as the caller's permission was checked on; Conflict if it changed meanwhile.
        """
        async with self._lock:
            old = self._unchanged(username, expect)
            if old is None:
                return None
            accounts = dict(self._accounts)
            if forget:
                del accounts[username]
            else:
                accounts[username] = replace(old, enabled=False, updated=time.time())
            await self._save(accounts)
            return old

    async def _save(self, accounts: dict[str, Account]) -> None:
        await asyncio.to_thread(write_atomic, self.path, encode_accounts(accounts))
        self._accounts = accounts


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so a crash leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ----------------------------------------------------------------------- homes


def ensure_home(homes_dir: Path, username: str) -> Path:
    """Create the home (0700) if missing; refuse one that is not a plain folder."""
    homes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home_path(homes_dir, username)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        log.warning("home %s exists but is not a folder; move it away", path, extra={"user": username})
        raise errors.Refused(f"the home of {username!r} exists on the gateway but is not a folder: ask its operator")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def scan_usage(root: Path) -> tuple[int, int]:
    """(bytes, regular files) under ``root``; hard links count once, symlinks are not followed."""
    total = files = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            it = os.scandir(top)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot list %s while counting a home: %s", top, exc.strerror)
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    if st.st_nlink > 1:
                        ident = (st.st_dev, st.st_ino)
                        if ident in seen:
                            continue
                        seen.add(ident)
                    total += st.st_size
                    files += 1
    return total, files


class QuotaExceeded(errors.LimitExceeded):
    """A write would take the home over its maximum size."""


class Home:
    """A home's root, size limit and bytes used (shared by every session of its user)."""

    def __init__(self, username: str, root: Path, max_bytes: int) -> None:
        self.username = username
        self.root = root
        self.max_bytes = max_bytes
        self.used = 0
        self.files = 0
        self.scanned_at: float | None = None  # monotonic time of the last full scan
        self._scan: asyncio.Task[None] | None = None
        self._delta_while_scanning = 0

    @property
    def stale(self) -> bool:
        return self.scanned_at is None or time.monotonic() - self.scanned_at > SCAN_MAX_AGE

    @property
    def recount_due(self) -> bool:
        """Whether a refused write should recount first (the count may miss removals made outside SFTP)."""
        return self.scanned_at is None or time.monotonic() - self.scanned_at > RECOUNT_AFTER

    def invalidate(self) -> None:
        """Something outside the SFTP hooks changed the home (rsync, Process, maint): rescan next time."""
        self.scanned_at = None

    async def refresh(self, *, force: bool = False) -> None:
        """Rescan when stale (or ``force``); concurrent callers share one scan."""
        if not force and not self.stale:
            return
        if self._scan is None or self._scan.done():
            self._scan = asyncio.create_task(self._rescan())
        await asyncio.shield(self._scan)

    async def _rescan(self) -> None:
        self._delta_while_scanning = 0
        used, files = await asyncio.to_thread(scan_usage, self.root)
        # Writes during the scan may or may not have been seen; counting them again errs on the safe side.
        self.used = max(0, used + self._delta_while_scanning)
        self.files = files
        self.scanned_at = time.monotonic()

    def message(self) -> str:
        return f"quota exceeded: home is {self.used} of {self.max_bytes} bytes"

    def reserve(self, growth: int) -> None:
        """Count ``growth`` new bytes, or QuotaExceeded when they do not fit."""
        if growth <= 0:
            return
        if self.used + growth > self.max_bytes:
            raise QuotaExceeded(self.message())
        self.used += growth
        self._delta_while_scanning += growth

    def release(self, freed: int) -> None:
        """Bytes removed (a file deleted or truncated)."""
        if freed <= 0:
            return
        self.used = max(0, self.used - freed)
        self._delta_while_scanning -= freed

    @property
    def free(self) -> int:
        return max(0, self.max_bytes - self.used)
