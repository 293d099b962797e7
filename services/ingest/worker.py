"""Store workers: separate processes that turn queued uploads into stored files.

``python -m services.ingest.worker --config FILE|-`` runs one worker (``-``
reads the YAML config from stdin, which is how ``WorkerPool`` hands over the
ingest service's config). A worker reads the job stream through the consumer
group, one job at a time:

1. FindByHash at meta: content already stored -> DONE with that id, no shards written
   (with this upload's extension, which AddExtension records at meta when it is new).
2. Otherwise ``Engine.store`` the spool file (progress into the job hash), then
   PutRecord; if meta answers ``deduplicated`` (the same content finished
   meanwhile), the shards just written are deleted.
3. DONE with the file id and a receipt signed by the gateway key, XACK, spool file removed.
   Any failure: ERROR with the reason, spool file removed, XACK.

A big upload is queued while it still arrives (job field ``receiving``): its
worker follows the growing spool file, and at its end reads the job hash: the
final size and hash (then PutRecord, which dedups; the stored hash must equal
the upload's), an abort by ingest (the engine deletes what it wrote; the job is
left as ingest ended it), or not yet (look again in TAIL_POLL). No FindByHash
first there: the hash is known only once the upload is complete.

Each worker runs in a slot of the pool with a stable consumer name
(services/ingest/slots.py): a worker restarted in its slot (after a crash, a
SIGKILL) first reads the entries its predecessor left pending and carries them
on at once. Entries of a worker gone for good (its slot no longer exists, or its
host) are taken over with XAUTOCLAIM after ``GRIDSTOR_CLAIM_IDLE_MS`` (default
60000) of silence; a live worker sends a heartbeat well within that. A job holds
a lease in Redis while it writes shards (services/common/leases.py); the attempt
that takes a job over replaces it, so the shards a dead attempt wrote are
orphans that maint's orphan collection deletes (services/maint/orphans.py),
while those of running jobs are safe.

A worker holds up to MAX_HELD jobs but works on one at a time (its lane). A
streamed job whose upload has not arrived yet steps aside after ASIDE_AFTER
seconds, so the next queued job is stored meanwhile; when the process that was
receiving that upload is gone (services/ingest/liveness.py) the job ends at once
(``aborted``: nobody was given its id), not after the stall timeout.

Outages: a job waits out an unreachable meta service or metadata store (calls
retried, the reason in the job's ``waiting`` field for Status) and an
unreachable Redis when it records its outcome, for ``outage_wait`` seconds,
then fails naming the outage. A job stored with shards unwritten (backends
down, ``engine.write_quorum``) goes into maint's repair queue.

``WorkerPool`` (used by the ingest service) starts one worker process per
core, restarts any that exits (in the same slot), and stops them on cleanup.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import blake3
import yaml
from nacl.signing import SigningKey
from redis.exceptions import RedisError

from gridstor.v1 import common_pb2
from services.common import errors, gateway, jobs, metaclient, net, readiness, rpc, tuning
from services.common.backends.pool import BackendPool
from services.common.config import Config, build_config, dump_config, load_config
from services.common.engine import Engine, FileRecord, file_source, read_once, unwritten_shards
from services.common.ids import HASH_BYTES
from services.common.jobs import Job, JobStore
from services.common.keys import key_id, signing_key
from services.common.leases import Lease, LeaseLost, Leases
from services.common.metaclient import MetaClient
from services.common.readiness import READY, Ready
from services.common.repairqueue import RepairQueue
from services.ingest import liveness
from services.ingest.slots import Lane, SlotLock, Ticket, consumer_name

log = logging.getLogger(__name__)

RECEIPT_DOMAIN = b"gridstor/v1/receipt\n"
CLAIM_IDLE_ENV = "GRIDSTOR_CLAIM_IDLE_MS"
DEFAULT_CLAIM_IDLE_MS = 60_000
MAX_ATTEMPTS = 3  # a job whose workers die this often (e.g. it crashes them) fails instead of looping
PROGRESS_INTERVAL = 0.1  # seconds between progress writes to the job hash
STOP_GRACE = 5.0  # a stopping worker lets its job run this long before putting it back in the queue
META_CALL_TIMEOUT = 20.0  # seconds one call to meta may take before it is retried (a hung meta)
LEASE_SLACK = 300.0  # a job's lease outlives outage_wait by this much: renewals may fail during an outage
PRUNE_IDLE_MS = 3_600_000
TAIL_POLL = 0.003  # seconds between looks at a spool file that is still growing
TAIL_ASK = 0.01  # seconds a growing spool file must stand still before the job hash is asked whether it ended
DEFAULT_STALL_TIMEOUT = 90.0  # a growing spool file silent this long: its upload died with its ingest process
REPORT_EVERY = 2.0  # seconds between a worker's readiness reports (they lapse after REPORT_TTL)
REPORT_TTL = 3 * REPORT_EVERY
MAX_HELD = 8  # jobs one worker holds at once: the one it works on and streamed ones awaiting their upload
ASIDE_AFTER = 0.25  # seconds a streamed job waits for bytes before it lets the worker take the next job
ASIDE_POLL = 0.05  # seconds between looks at a spool file while stepped aside
LIVENESS_EVERY = 1.0  # seconds between checks that the process receiving a silent upload still exists

# The lane ticket of the job being processed (set per job task; read where its upload is awaited).
_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("lane_ticket", default=None)
# The lease of the job being stored (per job task: a job stepped aside keeps its own while another is stored).
_lease: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("job_lease", default=None)

_T = TypeVar("_T")


def claim_idle_ms() -> int:
    """How long a pending entry must be silent before another worker takes it over."""
    raw = os.environ.get(CLAIM_IDLE_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_CLAIM_IDLE_MS
    except ValueError:
        raise errors.InvalidInput(f"{CLAIM_IDLE_ENV}: expected milliseconds as an integer, got {raw!r}") from None
    if value < 100:
        raise errors.InvalidInput(f"{CLAIM_IDLE_ENV}: must be at least 100 ms, got {value}")
    return value


def sign_receipt(key: SigningKey, *, file_id: str, size: int, hash_hex: str, job: str) -> common_pb2.Receipt:
    """A Receipt: ed25519 over the domain line and the serialized ReceiptBody."""
    body = common_pb2.ReceiptBody(file_id=file_id, size=size, hash=hash_hex, job=job, issued=int(time.time()))
    data = body.SerializeToString(deterministic=True)
    return common_pb2.Receipt(
        body=data, signature=key.sign(RECEIPT_DOMAIN + data).signature, key_id=key_id(key.verify_key)
    )


def _hash_file(path: Path) -> tuple[bytes, int]:
    h = blake3.blake3()
    h.update_mmap(path)
    return h.digest(HASH_BYTES), path.stat().st_size


def _same_shards(a: FileRecord, b: FileRecord) -> bool:
    """Whether two records point at the same stored shards (so one is a retried write of the other)."""
    if not a.chunks or not b.chunks:
        return False
    sa, sb = a.chunks[0].shards[0], b.chunks[0].shards[0]
    return bool(a.backends[sa.backend] == b.backends[sb.backend] and sa.key == sb.key)


# Meta answered, and what it answered means the record was not stored: the shards can go.
_REFUSED = (errors.InvalidInput, errors.Refused, errors.PermissionDenied, errors.Unauthenticated, errors.LimitExceeded)


class UploadCut(errors.Refused):
    """A streamed job's upload can no longer arrive: the ingest process receiving it is gone."""


