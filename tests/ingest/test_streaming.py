"""Big uploads are queued while they arrive and stored as they grow: success, abort, oversize, worker death."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2

from gridstor.v1 import common_pb2, ingest_pb2
from services.common import jobs
from services.ingest.upload import STREAM_FROM
from tests.helpers import wait_until_async
from tests.ingest.conftest import MESSAGE, MiB, Suite, SuiteFactory


def body(data: bytes, **header: object) -> ingest_pb2.UploadRequest:
    return ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=data), **header)  # type: ignore[arg-type]


async def send(call: Any, data: bytes, off: int, end: int) -> int:
    """Write ``data[off:end]`` to an Upload call in MESSAGE-sized requests; the offset reached."""
    while off < end:
        await call.write(body(data[off : off + MESSAGE]))
        off += MESSAGE
    return off


async def begin(suite: Suite, data: bytes, end: int) -> tuple[Any, int]:
    """Start a streamed upload of ``data`` (its size declared) and send it up to ``end``: (the call, the offset)."""
    call = suite.ingest.Upload(None)
    await call.write(body(data[:MESSAGE], name="big.bin", declared_size=len(data)))
    return call, await send(call, data, MESSAGE, end)


async def queue_length(suite: Suite) -> int:
    return int(await suite.redis.xlen(jobs.STREAM))


async def only_job(suite: Suite) -> str:
    keys = await suite.redis.keys(jobs.JOB_PREFIX + "*")
    return str(keys[0])[len(jobs.JOB_PREFIX) :] if len(keys) == 1 else ""


async def held_while_receiving(suite: Suite) -> str:
    """Wait until a worker holds the only job, queued while its upload still arrives; the job's id."""

    async def held() -> bool:
        job = await only_job(suite)
        h = await suite.job_hash(job) if job else {}
        return h.get("receiving") == "1" and bool(h.get("worker"))

    await wait_until_async(held, "the job queued and taken by a worker while the upload is incomplete")
    return await only_job(suite)


async def test_streamed_upload_is_stored_and_deduplicated(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    data = os.urandom(STREAM_FROM + 3 * MiB + 7)
    call, off = await begin(suite, data, 2 * MiB)
    await held_while_receiving(suite)
    await send(call, data, off, len(data))
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
    # Under another extension: the answer carries it, and meta serves that id with its type.
    other = await suite.wait((await suite.upload(data, "copy.mp4", declared_size=len(data))).job)
    assert other.deduplicated and other.file_id == status.file_id.removesuffix(".bin") + ".mp4"
    assert await suite.shard_count() == shards
    await wait_until_async(lambda: suite.spool_files, "the spool to be empty", until=lambda f: f == [])


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

    await wait_until_async(stored_some, "a worker storing some shards")
    job = await only_job(suite)
    call.cancel()
    await wait_until_async(lambda: suite.spool_files, "the spool to be empty", until=lambda f: f == [])
    h = await suite.job_hash(job)
    assert h["state"] == jobs.ERROR and h["error"].startswith(jobs.ABORTED)
    await wait_until_async(lambda: queue_length(suite), "the worker to acknowledge the job", until=lambda n: n == 0)
    await wait_until_async(suite.shard_count, "the shards to be removed", until=lambda n: n == 0)
    assert (await suite.job_hash(job))["state"] == jobs.ERROR


async def test_oversize_while_streaming(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory(max_upload=STREAM_FROM + 2 * MiB)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await suite.upload(os.urandom(STREAM_FROM + 3 * MiB))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # errors.TooLarge: never worth a retry
    assert suite.spool_files == []
    await wait_until_async(lambda: queue_length(suite), "an empty job queue", until=lambda n: n == 0)
    await wait_until_async(suite.shard_count, "the shards to be removed", until=lambda n: n == 0)
    job = await only_job(suite)
    assert (await suite.job_hash(job))["state"] == jobs.ERROR


async def test_worker_killed_while_receiving(suite_factory: SuiteFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDSTOR_CLAIM_IDLE_MS", "1000")
    suite = await suite_factory(workers=2, engine={"chunk_size": "64KiB"})
    data = os.urandom(16 * MiB)
    call, off = await begin(suite, data, 4 * MiB)

    async def storing() -> bool:
        job = await only_job(suite)
        h = await suite.job_hash(job) if job else {}
        return bool(h.get("worker_pid")) and await suite.shard_count() > 0

    await wait_until_async(storing, "a worker storing shards of the upload")
    job = await only_job(suite)
    victim = int((await suite.job_hash(job))["worker_pid"])
    os.kill(victim, signal.SIGKILL)

    async def taken_over() -> bool:
        return (await suite.job_hash(job)).get("attempts") == "2"

    await wait_until_async(taken_over, "a second worker to take over the upload still arriving")
    assert (await suite.job_hash(job))["receiving"] == "1"
    await send(call, data, off, len(data))
    await call.done_writing()
    reply = await call
    status = await suite.wait(reply.job)
    assert status.state == common_pb2.JOB_STATE_DONE, status.error
    assert status.hash == reply.hash and status.size == len(data)
    assert int((await suite.job_hash(job))["worker_pid"]) != victim
    assert await suite.download(status.file_id) == data
    await wait_until_async(lambda: suite.spool_files, "the spool to be empty", until=lambda f: f == [])


async def test_a_stalled_upload_does_not_hold_up_the_queue(suite_factory: SuiteFactory) -> None:
    """One worker: a streamed upload that stops sending steps aside, and a small upload queued after it is stored."""
    suite = await suite_factory(workers=1)
    data = os.urandom(STREAM_FROM + 2 * MiB)
    call, off = await begin(suite, data, STREAM_FROM + MiB)
    stalled = await held_while_receiving(suite)
    small = os.urandom(MiB)
    status = await suite.wait((await suite.upload(small, "small.bin")).job, seconds=20)
    assert status.state == common_pb2.JOB_STATE_DONE, status.error
    assert await suite.download(status.file_id) == small
    h = await suite.job_hash(stalled)
    assert h["state"] == jobs.ACTIVE and h["receiving"] == "1"  # still waiting for its bytes, untouched

    await send(call, data, off, len(data))
    await call.done_writing()
    reply = await call
    done = await suite.wait(reply.job)
    assert reply.job == stalled and done.state == common_pb2.JOB_STATE_DONE, done.error
    assert await suite.download(done.file_id) == data


async def test_an_upload_whose_ingest_process_is_gone_ends_at_once(suite_factory: SuiteFactory) -> None:
    """A streamed job recorded as received by a process that no longer exists is ended by its worker at once."""
    suite = await suite_factory(workers=1)
    data = os.urandom(STREAM_FROM + 2 * MiB)
    call, _ = await begin(suite, data, STREAM_FROM + MiB)
    job = await held_while_receiving(suite)
    # A process that ran on this host and is gone: what the job would name had its ingest been killed.
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    await suite.redis.hset(jobs.job_key(job), "ingest", f"{socket.gethostname()}:{gone.pid}:0badc0de")

    async def ended() -> dict[str, str]:
        return await suite.job_hash(job)

    h = await wait_until_async(ended, "the job to end", until=lambda h: h.get("state") == jobs.ERROR)
    assert h["error"].startswith(jobs.ABORTED + "its upload was cut off: the ingest process receiving it (pid")
    await wait_until_async(lambda: queue_length(suite), "the worker to acknowledge the job", until=lambda n: n == 0)
    await wait_until_async(suite.shard_count, "the shards it wrote to be removed", until=lambda n: n == 0)
    call.cancel()
    await wait_until_async(lambda: suite.spool_files, "the spool to be empty", until=lambda f: f == [])
