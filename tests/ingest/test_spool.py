"""The spool: private files, hashing while writing, limits, discard with a write in flight."""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3
import pytest

from services.common import errors, spool
from services.common.spool import Spool, UploadHeader
from tests.helpers import wait_until_async


async def test_writes_hashes_and_counts(tmp_path: Path) -> None:
    spool.prepare_dir(tmp_path / "spool")
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    sp = Spool(tmp_path / "spool", limit=10 * 1024 * 1024)
    assert sp.path.stat().st_mode & 0o777 == 0o600
    pieces = [os.urandom(n) for n in (1, 0, 70_000, 1024 * 1024, 3, 2 * 1024 * 1024 + 5)]
    for p in pieces:
        await sp.write(p)
    done = await sp.finish()
    data = b"".join(pieces)
    assert done.size == len(data) and done.hash == blake3.blake3(data).digest(24)
    assert done.path.read_bytes() == data


async def test_many_small_messages(tmp_path: Path) -> None:
    sp = Spool(tmp_path, limit=10**6)
    for i in range(3000):  # more parts than one writev takes
        await sp.write(bytes([i % 256]))
    done = await sp.finish()
    assert done.path.read_bytes() == bytes(i % 256 for i in range(3000))


async def test_limit_and_discard(tmp_path: Path) -> None:
    sp = Spool(tmp_path, limit=2 * 1024 * 1024)
    await sp.write(os.urandom(2 * 1024 * 1024))  # a batch is in flight now
    with pytest.raises(errors.TooLarge):
        await sp.write(b"x")
    sp.discard()
    sp.discard()  # idempotent
    assert os.listdir(tmp_path) == []


def test_header_rules() -> None:
    h = UploadHeader.parse("Photo.JPG", "", "", None, 100)
    assert (h.ext, h.content_type, h.declared_size) == (".jpg", "image/jpeg", None)
    # body.content_type (REST Content-Type) counts, except the form type curl -d sends.
    assert UploadHeader.parse("a.bin", "", "video/mp4", None, 100).content_type == "video/mp4"
    form = UploadHeader.parse("a.txt", "", "application/x-www-form-urlencoded", None, 100)
    assert form.content_type == "text/plain"
    assert UploadHeader.parse("x", "", "", 100, 100).declared_size == 100
    with pytest.raises(errors.TooLarge):
        UploadHeader.parse("x", "", "", 101, 100)
    with pytest.raises(errors.InvalidInput):
        UploadHeader.parse("x", "", "", -1, 100)
    with pytest.raises(errors.InvalidInput):
        UploadHeader.parse("x", "t/" + "a" * 300, "", None, 100)


def test_sweep_removes_only_stale_partials(tmp_path: Path) -> None:
    stale = tmp_path / "up-old.part"
    fresh = tmp_path / "up-new.part"
    queued = tmp_path / ("0" * 32 + ".spool")
    for p in (stale, fresh, queued):
        p.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(queued, (old, old))
    assert spool.sweep_partials(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, queued.name])


async def test_syncs_beside_the_writes_and_discard_closes_after_them(tmp_path: Path) -> None:
    """Past SYNC_EVERY an fdatasync runs beside the writes; finish waits for it, discard closes after it."""
    piece = os.urandom(256 * 1024)
    n = (2 * spool.SYNC_EVERY + spool.BATCH_BYTES) // len(piece)
    sp = Spool(tmp_path, limit=10**9)
    for _ in range(n):
        await sp.write(piece)
    done = await sp.finish()
    assert done.size == n * len(piece) and done.hash == blake3.blake3(piece * n).digest(24)

    fds = set(os.listdir("/proc/self/fd"))
    sp = Spool(tmp_path, limit=10**9)
    for _ in range(n):
        await sp.write(piece)
    sp.discard()  # a batch and a sync may still run: the descriptor closes once both have ended
    await wait_until_async(lambda: set(os.listdir("/proc/self/fd")) <= fds, what="the spool file's descriptor closed")
    assert sorted(os.listdir(tmp_path)) == [done.path.name]
