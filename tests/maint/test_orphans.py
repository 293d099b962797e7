"""Orphan collection: shards no record references and no running job owns are found and deleted.

Over the whole write path (meta, ingest with its store worker processes, maint) and a real redis: a worker
killed mid-upload leaves shards no record references; a collection removes exactly those, and never the
shards of a job still in flight (its lease), of a stored file, or a backend's identity marker.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.backends import Mode
from services.common.backends.zdb import ensure_namespace
from services.common.gateway import open_engine
from services.common.leases import Leases
from tests.helpers import wait_until_async
from tests.maint.conftest import gridstor
from tests.redis_server import RedisProcess
from tests.stack import Stack
from tests.zdb_server import ZdbProcess

pytestmark = pytest.mark.usefixtures("private_home")


def orphans_of(keys: dict[str, set[bytes]], refs: dict[str, set[bytes]]) -> dict[str, set[bytes]]:
    return {name: held - refs.get(name, set()) for name, held in keys.items() if held - refs.get(name, set())}


@pytest.mark.parametrize("backend", ["dir", "zdb"])
async def test_a_killed_workers_shards_are_collected(
    backend: str,
    tmp_path: Path,
    redis_server: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
    zdb_factory: Callable[..., ZdbProcess],
) -> None:
    monkeypatch.setenv("GRIDSTOR_CLAIM_IDLE_MS", "1000")
    backends = None
    if backend == "zdb":
        zdb = zdb_factory(datasize=16 * 1024 * 1024)
        backends = []
        for i in range(20):
            await ensure_namespace(zdb.host, zdb.port, f"s{i:02d}", mode=Mode.SEQ)
            backends.append({"name": f"b{i:02d}", "uri": f"zdb://{zdb.host}:{zdb.port}/s{i:02d}"})
    stack = await Stack.start(
        tmp_path,
        redis_server,
        backends=backends,
        engine={"chunk_size": "16KiB"},  # slow enough (hundreds of chunks) to kill the worker midway
        maint={"orphan_grace": 0},
        workers=2,
    )
    try:
        kept = os.urandom(100_000)
        kept_id = await stack.stored(kept, "kept.bin")
        assert orphans_of(await stack.keys(), await stack.referenced()) == {}

        data = os.urandom(6 * 1024 * 1024)
        job = await stack.upload(data, "big.bin")

        async def storing() -> bool:
            h = await stack.redis.hgetall(f"gridstor:job:{job}")
            return int(h.get("progress") or 0) > 0 and bool(h.get("worker_pid"))

        await wait_until_async(storing, "a worker storing the job")
        os.kill(int((await stack.redis.hgetall(f"gridstor:job:{job}"))["worker_pid"]), signal.SIGKILL)
        done = await stack.status(job, wait=120)  # another worker takes the job over and stores it again
        assert done.file_id, done

        left = orphans_of(await stack.keys(), await stack.referenced())
        count = sum(len(keys) for keys in left.values())
        assert count > 0, "the killed attempt left shards behind"

        dry = await stack.collect_orphans(dry_run=True)
        assert (dry.orphans, dry.deleted, dry.error) == (count, 0, "")
        assert orphans_of(await stack.keys(), await stack.referenced()) == left

        code, out, err = await gridstor(stack, tmp_path, "admin", "token", "--data", str(stack.cfg.data_dir))
        assert code == 0, err
        code, out, err = await gridstor(stack, tmp_path, "admin", "orphans", "--wait")
        assert code == 0, err
        assert f"{count} orphans, {count} deleted" in out and "orphans idle (collection" in out
        assert orphans_of(await stack.keys(), await stack.referenced()) == {}
        assert f"gridstor_maint_orphans_deleted_total {count}" in stack.maint_registry.render()
        for fid, content in ((kept_id, kept), (done.file_id, data)):
            assert await stack.download(fid) == content
            assert (await stack.check(fid)).ok
        if backend == "zdb":  # the identity markers stayed
            assert all(len(k) == 1 for k in (await stack.keys(markers=True)).values())
    finally:
        await stack.stop()


async def test_the_shards_of_a_job_in_flight_are_kept(tmp_path: Path, redis_server: RedisProcess) -> None:
    """A lease taken before the first shard keeps every key written since from being judged."""
    stack = await Stack.start(tmp_path, redis_server, maint={"orphan_grace": 0})
    engine = await open_engine(stack.cfg)
    try:
        await stack.stored(os.urandom(50_000), "kept.bin")
        leases = Leases(stack.redis, ttl=600)
        async with leases.hold("a-job-in-flight"):
            unregistered = await engine.store([os.urandom(200_000)])  # shards written, no record yet
            during = await stack.collect_orphans()
            assert during.error == "" and during.orphans == 0 and during.too_new >= 20 * len(unregistered.chunks)
        after = await stack.collect_orphans()  # the job ended without a record: its shards are orphans now
        assert after.orphans == after.deleted == 20 * len(unregistered.chunks)
        assert orphans_of(await stack.keys(), await stack.referenced()) == {}
    finally:
        await engine.pool.close()
        await stack.stop()


async def test_no_collection_without_the_job_queue_or_with_no_records(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    stack = await Stack.start(tmp_path, redis_server, maint={"orphan_grace": 0})
    try:
        empty = await stack.collect_orphans()
        assert "the metadata lists no record" in empty.error and empty.deleted == 0
        await stack.stored(os.urandom(10_000))
        redis_server.stop()
        try:
            blind = await stack.collect_orphans()
        finally:
            redis_server.start()
        assert "running jobs cannot be seen" in blind.error and blind.deleted == 0
    finally:
        await stack.stop()
