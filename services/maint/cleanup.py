"""Home cleanup: keep every SSH home under its size limit by removing its oldest files first.

The counting and the removal are services/common/homes.py's (``enforce_quota``),
shared with the ssh service, which counts a home the same way for its quota and
shows the same plan when a home is resized below what it holds: a home holds the
blocks allocated to everything below it (hard links once); while that is over
``max_bytes``, regular files go in mtime order, oldest first, at any depth. The
walk never follows a symlink or leaves the home's file system; folders,
symlinks and special files are kept.

``sweep_homes`` applies it to every SSH account (services/common/accounts.py).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from services.common import accounts, homes
from services.common.config import Config
from services.common.homes import Removed, enforce_quota

log = logging.getLogger(__name__)

__all__ = ["Removed", "enforce_quota", "home_usage", "sweep_homes"]


def home_usage(home: Path) -> int:
    """Bytes ``home`` holds on disk, counted as ``enforce_quota`` counts them."""
    return homes.usage(home).bytes


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
                    extra={"user": account.username, "bytes": sum(r.allocated for r in removed)},
                )
    return out
