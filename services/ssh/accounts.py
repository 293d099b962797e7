"""SSH accounts and their homes: the writer of the accounts file, home folders.

The account record and the file's format are in services/common/accounts.py
(maint reads the file too); ``AccountStore`` is its one writer, rewriting it
atomically (temp file, fsync, rename) on every change. A home is
``HOMES/<username>`` (0700); what it holds is counted by services/ssh/home.py.
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
HOME_MODE = 0o700  # homes keep it: SFTP refuses to change it, rsync's chmod of it is answered without effect


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
    """Create the home (0700, the service's own) if missing or put its mode and owner back; refuse a non-folder."""
    homes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home_path(homes_dir, username)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, HOME_MODE)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        log.warning("home %s exists but is not a folder; move it away", path, extra={"user": username})
        raise errors.Refused(f"the home of {username!r} exists on the gateway but is not a folder: ask its operator")
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        os.chown(path, os.geteuid(), os.getegid(), follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != HOME_MODE:
        os.chmod(path, HOME_MODE)
    return path
