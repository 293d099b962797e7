"""The embedded dir:// backend: 0-db semantics, persistence, crash tails, many processes, compaction."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import queue
import shutil
import struct
import tempfile
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.common import errors
from services.common.backends.base import MAX_KEY_SIZE, MAX_VALUE_SIZE, Mode, seq_id, seq_key
from services.common.backends.dirstore import DirBackend, ModeMismatch
from services.common.backends.uri import DirURI
from tests.helpers import tmpfs, wait_until_async


async def open_dir(path: Path | str, mode: Mode = Mode.SEQ, **kwargs: Any) -> DirBackend:
    kwargs.setdefault("fsync", "never")
    return await DirBackend.open(DirURI(str(path)), mode, **kwargs)


async def keys_of(backend: DirBackend, after: bytes | None = None) -> list[bytes]:
    return [k async for k in backend.scan(after)]


@pytest.fixture
async def seq(tmp_path: Path) -> AsyncIterator[DirBackend]:
    backend = await open_dir(tmp_path / "seq", Mode.SEQ)
    yield backend
    await backend.close()


@pytest.fixture
async def user(tmp_path: Path) -> AsyncIterator[DirBackend]:
    backend = await open_dir(tmp_path / "user", Mode.USER)
    yield backend
    await backend.close()


# -- semantics -----------------------------------------------------------------


async def test_seq_mode(seq: DirBackend) -> None:
    keys = [await seq.put(b"v%d" % i) for i in range(4)]
    assert keys == [seq_key(i) for i in range(4)]
    assert [await seq.get(k) for k in keys] == [b"v0", b"v1", b"v2", b"v3"]
    assert await seq.exists(keys[1])
    assert await seq.get(seq_key(99)) is None
    assert not await seq.exists(seq_key(99))
    assert await seq.get(b"abc") is None  # not an 8-byte key: cannot be stored here

    await seq.set(keys[1], b"updated")
    assert await seq.get(keys[1]) == b"updated"
    with pytest.raises(errors.KeyNotFound, match=r"^dir://.*not stored"):
        await seq.set(seq_key(99), b"x")
    with pytest.raises(errors.KeyNotFound, match=r"^dir://"):
        await seq.set(b"abc", b"x")

    await seq.delete(keys[3])
    assert await seq.get(keys[3]) is None and not await seq.exists(keys[3])
    with pytest.raises(errors.KeyNotFound, match=r"^dir://"):
        await seq.delete(keys[3])
    with pytest.raises(errors.KeyNotFound):
        await seq.set(keys[3], b"back")  # a deleted id cannot be updated
    # The highest id was deleted: it is not handed out again.
    assert seq_id(await seq.put(b"v4")) == 4

    assert await keys_of(seq) == [seq_key(i) for i in (0, 1, 2, 4)]
    assert await keys_of(seq, keys[0]) == [seq_key(i) for i in (1, 2, 4)]
    assert await keys_of(seq, keys[3]) == [seq_key(4)]  # resuming after a deleted id works
    assert await keys_of(seq, seq_key(4)) == []
    with pytest.raises(errors.KeyNotFound):
        await keys_of(seq, b"not8")

    info = await seq.info()
    assert info.entries == 4
    assert info.used_bytes == len(b"v0updatedv2v4")
    assert info.free_bytes is not None and info.free_bytes > 0


async def test_user_mode(user: DirBackend) -> None:
    with pytest.raises(errors.InvalidInput, match=r"^dir://.*put\(\).*seq"):
        await user.put(b"x")
    long_key = b"k" * MAX_KEY_SIZE
    for key in (b"a", b"b", long_key, b"\x00"):
        await user.set(key, key[:3])
    assert await user.get(long_key) == b"kkk"
    for bad in (b"", b"k" * (MAX_KEY_SIZE + 1)):
        with pytest.raises(errors.InvalidInput):
            await user.set(bad, b"x")
        with pytest.raises(errors.InvalidInput):
            await user.get(bad)
    await user.set(b"a", b"again")  # an overwrite moves the key to the end of the write order
    assert await user.get(b"a") == b"again"
    assert await keys_of(user) == [b"b", long_key, b"\x00", b"a"]
    assert await keys_of(user, long_key) == [b"\x00", b"a"]
    await user.delete(b"b")
    with pytest.raises(errors.KeyNotFound, match=r"^dir://"):
        await user.delete(b"b")
    with pytest.raises(errors.KeyNotFound):
        await keys_of(user, b"b")  # no position to resume from
    assert await user.get(b"missing") is None
    assert (await user.info()).entries == 3


@pytest.mark.parametrize("size", [0, 1, MAX_VALUE_SIZE])
async def test_value_sizes_round_trip_and_persist(tmp_path: Path, size: int) -> None:
    value = os.urandom(size)
    backend = await open_dir(tmp_path / "b", Mode.SEQ, segment_size=1024)
    key = await backend.put(value)
    await backend.set(key, value[::-1])
    await backend.close()
    backend = await open_dir(tmp_path / "b", Mode.SEQ)
    assert await backend.get(key) == value[::-1]
    assert await backend.exists(key)
    await backend.close()


async def test_value_too_large(seq: DirBackend, user: DirBackend) -> None:
    big = bytes(MAX_VALUE_SIZE + 1)
    with pytest.raises(errors.ValueTooLarge, match=r"^dir://.*8388609 bytes"):
        await seq.put(big)
    key = await seq.put(b"small")
    with pytest.raises(errors.ValueTooLarge, match=r"^dir://"):
        await seq.set(key, big)
    with pytest.raises(errors.ValueTooLarge, match=r"^dir://"):
        await user.set(b"k", big)
    assert await seq.get(key) == b"small"
    assert (await user.info()).entries == 0


async def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "p"
    backend = await open_dir(path, Mode.SEQ, segment_size=4096, fsync="batch")
    values = {await backend.put(os.urandom(1000 + i)): i for i in range(30)}
    keys = list(values)
    await backend.delete(keys[5])
    await backend.set(keys[6], b"six")
    await backend.close()
    assert len(os.listdir(path / "data")) > 5  # values were spread over several segments

    again = await open_dir(path, Mode.SEQ)
    assert await keys_of(again) == [k for k in keys if k != keys[5]]
    assert await again.get(keys[5]) is None
    assert await again.get(keys[6]) == b"six"
    assert len(await again.get(keys[29]) or b"") == 1029
    assert seq_id(await again.put(b"next")) == 30
    await again.close()


async def test_same_process_concurrency(seq: DirBackend) -> None:
    values = [os.urandom(300 + i) for i in range(64)]
    keys = await asyncio.gather(*(seq.put(v) for v in values))
    assert len(set(keys)) == 64
    assert await asyncio.gather(*(seq.get(k) for k in keys)) == values
    assert await keys_of(seq) == sorted(keys, key=seq_id)


async def test_two_instances_see_each_other(tmp_path: Path) -> None:
    a = await open_dir(tmp_path / "x", Mode.USER)
    b = await open_dir(tmp_path / "x", Mode.USER)
    await a.set(b"k", b"1")
    assert await b.get(b"k") == b"1"  # a miss in b reads a's new index records
    await b.set(b"k", b"2")
    assert await a.get(b"k") == b"2"  # and a hit is never stale either
    await b.delete(b"k")
    assert await a.get(b"k") is None
    await a.close()
    await b.close()


async def test_put_batch(tmp_path: Path) -> None:
    a = await open_dir(tmp_path / "a", fsync="batch", fsync_interval=0.05)
    b = await open_dir(tmp_path / "b")
    closed = await open_dir(tmp_path / "closed")
    await closed.close()
    results = await DirBackend.put_batch([(a, b"a0"), (b, b"b0"), (closed, b"c0"), (a, b"a1")])
    assert results[:2] == [seq_key(0), seq_key(0)] and results[3] == seq_key(1)
    assert isinstance(results[2], errors.BackendUnavailable) and "closed" in str(results[2])
    assert [await a.get(seq_key(i)) for i in range(2)] == [b"a0", b"a1"]
    assert await b.get(seq_key(0)) == b"b0"
    assert a._flush_handle is not None  # the batch armed the background fsync like put does

    user = await open_dir(tmp_path / "u", Mode.USER)
    for bad, error, match in (
        ((a, bytes(MAX_VALUE_SIZE + 1)), errors.ValueTooLarge, "limit"),
        ((user, b"x"), errors.InvalidInput, "seq"),
    ):
        with pytest.raises(error, match=match):  # refused before anything is written
            await DirBackend.put_batch([(b, b"not written"), bad])
    assert await keys_of(b) == [seq_key(0)]
    for backend in (a, b, user):
        await backend.close()


async def test_closed_backend(tmp_path: Path) -> None:
    backend = await open_dir(tmp_path / "c")
    key = await backend.put(b"x")
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(errors.BackendUnavailable, match="closed"):
        await backend.get(key)
    with pytest.raises(errors.BackendUnavailable, match="closed"):
        await backend.put(b"y")


async def test_fsync_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    always = await open_dir(tmp_path / "always", fsync="always")
    await always.put(b"x" * 100)
    assert len(synced) >= 2  # the value, then its index record
    await always.close()

    synced.clear()
    batch = await open_dir(tmp_path / "batch", fsync="batch", fsync_interval=0.05)
    key = await batch.put(b"y" * 100)
    assert synced == []  # not inline
    await wait_until_async(lambda: len(synced), "the background flush", until=lambda n: n >= 2)  # value and index
    assert await batch.get(key) == b"y" * 100
    await batch.close()

    synced.clear()
    never = await open_dir(tmp_path / "never", fsync="never")
    await never.put(b"z")
    await never.sync()
    assert len(synced) >= 2  # sync() flushes whatever the policy
    await never.close()

    with pytest.raises(errors.InvalidInput, match="fsync"):
        await open_dir(tmp_path / "bad", fsync="sometimes")


# -- opening, lost folders -------------------------------------------------------


async def test_mode_mismatch(tmp_path: Path) -> None:
    backend = await open_dir(tmp_path / "m", Mode.SEQ)
    await backend.put(b"x")
    await backend.close()
    with pytest.raises(ModeMismatch, match=r"^dir://.*'seq'-mode.*'user'"):
        await open_dir(tmp_path / "m", Mode.USER)
    assert isinstance(ModeMismatch("n", "m"), errors.BackendError)


async def test_open_refuses_missing_parent_and_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(errors.BackendUnavailable, match="parent folder"):
        await open_dir(tmp_path / "no" / "such", Mode.SEQ)
    assert not (tmp_path / "no").exists()
    with pytest.raises(errors.BackendUnavailable, match="does not exist"):
        await open_dir(tmp_path / "absent", Mode.SEQ, create=False)
    assert not (tmp_path / "absent").exists()
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(errors.BackendError, match="not a dir backend"):
        await open_dir(foreign, Mode.SEQ)
    assert os.listdir(foreign) == ["notes.txt"]


async def test_folder_removed_while_open(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    backend = await open_dir(path, Mode.SEQ)
    key = await backend.put(b"x")
    shutil.rmtree(path)
    with pytest.raises(errors.BackendUnavailable, match=r"^dir://.*gone"):
        await backend.get(key)
    with pytest.raises(errors.BackendUnavailable):
        await backend.put(b"y")
    with pytest.raises(errors.BackendUnavailable):
        await backend.exists(key)
    with pytest.raises(errors.BackendUnavailable):
        await backend.info()
    with pytest.raises(errors.BackendUnavailable):
        await keys_of(backend)
    assert not path.exists()  # nothing was recreated
    await backend.close()
    with pytest.raises(errors.BackendUnavailable):
        await open_dir(path, Mode.SEQ, create=False)


async def test_folder_moved_away_and_back(tmp_path: Path) -> None:
    path, aside = tmp_path / "b", tmp_path / "aside"
    backend = await open_dir(path, Mode.SEQ)
    key = await backend.put(b"x")
    path.rename(aside)
    with pytest.raises(errors.BackendUnavailable):
        await backend.get(key)
    aside.rename(path)
    assert await backend.get(key) == b"x"
    await backend.close()


async def test_folder_emptied_while_open(tmp_path: Path) -> None:
    """A replaced disk: the folder comes back empty. Reads see nothing; the next write sets it up."""
    path = tmp_path / "e"
    writer = await open_dir(path, Mode.SEQ)
    reader = await open_dir(path, Mode.SEQ)
    old = [await writer.put(b"old %d" % i) for i in range(3)]
    assert await reader.get(old[0]) == b"old 0"
    shutil.rmtree(path)
    path.mkdir()
    assert await reader.get(old[0]) is None
    assert not await writer.exists(old[1])
    assert await keys_of(reader) == []
    assert sorted(os.listdir(path)) == []  # reading created nothing
    new = await writer.put(b"new")
    assert seq_id(new) == 0  # a new, empty backend
    assert await reader.get(new) == b"new"
    assert await keys_of(reader) == [new]
    await writer.close()
    await reader.close()
    again = await open_dir(path, Mode.SEQ)
    assert await keys_of(again) == [new]
    await again.close()


async def test_folder_replaced_while_open(tmp_path: Path) -> None:
    """Another backend took the folder's place: it is used, as a fresh open would; another mode is refused."""
    path = tmp_path / "r"
    backend = await open_dir(path, Mode.SEQ)
    key = await backend.put(b"x")
    shutil.rmtree(path)
    other = await open_dir(path, Mode.SEQ)
    await other.put(b"other")
    assert await backend.get(key) == b"other"
    assert seq_id(await backend.put(b"y")) == 1
    assert await keys_of(other) == [seq_key(0), seq_key(1)]
    await other.close()

    shutil.rmtree(path)
    user = await open_dir(path, Mode.USER)
    with pytest.raises(ModeMismatch):
        await backend.get(key)
    with pytest.raises(ModeMismatch):
        await backend.put(b"z")
    await user.close()
    await backend.close()