class MetaCallFailed(errors.StoreFailed):
    """A call to the meta service failed; ``refused`` when meta answered that it did not do it."""

    def __init__(self, method: str, cause: errors.GridstorError) -> None:
        if isinstance(cause, errors.BackendUnavailable):  # meta could not answer: the reason names the code
            what = cause.reason
        else:
            what = f"{rpc.status_for(cause)[0].name}: {cause}"
        super().__init__(f"meta {method} failed: {what}")
        self.refused = isinstance(cause, _REFUSED)


async def _meta(method: str, call: Awaitable[_T]) -> _T:
    """Await a MetaClient call; its failure as MetaCallFailed (which fails the job with that message)."""
    try:
        return await call
    except LeaseLost:
        raise
    except errors.GridstorError as exc:
        raise MetaCallFailed(method, exc) from None


@dataclasses.dataclass
class Outcome:
    file_id: str
    size: int
    hash_hex: str
    dedup: bool


class Worker:
    """Consumes the job stream; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        meta: MetaClient,
        key: SigningKey,
        *,
        claim_idle: int,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        consumer: str = "",
        max_held: int = MAX_HELD,
        leases: Leases | None = None,
        queue: RepairQueue | None = None,
        outage_wait: float = 600.0,
    ) -> None:
        self.store = store
        self.stall_timeout = stall_timeout
        self.leases = leases
        self.queue = queue
        self.outage_wait = outage_wait
        self.engine = engine
        self.meta = meta
        self.key = key
        self.claim_idle = claim_idle
        self.consumer = consumer or f"pid-{os.getpid()}"
        self.max_held = max_held
        self.lane = Lane()
        self.heartbeat_every = max(0.05, claim_idle / 4000)
        self.claim_every = min(max(0.05, claim_idle / 2000), 5.0)
        self._last_claim = self._last_prune = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Take jobs until ``stop`` is set: first this slot's pending ones, then queued ones; see the docstring.

        A job in progress gets STOP_GRACE seconds once ``stop`` is set, then goes back to the queue.
        """
        await self.store.ensure_group()
        log.info("worker ready", extra={"consumer": self.consumer, "claim_idle_ms": self.claim_idle})
        held: set[asyncio.Task[None]] = set()
        backlog: list[tuple[str, str]] | None = None  # the slot's own pending entries, read first
        backoff = 0.5
        worked = False  # a job ran since memory was last released
        try:
            while not stop.is_set():
                if len(held) >= self.max_held:  # every held job awaits its upload: take no more for now
                    stopping = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({*held, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    stopping.cancel()
                    continue
                if not await self.lane.idle(stop):
                    break
                try:
                    if backlog is None:
                        backlog = await self.store.read_pending(self.consumer)
                        if backlog:
                            log.warning("resuming %d jobs this slot's previous worker left unfinished", len(backlog))
                    entries = [backlog.pop(0)] if backlog else await self._next()
                    backoff = 0.5
                except RedisError as exc:
                    log.warning("job queue unavailable (%s); retrying in %.1fs", exc, backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                if not entries and not held and worked:
                    worked = False  # the queue is empty: hand what the jobs' buffers took back to the system
                    tuning.release_memory()
                for entry_id, job in entries:
                    task = asyncio.create_task(self._run_one(entry_id, job, stop), name=f"job-{job}")
                    held.add(task)
                    task.add_done_callback(held.discard)
                    worked = True
                    await asyncio.sleep(0)  # let it take the lane before the next look
        finally:
            if held:
                await asyncio.gather(*held, return_exceptions=True)

    async def _next(self) -> list[tuple[str, str]]:
        """The next entry: one taken over from a vanished worker (now and then), else a new one (waits <= 1 s)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_claim >= self.claim_every:
            self._last_claim = loop.time()
            entries = await self.store.autoclaim(self.consumer, self.claim_idle)
            for entry_id, job in entries:
                log.warning("took over job %s from a worker that stopped answering", job, extra={"entry": entry_id})
            if loop.time() - self._last_prune >= 600:
                self._last_prune = loop.time()
                await self.store.prune_consumers(max(PRUNE_IDLE_MS, self.claim_idle * 10))
            if entries:
                return entries
        return await self.store.read(self.consumer, block_ms=int(min(1.0, self.claim_every) * 1000))

    async def _work(self, entry_id: str, job: str) -> None:
        """``process`` the job holding the lane (given up while its upload is awaited)."""
        ticket = await self.lane.take()
        _ticket.set(ticket)
        try:
            await self.process(entry_id, job)
        finally:
            ticket.done()

    async def _run_one(self, entry_id: str, job: str, stop: asyncio.Event) -> None:
        task = asyncio.create_task(self._work(entry_id, job))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), STOP_GRACE)
            if not task.done():
                await jobs.cancel_and_wait(task)
                log.info("stopping: job %s goes back to the queue", job)
                with contextlib.suppress(RedisError):
                    await self.store.requeue(entry_id, job)
                return
            exc = task.exception()
            if isinstance(exc, RedisError):
                # The job's outcome could not be recorded; the entry stays pending and is reclaimed.
                log.warning("job %s: job queue unavailable (%s); it will be taken over later", job, exc)
            elif exc is not None:
                log.error("job %s: unexpected failure", job, exc_info=exc)
        finally:
            stopping.cancel()

    async def process(self, entry_id: str, job_id: str) -> None:
        """Run one job to DONE or ERROR and acknowledge it (unless another worker took it over)."""
        job = await self.store.get(job_id)
        if job is None:
            log.warning("job %s has no record (expired?); dropping its queue entry", job_id)
            await self.store.ack(entry_id)
            return
        if job.finished:  # its worker ended it but died before acknowledging
            self._remove_spool(job)
            await self.store.ack(entry_id)
            return
        attempt = await self.store.start(job_id, self.consumer)
        if attempt > 1:
            log.warning(
                "job %s: attempt %d; shards written by an earlier attempt that died are orphans"
                " (no record references them; maint's orphan collection removes them)",
                job_id,
                attempt,
                extra={"previous_worker": job.worker},
            )
        if attempt > MAX_ATTEMPTS:
            await self._fail(job, entry_id, f"gave up after {MAX_ATTEMPTS} attempts: its worker stopped each time")
            return
        started = time.monotonic()
        work = asyncio.create_task(self._store_leased(job))
        lost = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(entry_id, job_id, work, lost))
        try:
            outcome = await work
        except asyncio.CancelledError:
            if lost.is_set():
                log.warning("job %s was taken over by another worker; leaving it to that one", job_id)
                return
            raise
        except errors.GridstorError as exc:
            if isinstance(exc, UploadCut):
                await self.store.abort(job_id, str(exc))
                log.warning("job %s: %s", job_id, exc)
            if job.receiving and await self._aborted(job_id):
                log.info("job %s: its upload was aborted; nothing kept", job_id)
                self._remove_spool(job)
                await self.store.ack(entry_id)
                return
            log.info("job %s failed: %s", job_id, exc)
            await self._fail(job, entry_id, str(exc))
            return
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            await self._fail(job, entry_id, f"internal error ({type(exc).__name__}); see the ingest worker log")
            return
        finally:
            await jobs.cancel_and_wait(beat)
        receipt = sign_receipt(
            self.key, file_id=outcome.file_id, size=outcome.size, hash_hex=outcome.hash_hex, job=job_id
        )
        done = functools.partial(
            self.store.done,
            job_id,
            file_id=outcome.file_id,
            dedup=outcome.dedup,
            receipt=receipt.SerializeToString(),
            size=outcome.size,
            hash_hex=outcome.hash_hex,
        )
        await self._despite_redis_outage(f"job {job_id}: recording DONE", done)
        await self._despite_redis_outage(f"job {job_id}: acknowledging", functools.partial(self.store.ack, entry_id))
        self._remove_spool(job)
        log.info(
            "job %s done: %s",
            job_id,
            outcome.file_id,
            extra={"size": outcome.size, "dedup": outcome.dedup, "seconds": round(time.monotonic() - started, 3)},
        )

    async def _heartbeat(self, entry_id: str, job: str, work: asyncio.Task[Outcome], lost: asyncio.Event) -> None:
        """Refresh the entry's idle time; cancel ``work`` if another worker has claimed it."""
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                owned = await self.store.heartbeat(self.consumer, entry_id)
            except RedisError as exc:
                log.warning("job %s: heartbeat failed (%s)", job, exc)
                owned = True
            jobs.checkpoint()
            if not owned:
                lost.set()
                await jobs.cancel_and_wait(work)
                return

    async def _aborted(self, job_id: str) -> bool:
        """Whether the job's upload was aborted (it ended without this worker: leave its state be)."""
        current = await self.store.get(job_id)
        return current is None or current.aborted

    async def _fail(self, job: Job, entry_id: str, reason: str) -> None:
        self._remove_spool(job)
        await self.store.fail(job.id, reason)
        await self.store.ack(entry_id)

    def _remove_spool(self, job: Job) -> None:
        if job.remove and job.spool:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job.spool)

    async def _despite_redis_outage(self, what: str, call: Callable[[], Awaitable[object]]) -> None:
        """Run ``call`` (a job queue write), retrying while Redis is unreachable, for up to ``outage_wait`` s."""
        await jobs.despite_outage(what, call, self.outage_wait)

    async def _store_leased(self, job: Job) -> Outcome:
        """``_store`` under the job's lease (orphan collection leaves its shards alone), outages shown in Status."""
        waiting_since: list[float] = []

        async def note(reason: str | None) -> None:
            if reason is None:
                waiting_since.clear()
            elif not waiting_since:
                waiting_since.append(time.time())
            lease = _lease.get()
            if lease is not None and reason is not None:
                lease.check()  # lapsed during the outage: do not commit shards that may be collected
            text = None
            if reason is not None:
                since = time.strftime("%H:%M:%S UTC", time.gmtime(waiting_since[0]))
                text = (
                    f"the metadata service is unreachable since {since} ({reason}); waiting up to"
                    f" {self.outage_wait:.0f} s"
                )
            try:
                await self.store.set_waiting(job.id, text)
            except RedisError as exc:
                log.debug("job %s: waiting reason not recorded: %s", job.id, exc)

        # This runs in the job's own task: the hook and the lease are this job's alone.
        metaclient.on_wait.set(note)
        if self.leases is None:
            return await self._store(job)
        async with self.leases.hold(job.id, retry_for=self.outage_wait) as lease:
            _lease.set(lease)
            return await self._store(job)

    async def _store(self, job: Job) -> Outcome:
        """Dedup or store the job's file and register it at meta."""
        path = Path(job.spool)
        if not await asyncio.to_thread(path.is_file):
            raise errors.NotFound("the uploaded data is gone (spool file missing); upload the file again")
        if job.receiving:
            return await self._store_streamed(job, path)
        if job.hash:
            digest, size = bytes.fromhex(job.hash), job.size
        else:  # queued without a hash (e.g. by ssh Process): hash it here
            digest, size = await asyncio.to_thread(_hash_file, path)
        found = await _meta("FindByHash", self.meta.find_by_hash(digest))
        if found is not None:
            return Outcome(await self._as_uploaded(job, found), size, digest.hex(), dedup=True)
        record = await self.engine.store(self._source(job, path), ext=job.ext, content_type=job.content_type)
        return await self._register(job, record, digest, size)

    async def _store_streamed(self, job: Job, path: Path) -> Outcome:
        """Store a spool file while its upload still arrives; the hash is known only at its end.

        No FindByHash first: PutRecord answers ``deduplicated`` for content already
        stored, and the shards just written are deleted then.
        """
        final: list[tuple[int, str]] = []
        source = self._source(job, path, tail=final)
        record = await self.engine.store(source, ext=job.ext, content_type=job.content_type)
        if not final:  # the source always ends by noting the upload's final size and hash
            await self.engine.delete_shards(record)
            raise errors.IntegrityError("the upload's final size and hash were not recorded")
        size, hash_hex = final[0]
        try:
            digest = bytes.fromhex(hash_hex)
        except ValueError:
            digest = b""
        return await self._register(job, record, digest, size)

    async def _register(self, job: Job, record: FileRecord, digest: bytes, size: int) -> Outcome:
        """PutRecord a just-stored file whose content must hash to ``digest``; undo the shards on refusal."""
        try:
            if record.hash != digest or record.size != size:
                if job.receiving:
                    log.error(
                        "job %s: stored %d bytes hashing to %s, but the upload recorded %d bytes hashing to %s",
                        job.id,
                        record.size,
                        record.hash.hex(),
                        size,
                        digest.hex(),
                    )
                raise errors.IntegrityError(
                    "the spooled file changed while it was being stored (its hash or size differs from the upload)"
                )
            lease = _lease.get()
            if lease is not None:
                lease.check()
            entry, dedup = await _meta("PutRecord", self.meta.put(record))
        except MetaCallFailed as exc:
            if exc.refused:
                await self.engine.delete_shards(record)
            else:  # meta may have stored the record before the failure: keep the shards it might reference
                log.warning("job %s: PutRecord outcome unknown; its shards may be orphans", job.id)
            raise
        except errors.IntegrityError:
            await self.engine.delete_shards(record)
            raise
        if dedup:
            existing = await _meta("GetRecord", self.meta.get(entry.file_id))
            if _same_shards(existing.record, record):
                dedup = False  # a retried PutRecord found our own first write
            else:
                removed = await self.engine.delete_shards(record)
                log.info("job %s: content stored meanwhile by another job; removed %d new shards", job.id, removed)
                return Outcome(await self._as_uploaded(job, entry.file_id), size, digest.hex(), dedup=True)
        unwritten = unwritten_shards(record)
        if unwritten:
            await self._queue_degraded(job, entry.file_id, unwritten)
        return Outcome(entry.file_id, size, digest.hex(), dedup=dedup)

    async def _as_uploaded(self, job: Job, file_id: str) -> str:
        """The id of content stored before, with this upload's extension (meta records it for downloads)."""
        _, dot, ext = file_id.partition(".")
        if not job.ext or (dot and "." + ext == job.ext):
            return file_id
        return await _meta("AddExtension", self.meta.add_extension(file_id, job.ext, job.content_type))

    async def _queue_degraded(self, job: Job, file_id: str, unwritten: int) -> None:
        """A file stored with shards unwritten: into maint's repair queue (scrub finds it otherwise)."""
        log.warning(
            "job %s: %s stored with %d shards unwritten (backends down); queued for repair", job.id, file_id, unwritten
        )
        if self.queue is None:
            return
        try:
            await self.queue.degraded_upload(file_id)
        except errors.StoreFailed as exc:
            log.warning("job %s: %s not queued for repair (the next scrub pass finds it): %s", job.id, file_id, exc)

    async def _source(self, job: Job, path: Path, tail: list[tuple[int, str]] | None = None) -> AsyncIterator[bytes]:
        """The spool file's bytes, noting progress in the job hash as the engine takes them.

        With ``tail`` the file may still be growing: at its end the job hash says
        whether the upload is complete (then its final size and hash go into
        ``tail``), was aborted (raise, so the engine deletes what it wrote) or is
        still arriving (look again shortly).
        """
        done = 0
        last = time.monotonic()
        chunk = self.engine.config.chunk_size
        pieces = file_source(path, block=chunk, once=True) if tail is None else self._tail(job, path, tail)
        async for piece in pieces:
            yield piece
            done += len(piece)
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL:
                last = now
                with contextlib.suppress(RedisError):
                    await self.store.set_progress(job.id, done)
                jobs.checkpoint()

    async def _tail(self, job: Job, path: Path, final: list[tuple[int, str]]) -> AsyncIterator[bytes]:
        """Follow a spool file that its upload is still writing; see ``_source``.

        The file is read a whole chunk at a time (the engine takes it without joining pieces), and
        only once a chunk's worth is there (a cheap fstat per look); the rest at the upload's end.
        The job hash is looked at only once the file stood still for TAIL_ASK: the upload's end is
        recorded after its last bytes are in the file (and fsynced, which takes longer than that).
        """
        block = self.engine.config.chunk_size
        ticket = _ticket.get()
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            offset = 0
            seen = 0  # the file's size at the last look
            end: int | None = None  # the upload's final size, once it is complete
            end_hash = ""
            grew = checked = time.monotonic()
            while True:
                size = os.fstat(fd).st_size
                if size > seen:
                    seen, grew = size, time.monotonic()
                if seen - offset >= block or (end is not None and seen > offset):
                    data = await asyncio.to_thread(read_once, fd, block, offset)
                    if data:
                        offset += len(data)
                        if ticket is not None:
                            await ticket.resume()  # bytes to work on: back in the lane
                        yield data
                        continue
                if end is not None:  # all of the file read
                    if offset != end:
                        raise errors.IntegrityError(
                            f"the spool file holds {offset} bytes but the upload recorded {end} bytes"
                        )
                    final.append((end, end_hash))
                    return
                now = time.monotonic()
                if now - grew < TAIL_ASK:  # still growing: no need to ask whether the upload ended
                    await asyncio.sleep(TAIL_POLL)
                    continue
                state = await self.store.tail_state(job.id)
                if state is None:
                    raise errors.NotFound("the job's record is gone (expired?) while its upload arrived")
                status, receiving, size, hash_hex, error = state
                if status != jobs.ACTIVE:
                    raise errors.Refused(error or f"the job ended ({status}) while its upload arrived")
                if not receiving:
                    end, end_hash = size, hash_hex
                    continue  # the rest is in the file already (synced before the end was recorded): read it
                if now - grew > self.stall_timeout:
                    raise errors.TimedOut(
                        f"the upload stopped arriving ({offset} bytes in {self.stall_timeout:.0f}s); upload it again"
                    )
                if now - grew < ASIDE_AFTER:
                    await asyncio.sleep(TAIL_POLL)
                    continue
                if ticket is not None:
                    ticket.step_aside()  # the worker stores other jobs while this upload is awaited
                if now - checked >= LIVENESS_EVERY:
                    checked = now
                    receiver = await self.store.receiver(job.id)
                    if receiver and await liveness.gone(self.store.redis, receiver):
                        raise UploadCut(liveness.cut_off(receiver))
                await asyncio.sleep(ASIDE_POLL)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------- the pool


class WorkerPool:
    """Spawns ``size`` worker processes, restarts any that exits, stops them all on ``stop``."""

    def __init__(self, cfg: Config, size: int) -> None:
        self.size = size
        # Each worker reads the service's config from stdin (dump_config round-trips through build_config).
        self._config = yaml.safe_dump(dump_config(cfg)).encode()
        self._spool = cfg.spool_dir
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [p.pid for p in self._procs.values() if p.returncode is None]

    @property
    def consumers(self) -> list[str]:
        """Consumer names of the slots whose worker runs."""
        return [consumer_name(slot, self._spool) for slot, p in self._procs.items() if p.returncode is None]

    async def ready(self, store: JobStore) -> Ready:
        """Serving while Redis answers and one of these workers reports it can store (``report_readiness``)."""
        try:
            reports = await store.worker_reports(self.consumers)
        except errors.StoreFailed as exc:
            return Ready(False, str(exc))
        if any(can for can, _ in reports.values()):
            return READY
        if not reports:
            return Ready(False, f"none of the {len(self.pids)} running store workers has reported yet")
        return Ready(False, f"no store worker can store: {next(iter(reports.values()))[1]}")

    async def start(self) -> None:
        for slot in range(self.size):
            await self._spawn(slot)
            self._tasks.append(asyncio.create_task(self._supervise(slot), name=f"ingest-worker-{slot}"))

    async def _spawn(self, slot: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.ingest.worker",
            "--config",
            "-",
            "--parent-pid",
            str(os.getpid()),
            "--slot",
            str(slot),
            stdin=asyncio.subprocess.PIPE,
            cwd=net.REPO_ROOT,
            env=net.child_env(),
        )
        assert proc.stdin is not None
        proc.stdin.write(self._config)
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        self._procs[slot] = proc
        log.info("ingest worker %d started", slot, extra={"pid": proc.pid})

    async def _supervise(self, slot: int) -> None:
        delay = 0.2
        while True:
            proc = self._procs[slot]
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            if time.monotonic() - started > 30:
                delay = 0.2  # it ran a while: not a crash loop
            log.warning("ingest worker %d (pid %d) exited with %s; restarting in %.1fs", slot, proc.pid, code, delay)
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                if self._stopping:
                    return
                try:
                    await self._spawn(slot)
                    break
                except OSError as exc:  # e.g. out of processes or memory: keep trying
                    log.error("cannot start ingest worker %d (%s); retrying in %.1fs", slot, exc, delay)
            self.restarts += 1

    async def stop(self, grace: float = STOP_GRACE + 5.0) -> None:
        """SIGTERM every worker; SIGKILL those still running after ``grace`` seconds."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        procs = [p for p in self._procs.values() if p.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), grace)
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.warning("ingest worker pid %d did not stop in %.0fs; killing it", p.pid, grace)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))


# ----------------------------------------------------------------------- entry point


async def serve(cfg: Config, parent_pid: int | None = None, slot: int = 0) -> None:
    """Run the worker of ``slot`` until SIGTERM/SIGINT (or until the parent process is gone)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = jobs.connect(cfg.redis_url)
    engine = await gateway.open_engine(cfg)
    meta = MetaClient.for_config(
        cfg, "ingest", retry_for=cfg.outage_wait, retry_deadline=True, timeout=META_CALL_TIMEOUT
    )
    watch: asyncio.Task[None] | None = None
    if parent_pid is not None:

        async def orphaned() -> None:
            while os.getppid() == parent_pid and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return
            log.warning("the ingest service (pid %d) is gone; stopping", parent_pid)
            stop.set()

        watch = asyncio.create_task(orphaned())
    store = JobStore(redis)
    consumer = consumer_name(slot, cfg.spool_dir)
    lock = SlotLock(cfg.data_dir / "ingest" / f"worker-{slot}.lock")
    # A store needs write_quorum backends taking writes (each shard of a chunk on its own backend).
    need = cfg.engine.quorum
    reports = asyncio.create_task(report_readiness(store, engine.pool, need, stop, consumer))
    try:
        # An upload still arriving is dropped by ingest after upload_idle_timeout; past that and a
        # margin, a silent spool file means its ingest process died without saying so (a backstop:
        # the liveness check sees a gone process sooner).
        stall = cfg.limits.upload_idle_timeout + 30.0
        worker = Worker(
            store,
            engine,
            meta,
            signing_key(cfg.data_dir),
            claim_idle=claim_idle_ms(),
            stall_timeout=stall,
            consumer=consumer,
            leases=Leases(redis, cfg.outage_wait + LEASE_SLACK, consumer),
            queue=RepairQueue(redis),
            outage_wait=cfg.outage_wait,
        )
        if await lock.acquire(stop):
            await worker.run(stop)
    finally:
        if watch is not None:
            watch.cancel()
        stop.set()
        await reports
        lock.release()
        await meta.close()
        await engine.pool.close()
        await jobs.disconnect(redis)


async def report_readiness(store: JobStore, pool: BackendPool, need: int, stop: asyncio.Event, consumer: str) -> None:
    """Until ``stop``: every REPORT_EVERY seconds, whether ``need`` backends answer, into Redis for ingest's health."""
    while not stop.is_set():
        ready = await readiness.backends(pool, need)
        try:
            await store.report_worker(consumer, ready.serving, ready.reason, REPORT_TTL)
        except errors.StoreFailed as exc:  # the job loop logs the queue's trouble; the report lapses meanwhile
            log.debug("readiness report not stored: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REPORT_EVERY)
    try:
        await store.forget_worker(consumer)
    except errors.StoreFailed as exc:
        log.debug("readiness report not removed (it lapses): %s", exc)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the config, work until told to stop."""
    from services.common.logging import register_secret, setup_logging
    from services.common.tuning import tune_malloc

    parser = argparse.ArgumentParser(prog="python -m services.ingest.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="gateway YAML config, or - to read it from stdin")
    parser.add_argument("--data", help="data dir (overrides data_dir in the config)")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the ingest service) is gone")
    parser.add_argument("--slot", type=int, default=0, help="the pool's slot this worker runs in (its consumer name)")
    parser.add_argument("--log-level", default=os.environ.get("GRIDSTOR_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    try:
        setup_logging("ingest-worker", args.log_level)
        if args.config == "-":
            loaded = yaml.safe_load(sys.stdin.read()) or {}
            if not isinstance(loaded, dict):
                raise errors.InvalidInput("config on stdin must be a mapping of settings")
            cfg = build_config(loaded, data_dir=args.data)
        else:
            cfg = load_config(args.config, data_dir=args.data)
        claim_idle_ms()  # a bad value stops the start here, with its message
    except (errors.InvalidInput, yaml.YAMLError) as exc:
        print(f"ingest worker: {exc}", file=sys.stderr)
        return 2
    register_secret(cfg.secret)
    tune_malloc()
    try:
        asyncio.run(serve(cfg, args.parent_pid, args.slot))
    except errors.InvalidInput as exc:
        print(f"ingest worker: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
