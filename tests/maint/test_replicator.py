"""ReplicatedMetaStore on its own: write-through, cursors, a wiped replica, the full compare."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common.backends import Mode, open_backend
from services.common.backends.base import seq_key
from services.common.backends.zdb import ensure_namespace
from services.common.engine import RECORD_VERSION, FileRecord
from services.common.errors import Refused
from services.common.metastore import REPLICA_CURSOR_KEY, MetaStore, Replica, ReplicatedMetaStore, load_cursor
from tests.maint.conftest import replica_records


def record(n: int) -> FileRecord:
    return FileRecord(version=RECORD_VERSION, hash=os.urandom(24), size=n, k=2, m=1, chunk_size=4096)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ReplicatedMetaStore]:
    (tmp_path / "m2").mkdir()
    records = await open_backend(f"dir://{tmp_path}/records", Mode.SEQ)
    index = await open_backend(f"dir://{tmp_path}/index", Mode.USER)
    uri = f"dir://{tmp_path}/m2/replica"
    replica = Replica(uri, uri, await open_backend(uri, Mode.USER))
    s = ReplicatedMetaStore(records, index, [replica], opener=open_backend, sync_interval=0.05, verify_interval=0)
    yield s
    await s.close()


async def test_write_through_wiped_replica_and_full_compare(store: ReplicatedMetaStore, tmp_path: Path) -> None:
    r = store.replicas[0]
    ids = [await store.put(record(i)) for i in range(5)]
    assert ids == [0, 1, 2, 3, 4]
    master = {i: await store.records.get(seq_key(i)) for i in ids}
    assert await replica_records(r.uri) == master  # written through on every put
    assert await store.sync(r) == 0  # the first round compares everything (no cursor yet): nothing to copy
    assert r.synced and await load_cursor(r.backend) == 4  # type: ignore[arg-type]

    # A replica that comes back empty (a replaced disk) has no cursor: it is rebuilt from the start.
    await r.backend.close()  # type: ignore[union-attr]
    shutil.rmtree(tmp_path / "m2" / "replica")
    r.backend = None
    r.synced = False
    assert await store.sync(r) == 5
    assert await replica_records(r.uri) == master

    # A replica record changed behind meta's back is found by the full compare only.
    assert r.backend is not None
    await r.backend.set(seq_key(2), b"tampered")
    assert await store.sync(r) == 0
    assert await store.sync(r, full=True) == 1
    assert await replica_records(r.uri) == master


async def test_a_missed_write_never_fails_the_put(store: ReplicatedMetaStore, tmp_path: Path) -> None:
    r = store.replicas[0]
    await store.put(record(1))
    await store.sync(r)
    (tmp_path / "m2").rename(tmp_path / "m2.off")
    new = [await store.put(record(i)) for i in range(3)]  # the replica is away: puts still succeed
    changed = await store.get(0)
    assert changed is not None
    changed.content_type = "x/changed"
    await store.update(0, changed)
    assert not r.synced and r.floor == new[0] - 1 and r.dirty == {0}
    (tmp_path / "m2.off").rename(tmp_path / "m2")
    await store.sync(r)
    assert r.synced and not r.dirty and r.floor is None
    master = {i: await store.records.get(seq_key(i)) for i in range(4)}
    assert await replica_records(r.uri) == master
    assert await r.backend.get(REPLICA_CURSOR_KEY) == seq_key(3)


async def test_a_replica_namespace_reads_but_never_writes(store: ReplicatedMetaStore, tmp_path: Path) -> None:
    stored = [await store.put(record(i)) for i in range(3)]
    replica = MetaStore(await open_backend(store.replicas[0].uri, Mode.USER), None)
    try:
        assert replica.is_replica
        assert [i async for i, _ in replica.scan()] == stored
        assert [i async for i, _ in replica.scan(after=0)] == stored[1:]
        got = await replica.get(1)
        assert got is not None and got == await store.get(1)
        with pytest.raises(Refused):
            await replica.put(record(9))
        with pytest.raises(Refused):
            await replica.update(1, got)
    finally:
        await replica.close()


async def synced_store(tmp_path: Path, uri: str, count: int) -> tuple[Replica, ReplicatedMetaStore]:
    """A store over dir records and one replica at ``uri``, with ``count`` records put and synced."""
    records = await open_backend(f"dir://{tmp_path}/records", Mode.SEQ)
    r = Replica(uri, uri, await open_backend(uri, Mode.USER))
    store = ReplicatedMetaStore(records, None, [r], opener=open_backend, verify_interval=0)
    for i in range(count):
        await store.put(record(i))
    await store.sync_all()
    assert r.synced and r.saved == count - 1
    return r, store


async def test_a_replica_wiped_under_a_running_meta_is_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "m2").mkdir()
    uri = f"dir://{tmp_path}/m2/replica"
    r, store = await synced_store(tmp_path, uri, 4)
    try:
        shutil.rmtree(tmp_path / "m2" / "replica")  # the disk is replaced while meta runs
        await store.sync_all()  # the old handle fails: dropped
        assert r.backend is None and not r.synced
        await store.sync_all()  # reopened (empty) and rebuilt
        assert r.synced and len(await replica_records(uri)) == 4
    finally:
        await store.close()


async def test_a_zdb_replica_namespace_recreated_is_rebuilt(tmp_path: Path, zdb_factory: Any) -> None:
    zdb = zdb_factory(datasize=1024 * 1024)
    await ensure_namespace(zdb.host, zdb.port, "rep", mode=Mode.USER)
    uri = f"zdb://{zdb.host}:{zdb.port}/rep"
    r, store = await synced_store(tmp_path, uri, 3)
    try:
        zdb.command("NSDEL", "rep")
        await ensure_namespace(zdb.host, zdb.port, "rep", mode=Mode.USER)
        for _ in range(3):  # the cursor is gone: every record is copied again (after a reconnect)
            await store.sync_all()
        assert r.synced and len(await replica_records(uri)) == 3
        assert await load_cursor(r.backend) == 2  # type: ignore[arg-type]
    finally:
        await store.close()