# -- crash leftovers -------------------------------------------------------------


def _damage(index: Path, damage: str) -> None:
    """What a crash mid-append leaves: a record cut short, or bytes that are no record."""
    if damage == "truncate":
        os.truncate(index, index.stat().st_size - 3)
    else:
        with index.open("ab") as fh:
            fh.write(b"\x01\x02garbage\xff" if damage == "garbage" else os.urandom(200_000))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "big-garbage"])
async def test_torn_index_tail(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t"
    writer = await open_dir(path, Mode.SEQ)
    keys = [await writer.put(b"value %d" % i) for i in range(10)]
    _damage(path / "index.log", damage)
    survivors = keys[:-1] if damage == "truncate" else keys

    reader = await open_dir(path, Mode.SEQ)
    assert await keys_of(reader) == survivors
    assert [await reader.get(k) for k in survivors] == [b"value %d" % i for i in range(len(survivors))]
    assert await writer.get(keys[0]) == b"value 0"

    new = await reader.put(b"after the crash")  # cuts the torn tail off under the lock
    assert await reader.get(new) == b"after the crash"
    assert await writer.get(new) == b"after the crash"
    assert await keys_of(writer) == [*survivors, new]
    if damage == "big-garbage":
        assert [p.name for p in path.iterdir() if p.name.startswith("index.log.torn-")]  # kept aside
    await reader.close()
    await writer.close()

    again = await open_dir(path, Mode.SEQ)
    assert await keys_of(again) == [*survivors, new]
    await again.close()


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


async def test_value_without_index_record_is_invisible(tmp_path: Path) -> None:
    path = tmp_path / "d"
    backend = await open_dir(path, Mode.SEQ)
    first = await backend.put(b"first")
    (segment,) = (path / "data").iterdir()
    _append(segment, b"half-written value, no index record")
    second = await backend.put(b"second")
    assert await keys_of(backend) == [first, second]
    assert await backend.get(second) == b"second"
    assert (await backend.usage()).dead_bytes == len(b"half-written value, no index record")
    await backend.close()


# -- compaction ------------------------------------------------------------------


async def test_compact_reclaims_space_and_keeps_live_values(tmp_path: Path) -> None:
    path = tmp_path / "c"
    backend = await open_dir(path, Mode.SEQ, segment_size=64 * 1024)
    other = await open_dir(path, Mode.SEQ)  # stands for another process using the folder
    values = {await backend.put(os.urandom(10_000)): i for i in range(60)}
    keys = list(values)
    assert await other.get(keys[0]) is not None  # other has segment descriptors cached
    live: dict[bytes, bytes] = {}
    for i, key in enumerate(keys):
        if i % 3:
            await backend.delete(key)
        elif i % 2:
            new = os.urandom(5_000)
            await backend.set(key, new)
            live[key] = new
        else:
            live[key] = await backend.get(key) or b""
    before = await backend.usage()
    assert before.dead_bytes >= 40 * 10_000
    segments_before = sorted(p.name for p in (path / "data").iterdir())

    freed = (await backend.compact()).freed

    after = await backend.usage()
    assert freed == before.segment_bytes - after.segment_bytes
    assert freed >= before.dead_bytes
    assert after.dead_bytes == 0
    assert after.live_bytes == before.live_bytes == sum(len(v) for v in live.values())
    assert after.segments < before.segments
    assert len(set(segments_before) - {p.name for p in (path / "data").iterdir()}) >= before.segments - 2
    for instance in (backend, other):
        assert await keys_of(instance) == list(live)
        for key, value in live.items():
            assert await instance.get(key) == value
        assert await instance.get(keys[1]) is None
    new = await other.put(b"after compaction")  # ids keep growing, in every process
    assert seq_id(new) == 60
    assert await backend.get(new) == b"after compaction"
    await backend.close()
    await other.close()

    again = await open_dir(path, Mode.SEQ)
    assert await keys_of(again) == [*live, new]
    await again.close()


async def test_compact_everything_deleted(tmp_path: Path) -> None:
    user = await open_dir(tmp_path / "u", Mode.USER, segment_size=1000)
    for i in range(10):
        await user.set(b"k%d" % i, b"x" * 300)
    for i in range(10):
        await user.delete(b"k%d" % i)
    done = await user.compact()
    # The write segment too: a new index moves writers past it (and drops the stale records).
    assert (done.segments, done.removed_bytes, done.moved_bytes) == (4, 3000, 0) and done.index_bytes > 0
    assert (await user.usage()).segments == 0
    await user.set(b"k0", b"back")
    assert await keys_of(user) == [b"k0"]
    assert (await user.compact()).freed == 0
    assert await user.get(b"k0") == b"back"
    await user.close()


async def test_compaction_reclaims_deleted_space_on_a_nearly_full_disk(tmp_path: Path) -> None:
    """A real, nearly full disk: compaction goes segment by segment, so it needs little free space.

    (Rewriting everything at once needed free space equal to all live data: on this disk, none.)
    """
    with tmpfs(tmp_path / "disk", "16m") as disk:
        backend = await open_dir(disk / "b", Mode.SEQ, segment_size=1024 * 1024)
        other = await open_dir(disk / "b", Mode.SEQ)  # another process reading the same folder
        keys: list[bytes] = []
        while _free(disk) > 512 * 1024:  # fill the disk up, leaving room for the deletes' index records
            keys.append(await backend.put(os.urandom(64 * 1024)))
        assert await other.get(keys[0]) is not None  # it holds segment descriptors now
        # A failed attempt's shards (whole segments), and every other value of the rest, are deleted.
        dead = keys[:48] + keys[49::2]
        for key in dead:
            await backend.delete(key)
        live = {key: await backend.get(key) for key in keys if key not in set(dead)}
        free_before = _free(disk)
        assert free_before <= 512 * 1024 and len(keys) >= 240

        result = await backend.compact()

        assert result.skipped == 0 and result.segments >= 14
        assert result.freed >= 0.9 * len(dead) * 64 * 1024
        for instance in (backend, other):
            for key, value in live.items():
                assert await instance.get(key) == value
        assert (await backend.usage()).dead_bytes == 0
        # Every process lets go of the removed segments, so the disk gets the space back.
        await other.exists(keys[0])
        assert _free(disk) - free_before >= 0.9 * result.freed
        await backend.put(os.urandom(2 * 1024 * 1024 - 100))  # room for new writes again
        await backend.close()
        await other.close()


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- several processes -------------------------------------------------------------

N_PROCS = 4
PUTS_PER_PROC = 120


def _mp_value(worker: int, i: int) -> bytes:
    seed = hashlib.blake2b(struct.pack("<II", worker, i)).digest()
    size = 1 + (int.from_bytes(seed[:4], "little") % 20_000)
    return struct.pack("<II", worker, i) + (seed * (size // len(seed) + 1))[:size]


def _mp_check(value: bytes | None) -> None:
    assert value is not None and len(value) >= 8, value
    worker, i = struct.unpack_from("<II", value)
    assert value == _mp_value(worker, i), (worker, i)


async def _mp_main(path: str, worker: int, barrier: Any) -> tuple[list[str], int]:
    backend = await open_dir(path, Mode.SEQ, segment_size=512 * 1024)
    barrier.wait(30)
    mine: list[bytes] = []
    for i in range(PUTS_PER_PROC):
        mine.append(await backend.put(_mp_value(worker, i)))
        if worker == 0 and i in (40, 80):  # segments are rewritten under everybody's feet
            await backend.compact()
        if i % 20 == 0:  # read everything written so far, by every process
            for key in await keys_of(backend):
                _mp_check(await backend.get(key))
    for key in mine:
        _mp_check(await backend.get(key))
    barrier.wait(60)
    seen = await keys_of(backend)
    for key in seen:
        _mp_check(await backend.get(key))
    await backend.close()
    return [k.hex() for k in mine], len(seen)


def _mp_worker(path: str, worker: int, barrier: Any, results: Any) -> None:
    try:
        results.put((worker, "ok", asyncio.run(_mp_main(path, worker, barrier))))
    except BaseException:
        results.put((worker, "error", traceback.format_exc()))


def test_many_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_PROCS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_mp_worker, args=(path, w, barrier, results)) for w in range(N_PROCS)]
    for proc in procs:
        proc.start()
    outcomes = {}
    try:
        for _ in procs:
            worker, status, payload = results.get(timeout=120)
            assert status == "ok", f"worker {worker} failed:\n{payload}"
            outcomes[worker] = payload
    except queue.Empty:  # pragma: no cover - a hung worker
        pytest.fail("a worker process did not answer")
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():  # pragma: no cover
                proc.kill()
    every = [bytes.fromhex(k) for keys, _ in outcomes.values() for k in keys]
    assert len(every) == N_PROCS * PUTS_PER_PROC
    assert len(set(every)) == len(every)  # every key unique
    assert sorted(seq_id(k) for k in every) == list(range(len(every)))  # no gaps: puts only
    for keys, _ in outcomes.values():
        ids = [seq_id(bytes.fromhex(k)) for k in keys]
        assert ids == sorted(ids)  # strictly increasing within one process
    assert {seen for _, seen in outcomes.values()} == {len(every)}  # each process saw all

    async def check() -> None:
        backend = await open_dir(path, Mode.SEQ)
        assert await keys_of(backend) == sorted(every, key=seq_id)
        for key in every:
            _mp_check(await backend.get(key))
        await backend.close()

    asyncio.run(check())


# -- model-based -------------------------------------------------------------------

VALUES = st.binary(max_size=700)
USER_KEYS = st.sampled_from([b"a", b"b", b"c", b"\x00" * 8, b"k" * MAX_KEY_SIZE])


async def _get_all(backend: DirBackend, keys: list[bytes]) -> list[bytes | None]:
    return list(await asyncio.gather(*(backend.get(k) for k in keys)))


class DirBackendModel(RuleBasedStateMachine):
    """Random put/set/delete/get/compact/reopen on seq and user backends against dicts.

    A second instance of each backend is only read from, as another process would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="dirstore-model-")
        self.loop = asyncio.new_event_loop()
        self.seq_model: dict[bytes, bytes] = {}  # id order == insertion order
        self.user_model: dict[bytes, bytes] = {}  # last-write order
        self.issued: list[bytes] = []
        self.seq, self.user = self._open()
        self.seq_reader, self.user_reader = self._open()

    def _open(self) -> tuple[DirBackend, DirBackend]:
        kw = {"segment_size": 2048}
        return (
            self.run(open_dir(os.path.join(self.root, "seq"), Mode.SEQ, **kw)),
            self.run(open_dir(os.path.join(self.root, "user"), Mode.USER, **kw)),
        )

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        for backend in (self.seq, self.user, self.seq_reader, self.user_reader):
            self.run(backend.close())
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(value=VALUES)
    def put(self, value: bytes) -> None:
        key = self.run(self.seq.put(value))
        assert key not in self.issued
        assert not self.issued or seq_id(key) > seq_id(self.issued[-1])
        self.issued.append(key)
        self.seq_model[key] = value

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), value=VALUES)
    def seq_set(self, data: st.DataObject, value: bytes) -> None:
        key = data.draw(st.sampled_from(self.issued))
        if key in self.seq_model:
            self.run(self.seq.set(key, value))
            self.seq_model[key] = value
        else:
            with pytest.raises(errors.KeyNotFound):
                self.run(self.seq.set(key, value))

    @precondition(lambda self: self.issued)
    @rule(data=st.data())
    def seq_delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.issued))
        if key in self.seq_model:
            self.run(self.seq.delete(key))
            del self.seq_model[key]
        else:
            with pytest.raises(errors.KeyNotFound):
                self.run(self.seq.delete(key))

    @rule(key=USER_KEYS, value=VALUES)
    def user_set(self, key: bytes, value: bytes) -> None:
        self.run(self.user.set(key, value))
        self.user_model.pop(key, None)
        self.user_model[key] = value

    @rule(key=USER_KEYS)
    def user_delete(self, key: bytes) -> None:
        if key in self.user_model:
            self.run(self.user.delete(key))
            del self.user_model[key]
        else:
            with pytest.raises(errors.KeyNotFound):
                self.run(self.user.delete(key))

    @rule(key=USER_KEYS, reader=st.booleans())
    def user_get(self, key: bytes, reader: bool) -> None:
        backend = self.user_reader if reader else self.user
        assert self.run(backend.get(key)) == self.user_model.get(key)

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), reader=st.booleans())
    def seq_get(self, data: st.DataObject, reader: bool) -> None:
        key = data.draw(st.sampled_from(self.issued))
        backend = self.seq_reader if reader else self.seq
        assert self.run(backend.get(key)) == self.seq_model.get(key)
        assert self.run(backend.exists(key)) == (key in self.seq_model)

    @rule()
    def compact(self) -> None:
        self.run(self.seq.compact())
        self.run(self.user.compact())

    @rule()
    def reopen(self) -> None:
        self.run(self.seq.close())
        self.run(self.user.close())
        self.seq, self.user = self._open()

    @invariant()
    def same_keys_in_order(self) -> None:
        for backend, model in (
            (self.seq, self.seq_model),
            (self.user, self.user_model),
            (self.seq_reader, self.seq_model),
            (self.user_reader, self.user_model),
        ):
            assert self.run(keys_of(backend)) == list(model)
            info = self.run(backend.info())
            assert (info.entries, info.used_bytes) == (len(model), sum(map(len, model.values())))

    @rule()
    def all_values(self) -> None:
        for backend, model in ((self.seq_reader, self.seq_model), (self.user, self.user_model)):
            assert self.run(_get_all(backend, list(model))) == list(model.values())


TestDirBackendModel = DirBackendModel.TestCase
TestDirBackendModel.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
