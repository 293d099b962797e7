"""IngestService over grpc.aio: thin servicer over the spool, the job store and the worker pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from redis.exceptions import RedisError

from gridstor.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from services.common import errors, jobs, spool
from services.common.config import Config
from services.common.jobs import Job, JobStore, Notifier
from services.common.keys import signing_key
from services.common.limits import idle_timeout
from services.common.metrics import Registry
from services.common.rpc import Guard, Policy, Running, current_identity, start_server
from services.ingest.worker import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
POLICY = Policy(public=frozenset({"Status"}))
DEFAULT_WAIT = 60  # seconds a Status(wait) with timeout_seconds 0 waits
METRICS_INTERVAL = 1.0
# Answer TIMEOUT a little before the client's own deadline would cut the call.
DEADLINE_MARGIN = 0.25
# Uploads this big are queued while they still arrive, so storing overlaps receiving. Smaller
# ones arrive in a few ms: they keep the simple path (queued complete, FindByHash before any write).
STREAM_FROM = 8 * 1024 * 1024

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
        self.queue = registry.gauge("ingest_queue_length", "Jobs queued or being stored")
        self.workers = registry.gauge("ingest_workers", "Worker processes running")
        self.restarts = registry.gauge("ingest_worker_restarts", "Worker processes restarted since start")
        self._seen: dict[str, int] = {}

    def mirror(self, stats: dict[str, int]) -> None:
        """Advance the counters by what the workers counted since the last look."""
        for key, counter in (("done", self.done), ("failed", self.failed), ("dedup", self.dedup)):
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

    def __init__(self, cfg: Config, store: JobStore, notifier: Notifier, metrics: Metrics) -> None:
        self.cfg = cfg
        self.store = store
        self.notifier = notifier
        self.metrics = metrics

    async def Upload(
        self, request_iterator: AsyncIterator[ingest_pb2.UploadRequest], context: Context
    ) -> ingest_pb2.UploadReply:
        """Receive one file; reply with the job that stores it."""
        limit = self.cfg.max_upload
        header: spool.UploadHeader | None = None
        sp = spool.Spool(self.cfg.spool_dir, limit)
        result = "failed"
        committed: asyncio.Future[None] | None = None
        job = ""
        streaming = False  # the job is queued already and a worker may be storing the spool as it grows
        try:
            # A client that stops sending is dropped after limits.upload_idle_timeout (its spool file too).
            async for msg in idle_timeout(request_iterator, self.cfg.limits.upload_idle_timeout):
                if header is None:
                    header = spool.UploadHeader.parse(
                        msg.name,
                        msg.content_type,
                        msg.body.content_type,
                        msg.declared_size if msg.HasField("declared_size") else None,
                        limit,
                    )
                data = msg.body.data
                self.metrics.bytes.inc(len(data))
                await sp.write(data)
                if header.declared_size is not None and sp.size > header.declared_size:
                    raise errors.InvalidInput(
                        f"more bytes arrived than the declared_size of {header.declared_size} bytes"
                    )
                if not streaming and _big(header, sp.size):
                    job = jobs.new_job_id()
                    await self._spool_as_job(job, sp)
                    streaming = True  # set before submit: a cancellation cutting it short must still abort
                    await self._queue_receiving(job, sp, header)
            if header is None:  # an empty stream is an empty, nameless file
                header = spool.UploadHeader.parse("", "", "", None, limit)
            done = await sp.finish()
            if header.declared_size is not None and header.declared_size != done.size:
                raise errors.InvalidInput(
                    f"declared_size was {header.declared_size} bytes but {done.size} bytes arrived"
                )
            await _client_still_there(context)
            if streaming:
                # Past this point the upload is complete: a cancellation no longer undoes it.
                committed = asyncio.ensure_future(self.store.received(job, size=done.size, hash_hex=done.hash.hex()))
            else:
                job = jobs.new_job_id()
                path = spool.job_path(self.cfg.spool_dir, job)
                os.rename(done.path, path)
                sp.path = path
                committed = asyncio.ensure_future(
                    self.store.submit(
                        job,
                        path=str(path),
                        size=done.size,
                        hash_hex=done.hash.hex(),
                        name=header.name,
                        ext=header.ext,
                        content_type=header.content_type,
                        identity=current_identity.get(),
                    )
                )

            def drop_unless_queued(f: asyncio.Future[None]) -> None:
                if f.cancelled() or f.exception() is not None:
                    sp.discard()  # a streamed job's worker then stalls and fails it

            committed.add_done_callback(drop_unless_queued)
            await asyncio.shield(committed)
            result = "ok"
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        except (errors.InvalidInput, errors.LimitExceeded):
            result = "refused"
            raise
        finally:
            if committed is None:
                if streaming:
                    await self._abort(job, result)
                sp.discard()
            self.metrics.uploads.inc(result=result)
        log.info(
            "upload received",
            extra={"job": job, "size": done.size, "ext": header.ext, "identity": current_identity.get()},
        )
        return ingest_pb2.UploadReply(job=job, size=done.size, hash=done.hash.hex())

    async def _spool_as_job(self, job: str, sp: spool.Spool) -> None:
        """Give the growing spool file its job name, with what arrived so far on disk."""
        await sp.sync()  # the first batch is on disk before a worker looks
        path = spool.job_path(self.cfg.spool_dir, job)
        os.rename(sp.path, path)  # the open descriptor keeps writing to the same file
        sp.path = path

    async def _queue_receiving(self, job: str, sp: spool.Spool, header: spool.UploadHeader) -> None:
        """Queue ``job`` while its upload still arrives, so a worker stores the spool file as it grows."""
        await self.store.submit(
            job,
            path=str(sp.path),
            size=0,
            name=header.name,
            ext=header.ext,
            content_type=header.content_type,
            identity=current_identity.get(),
            receiving=True,
        )

    async def _abort(self, job: str, result: str) -> None:
        """Tell the worker of a streamed job that its upload failed, before its spool file goes."""
        aborting = asyncio.ensure_future(self.store.abort(job, f"the upload was {result}"))
        try:
            await asyncio.shield(aborting)
        except (asyncio.CancelledError, errors.StoreFailed) as exc:
            # The worker then finds the spool file gone or stalled and fails the job itself.
            log.warning("upload of job %s failed; could not tell its worker (%s)", job, exc)

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


async def _client_still_there(context: Context) -> None:
    """Raise CancelledError if the client cancelled rather than finished its upload stream.

    grpc.aio ends the request iterator the same way for both, and cancels the
    handler task only a moment later. Yielding, then sending the response
    headers (a batch on the call, completed after the core's cancellation
    notice), lets that cancellation land here, before the upload is queued.
    """
    await asyncio.sleep(0)
    try:
        await context.send_initial_metadata(())
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the call is gone (the batch failed)
        raise asyncio.CancelledError(f"the client went away ({type(exc).__name__})") from None
    jobs.checkpoint()


def _big(header: spool.UploadHeader, received: int) -> bool:
    """Whether to queue an upload now: it is (declared, or so far) at least STREAM_FROM, a batch is on its way."""
    return received >= max(STREAM_FROM, spool.BATCH_BYTES) or (
        received >= spool.BATCH_BYTES and (header.declared_size or 0) >= STREAM_FROM
    )


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
    else:
        reply.result = "ACTIVE"
    return reply


async def _sweep_spool(directory: Path, store: JobStore) -> None:
    """Remove spool files no live job needs: stale partial uploads, files of finished or unknown jobs."""
    await asyncio.to_thread(spool.sweep_partials, directory)
    removed = 0
    for entry in await asyncio.to_thread(lambda: list(os.scandir(directory))):
        name = entry.name
        if not name.endswith(spool.JOB_SUFFIX):
            continue
        job_id = name[: -len(spool.JOB_SUFFIX)]
        try:
            jobs.check_job_id(job_id)
        except errors.InvalidInput:
            continue
        job = await store.get(job_id)
        if job is None or job.finished:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    if removed:
        log.info("removed %d spool files of finished or unknown jobs", removed)


async def build(
    cfg: Config, *, port: int | None = None, registry: Registry | None = None
) -> tuple[Running, Callable[[], Awaitable[None]]]:
    """Connect Redis, start the worker pool and the server; the cleanup stops the workers."""
    signing_key(cfg.data_dir)  # created 0600 on first start, before the workers need it
    spool.prepare_dir(cfg.spool_dir)
    redis = jobs.connect(cfg.redis_url)
    store = JobStore(redis)
    notifier = Notifier(redis)
    metrics = Metrics(registry or Registry())
    pool = WorkerPool(cfg, cfg.workers or os.cpu_count() or 1)
    tasks: list[asyncio.Task[None]] = []
    try:
        try:
            await store.ensure_group()
        except RedisError as exc:
            raise errors.StoreFailed(f"the job queue (redis at {cfg.redis_url}) is unavailable: {exc}") from None
        await _sweep_spool(cfg.spool_dir, store)
        await notifier.start()
        await pool.start()

        async def refresh_metrics() -> None:
            while True:
                with contextlib.suppress(errors.StoreFailed):
                    metrics.queue.set(await store.queue_length())
                    metrics.mirror(await store.stats())
                jobs.checkpoint()
                metrics.workers.set(len(pool.pids))
                metrics.restarts.set(pool.restarts)
                await asyncio.sleep(METRICS_INTERVAL)

        tasks.append(asyncio.create_task(refresh_metrics(), name="ingest-metrics"))
        servicer = IngestServicer(cfg, store, notifier, metrics)
        guard = Guard.for_config(cfg, {SERVICE_NAME: POLICY})

        def register(server: grpc.aio.Server) -> list[str]:
            ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)
            return [SERVICE_NAME]

        running = await start_server(cfg, guard, register, port=cfg.ports["ingest"] if port is None else port)
    except BaseException:
        await _close(tasks, pool, notifier, redis)
        raise
    log.info("ingest ready", extra={"workers": pool.size, "max_upload": cfg.max_upload, "mode": cfg.mode})

    async def cleanup() -> None:
        # run_service has stopped the server gracefully already; a second stop is a no-op there.
        await running.server.stop(1)
        await _close(tasks, pool, notifier, redis)

    return running, cleanup


async def _close(tasks: list[asyncio.Task[None]], pool: WorkerPool, notifier: Notifier, redis: Any) -> None:
    for t in tasks:
        await jobs.cancel_and_wait(t)
    await pool.stop()
    await notifier.stop()
    with contextlib.suppress(Exception):
        await redis.aclose()
