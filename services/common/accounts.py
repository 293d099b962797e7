"""SSH accounts as stored: the record, its checks, and the accounts file the ssh service owns.

The file is ``DATA/ssh/accounts.json`` (``Config.ssh_state_dir``, 0600): ``{"version": 1, "accounts":
{username: {public_key, max_bytes, enabled, created, updated[, owner]}}}``. ``owner`` is the
identity the account belongs to: recorded only when that identity was proven by its key (allowlist
mode); an account without one (created in public or secret mode, or before owners were recorded)
belongs to whoever holds its SSH key (docs/security.md). Only the ssh
service writes it, and always whole (temp file, fsync, rename), so a reader in
another process sees the old file or the new one, never half: maint's home
cleanup takes a snapshot with ``read_accounts`` and never writes. A home is
``<ssh.homes_dir>/<username>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from services.common import errors

USERNAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ACCOUNTS_FILE = "accounts.json"  # in the ssh service's state dir (Config.ssh_state_dir)
MAX_KEY_LINE = 16 * 1024
REFUSED_KEY_TYPES = frozenset({"ssh-dss"})  # DSA: disabled by OpenSSH itself


def check_username(name: str) -> str:
    """The username, or InvalidInput saying what a username may be."""
    if not USERNAME.match(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise errors.InvalidInput(
            f"username {shown!r} is not valid: 1-32 of lowercase letters, digits, '-' and '_', starting with a letter"
        )
    return name


def parse_public_key(text: str) -> tuple[str, bytes]:
    """One OpenSSH public key line as (normalized line, key blob); InvalidInput says what is wrong."""
    line = text.strip()
    if not line:
        raise errors.InvalidInput("public_key is empty: give one OpenSSH public key line, e.g. 'ssh-ed25519 AAAA...'")
    if len(line) > MAX_KEY_LINE:
        raise errors.InvalidInput(f"public_key is {len(line)} characters; one key line is at most {MAX_KEY_LINE}")
    if "\n" in line or "\r" in line:
        raise errors.InvalidInput("public_key must be a single key line (one key per account)")
    if "PRIVATE KEY" in line:
        raise errors.InvalidInput("public_key looks like a PRIVATE key; send the .pub file's line instead")
    try:
        key = asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise errors.InvalidInput(f"public_key is not an OpenSSH public key line: {exc}") from None
    algorithm = key.get_algorithm()
    if algorithm in REFUSED_KEY_TYPES:
        raise errors.InvalidInput(f"public_key type {algorithm} is not accepted; use ssh-ed25519 (or ecdsa, rsa)")
    normalized = key.export_public_key("openssh").decode().strip()
    return normalized, bytes(key.public_data)


@dataclass(frozen=True)
class Account:
    """One SSH account as stored."""

    username: str
    public_key: str  # the OpenSSH line, normalized (with its comment)
    key_blob: bytes  # wire form of the key, compared at login
    max_bytes: int
    enabled: bool = True
    created: float = 0.0
    updated: float = 0.0
    owner: str = ""  # the proven identity it belongs to (allowlist mode); "" = whoever holds its key

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "public_key": self.public_key,
            "max_bytes": self.max_bytes,
            "enabled": self.enabled,
            "created": round(self.created, 3),
            "updated": round(self.updated, 3),
        }
        if self.owner:
            out["owner"] = self.owner
        return out

    @classmethod
    def from_json(cls, username: str, raw: dict[str, Any]) -> Account:
        line, blob = parse_public_key(str(raw["public_key"]))
        return cls(
            username=check_username(username),
            public_key=line,
            key_blob=blob,
            max_bytes=int(raw["max_bytes"]),
            enabled=bool(raw.get("enabled", True)),
            created=float(raw.get("created", 0.0)),
            updated=float(raw.get("updated", 0.0)),
            owner=str(raw.get("owner", "")),
        )


def read_accounts(path: Path) -> dict[str, Account]:
    """The accounts in the file at ``path`` (none when it is missing); InvalidInput when it is damaged."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        raw = json.loads(text)
        return {name: Account.from_json(name, entry) for name, entry in raw["accounts"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, errors.InvalidInput) as exc:
        raise errors.InvalidInput(
            f"accounts file {path} is damaged ({exc}); restore it from a backup or move it away"
        ) from None


def encode_accounts(accounts: Mapping[str, Account]) -> bytes:
    """The accounts file's bytes for ``accounts``."""
    doc = {"version": 1, "accounts": {n: a.to_json() for n, a in sorted(accounts.items())}}
    return (json.dumps(doc, indent=1) + "\n").encode()


def home_path(homes: Path, username: str) -> Path:
    """The home of ``username`` under ``homes`` (InvalidInput for a malformed name)."""
    return homes / check_username(username)
