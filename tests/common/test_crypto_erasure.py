"""Chunk encryption, key wrapping and the Reed-Solomon coder (pure logic)."""

from __future__ import annotations

import os
import random

import pytest

from services.common import crypto
from services.common.erasure import Coder
from services.common.errors import IntegrityError, InvalidInput, Unrecoverable, WrongMasterKey


def test_chunk_round_trip_and_index_binding() -> None:
    c = crypto.ChunkCipher(crypto.new_file_key())
    ct = c.encrypt(3, b"hello")
    assert len(ct) == 5 + crypto.TAG_BYTES
    assert c.decrypt(3, ct) == b"hello"
    with pytest.raises(IntegrityError, match="chunk 4"):
        c.decrypt(4, ct)  # a chunk moved to another position does not authenticate
    tampered = bytearray(ct)
    tampered[0] ^= 1
    with pytest.raises(IntegrityError):
        c.decrypt(3, bytes(tampered))


def test_same_plaintext_different_files_differ() -> None:
    a = crypto.ChunkCipher(crypto.new_file_key()).encrypt(0, b"x" * 64)
    b = crypto.ChunkCipher(crypto.new_file_key()).encrypt(0, b"x" * 64)
    assert a != b


def test_wrap_unwrap_and_wrong_master_key() -> None:
    master, other, fk = os.urandom(32), os.urandom(32), crypto.new_file_key()
    wrapped = crypto.wrap_key(master, fk)
    assert crypto.unwrap_key(master, wrapped) == fk
    with pytest.raises(WrongMasterKey, match="master key"):
        crypto.unwrap_key(other, wrapped)
    with pytest.raises(IntegrityError):
        crypto.unwrap_key(master, wrapped[:-1])
    with pytest.raises(InvalidInput, match="32 bytes"):
        crypto.wrap_key(b"short", fk)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 1 << 20, (1 << 20) + 7])
def test_coder_round_trip_any_k_fragments(size: int) -> None:
    coder = Coder(16, 4)
    data = os.urandom(size)
    frags = coder.encode(data)
    assert len(frags) == 20
    assert coder.join_data(frags, size) == data
    rnd = random.Random(size)
    for _ in range(5):
        keep = rnd.sample(range(20), 16)
        assert coder.decode({i: frags[i] for i in keep}, size) == data
    for i, f in enumerate(frags):
        assert Coder.fragment_index(f) == i


def test_coder_reconstruct_missing() -> None:
    coder = Coder(4, 2)
    data = os.urandom(10_000)
    frags = coder.encode(data)
    have = {i: frags[i] for i in (0, 2, 4, 5)}
    rebuilt = coder.reconstruct(have, [1, 3])
    assert rebuilt == {1: frags[1], 3: frags[3]}


def test_coder_too_few_fragments() -> None:
    coder = Coder(4, 2)
    frags = coder.encode(b"abc" * 100)
    with pytest.raises(Unrecoverable, match="3 fragments available, 4 needed"):
        coder.decode({i: frags[i] for i in (0, 1, 5)}, 300)


@pytest.mark.parametrize(("k", "m"), [(0, 4), (16, 0), (30, 4)])
def test_coder_rejects_bad_params(k: int, m: int) -> None:
    with pytest.raises(InvalidInput):
        Coder(k, m)


def test_coder_rejects_unknown_ec_type() -> None:
    with pytest.raises(InvalidInput, match="unavailable"):
        Coder(4, 2, "no_such_backend")
