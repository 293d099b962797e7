"""Metadata backup into the pool, wipe, restore: the same ids, byte-identical records, every file back."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gridstor.v1 import maint_pb2, meta_pb2
from services.common import net
from services.common.backends import Mode, open_backend
from services.common.backends.base import seq_key
from services.common.backends.zdb import ensure_namespace
from services.common.engine import FileRecord
from services.common.errors import IntegrityError
from services.common.net import REPO_ROOT as REPO
from services.maint.backup import MAGIC, read_snapshot
from tests.maint.conftest import CHUNK, Gateway, delete_shard, gateway_config, raw_config, raw_records
from tests.zdb_server import ZdbProcess

Make = Callable[..., Awaitable[Gateway]]


async def metadata_site(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[dict[str, Any], Any]:
    """(metadata settings, wipe()) for dir folders or 0-db namespaces."""
    if kind == "dir":
        m = tmp_path / "m1"
        m.mkdir()

        async def wipe_dir() -> None:
            shutil.rmtree(m / "records")
            shutil.rmtree(m / "index")

        return {"uri": f"dir://{m}/records", "index_uri": f"dir://{m}/index"}, wipe_dir
    zdb: ZdbProcess = request.getfixturevalue("zdb_factory")(datasize=4 * 1024 * 1024)
    await ensure_namespace(zdb.host, zdb.port, "meta", mode=Mode.SEQ)
    await ensure_namespace(zdb.host, zdb.port, "index", mode=Mode.USER)

    async def wipe_zdb() -> None:
        for ns, mode in (("meta", Mode.SEQ), ("index", Mode.USER)):
            zdb.command("NSDEL", ns)
            await ensure_namespace(zdb.host, zdb.port, ns, mode=mode)  # NSNEW + mode

    return {"uri": f"zdb://{zdb.host}:{zdb.port}/meta", "index_uri": f"zdb://{zdb.host}:{zdb.port}/index"}, wipe_zdb


@pytest.mark.parametrize("kind", ["dir", "zdb"])
async def test_backup_wipe_restore(kind: str, tmp_path: Path, request: pytest.FixtureRequest, gateways: Make) -> None:
    metadata, wipe = await metadata_site(kind, tmp_path, request)
    raw = raw_config(tmp_path / "gw", metadata=metadata)
    cfg = gateway_config(tmp_path / "gw", metadata=metadata)
    gw = await gateways(cfg)
    assert gw.meta is not None and gw.maint is not None
    contents = {}
    for n in (1, CHUNK * 2 + 9, 777, CHUNK, 40_000):
        data = os.urandom(n)
        contents[await gw.store(data, ext=".bin")] = data
    # Gaps in the ids: a repair (0-db: an update uses up an id) and a record removed from the namespace.
    first = next(iter(contents))
    await delete_shard(gw.engine, await gw.record(first), 0, 0)
    assert (await gw.admin.Repair(maint_pb2.RepairRequest(id=first))).ok
    removed = list(contents)[2]
    records_ns = await open_backend(metadata["uri"], Mode.SEQ)
    await records_ns.delete(seq_key(int(removed[48:56], 16)))
    await records_ns.close()
    del contents[removed]
    contents[await gw.store(os.urandom(5000), ext=".txt")] = b""
    contents = {fid: await gw.fetch(fid) for fid in contents}
    before = await raw_records(cfg)
    assert len(before) == 5

    reply = await gw.admin.Backup(maint_pb2.BackupRequest())
    assert reply.records == 5 and reply.last_id == max(before) and reply.size > 0 and reply.created > 0
    assert reply.record.hash.hex() == reply.backup_id[:48]
    saved = sorted((tmp_path / "gw" / "backups").glob("*.record"))
    assert len(saved) == 1
    assert FileRecord.FromString(saved[0].read_bytes()) == reply.record
    snapshot = await gw.fetch(reply.backup_id)  # an ordinary file in the pool
    assert snapshot.startswith(MAGIC)

    async def chunks() -> Any:
        yield snapshot

    assert [(i, v) async for i, v in read_snapshot(chunks())] == sorted(before.items())

    # Lose all metadata.
    await gw.stop_meta()
    await wipe()
    if kind == "dir":
        # The command-line restore, as an operator would run it after losing every metadata machine.
        config_file = tmp_path / "gateway.yaml"
        config_file.write_text(yaml.safe_dump(raw))
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "services.maint",
                "restore",
                "--record",
                str(saved[0]),
                "--config",
                str(config_file),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=net.child_env(),
        )
        assert proc.returncode == 0, proc.stderr
        assert f"restored 5 records (last id {max(before):08x})" in proc.stdout
    else:
        restored = await gw.admin.Restore(maint_pb2.RestoreRequest(record=reply.record, backup_id=reply.backup_id))
        assert (restored.records, restored.last_id) == (5, max(before))

    assert await raw_records(cfg) == before  # same ids, byte-identical records, no filler left
    await gw.start_meta()
    for file_id, data in contents.items():
        assert await gw.fetch(file_id) == data
        found = await gw.meta.FindByHash(meta_pb2.FindByHashRequest(hash=bytes.fromhex(file_id[:48])), metadata=gw.auth)
        assert found.found and found.file_id == file_id  # the dedup index is rebuilt
    new_id = await gw.store(os.urandom(10))
    assert int(new_id[48:56], 16) > max(before)

    # A second restore into the now non-empty namespace is refused unless forced.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.admin.Restore(maint_pb2.RestoreRequest(record=reply.record))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs an empty one" in (info.value.details() or "")


async def test_restore_with_force_and_bad_input(tmp_path: Path, gateways: Make) -> None:
    gw = await gateways(gateway_config(tmp_path / "gw"))
    assert gw.maint is not None
    ids = [await gw.store(os.urandom(n)) for n in (10, 20)]
    reply = await gw.admin.Backup(maint_pb2.BackupRequest())
    # Damage a record after the backup; a forced restore puts the snapshot's version back.
    record = await gw.record(ids[0])
    changed = FileRecord()
    changed.CopyFrom(record)
    changed.content_type = "text/x-changed"
    assert gw.meta is not None
    await gw.meta.UpdateRecord(meta_pb2.UpdateRecordRequest(id=ids[0], record=changed), metadata=gw.auth)
    restored = await gw.admin.Restore(maint_pb2.RestoreRequest(backup_id=reply.backup_id, force=True))
    assert restored.records == 2
    assert await gw.record(ids[0]) == record
    # The record must match the backup id it comes with.
    other = await gw.record(ids[1])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.admin.Restore(maint_pb2.RestoreRequest(backup_id=reply.backup_id, record=other, force=True))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A file that is not a snapshot.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.admin.Restore(maint_pb2.RestoreRequest(backup_id=ids[1], force=True))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS


async def test_truncated_snapshots_are_refused() -> None:
    async def stream(*parts: bytes) -> Any:
        for p in parts:
            yield p

    good = MAGIC + bytes(8) + b"R" + (3).to_bytes(4, "little") + (2).to_bytes(4, "little") + b"ab"
    end = b"E" + (1).to_bytes(8, "little")
    assert [x async for x in read_snapshot(stream(good[:5], good[5:], end))] == [(3, b"ab")]
    for bad in (good, good[:-1], good + b"E" + (2).to_bytes(8, "little"), b"nope", good + end + b"x"):
        with pytest.raises(IntegrityError):
            _ = [x async for x in read_snapshot(stream(bad))]
