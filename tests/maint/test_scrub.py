"""Scrub and repair over real meta + maint servers and dir backends."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from gridstor.v1 import maint_pb2, meta_pb2
from services.common.backends import Mode
from services.common.backends.zdb import ensure_namespace
from services.common.engine import EngineConfig, FileRecord
from services.common.gateway import open_engine
from services.common.metaclient import MetaClient
from services.maint import checks
from services.maint.scrub import RateLimiter, ScrubState
from tests.common.engine_util import corrupt_shard
from tests.maint.conftest import (
    CHUNK,
    Gateway,
    delete_shard,
    dir_backends,
    gateway_config,
    names,
    shard_backends,
)
from tests.zdb_server import ZdbProcess

Make = Callable[..., Awaitable[Gateway]]


def payloads(n: int) -> list[bytes]:
    """Files of 1 byte to a few chunks."""
    sizes = [1, CHUNK - 1, CHUNK * 2 + 17, CHUNK * 3, 5000, CHUNK + 1][:n]
    return [os.urandom(s) for s in sizes]


async def store_payloads(gw: Gateway, n: int) -> tuple[dict[str, bytes], str, FileRecord]:
    """``payloads(n)`` stored through ``gw`` (by file id), and the id and record of one over two chunks long."""
    files = {await gw.store(data): data for data in payloads(n)}
    big = next(fid for fid, d in files.items() if len(d) > CHUNK * 2)
    return files, big, await gw.record(big)


@pytest.mark.parametrize("how", ["removed", "wiped"])
async def test_lost_backends_are_rebuilt_onto_added_ones(how: str, tmp_path: Path, gateways: Make) -> None:
    root = tmp_path / "disks"
    root.mkdir()
    cfg20 = gateway_config(tmp_path / "gw", backends=dir_backends(root, names(20)))
    gw20 = await gateways(cfg20, maint=False)
    files = {await gw20.store(data): data for data in payloads(6)}
    await gw20.stop()

    # Four disks die. "removed": they leave the config and four new ones join (20 listed, k+m = 20).
    # "wiped": all 24 stay listed and the four come back empty (replaced disks).
    gone = {"b03", "b07", "b11", "b15"}
    for name in gone:
        shutil.rmtree(root / name)
    now = [n for n in names(24) if how == "wiped" or n not in gone]
    cfg = gateway_config(tmp_path / "gw", backends=dir_backends(root, now))
    gw = await gateways(cfg)

    first_id = next(iter(files))
    before = await gw.record(first_id)
    first = await gw.check(first_id)
    assert not first.ok and first.recoverable and not first.hard
    assert len(first.damaged) == len(before.chunks)
    for c in first.damaged:
        on_gone = [si for si, s in enumerate(before.chunks[c.index].shards) if before.backends[s.backend] in gone]
        assert list(c.missing) == on_gone and len(on_gone) == 4

    progress = await gw.scrub()
    assert progress.files_checked == len(files)
    assert progress.files_damaged == len(files)
    assert progress.files_repaired == len(files)
    chunks = sum([len((await gw.record(fid)).chunks) for fid in files])
    assert progress.shards_repaired == 4 * chunks
    assert progress.files_unrecoverable == 0 and progress.last_full_pass > 0
    assert gw.registry.render().count("gridstor_maint_scrub_files_repaired_total 6") == 1
    state = ScrubState.load(tmp_path / "gw" / "maint" / "scrub.json")
    assert state.passes_since_hard + 1 >= cfg.maint.hard_every, "after damage the next scheduled pass is hard"
    # The soft pass was enough, wiped disks included: a re-initialised folder has a new identity.

    new = set(names(4, 20))
    for file_id, data in files.items():
        record = await gw.record(file_id)
        used = shard_backends(record)
        if how == "removed":
            assert not used & gone, "no shard may stay on a removed backend"
            assert used & new
        for chunk in record.chunks:  # every chunk: 20 shards on 20 distinct backends
            assert len({record.backends[s.backend] for s in chunk.shards}) == 20
        hard = await gw.check(file_id, hard=True)
        assert hard.ok and hard.hash_ok and not hard.damaged, hard
        assert await gw.fetch(file_id) == data

    # A second pass finds nothing left to do; the metrics add up.
    again = await gw.scrub()
    assert (again.files_checked, again.files_damaged, again.files_repaired) == (len(files), 0, 0)
    assert "gridstor_maint_scrub_last_full_pass_timestamp_seconds 0" not in gw.registry.render()

    # New writes use the added backends too.
    record = await gw.engine.store([os.urandom(CHUNK * 4)])
    assert shard_backends(record) & new
    await gw.engine.delete_shards(record)


async def test_hard_scrub_finds_and_repairs_corrupt_shards(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw"))
    files, target, record = await store_payloads(gw, 3)
    await corrupt_shard(gw.engine, record, 0, 2)
    await corrupt_shard(gw.engine, record, 1, 17)
    await delete_shard(gw.engine, record, 2, 5)

    soft = await gw.check(target)
    assert [(c.index, list(c.missing), list(c.corrupt)) for c in soft.damaged] == [(2, [5], [])]
    hard = await gw.check(target, hard=True)
    assert hard.hard and not hard.ok and hard.recoverable and hard.hash_ok
    assert [(c.index, list(c.missing), list(c.corrupt)) for c in hard.damaged] == [
        (0, [], [2]),
        (1, [], [17]),
        (2, [5], []),
    ]

    # A soft pass sees (and repairs) only the missing shard; the corrupt ones need the hard cycle.
    soft_pass = await gw.scrub()
    assert soft_pass.files_damaged == 1 and soft_pass.files_repaired == 1 and soft_pass.shards_repaired == 1
    still = await gw.check(target, hard=True)
    assert [(c.index, list(c.corrupt)) for c in still.damaged] == [(0, [2]), (1, [17])]

    hard_pass = await gw.scrub(hard=True)
    assert hard_pass.hard and hard_pass.files_damaged == 1 and hard_pass.files_repaired == 1
    assert hard_pass.shards_repaired == 2 and hard_pass.last_hard_pass > 0
    final = await gw.check(target, hard=True)
    assert final.ok and not final.damaged
    for file_id, data in files.items():
        assert await gw.fetch(file_id) == data


async def test_m_plus_one_lost_shards_is_unrecoverable_and_kept(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw"))
    files, lost, record = await store_payloads(gw, 4)
    for si in (0, 3, 8, 16, 19):  # m+1 = 5 shards of chunk 1
        await delete_shard(gw.engine, record, 1, si)
    other = next(fid for fid in files if fid != lost)
    other_record = await gw.record(other)
    await delete_shard(gw.engine, other_record, 0, 4)

    check = await gw.check(lost)
    assert not check.recoverable and [c.index for c in check.damaged] == [1]

    progress = await gw.scrub()
    assert progress.files_unrecoverable == 1 and list(progress.unrecoverable_ids) == [lost]
    assert progress.files_repaired == 1  # the other damaged file
    assert "gridstor_maint_scrub_unrecoverable_files 1" in gw.registry.render()
    # Never dropped: the record is still there, untouched, and Repair says why it cannot help.
    assert await gw.record(lost) == record
    assert gw.maint is not None
    reply = await gw.admin.Repair(maint_pb2.RepairRequest(id=lost))
    assert not reply.ok and list(reply.unrecoverable) == [1] and "fewer than 16 good shards" in reply.error
    for file_id, data in files.items():
        if file_id != lost:
            assert await gw.fetch(file_id) == data
            assert (await gw.check(file_id)).ok


async def test_repair_rpc_and_racing_repairs_leave_no_orphans(tmp_path: Path, gateways: Make) -> None:
    cfg = gateway_config(tmp_path / "gw")
    gw = await gateways(cfg)
    data = os.urandom(CHUNK * 3)
    file_id = await gw.store(data)
    record = await gw.record(file_id)
    await delete_shard(gw.engine, record, 0, 1)
    await delete_shard(gw.engine, record, 2, 19)

    async def entries() -> int:
        return sum([(await b.info()).entries for b in gw.engine.pool.backends.values()])

    before = await entries()
    # Two repairs at once: one wins the compare-and-swap, the other retries on the new record.
    client = MetaClient.for_config(dataclasses.replace(gw.cfg, ports={**gw.cfg.ports, "meta": gw.meta_port}), "maint")
    engine2 = await open_engine(gw.cfg)
    try:
        results = await asyncio.gather(
            checks.repair(gw.engine, client, file_id), checks.repair(engine2, client, file_id)
        )
    finally:
        await client.close()
        await engine2.pool.close()
    assert all(r.ok for r in results)
    assert sorted(r.shards_repaired for r in results) in ([0, 2], [2, 2])
    assert await entries() == before + 2, "the losing repair's shards must be removed"
    assert (await gw.check(file_id, hard=True)).ok

    assert gw.maint is not None
    await delete_shard(gw.engine, await gw.record(file_id), 1, 7)
    reply = await gw.admin.Repair(maint_pb2.RepairRequest(id=file_id, hard=True))
    assert reply.ok and reply.shards_repaired == 1
    assert [(r.index, list(r.shards)) for r in reply.repaired] == [(1, [7])]
    assert reply.id == file_id and len(reply.repaired[0].backends) == 1
    assert await gw.fetch(file_id) == data


async def test_scrub_rpc_reports_the_running_pass_and_dry_run(tmp_path: Path, gateways: Make) -> None:
    cfg = gateway_config(tmp_path / "gw", maint={"scrub_interval": 0, "scrub_files_per_second": 5})
    gw = await gateways(cfg)
    files = [await gw.store(d) for d in payloads(3)]
    record = await gw.record(files[0])
    await delete_shard(gw.engine, record, 0, 0)
    assert gw.maint is not None
    first = await gw.admin.Scrub(maint_pb2.ScrubRequest(dry_run=True))
    assert first.started and first.progress.state == maint_pb2.SCRUB_STATE_RUNNING and first.progress.dry_run
    second = await gw.admin.Scrub(maint_pb2.ScrubRequest(hard=True))
    assert not second.started and second.progress.dry_run and not second.progress.hard

    done = await gw.scrub_ended()
    assert done.files_checked == 3 and done.files_damaged == 1 and done.files_repaired == 0
    assert done.finished >= done.started > 0
    assert not (await gw.check(files[0])).ok  # dry run: nothing repaired


async def test_check_errors(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw"))
    assert gw.maint is not None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.maint.Check(maint_pb2.CheckRequest(id="nope"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.maint.Check(maint_pb2.CheckRequest(id="ab" * 28))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    file_id = await gw.store(b"hello")
    reply = await gw.maint.Check(maint_pb2.CheckRequest(id=file_id.split(".")[0]))
    assert reply.ok and reply.id == file_id and not reply.hard and not reply.hash_ok
    assert (reply.k, reply.m, reply.chunks) == (16, 4, 1)
    assert (await gw.meta.Exists(meta_pb2.ExistsRequest(id=file_id))).exists  # type: ignore[union-attr]


async def test_rate_limiter_spaces_work_out() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)
        now[0] += d

    limiter = RateLimiter(10, 1000, clock=lambda: now[0], sleep=sleep, burst=0.0)
    for _ in range(5):
        await limiter.take(files=1)
    assert sum(slept) == pytest.approx(0.5)
    await limiter.take(nbytes=2000)
    assert sum(slept) == pytest.approx(2.5)
    assert EngineConfig().k == 16


async def test_zdb_namespaces_wiped_and_recreated(
    tmp_path: Path, gateways: Make, zdb_factory: Callable[..., ZdbProcess]
) -> None:
    zdb = zdb_factory(datasize=2 * 1024 * 1024)
    spaces = names(20)
    for ns in spaces:
        await ensure_namespace(zdb.host, zdb.port, ns, mode=Mode.SEQ)
    backends = [{"name": ns, "uri": f"zdb://{zdb.host}:{zdb.port}/{ns}"} for ns in spaces]
    cfg = gateway_config(tmp_path / "gw", backends=backends)
    gw = await gateways(cfg, maint=False)
    files = {await gw.store(data): data for data in payloads(5)}
    await gw.stop()

    replaced = ("b02", "b09", "b13", "b18")
    for ns in replaced:  # four disks replaced: empty namespaces under the same names
        zdb.command("NSDEL", ns)
        await ensure_namespace(zdb.host, zdb.port, ns, mode=Mode.SEQ)
    gw = await gateways(cfg)
    # New uploads land first: a recreated namespace hands out its keys again (0-db ids restart), so the
    # new files' shards sit under the very keys the old records point at, with the same sizes.
    newer = {await gw.store(data): data for data in payloads(5)}
    first = next(iter(files))
    check = await gw.check(first)  # soft: nothing read; the identities tell the old shards are gone
    assert not check.ok and check.recoverable and set(check.replaced_backends) == set(replaced)
    assert all(len(c.missing) == 4 for c in check.damaged) and check.shards_unreachable == 0
    progress = await gw.scrub()
    assert progress.files_damaged == len(files) and progress.files_repaired == len(files)
    assert progress.files_unrecoverable == 0
    for file_id, data in {**files, **newer}.items():
        check = await gw.check(file_id, hard=True)
        assert check.ok and not check.damaged
        assert await gw.fetch(file_id) == data
