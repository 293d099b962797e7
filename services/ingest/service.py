"""IngestService over grpc.aio: a thin servicer over uploads (upload.py), the job store and the store workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import grpc
from redis.exceptions import RedisError

from gridstor.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from services.common import errors, jobs, spool
from services.common.capacity import Gate
from services.common.config import Config
from services.common.jobs import Job, JobStore, Notifier
from services.common.keys import signing_key
from services.common.metrics import Registry
from services.common.rpc import Policy, current_identity
from services.common.server import READY_EVERY, Cleanup, Running, Wiring, create_server
from services.ingest import liveness, upload
from services.ingest.liveness import Instance
from services.ingest.worker import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
POLICY = Policy(public=frozenset({"Status"}))
DEFAULT_WAIT = 60  # seconds a Status(wait) with timeout_seconds 0 waits
METRICS_INTERVAL = 1.0
# Answer TIMEOUT a little before the client's own deadline would cut the call.
DEADLINE_MARGIN = 0.25

Context = grpc.aio.ServicerContext[Any, Any]

_STATES = {
    jobs.ACTIVE: common_pb2.JOB_STATE_ACTIVE,
    jobs.DONE: common_pb2.JOB_STATE_DONE,
    jobs.ERROR: common_pb2.JOB_STATE_ERROR,
}


class Metrics:
    """The ingest service's metrics; worker counters are mirrored from Redis."""

    def __init__(self, registry: Registry) -> None:
        self.uploads = registry.counter("ingest_uploads_total", "Uploads by result (ok, refused, cancelled, failed)")
        self.bytes = registry.counter("ingest_bytes_received_total", "Bytes received by Upload, kept or not")
        self.done = registry.counter("ingest_jobs_done_total", "Jobs that ended DONE (all workers)")
        self.failed = registry.counter("ingest_jobs_failed_total", "Jobs that ended ERROR (all workers)")
        self.dedup = registry.counter("ingest_dedup_hits_total", "Jobs whose content was already stored")
        self.stored = registry.counter("ingest_bytes_stored_total", "Plaintext bytes of newly stored files")
        self.degraded = registry.counter(
            "ingest_degraded_writes_total", "Files stored with shards unwritten (backends down; maint rebuilds them)"
        )
        self.queue = registry.gauge("ingest_queue_length", "Jobs queued or being stored")
        self.workers = registry.gauge("ingest_workers", "Worker processes running")
        self.restarts = registry.gauge("ingest_worker_restarts", "Worker processes restarted since start")
        self._seen: dict[str, int] = {}

    def mirror(self, stats: dict[str, int]) -> None:
        """Advance the counters by what the workers counted since the last look."""
        for key, counter in (
            ("done", self.done),
            ("failed", self.failed),
            ("dedup", self.dedup),
            ("degraded", self.degraded),
        ):
            self._bump(key, counter, stats)
        self._bump("bytes_stored", self.stored, stats)

    def _bump(self, key: str, counter: Any, stats: dict[str, int]) -> None:
        now = stats.get(key, 0)
        delta = now - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = now


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Upload: spool while hashing, then queue a job. Status: read or long-poll the job."""

    def __init__(
        self, cfg: Config, store: JobStore, notifier: Notifier, metrics: Metrics, instance: Instance | None = None
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.notifier = notifier
        self.metrics = metrics
        self.instance = instance
        # Memory is bounded per process: so many uploads are received at once; the rest wait, unread.
        self.uploads = Gate("uploads in this ingest process", cfg.limits.uploads_per_process, cfg.limits.busy_wait)

    async def Upload(
        self, request_iterator: AsyncIterator[ingest_pb2.UploadRequest], context: Context
    ) -> ingest_pb2.UploadReply:
        """Receive one file; reply with the job that stores it."""
        up = upload.Upload(self.cfg, self.store, current_identity.get(), self.metrics.bytes.inc, self.instance)
        try:
            async with self.uploads.slot():
                received = await up.receive(request_iterator, context)
        except errors.Busy:
            up.result = "refused"
            raise
        finally:
            self.metrics.uploads.inc(result=up.result)
        return ingest_pb2.UploadReply(
            job=received.job,
            size=received.size,
            hash=received.hash,
            name=received.name,
            ext=received.ext,
            note=received.note,
        )

    async def Status(self, request: ingest_pb2.StatusRequest, context: Context) -> ingest_pb2.StatusReply:
        """Where a job stands; with wait, once it ends or the timeout passes."""
        job_id = jobs.check_job_id(request.job)
        timed_out = False
        if request.wait:
            timeout = float(min(request.timeout_seconds or DEFAULT_WAIT, self.cfg.status_max_wait))
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = max(0.0, min(timeout, remaining - DEADLINE_MARGIN))
            job, timed_out = await self.notifier.wait(self.store, job_id, timeout)
        else:
            found = await self.store.get(job_id)
            if found is None:
                raise errors.NotFound(f"no job {job_id} (unknown, or finished more than a few days ago)")
            job = found
        return status_reply(job, timed_out)


def status_reply(job: Job, timed_out: bool) -> ingest_pb2.StatusReply:
    """The reply for a job, with the owner's one-string result."""
    reply = ingest_pb2.StatusReply(
        job=job.id,
        state=_STATES.get(job.state, common_pb2.JOB_STATE_UNSPECIFIED),
        size=job.size,
        hash=job.hash,
        progress_bytes=job.progress,
    )
    if job.state == jobs.DONE:
        reply.result = reply.file_id = job.file_id
        reply.deduplicated = job.dedup
        if job.receipt:
            reply.receipt.ParseFromString(job.receipt)
    elif job.state == jobs.ERROR:
        reply.error = job.error
        reply.result = f"ERROR:{job.error}"
    elif timed_out:
        reply.state = common_pb2.JOB_STATE_TIMEOUT
        reply.result = "TIMEOUT"
        reply.waiting = job.waiting
    else:
        reply.result = "ACTIVE"
        reply.waiting = job.waiting
    return reply


