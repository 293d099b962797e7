"""The Redis job store on a real redis-server: queueing, claiming, heartbeats, requeue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common import errors, jobs
from services.common.jobs import JobStore, Notifier
from tests.helpers import wait_until_async
from tests.redis_server import RedisProcess, watch_commands


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[JobStore]:
    client = jobs.connect(redis_server.url)
    s = JobStore(client)
    await s.ensure_group()
    await s.ensure_group()  # idempotent
    yield s
    await client.aclose()


def test_job_ids() -> None:
    job = jobs.new_job_id()
    assert jobs.check_job_id(job) == job and len(job) == 32
    assert jobs.new_job_id() != job
    for bad in ("", job.upper(), job[:-1], job + "0", "g" * 32):
        with pytest.raises(errors.InvalidInput):
            jobs.check_job_id(bad)


async def test_submit_read_ack(store: JobStore) -> None:
    job = jobs.new_job_id()
    await store.submit(job, path="/x", size=5, hash_hex="ab" * 24, name="a.TXT", ext=".txt", identity="bob")
    got = await store.get(job)
    assert got is not None and got.state == jobs.ACTIVE and not got.finished
    assert (got.size, got.ext, got.identity, got.remove, got.attempts) == (5, ".txt", "bob", True, 0)
    assert await store.queue_length() == 1
    [(entry, read_job)] = await store.read("w1", block_ms=100)
    assert read_job == job
    assert await store.read("w2", block_ms=50) == []  # delivered once
    assert await store.start(job, "w1") == 1
    await store.done(job, file_id="f", dedup=False, receipt=b"\x01", size=5)
    await store.ack(entry)
    assert await store.queue_length() == 0
    finished = await store.get(job)
    assert finished is not None and finished.finished and finished.receipt == b"\x01"
    assert (await store.stats())["done"] == 1
    assert await store.get(jobs.new_job_id()) is None


async def test_heartbeat_autoclaim_and_requeue(store: JobStore) -> None:
    job = jobs.new_job_id()
    await store.submit(job, path="/x", size=1)
    [(entry, _)] = await store.read("alive", block_ms=100)
    await store.start(job, "alive")
    assert await store.heartbeat("alive", entry)
    # These sleeps are the point: the entry must sit idle longer than min_idle_ms (100 ms) for autoclaim.
    await asyncio.sleep(0.15)
    assert await store.heartbeat("alive", entry)  # resets the idle time
    assert await store.autoclaim("other", min_idle_ms=100) == []
    await asyncio.sleep(0.15)
    [(claimed, claimed_job)] = await store.autoclaim("other", min_idle_ms=100)
    assert (claimed, claimed_job) == (entry, job)
    assert not await store.heartbeat("alive", entry)  # the old owner learns it lost the job

    await store.requeue(entry, job)  # "other" is stopping: the job goes back, the attempt does not count
    got = await store.get(job)
    assert got is not None and got.attempts == 0
    [(new_entry, again)] = await store.read("third", block_ms=100)
    assert again == job and new_entry != entry
    assert await store.queue_length() == 1
    assert await store.prune_consumers(idle_ms=0) == 2  # "alive" and "other" hold nothing now


async def test_notifier_wakes_and_times_out(store: JobStore, redis_server: RedisProcess) -> None:
    notifier = Notifier(store.redis)
    await notifier.start()
    try:
        job = jobs.new_job_id()
        await store.submit(job, path="/x", size=1)
        current, timed_out = await notifier.wait(store, job, 0.2)
        assert timed_out and current.state == jobs.ACTIVE
        async with watch_commands(redis_server.url) as seen:
            waiter = asyncio.create_task(notifier.wait(store, job, 30))
            # The waiter reads the job once it is registered for the notice: then the job may end.
            await wait_until_async(lambda: seen.count(f"HGETALL {jobs.job_key(job)}"), "the waiter to read its job")
        await store.fail(job, "nope")
        current, timed_out = await waiter
        assert not timed_out and current.state == jobs.ERROR and current.error == "nope"
        with pytest.raises(errors.NotFound):
            await notifier.wait(store, jobs.new_job_id(), 1)
    finally:
        await notifier.stop()
