"""Big uploads are queued while they arrive and stored as they grow: success, abort, oversize, worker death."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from google.api import httpbody_pb2

from gridstor.v1 import common_pb2, ingest_pb2
from services.common import jobs
from services.ingest.upload import STREAM_FROM
from tests.ingest.conftest import MESSAGE, MiB, Suite, SuiteFactory, eventually


def body(data: bytes, **header: object) -> ingest_pb2.UploadRequest:
    return ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=data), **header)  # type: ignore[arg-type]


async def only_job(suite: Suite) -> str:
    keys = await suite.redis.keys(jobs.JOB_PREFIX + "*")
    return str(keys[0])[len(jobs.JOB_PREFIX) :] if len(keys) == 1 else ""


async def test_streamed_upload_is_stored_and_deduplicated(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    data = os.urandom(STREAM_FROM + 3 * MiB + 7)
    call = suite.ingest.Upload(None)
    await call.write(body(data[:MESSAGE], name="big.bin", declared_size=len(data)))
    off = MESSAGE
    while off < 2 * MiB:
        await call.write(body(data[off : off + MESSAGE]))
        off += MESSAGE

    async def storing() -> bool:
        job = await only_job(suite)
        h = await suite.job_hash(job) if job else {}
        return h.get("receiving") == "1" and bool(h.get("worker"))

    await eventually(storing)  # queued and taken by a worker while the upload is incomplete
    while off < len(data):
        await call.write(body(data[off : off + MESSAGE]))
        off += MESSAGE
    await call.done_writing()
    reply = await call
    status = await suite.wait(reply.job)
    assert status.state == common_pb2.JOB_STATE_DONE, status.error
    assert (status.size, status.hash, status.deduplicated) == (len(data), reply.hash, False)
    assert status.file_id.startswith(reply.hash)
    assert await suite.download(status.file_id) == data
    shards = await suite.shard_count()

    # The same content again, streamed: PutRecord dedups and the new shards go.
    again = await suite.wait((await suite.upload(data, "copy.bin", declared_size=len(data))).job)
    assert again.state == common_pb2.JOB_STATE_DONE and again.deduplicated
    assert again.file_id == status.file_id
    assert await suite.shard_count() == shards
    await eventually(lambda: not suite.spool_files)


async def test_cancel_while_streaming_leaves_nothing(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    call = suite.ingest.Upload(None)
    chunk = os.urandom(MESSAGE)
    await call.write(body(chunk, name="partial.bin", declared_size=64 * MiB))
    for _ in range(15):
        await call.write(body(chunk))

    async def stored_some() -> bool:
        job = await only_job(suite)
        return bool(job) and bool((await suite.job_hash(job)).get("worker")) and await suite.shard_count() > 0

    await eventually(stored_some)
    job = await only_job(suite)
    call.cancel()
    await eventually(lambda: not suite.spool_files)
    h = await suite.job_hash(job)
    assert h["state"] == jobs.ERROR and h["error"].startswith(jobs.ABORTED)
    await eventually(lambda: _queue_empty(suite))  # the worker stopped and acknowledged it
    await eventually(lambda: _no_shards(suite))
    assert (await suite.job_hash(job))["state"] == jobs.ERROR


async def test_oversize_while_streaming(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(max_upload=STREAM_FROM + 2 * MiB)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.upload(os.urandom(STREAM_FROM + 3 * MiB))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert suite.spool_files == []
    await eventually(lambda: _queue_empty(suite))
    await eventually(lambda: _no_shards(suite))
    job = await only_job(suite)
    assert (await suite.job_hash(job))["state"] == jobs.ERROR


async def test_worker_killed_while_receiving(suite_factory: SuiteFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDSTOR_CLAIM_IDLE_MS", "1000")
    suite = await suite_factory(workers=2, engine={"chunk_size": "64KiB"})
    data = os.urandom(16 * MiB)
    call = suite.ingest.Upload(None)
    await call.write(body(data[:MESSAGE], name="big.bin", declared_size=len(data)))
    off = MESSAGE
    while off < 4 * MiB:
        await call.write(body(data[off : off + MESSAGE]))
        off += MESSAGE

    async def storing() -> bool:
        job = await only_job(suite)
        h = await suite.job_hash(job) if job else {}
        return bool(h.get("worker_pid")) and await suite.shard_count() > 0

    await eventually(storing)
    job = await only_job(suite)
    victim = int((await suite.job_hash(job))["worker_pid"])
    os.kill(victim, signal.SIGKILL)

    async def taken_over() -> bool:
        return (await suite.job_hash(job)).get("attempts") == "2"

    await eventually(taken_over)  # the new worker tails the upload that is still arriving
    assert (await suite.job_hash(job))["receiving"] == "1"
    while off < len(data):
        await call.write(body(data[off : off + MESSAGE]))
        off += MESSAGE
    await call.done_writing()
    reply = await call
    status = await suite.wait(reply.job)
    assert status.state == common_pb2.JOB_STATE_DONE, status.error
    assert status.hash == reply.hash and status.size == len(data)
    assert int((await suite.job_hash(job))["worker_pid"]) != victim
    assert await suite.download(status.file_id) == data
    await eventually(lambda: not suite.spool_files)


async def _queue_empty(suite: Suite) -> bool:
    return bool(await suite.redis.xlen(jobs.STREAM) == 0)


async def _no_shards(suite: Suite) -> bool:
    return await suite.shard_count() == 0