async def build(
    cfg: Config, *, port: int | None = None, registry: Registry | None = None, ready_every: float = READY_EVERY
) -> tuple[Running, Cleanup]:
    """Connect Redis, start the worker pool and the server; the cleanup stops the workers.

    Serving while Redis answers and at least one of the pool's workers reports that it can store.
    """

    async def setup(stack: contextlib.AsyncExitStack) -> Wiring:
        signing_key(cfg.data_dir)  # created 0600 on first start, before the workers need it
        spool.prepare_dir(cfg.spool_dir)
        redis = jobs.connect(cfg.redis_url)
        stack.push_async_callback(jobs.disconnect, redis)
        store = JobStore(redis)
        notifier = Notifier(redis)
        try:
            await store.ensure_group()
        except RedisError as exc:
            raise errors.StoreFailed(f"the job queue (redis at {cfg.redis_url}) is unavailable: {exc}") from None
        instance = Instance.this_process()
        beat = liveness.Heartbeat(redis, instance)
        await beat.start()
        stack.push_async_callback(beat.stop)
        await upload.sweep_spool(cfg.spool_dir, store, instance, at_start=True)
        sweeper = asyncio.create_task(upload.sweep_forever(cfg.spool_dir, store, instance), name="spool-sweep")
        stack.push_async_callback(jobs.cancel_and_wait, sweeper)
        await notifier.start()
        stack.push_async_callback(notifier.stop)
        pool = WorkerPool(cfg, cfg.workers or os.cpu_count() or 1)
        stack.push_async_callback(pool.stop)
        await pool.start()
        metrics = Metrics(registry or Registry())
        task = asyncio.create_task(_refresh_metrics(metrics, store, pool), name="ingest-metrics")
        stack.push_async_callback(jobs.cancel_and_wait, task)
        servicer = IngestServicer(cfg, store, notifier, metrics, instance)
        log.info("ingest started", extra={"workers": pool.size, "max_upload": cfg.max_upload, "mode": cfg.mode})
        add = partial(ingest_pb2_grpc.add_IngestServiceServicer_to_server, servicer)
        return Wiring(SERVICE_NAME, add, POLICY, partial(pool.ready, store))

    # The receive window of each upload stream: the default 64 KiB (no BDP probing, server.py) slows one
    # upload by ~20%; a bigger one costs up to that much memory per upload (docs/resilience.md).
    window = [("grpc.http2.lookahead_bytes", cfg.limits.upload_window)]
    return await create_server(cfg, "ingest", setup, port=port, ready_every=ready_every, options=window)


async def _refresh_metrics(metrics: Metrics, store: JobStore, pool: WorkerPool) -> None:
    """Mirror the queue length, the workers' counters and the pool's size into the metrics, every second."""
    while True:
        try:
            metrics.queue.set(await store.queue_length())
            metrics.mirror(await store.stats())
        except errors.StoreFailed as exc:  # Redis away: the readiness check reports it; the numbers wait
            log.debug("metrics not refreshed: %s", exc)
        jobs.checkpoint()
        metrics.workers.set(len(pool.pids))
        metrics.restarts.set(pool.restarts)
        await asyncio.sleep(METRICS_INTERVAL)
