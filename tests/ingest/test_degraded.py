"""Uploads while backends are down (degraded writes), then full redundancy once they return.

The whole write path (ingest, its store worker process, meta) with maint running its repair queue, over
20 dir backends (a backend is down while its folder is moved away) and one redis. With 16+4 coding and the
default write_quorum of k+1 = 17, uploads go on with 1 and with 3 backends down, stop with 4.
"""

from __future__ import annotations

import os
from pathlib import Path

from gridstor.v1 import common_pb2, meta_pb2
from services.common.repairqueue import QUEUE
from tests.helpers import wait_until_async
from tests.redis_server import RedisProcess
from tests.stack import Stack, dir_backends, move_away, put_back

CHUNK = 64 * 1024


async def test_uploads_with_one_and_three_backends_down_then_full_redundancy(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    root = tmp_path / "disks"
    stack = await Stack.start(
        tmp_path,
        redis_server,
        backends=dir_backends(root),
        engine={"chunk_size": CHUNK, "hedge_after": 0.5, "backend_cooldown": 1.0},
    )
    try:

        async def under_replicated(fid: str, data: bytes, down: int) -> None:
            """Stored, readable, shown under-replicated: Stat from the record, Check from the backends."""
            info = (await stack.meta_stub.Stat(meta_pb2.StatRequest(id=fid))).info
            assert info.unwritten_shards == down * info.chunks
            assert await stack.download(fid) == data
            check = await stack.check(fid)
            assert not check.ok and check.under_replicated and check.readable and check.recoverable
            assert check.shards_lost == down * info.chunks and check.shards_unreachable == 0
            assert all(len(c.unwritten) == down and not c.missing for c in check.damaged)

        one = os.urandom(5 * CHUNK + 7)
        move_away(root, ["b03"])
        fid1 = await stack.stored(one, "one.bin")
        await under_replicated(fid1, one, 1)
        three = os.urandom(3 * CHUNK + 1)
        move_away(root, ["b07", "b11"])
        fid3 = await stack.stored(three, "three.bin")
        await under_replicated(fid3, three, 3)
        # The first file's shards on the two backends now away are unreachable, not lost.
        check = await stack.check(fid1)
        assert check.readable and check.recoverable and set(check.unreachable_backends) == {"b07", "b11"}
        assert check.shards_lost == len(check.damaged) and check.shards_unreachable == 2 * len(check.damaged)
        await wait_until_async(
            lambda: stack.ingest_registry.render(),
            "the degraded writes counted",
            until=lambda text: "gridstor_ingest_degraded_writes_total 2" in text,
        )
        assert set(await stack.redis.zrange(QUEUE, 0, -1)) == {fid1, fid3}  # the workers queued both

        # A fourth backend down: 16 of 20 take writes, below the quorum: the job fails with the reason.
        move_away(root, ["b15"])
        job = await stack.upload(os.urandom(2 * CHUNK), "four.bin")
        failed = await stack.status(job, wait=60)
        assert failed.state == common_pb2.JOB_STATE_ERROR and "write_quorum is 17" in failed.error, failed
        put_back(root, ["b15"])

        # The backends come back: maint's health checks close their breakers, the repair queue runs at once.
        put_back(root, ["b03", "b07", "b11"])

        async def healed() -> list[bool]:
            return [(await stack.check(fid)).ok for fid in (fid1, fid3)]

        await wait_until_async(healed, "both files back to k+m shards", until=all, within=60)
        for fid, data in ((fid1, one), (fid3, three)):
            assert (await stack.meta_stub.Stat(meta_pb2.StatRequest(id=fid))).info.unwritten_shards == 0
            assert (await stack.check(fid, hard=True)).ok
            assert await stack.download(fid) == data
        await wait_until_async(lambda: stack.redis.zcard(QUEUE), "the repair queue to empty", until=lambda n: n == 0)
        assert "gridstor_maint_repair_queue_repaired_total 2" in stack.maint_registry.render()
        # No shard of the failed upload was left behind: every key is one a record references.
        keys, refs = await stack.keys(), await stack.referenced()
        assert {n: k - refs.get(n, set()) for n, k in keys.items() if k - refs.get(n, set())} == {}
    finally:
        await stack.stop()
