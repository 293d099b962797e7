"""File and chunk encryption: AES-256-GCM from the ``cryptography`` package.

Each file gets a fresh random 256-bit key. Chunk ``i`` is encrypted under that
key with the 96-bit nonce ``i`` (big-endian): unique per chunk because the key
is never reused across files. The associated data binds the chunk index, so
chunks cannot be swapped or moved without failing authentication. The file key
is stored wrapped (AES-256-GCM) under the gateway master key.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.common.errors import IntegrityError, InvalidInput, WrongMasterKey

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
CIPHER_NAME = "aes-256-gcm"

_CHUNK_AAD = b"gridstor/v1/chunk"
_WRAP_AAD = b"gridstor/v1/file-key"


def new_file_key() -> bytes:
    """A fresh random file key."""
    return os.urandom(KEY_BYTES)


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_BYTES:
        raise InvalidInput(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")


class ChunkCipher:
    """Encrypts and decrypts the chunks of one file."""

    def __init__(self, file_key: bytes) -> None:
        _check_key(file_key, "file key")
        self._aead = AESGCM(file_key)

    @staticmethod
    def _nonce_aad(index: int) -> tuple[bytes, bytes]:
        idx = struct.pack(">Q", index)
        return b"\0\0\0\0" + idx, _CHUNK_AAD + idx

    def encrypt(self, index: int, plain: bytes | memoryview) -> bytes:
        """Ciphertext of chunk ``index`` (plaintext length + 16-byte tag)."""
        nonce, aad = self._nonce_aad(index)
        return self._aead.encrypt(nonce, plain, aad)

    def decrypt(self, index: int, cipher: bytes | memoryview) -> bytes:
        """Plaintext of chunk ``index``; IntegrityError if it does not authenticate."""
        nonce, aad = self._nonce_aad(index)
        try:
            return self._aead.decrypt(nonce, cipher, aad)
        except InvalidTag:
            raise IntegrityError(f"chunk {index} failed authentication (corrupt data or wrong key)") from None


def wrap_key(master_key: bytes, file_key: bytes) -> bytes:
    """Seal ``file_key`` under ``master_key``: nonce || ciphertext || tag."""
    _check_key(master_key, "master key")
    _check_key(file_key, "file key")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(master_key).encrypt(nonce, file_key, _WRAP_AAD)


def unwrap_key(master_key: bytes, wrapped: bytes) -> bytes:
    """Open a wrapped file key; WrongMasterKey when the master key does not match."""
    _check_key(master_key, "master key")
    if len(wrapped) != NONCE_BYTES + KEY_BYTES + TAG_BYTES:
        expected = NONCE_BYTES + KEY_BYTES + TAG_BYTES
        raise IntegrityError(f"wrapped file key has {len(wrapped)} bytes, expected {expected}")
    try:
        return AESGCM(master_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _WRAP_AAD)
    except InvalidTag:
        raise WrongMasterKey(
            "the gateway master key does not open this file's key (wrong master.key for this metadata?)"
        ) from None
