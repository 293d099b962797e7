"""Dir backends read a chunk's shards in one batch (``get_batch``), and a read stuck in it is hedged."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from services.common.backends import Mode
from services.common.backends.base import Backend, ReadBatch
from services.common.backends.dirstore import DirBackend
from services.common.backends.pool import State
from services.common.backends.uri import DirURI
from services.common.backends.zdb import ZdbBackend, ensure_namespace
from services.common.engine import BackendPool, Engine, EngineConfig, FileRecord
from services.common.errors import Unrecoverable
from tests.common.engine_util import collect, make_pool
from tests.zdb_server import ZdbProcess

CHUNK = 64 * 1024


class CountingDir(DirBackend):
    """A real dir backend that counts the batches and the single reads its class was given."""

    batches: ClassVar[list[int]] = []
    singles: ClassVar[int] = 0

    @classmethod
    async def get_batch(cls, batch: ReadBatch) -> None:
        cls.batches.append(len(batch.items))
        await super().get_batch(batch)

    async def get(self, key: bytes) -> bytes | None:
        type(self).singles += 1
        return await super().get(key)


async def _stored(root: Path, data: bytes) -> FileRecord:
    pool = await make_pool(root, 20)
    try:
        return await Engine(pool, b"k" * 32, EngineConfig(chunk_size=CHUNK)).store([data])
    finally:
        await pool.close()


async def test_a_chunk_is_read_in_one_batch(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 100)
    record = await _stored(tmp_path, data)
    backends = {}
    for i in range(20):
        backends[f"b{i:02d}"] = await CountingDir.open(DirURI(path=str(tmp_path / f"b{i:02d}")), Mode.SEQ)
    pool = BackendPool(dict(backends), cooldown=30.0)
    CountingDir.batches.clear()
    CountingDir.singles = 0
    try:
        engine = Engine(pool, b"k" * 32, EngineConfig(chunk_size=CHUNK))
        assert await collect(engine.read(record)) == data
        assert CountingDir.batches == [16, 16, 16, 16]  # one batch of the 16 data shards per chunk
        assert CountingDir.singles == 0
    finally:
        await pool.close()


@contextlib.contextmanager
def hung_segment(folder: Path) -> Iterator[None]:
    """Replace the folder's segment files with FIFOs: opening one blocks in the kernel (a disk that never answers).

    On the way out a writer opens each FIFO, so a thread stuck opening it returns (and finds no
    data), and the segments come back.
    """
    segs = sorted((folder / "data").glob("*.seg"))
    for seg in segs:
        seg.rename(seg.with_suffix(".away"))
        os.mkfifo(seg)
    try:
        yield
    finally:
        for seg in segs:
            fd = os.open(seg, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(seg) else None
            os.unlink(seg)
            seg.with_suffix(".away").rename(seg)
            if fd is not None:
                os.close(fd)


def _has_reader(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody has it open for reading
        return False
    return True


async def test_a_read_stuck_in_a_batch_is_hedged_with_parity(tmp_path: Path) -> None:
    """The batch stops after the stuck read; what follows it is read on its own, parity stands in for it."""
    data = os.urandom(CHUNK)
    record = await _stored(tmp_path, data)
    chunk = record.chunks[0]
    stuck = record.backends[chunk.shards[3].backend]  # the 4th data shard's backend
    pool = await make_pool(tmp_path, 20)  # new descriptors: segments are opened at their first read
    engine = Engine(pool, b"k" * 32, EngineConfig(chunk_size=CHUNK, hedge_after=0.3))
    try:
        with hung_segment(tmp_path / stuck):
            assert await collect(engine.read(record)) == data
            assert pool.breaker(stuck).strikes == 1  # a slow strike for the stuck one only
            assert all(pool.breaker(name).strikes == 0 for name in pool.names if name != stuck)
        assert await collect(engine.read(record)) == data
    finally:
        await pool.close()


async def test_a_batch_stuck_past_shard_timeout_ends_the_read_clearly(tmp_path: Path) -> None:
    """With 4 other backends gone, parity cannot stand in: the stuck read runs out of shard_timeout."""
    data = os.urandom(CHUNK)
    record = await _stored(tmp_path, data)
    chunk = record.chunks[0]
    names = [record.backends[ref.backend] for ref in chunk.shards]
    stuck = names[3]
    for name in names[16:]:  # the 4 parity shards' backends
        (tmp_path / name).rename(tmp_path / f"{name}.away")
    pool = await make_pool(tmp_path, 20)  # the 4 come back empty: their shards are gone
    engine = Engine(pool, b"k" * 32, EngineConfig(chunk_size=CHUNK, hedge_after=0.2, shard_timeout=1.0))
    try:
        with hung_segment(tmp_path / stuck), pytest.raises(Unrecoverable, match="15 good shards of 20"):
            await collect(engine.read(record))
        assert pool.breaker(stuck).state is not State.CLOSED  # no answer in time: its breaker opened
    finally:
        await pool.close()


@pytest.mark.zdb
async def test_a_pool_of_two_kinds_batches_the_dir_shards_and_hedges_a_hung_zdb(
    tmp_path: Path, zdb_factory: Callable[..., ZdbProcess]
) -> None:
    """19 dir backends and one 0-db: a chunk's dir shards are one batch, the 0-db's is read alone.

    Stopped (SIGSTOP) while its breaker is closed, the 0-db's read misses hedge_after: it alone gets
    a slow strike and parity stands in, while the batch of dir shards is read as before.
    """
    zdb = zdb_factory(datasize=8 * 1024 * 1024)
    await ensure_namespace(zdb.host, zdb.port, "one", mode=Mode.SEQ)
    backends: dict[str, Backend] = {}
    for i in range(19):
        backends[f"b{i:02d}"] = await CountingDir.open(DirURI(path=str(tmp_path / f"b{i:02d}")), Mode.SEQ)
    backends["zdb"] = await ZdbBackend.open(zdb.uri("one"), Mode.SEQ, timeout=5.0, marked=True)
    pool = BackendPool(backends)
    engine = Engine(pool, b"k" * 32, EngineConfig(chunk_size=CHUNK, hedge_after=0.3))
    data = os.urandom(2 * CHUNK)
    try:
        for _ in range(20):  # a file keeps one placement for all chunks: find one with a data shard on the 0-db
            record = await engine.store([data])
            if any(record.backends[s.backend] == "zdb" for s in record.chunks[0].shards[:16]):
                break
            await engine.delete_shards(record)
        else:
            pytest.fail("no placement put a data shard on the 0-db")
        CountingDir.batches.clear()
        CountingDir.singles = 0
        assert await collect(engine.read(record)) == data
        assert CountingDir.batches == [15, 15] and CountingDir.singles == 0

        zdb.pause()
        try:
            assert await collect(engine.read(record, 0, CHUNK)) == data[:CHUNK]
            assert pool.breaker("zdb").strikes == 1
            assert all(pool.breaker(name).strikes == 0 for name in pool.names if name != "zdb")
        finally:
            zdb.resume()
    finally:
        await pool.close()
