"""A job waits out a metadata outage (the meta service, or its 0-db) or a Redis one, then completes.

A metadata outage longer than ``outage_wait`` fails the job, naming it.

Status shows such a job ACTIVE with the reason it waits. A real outage: meta is stopped and started again
on the same port (60 s), or the 0-db holding the metadata is stopped with SIGSTOP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gridstor.v1 import common_pb2, meta_pb2
from services.common.backends import Mode
from services.common.backends.zdb import ensure_namespace
from tests.helpers import wait_until_async
from tests.ingest.conftest import requests
from tests.redis_server import RedisProcess
from tests.stack import Stack
from tests.zdb_server import ZdbProcess

OUTAGE = 60.0
ACTIVE = (common_pb2.JOB_STATE_ACTIVE, common_pb2.JOB_STATE_TIMEOUT)


async def test_a_job_survives_a_60_s_metadata_outage(tmp_path: Path, redis_server: RedisProcess) -> None:
    stack = await Stack.start(tmp_path, redis_server, outage_wait=180)
    try:
        await stack.stored(b"warm-up")
        await stack.stop_meta()
        down = time.monotonic()
        data = os.urandom(300_000)
        job = await stack.upload(data, "during.bin")  # ingest takes uploads without meta
        waiting = await wait_until_async(
            lambda: stack.status(job), "the job to say why it waits", until=lambda s: s.waiting
        )
        assert waiting.state == common_pb2.JOB_STATE_ACTIVE and waiting.result == "ACTIVE"
        assert (
            "the metadata service is unreachable since" in waiting.waiting and "waiting up to 180 s" in waiting.waiting
        )
        while time.monotonic() - down < OUTAGE:  # the whole outage: still ACTIVE, never failed
            reply = await stack.status(job, wait=5)
            assert reply.state in ACTIVE and reply.waiting, reply
        await stack.start_meta()
        done = await stack.status(job, wait=60)
        assert done.state == common_pb2.JOB_STATE_DONE and done.file_id.startswith(done.hash), done
        assert not done.waiting and await stack.download(done.file_id) == data
    finally:
        await stack.stop()


async def test_a_longer_outage_fails_the_job_clearly(tmp_path: Path, redis_server: RedisProcess) -> None:
    stack = await Stack.start(tmp_path, redis_server, outage_wait=3)
    try:
        await stack.stored(b"warm-up")
        await stack.stop_meta()
        job = await stack.upload(os.urandom(50_000), "lost.bin")
        failed = await stack.status(job, wait=60)
        assert failed.state == common_pb2.JOB_STATE_ERROR, failed
        assert failed.error.startswith("meta FindByHash failed: ") and "UNAVAILABLE" in failed.error
        assert "(still, after 3 s)" in failed.error
    finally:
        await stack.stop()


async def test_a_job_waits_out_a_stopped_metadata_zdb(
    tmp_path: Path, redis_server: RedisProcess, zdb_factory: Callable[..., ZdbProcess]
) -> None:
    zdb = zdb_factory()
    await ensure_namespace(zdb.host, zdb.port, "meta", mode=Mode.SEQ)
    await ensure_namespace(zdb.host, zdb.port, "meta-index", mode=Mode.USER)
    metadata = {"uri": f"zdb://{zdb.host}:{zdb.port}/meta", "index_uri": f"zdb://{zdb.host}:{zdb.port}/meta-index"}
    stack = await Stack.start(tmp_path, redis_server, metadata=metadata, outage_wait=120)
    try:
        await stack.stored(b"warm-up")
        zdb.pause()
        try:
            data = os.urandom(200_000)
            job = await stack.upload(data, "during.bin")
            waiting = await wait_until_async(
                lambda: stack.status(job), "the job to say why it waits", until=lambda s: s.waiting, within=60
            )
            assert waiting.state == common_pb2.JOB_STATE_ACTIVE and "metadata" in waiting.waiting
        finally:
            zdb.resume()
        done = await stack.status(job, wait=60)
        assert done.state == common_pb2.JOB_STATE_DONE, done
        assert await stack.download(done.file_id) == data
    finally:
        await stack.stop()


async def test_a_job_waits_out_a_redis_outage(
    tmp_path: Path, redis_server: RedisProcess, capfd: pytest.CaptureFixture[str]
) -> None:
    """Redis goes away while a worker stores a job: the file is stored meanwhile, and the job ends DONE once
    Redis is back (its outcome is recorded then), in its first attempt."""
    stack = await Stack.start(tmp_path, redis_server, engine={"chunk_size": "16KiB"}, outage_wait=120)
    try:
        data = os.urandom(6 * 1024 * 1024)
        reply = await stack.ingest_stub.Upload(iter(requests(data, "during.bin")))

        async def storing() -> bool:
            h = await stack.redis.hgetall(f"gridstor:job:{reply.job}")
            return int(h.get("progress") or 0) > 0

        await wait_until_async(storing, "a worker storing the job")
        redis_server.stop()
        try:
            find = meta_pb2.FindByHashRequest(hash=bytes.fromhex(reply.hash))
            await wait_until_async(
                lambda: stack.meta_stub.FindByHash(find, metadata=stack.internal),
                "the file stored while redis is away",
                until=lambda r: r.found,
                within=60,
            )
        finally:
            redis_server.start()
        done = await stack.status(reply.job, wait=60)
        assert done.state == common_pb2.JOB_STATE_DONE and not done.deduplicated, done
        assert (await stack.redis.hgetall(f"gridstor:job:{reply.job}"))["attempts"] == "1"
        assert await stack.download(done.file_id) == data
        # The worker's log (stderr of its process): it waited to record the outcome.
        assert "recording DONE: the job queue (redis) is unavailable" in capfd.readouterr().err
    finally:
        await stack.stop()
