"""The storage engine over real dir backends: round trips, ranges, loss, corruption, repair."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.backends import Mode, open_backend
from services.common.backends.base import Backend
from services.common.engine import Engine, EngineConfig, FileRecord, rechunk, unwritten_shards
from services.common.errors import (
    InvalidInput,
    StoreFailed,
    Unrecoverable,
    WrongMasterKey,
)
from tests.common.engine_util import collect, corrupt_shard, make_pool

K, M = 16, 4
CHUNK = 64 * 1024  # small chunks keep the tests fast while exercising many chunks


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Engine, Path]]:
    pool = await make_pool(tmp_path, 20)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=K, m=M, chunk_size=CHUNK))
    yield engine, tmp_path
    await pool.close()


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


SIZES = [0, 1, K - 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12345]


@pytest.mark.parametrize("size", SIZES)
async def test_round_trip(env: tuple[Engine, Path], size: int) -> None:
    engine, _ = env
    data = os.urandom(size)
    record = await engine.store(pieces(data, 7000), ext=".bin", content_type="application/octet-stream")
    assert record.size == size
    assert len(record.hash) == 24
    assert len(record.chunks) == -(-size // CHUNK)
    assert await collect(engine.read(record)) == data
    for chunk in record.chunks:
        assert len({(s.backend) for s in chunk.shards}) == K + M  # distinct backends per chunk


async def test_hash_is_blake3_192_of_plaintext(env: tuple[Engine, Path]) -> None:
    import blake3

    engine, _ = env
    data = os.urandom(200_000)
    record = await engine.store([data])
    assert record.hash == blake3.blake3(data).digest(24)


async def test_async_source_and_odd_pieces(env: tuple[Engine, Path]) -> None:
    engine, _ = env
    data = os.urandom(5 * CHUNK + 3)

    async def gen() -> AsyncIterator[bytes]:
        rnd = random.Random(1)
        i = 0
        while i < len(data):
            n = rnd.randint(1, 3 * CHUNK)
            yield data[i : i + n]
            i += n

    record = await engine.store(gen())
    assert await collect(engine.read(record)) == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
async def test_random_ranges(stored: tuple[Engine, FileRecord, bytes], data: st.DataObject) -> None:
    engine, record, content = stored
    offset = data.draw(st.integers(0, len(content)))
    length = data.draw(st.one_of(st.none(), st.integers(0, len(content) + 10)))
    got = await collect(engine.read(record, offset, length))
    want = content[offset:] if length is None else content[offset : offset + length]
    assert got == want


@pytest.fixture
async def stored(env: tuple[Engine, Path]) -> tuple[Engine, FileRecord, bytes]:
    engine, _ = env
    content = os.urandom(4 * CHUNK + 999)
    return engine, await engine.store([content]), content


async def test_bad_ranges(stored: tuple[Engine, FileRecord, bytes]) -> None:
    engine, record, content = stored
    with pytest.raises(InvalidInput, match="beyond the end"):
        await collect(engine.read(record, len(content) + 1))
    with pytest.raises(InvalidInput, match="negative"):
        await collect(engine.read(record, -1))
    assert await collect(engine.read(record, len(content))) == b""


def _backend_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("b"))


async def test_any_m_backends_gone_reads_identical(stored: tuple[Engine, FileRecord, bytes], tmp_path: Path) -> None:
    engine, record, content = stored
    for victims in (range(M), range(K - 2, K + 2), range(K, K + M)):
        gone = [_backend_dirs(tmp_path)[i] for i in victims]
        backup = tmp_path / "moved"
        backup.mkdir()
        for d in gone:
            shutil.move(str(d), backup / d.name)
        try:
            assert await collect(engine.read(record)) == content
            assert await collect(engine.read(record, CHUNK - 5, CHUNK + 10)) == content[CHUNK - 5 : 2 * CHUNK + 5]
        finally:
            for d in gone:
                shutil.move(str(backup / d.name), d)
            backup.rmdir()


async def test_m_plus_one_gone_is_a_clear_error(stored: tuple[Engine, FileRecord, bytes], tmp_path: Path) -> None:
    engine, record, _ = stored
    gone = _backend_dirs(tmp_path)[: M + 1]
    for d in gone:
        shutil.rmtree(d)
    with pytest.raises(Unrecoverable, match=r"chunk 0 has 15 good shards of 20, needs 16"):
        await collect(engine.read(record))
    # Folders gone (an unmounted disk?) are unreachable, not lost: the file is unreadable now, not lost.
    report = await engine.soft_check(record)
    assert len(report.unreadable) == len(record.chunks) and not report.unrecoverable
    assert report.unreachable_backends == {d.name for d in gone}
    same, rewritten = await engine.repair(record, report)  # nothing to rebuild from now: left for later
    assert rewritten == 0 and same == record
    with pytest.raises(Unrecoverable, match="cannot repair"):  # once they are written off, the data is lost
        await engine.repair(record, report, rebuild_unreachable={d.name for d in gone})


async def test_flipped_byte_read_check_repair(stored: tuple[Engine, FileRecord, bytes]) -> None:
    engine, record, content = stored
    await corrupt_shard(engine, record, chunk=1, shard=3)
    assert await collect(engine.read(record)) == content  # parity covers the bad data shard
    soft = await engine.soft_check(record)
    assert soft.ok  # the shard is present: only the hard check sees the damage
    hard = await engine.hard_check(record)
    assert not hard.ok
    assert [(c.index, c.corrupt) for c in hard.damaged] == [(1, [3])]
    assert hard.hash_ok is True
    repaired, n = await engine.repair(record, hard)
    assert n == 1
    again = await engine.hard_check(repaired)
    assert again.ok, again
    assert await collect(engine.read(repaired)) == content


async def test_repair_onto_spare_backends_after_loss(tmp_path: Path) -> None:
    pool = await make_pool(tmp_path, 24)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=K, m=M, chunk_size=CHUNK))
    content = os.urandom(3 * CHUNK + 5)
    record = await engine.store([content])
    lost = sorted({record.backends[s.backend] for s in record.chunks[0].shards})[:M]
    for name in lost:
        shutil.rmtree(tmp_path / name)
    soft = await engine.soft_check(record)
    assert soft.damaged and not soft.unrecoverable
    assert (await engine.repair(record, soft))[1] == 0, "unreachable backends may come back: nothing rebuilt yet"
    repaired, n = await engine.repair(record, soft, rebuild_unreachable=set(lost))  # down too long: rebuild
    assert n == sum(len(h.absent) for h in soft.chunks)
    for chunk in repaired.chunks:
        names = [repaired.backends[s.backend] for s in chunk.shards]
        assert len(set(names)) == K + M
        assert not set(lost) & set(names)
    assert (await engine.hard_check(repaired)).ok
    assert await collect(engine.read(repaired)) == content
    await pool.close()


async def test_repair_onto_replaced_empty_disks(stored: tuple[Engine, FileRecord, bytes], tmp_path: Path) -> None:
    engine, record, content = stored
    for d in _backend_dirs(tmp_path)[:M]:  # four disks replaced: folders come back empty
        shutil.rmtree(d)
        d.mkdir()
    soft = await engine.soft_check(record)
    assert [len(h.missing) for h in soft.chunks] == [M] * len(record.chunks)
    repaired, n = await engine.repair(record, soft)
    assert n == M * len(record.chunks)
    assert (await engine.soft_check(repaired)).ok
    assert (await engine.hard_check(repaired)).ok
    assert await collect(engine.read(repaired)) == content


async def test_repair_needs_free_distinct_backends(stored: tuple[Engine, FileRecord, bytes], tmp_path: Path) -> None:
    engine, record, content = stored
    gone = _backend_dirs(tmp_path)[:M]
    for d in gone:
        shutil.rmtree(d)
    # Exactly k+m backends, four of them gone: a rebuilt shard has nowhere to go (each backend of a chunk
    # holds one shard). The repair writes nothing and keeps the old references: the disks may come back.
    report = await engine.soft_check(record)
    same, rewritten = await engine.repair(record, report, rebuild_unreachable={d.name for d in gone})
    assert rewritten == 0 and same == record
    # A lost shard (its backend answers without it) with no free backend is marked unwritten instead.
    for d in gone:
        d.mkdir()
    assert all([await engine.pool.probe(d.name) for d in gone])  # a probe finds them back: breakers close
    report = await engine.soft_check(record)
    assert all(len(h.missing) == M for h in report.chunks)
    for d in gone[1:]:
        shutil.rmtree(d)
    assert not any([await engine.pool.probe(d.name) for d in gone[1:]])
    lost = gone[0].name
    partial, rewritten = await engine.repair(record, await engine.soft_check(record))
    assert rewritten == len(record.chunks)  # the one backend that is back takes its shard again
    assert unwritten_shards(partial) == 0
    assert await collect(engine.read(partial)) == content
    assert lost in {partial.backends[s.backend] for c in partial.chunks for s in c.shards}


async def test_a_wiped_backend_reusing_keys_is_seen_as_replaced(
    stored: tuple[Engine, FileRecord, bytes], tmp_path: Path
) -> None:
    """A disk replaced by an empty one hands out its keys again: new shards land under the old keys.

    The record noted each backend's identity, so a soft check (no data read) calls the old shards gone
    even though the keys hold data of the right size, reads skip them, deletes leave the new data alone,
    and a repair puts the shards back under the new identity.
    """
    engine, record, content = stored
    victim = _backend_dirs(tmp_path)[5]
    shutil.rmtree(victim)
    victim.mkdir()
    newer_data = os.urandom(len(content))
    newer = await engine.store([newer_data])  # same size: keys 0.. reused on the victim, same shard sizes
    backend = engine.pool.backends[victim.name]
    on_victim = [(c, s) for c in record.chunks for s in c.shards if record.backends[s.backend] == victim.name]
    assert [await backend.length(s.key) for _, s in on_victim] == [c.shard_size for c, _ in on_victim]

    soft = await engine.soft_check(record)
    assert soft.replaced_backends == {victim.name}
    assert [len(h.missing) for h in soft.chunks] == [1] * len(record.chunks)
    assert await collect(engine.read(record)) == content
    repaired, n = await engine.repair(record, soft)
    assert n == len(record.chunks) and (await engine.soft_check(repaired)).ok
    assert (await engine.hard_check(repaired)).ok
    assert backend.identity in repaired.backend_ids and backend.identity not in record.backend_ids
    # Deleting the old record's shards leaves the keys it had on the wiped backend: they hold new data.
    assert await engine.delete_shards(record) == (K + M - 1) * len(record.chunks)
    assert await collect(engine.read(newer)) == newer_data  # still whole
    assert (await engine.soft_check(newer)).ok


async def test_records_without_identities_or_sizes_still_work(stored: tuple[Engine, FileRecord, bytes]) -> None:
    """A record written before identities, shard sizes and unwritten shards were kept reads, checks, repairs."""
    engine, record, content = stored
    old = FileRecord()
    old.CopyFrom(record)
    old.ClearField("backend_ids")
    for chunk in old.chunks:
        chunk.ClearField("shard_size")
    assert await collect(engine.read(old)) == content
    assert (await engine.soft_check(old)).ok
    ref = old.chunks[1].shards[2]
    await engine.pool.backends[old.backends[ref.backend]].delete(ref.key)
    soft = await engine.soft_check(old)
    assert [(h.index, h.missing) for h in soft.damaged] == [(1, [2])]
    repaired, n = await engine.repair(old, soft)
    assert n == 1 and (await engine.hard_check(repaired)).ok
    # The new entry carries its identity; the old ones stay unknown, in step with the backend list.
    assert len(repaired.backend_ids) == len(repaired.backends) == len(old.backends) + 1
    assert set(repaired.backend_ids[:-1]) == {b""} and repaired.backend_ids[-1]


async def test_wrong_master_key(stored: tuple[Engine, FileRecord, bytes]) -> None:
    engine, record, _ = stored
    other = Engine(engine.pool, os.urandom(32), engine.config)
    with pytest.raises(WrongMasterKey, match="master key"):
        await collect(other.read(record))
    report = await other.hard_check(record)
    assert not report.ok and "master key" in report.error


async def test_write_survives_refusing_backends(tmp_path: Path) -> None:
    pool = await make_pool(tmp_path, 24)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=K, m=M, chunk_size=CHUNK))
    for d in _backend_dirs(tmp_path)[:3]:
        shutil.rmtree(d)
    data = os.urandom(3 * CHUNK)
    record = await engine.store([data])
    used = {record.backends[s.backend] for c in record.chunks for s in c.shards}
    assert not used & {"b00", "b01", "b02"}
    assert await collect(engine.read(record)) == data
    await pool.close()


@pytest.mark.parametrize("quorum", [0, K])
async def test_degraded_write_within_the_quorum(tmp_path: Path, quorum: int) -> None:
    pool = await make_pool(tmp_path, 20)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=K, m=M, chunk_size=CHUNK, write_quorum=quorum))
    down = 1 if quorum == 0 else M  # k+1 needs 17 of 20; k needs 16
    for d in _backend_dirs(tmp_path)[:down]:
        shutil.rmtree(d)
    data = os.urandom(3 * CHUNK + 5)
    record = await engine.store([data])
    assert unwritten_shards(record) == down * len(record.chunks)
    for chunk in record.chunks:
        assert sum(s.unwritten for s in chunk.shards) == down
    for chunk in record.chunks[engine.config.write_ahead :]:  # once the breakers are open: skipped up front
        assert not any(s.unwritten for s in chunk.shards[:K]), "data shards are placed first"
    assert await collect(engine.read(record)) == data
    soft = await engine.soft_check(record)
    assert [len(h.unwritten) for h in soft.chunks] == [down] * len(record.chunks)
    assert not soft.ok and not soft.unrecoverable and not soft.unreadable


async def test_backends_back_before_their_probe_take_writes_when_the_quorum_needs_them(tmp_path: Path) -> None:
    """Four backends went away and came back; their breakers are still open (no probe yet). Without them a
    chunk cannot reach the quorum, so they are tried anyway, and the upload keeps full redundancy."""
    pool = await make_pool(tmp_path, 20)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=K, m=M, chunk_size=CHUNK))
    away = _backend_dirs(tmp_path)[:M]
    for d in away:
        d.rename(d.with_name(d.name + "-away"))
    assert not any([await pool.probe(d.name) for d in away])  # a health check saw them gone
    for d in away:
        d.with_name(d.name + "-away").rename(d)
    assert not any(pool.writable(d.name) for d in away)
    data = os.urandom(2 * CHUNK)
    record = await engine.store([data])
    assert unwritten_shards(record) == 0 and all(pool.usable(d.name) for d in away)
    assert await collect(engine.read(record)) == data
    # With one backend down (and 19 taking writes) the down one is not asked: it is simply skipped.
    gone = _backend_dirs(tmp_path)[7]
    gone.rename(gone.with_name("gone"))
    assert not await pool.probe(gone.name)
    skipped = await engine.store([data[:CHUNK]])
    assert unwritten_shards(skipped) == 1 and pool.breaker(gone.name).opened == 1
    await pool.close()


async def test_below_the_quorum_fails_clean(tmp_path: Path) -> None:
    pool = await make_pool(tmp_path, 20)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=K, m=M, chunk_size=CHUNK))  # quorum k+1 = 17
    for d in _backend_dirs(tmp_path)[5:9]:
        shutil.rmtree(d)
    with pytest.raises(StoreFailed, match="16 of 20 shards written, write_quorum is 17"):
        await engine.store([os.urandom(3 * CHUNK)])
    for name, backend in pool.backends.items():
        if name not in {"b05", "b06", "b07", "b08"}:
            assert [k async for k in backend.scan()] == []  # written shards were removed again
    await pool.close()


async def test_fewer_backends_than_shards_refused_upfront(tmp_path: Path) -> None:
    pool = await make_pool(tmp_path, 10)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=K, m=M, chunk_size=CHUNK))
    with pytest.raises(StoreFailed, match="10 backends configured"):
        await engine.store([b"x"])
    await pool.close()


async def test_load_spreads_over_extra_backends(tmp_path: Path) -> None:
    pool = await make_pool(tmp_path, 30)
    engine = Engine(pool, os.urandom(32), EngineConfig(k=4, m=2, chunk_size=4096))
    record = await engine.store([os.urandom(60 * 4096)])
    counts: dict[str, int] = {}
    for c in record.chunks:
        for s in c.shards:
            counts[record.backends[s.backend]] = counts.get(record.backends[s.backend], 0) + 1
    assert len(counts) == 30
    assert max(counts.values()) - min(counts.values()) <= 1
    await pool.close()


async def test_source_error_leaves_no_shards(env: tuple[Engine, Path]) -> None:
    engine, _ = env

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(3 * CHUNK)
        raise OSError("client went away")

    with pytest.raises(OSError, match="client went away"):
        await engine.store(broken())
    for backend in engine.pool.backends.values():
        assert [k async for k in backend.scan()] == []


async def test_delete_shards(stored: tuple[Engine, FileRecord, bytes]) -> None:
    engine, record, _ = stored
    assert await engine.delete_shards(record) == len(record.chunks) * (K + M)
    assert (await engine.soft_check(record)).unrecoverable


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"chunk_size": 10}, "chunk_size"),
        ({"chunk_size": 200 * 1024 * 1024}, "chunk_size"),
        ({"k": 1, "m": 1, "chunk_size": 64 * 1024 * 1024}, "8 MiB"),
        ({"k": 0}, "at least 1"),
        ({"read_ahead": 0}, "at least 1"),
        ({"write_quorum": 15}, "write_quorum must be between k=16 and k\\+m=20"),
        ({"write_quorum": 21}, "write_quorum must be between"),
    ],
)
def test_bad_config(kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        EngineConfig(**kwargs)


def test_write_quorum_default_is_k_plus_one() -> None:
    assert EngineConfig().quorum == 17
    assert EngineConfig(k=4, m=1).quorum == 5
    assert EngineConfig(write_quorum=16).quorum == 16


async def test_rechunk_exact_sizes() -> None:
    src = [b"a" * 3, b"b" * 10, b"", b"c" * 1]
    out = [p async for p in rechunk(src, 4)]
    assert out == [b"aaab", b"bbbb", b"bbbb", b"bc"]
    assert [p async for p in rechunk([], 4)] == []


async def test_open_backend_rejects_bad_uri(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        await open_backend("nope://x", Mode.SEQ)
    b: Backend = await open_backend(f"dir://{tmp_path}/x", Mode.SEQ)
    await b.close()
