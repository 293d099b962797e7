"""Metadata replicas: write-through, catch-up after an outage, ReplicaStatus, and a replica gateway.

Each test runs with dir backends and, when ZDB_BIN points at a zdb binary, with the metadata (master,
dedup index, replicas) in real 0-db namespaces on separate 0-db servers.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from gridstor.v1 import maint_pb2, meta_pb2
from services.common.backends import Mode, open_backend
from services.common.backends.zdb import ensure_namespace
from services.common.metastore import REPLICA_CURSOR_KEY
from tests.helpers import wait_until_async
from tests.maint.conftest import (
    CHUNK,
    Gateway,
    copy_keys,
    delete_shard,
    dir_backends,
    gateway_config,
    names,
    raw_records,
    replica_records,
)
from tests.zdb_server import ZdbProcess

Make = Callable[..., Awaitable[Gateway]]


@dataclass
class Site:
    """Where the metadata lives, and how to take a piece of it down and bring it back."""

    master: str
    index: str
    replicas: list[str]
    down: Callable[[int], None]  # replica i down (-1: the master)
    up: Callable[[int], None]


def dir_site(tmp_path: Path) -> Site:
    # Each namespace sits in its own "machine" folder: renaming that away is a machine going down
    # (a dir backend never recreates a folder whose parent is gone).
    machines = [tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"]
    for m in machines:
        m.mkdir()

    def down(i: int) -> None:
        m = machines[i + 1]
        m.rename(m.with_name(m.name + ".off"))

    def up(i: int) -> None:
        m = machines[i + 1]
        m.with_name(m.name + ".off").rename(m)

    return Site(
        master=f"dir://{machines[0]}/records",
        index=f"dir://{machines[0]}/index",
        replicas=[f"dir://{machines[1]}/replica", f"dir://{machines[2]}/replica"],
        down=down,
        up=up,
    )


async def zdb_site(zdb_factory: Callable[..., ZdbProcess]) -> Site:
    servers = [zdb_factory(datasize=4 * 1024 * 1024) for _ in range(3)]
    await ensure_namespace(servers[0].host, servers[0].port, "meta", mode=Mode.SEQ)
    await ensure_namespace(servers[0].host, servers[0].port, "index", mode=Mode.USER)
    for s in servers[1:]:
        await ensure_namespace(s.host, s.port, "replica", mode=Mode.USER)

    def uri(s: ZdbProcess, ns: str) -> str:
        return f"zdb://{s.host}:{s.port}/{ns}"

    def up(i: int) -> None:
        servers[i + 1].start()

    return Site(
        master=uri(servers[0], "meta"),
        index=uri(servers[0], "index"),
        replicas=[uri(s, "replica") for s in servers[1:]],
        down=lambda i: servers[i + 1].stop(),
        up=up,
    )


@pytest.fixture(params=["dir", "zdb"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    if request.param == "dir":
        return dir_site(tmp_path)
    return await zdb_site(request.getfixturevalue("zdb_factory"))


def master_config(tmp_path: Path, site: Site, **extra: Any) -> Any:
    metadata = {"uri": site.master, "index_uri": site.index, "replicas": site.replicas, "sync_interval": 0.1}
    return gateway_config(tmp_path / "gw", metadata=metadata, **extra)


async def status(gw: Gateway) -> maint_pb2.ReplicaStatusReply:
    assert gw.maint is not None
    return await gw.maint.ReplicaStatus(maint_pb2.ReplicaStatusRequest())


async def test_a_replica_that_was_down_catches_up(tmp_path: Path, site: Site, gateways: Make) -> None:
    gw = await gateways(master_config(tmp_path, site))
    files = {await gw.store(os.urandom(n)): n for n in (10, CHUNK + 5, 3000)}
    await wait_until_async(lambda: status(gw), "both replicas in sync", until=lambda s: s.in_sync)
    first = await status(gw)
    assert first.role == "master" and first.master_reachable and first.master_entries == 3
    assert [(r.reachable, r.entries, r.last_id, r.lag) for r in first.replicas] == [
        (True, 3, first.master_last_id, 0)
    ] * 2

    site.down(0)
    more = [await gw.store(os.urandom(n)) for n in (20, 2 * CHUNK, 7)]  # uploads go on
    # A repair while the replica is away: an update of an old record it must also catch up on.
    repaired = next(iter(files))
    await delete_shard(gw.engine, await gw.record(repaired), 0, 3)
    assert gw.maint is not None
    assert (await gw.admin.Repair(maint_pb2.RepairRequest(id=repaired))).ok
    away = await status(gw)
    assert not away.in_sync and away.master_entries == 6
    assert not away.replicas[0].reachable and away.replicas[0].error
    assert away.replicas[1].reachable and away.replicas[1].lag == 0

    site.up(0)
    await wait_until_async(lambda: status(gw), "the replica caught up", until=lambda s: s.in_sync)
    master = await raw_records(gw.cfg)
    assert len(master) == 6
    for uri in site.replicas:
        assert await replica_records(uri) == master  # same ids, byte-identical records, the update included
    for fid in more:
        assert await gw.fetch(fid)

    # The cursor is kept in the replica itself, under a key that is never a record id.
    backend = await open_backend(site.replicas[0], Mode.USER)
    try:
        cursor = await backend.get(REPLICA_CURSOR_KEY)
    finally:
        await backend.close()
    assert cursor is not None and int.from_bytes(cursor, "little") == max(master)


async def test_a_replica_gateway_serves_every_file_with_the_master_stopped(
    tmp_path: Path, site: Site, gateways: Make
) -> None:
    shards = tmp_path / "disks"
    shards.mkdir()
    backends = dir_backends(shards, names(20))
    gw = await gateways(master_config(tmp_path, site, backends=backends))
    files = {await gw.store(os.urandom(n), ext=".dat"): n for n in (1, CHUNK * 2 + 3, 50_000, CHUNK)}
    await wait_until_async(lambda: status(gw), "replicas in sync", until=lambda s: s.in_sync)
    contents = {fid: await gw.fetch(fid) for fid in files}

    # M2: its own data dir with the gateway's keys, its metadata = the replica namespace, same shard backends.
    copy_keys(gw.cfg.data_dir, tmp_path / "m2gw")
    replica_cfg = gateway_config(
        tmp_path / "m2gw",
        role="replica",
        backends=backends,
        metadata={"uri": site.replicas[0], "mode": "user", "master": site.master},
    )
    await gw.stop_meta()
    site.down(-1)  # the master metadata machine is gone

    m2 = await gateways(replica_cfg)
    assert m2.meta is not None and m2.maint is not None
    for file_id, data in contents.items():
        assert await m2.fetch(file_id) == data
        assert (await m2.meta.Exists(meta_pb2.ExistsRequest(id=file_id))).exists
        assert (await m2.meta.Stat(meta_pb2.StatRequest(id=file_id))).info.size == len(data)
        check = await m2.check(file_id, hard=True)
        assert check.ok and check.hash_ok
    listed = [r.file_id async for r in m2.meta.ListRecords(meta_pb2.ListRecordsRequest(), metadata=m2.auth)]
    assert listed == sorted(contents, key=lambda f: int(f[48:56], 16))

    # Writes are refused with a clear error.
    record = await m2.engine.store([b"new"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await m2.meta.PutRecord(meta_pb2.PutRecordRequest(record=record), metadata=m2.auth)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await m2.engine.delete_shards(record)
    for call, request in [
        (m2.admin.Repair, maint_pb2.RepairRequest(id=next(iter(files)))),
        (m2.admin.Backup, maint_pb2.BackupRequest()),
        (m2.admin.Scrub, maint_pb2.ScrubRequest()),
        (m2.admin.Restore, maint_pb2.RestoreRequest(backup_id=next(iter(files)))),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request)  # type: ignore[operator]
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "read-only replica" in (info.value.details() or "")
    dry = await m2.scrub(dry_run=True)  # a report-only pass is fine on a replica
    assert dry.files_checked == len(files) and dry.files_damaged == 0

    st = await status(m2)
    assert st.role == "replica" and not st.master_reachable and not st.in_sync
    assert [(r.reachable, r.entries) for r in st.replicas] == [(True, len(files))]


async def test_master_starts_while_a_replica_is_down(tmp_path: Path, gateways: Make) -> None:
    site = dir_site(tmp_path)
    site.down(1)
    gw = await gateways(master_config(tmp_path, site))  # a replica that cannot be opened does not stop meta
    fid = await gw.store(os.urandom(100))
    st = await status(gw)
    assert st.replicas[0].reachable and not st.replicas[1].reachable and not st.in_sync
    site.up(1)
    await wait_until_async(lambda: status(gw), "the late replica caught up", until=lambda s: s.in_sync)
    assert await gw.fetch(fid)
