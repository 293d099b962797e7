"""Status: malformed, unknown, long-poll timeout and wake-up, ERROR results."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc

from gridstor.v1 import common_pb2, ingest_pb2
from services.common.jobs import JobStore
from tests.helpers import rpc_error, wait_until_async
from tests.ingest.conftest import Suite, SuiteFactory
from tests.redis_server import watch_commands


async def fake_active_job(suite: Suite) -> str:
    """A job record no worker will take (it is not in the stream)."""
    job = os.urandom(16).hex()
    await suite.redis.hset(f"gridstor:job:{job}", mapping={"state": "ACTIVE", "size": "10", "hash": "ab" * 24})
    return job


async def test_malformed_and_unknown(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    for bad in ("", "xyz", "A" * 32, "0" * 31, "0" * 33, "../../etc/passwd"):
        for wait in (False, True):
            err = await rpc_error(suite.ingest.Status(ingest_pb2.StatusRequest(job=bad, wait=wait)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert "32 lowercase hex" in (err.details() or "")
    for wait in (False, True):
        err = await rpc_error(suite.ingest.Status(ingest_pb2.StatusRequest(job="0" * 32, wait=wait, timeout_seconds=1)))
        assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_active_then_timeout(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    job = await fake_active_job(suite)
    now = await suite.ingest.Status(ingest_pb2.StatusRequest(job=job))
    assert (now.state, now.result, now.size) == (common_pb2.JOB_STATE_ACTIVE, "ACTIVE", 10)
    late = await suite.ingest.Status(ingest_pb2.StatusRequest(job=job, wait=True, timeout_seconds=1))
    assert (late.state, late.result) == (common_pb2.JOB_STATE_TIMEOUT, "TIMEOUT")
    # A client deadline shorter than the wait: TIMEOUT before the deadline cuts the call.
    early = await suite.ingest.Status(ingest_pb2.StatusRequest(job=job, wait=True, timeout_seconds=30), timeout=1.0)
    assert early.result == "TIMEOUT"


async def test_waiter_wakes_when_job_ends(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    store = JobStore(suite.redis)
    done_job, failed_job = await fake_active_job(suite), await fake_active_job(suite)
    async with watch_commands(suite.cfg.redis_url) as seen:
        # 30 s waits: only the completion notice can end them with DONE / ERROR within the test.
        waiting = [
            asyncio.ensure_future(suite.ingest.Status(ingest_pb2.StatusRequest(job=j, wait=True, timeout_seconds=30)))
            for j in (done_job, failed_job, done_job)
        ]
        # A waiter reads its job once it is registered for the notice: then the job may end.
        await wait_until_async(
            lambda: (seen.count(f"HGETALL gridstor:job:{done_job}"), seen.count(f"HGETALL gridstor:job:{failed_job}")),
            "the three waiters to read their jobs",
            until=lambda reads: reads[0] >= 2 and reads[1] >= 1,
        )
    await store.done(done_job, file_id="ab" * 24 + "00000007.txt", dedup=True, receipt=b"", size=10)
    await store.fail(failed_job, "the gateway's backends are full")
    first, second, third = await asyncio.gather(*waiting)
    for reply in (first, third):
        assert (reply.state, reply.result) == (common_pb2.JOB_STATE_DONE, "ab" * 24 + "00000007.txt")
        assert reply.deduplicated and reply.file_id == reply.result
    assert second.state == common_pb2.JOB_STATE_ERROR
    assert second.result == "ERROR:the gateway's backends are full"
    assert second.error == "the gateway's backends are full"
    # Finished jobs expire eventually, they do not stay forever.
    assert await suite.redis.ttl(f"gridstor:job:{done_job}") > 0


async def test_job_error_when_spool_is_gone(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    store = JobStore(suite.redis)
    job = os.urandom(16).hex()
    await store.submit(job, path=str(suite.cfg.spool_dir / "missing.spool"), size=3, hash_hex="00" * 24)
    reply = await suite.wait(job)
    assert reply.state == common_pb2.JOB_STATE_ERROR
    assert reply.result.startswith("ERROR:the uploaded data is gone")


async def test_job_queued_without_hash(suite_factory: SuiteFactory, tmp_path: Path) -> None:
    """What ssh Process does: queue a file by path with no hash; the worker hashes it and may keep it."""
    suite = await suite_factory()
    path = tmp_path / "home-file.txt"
    data = os.urandom(300_000)
    path.write_bytes(data)
    job = os.urandom(16).hex()
    await JobStore(suite.redis).submit(job, path=str(path), size=len(data), ext=".txt", remove=False)
    reply = await suite.wait(job)
    assert reply.state == common_pb2.JOB_STATE_DONE, reply.error
    assert reply.file_id.endswith(".txt") and reply.file_id.startswith(reply.hash)
    assert reply.size == len(data)
    assert await suite.download(reply.file_id) == data
    assert path.exists()
