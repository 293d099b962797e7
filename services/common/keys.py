"""Gateway secrets in the data dir: generated on first start, 0600, never logged.

* ``gateway.key``: the ed25519 signing key (tokens, upload receipts).
* ``master.key``: the 256-bit key that wraps every file key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from services.common.errors import InvalidInput

SIGNING_KEY_FILE = "gateway.key"
MASTER_KEY_FILE = "master.key"
KEY_BYTES = 32


def _load_or_create(path: Path, size: int) -> bytes:
    """The ``size`` secret bytes at ``path``, created atomically with mode 0600 when missing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(size))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        data = path.read_bytes()
    if len(data) != size:
        raise InvalidInput(f"key file {path} holds {len(data)} bytes, expected {size}; restore it from backup")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise InvalidInput(f"key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    return data


def master_key(data_dir: Path) -> bytes:
    """The gateway master key (created on first use)."""
    return _load_or_create(data_dir / MASTER_KEY_FILE, KEY_BYTES)


def signing_key(data_dir: Path) -> SigningKey:
    """The gateway's ed25519 signing key (created on first use)."""
    return SigningKey(_load_or_create(data_dir / SIGNING_KEY_FILE, KEY_BYTES))


def key_id(verify_key: VerifyKey) -> str:
    """A short stable id of a verification key: 16 hex of its SHA-256."""
    return hashlib.sha256(bytes(verify_key)).hexdigest()[:16]
