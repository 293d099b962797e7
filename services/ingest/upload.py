"""One upload, from its first message to a queued job: what IngestService.Upload does.

1. The first message's header is checked (name, content type, declared size);
   every message's bytes go to a spool file, hashed and counted, within the
   upload limit and the declared size. A multipart/form-data body (form.py)
   is parsed as it arrives: its one file part's bytes are spooled, and the
   part's filename and type are the header's. A client that stops sending is dropped
   after ``limits.upload_idle_timeout``.
2. A big upload (``STREAM_FROM`` bytes, declared or so far) is queued while
   it still arrives: its spool file takes the job's name and the job is
   submitted ``receiving``, so a worker stores the file as it grows.
3. At the end of the stream the client must still be there (grpc.aio ends the
   stream the same way for a cancel), then the upload commits: the spool file
   and its name are fsynced, a streamed job gets its final size and hash
   (``received``); any other is submitted complete. The reply (the job id) goes
   out only after that, so an acknowledged upload is on disk and its job in
   Redis (whose append-only file the launcher fsyncs at every write:
   docs/resilience.md). Past that point a cancellation no longer undoes it.
4. Anything failing before the commit removes the spool file; a streamed
   job is aborted first, so its worker stops and deletes what it wrote.

A ``role: replica`` gateway refuses every upload (FAILED_PRECONDITION) before
anything is spooled or stored: it shares the master's pool but cannot store a
record. What the client still sends is read and dropped for a moment first
(``_drain``), so it hears why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gridstor.v1 import ingest_pb2
from services.common import errors, jobs, spool
from services.common.config import Config
from services.common.gateway import refuse_on_replica
from services.common.ids import dropped_ext
from services.common.jobs import JobStore
from services.common.limits import idle_timeout
from services.ingest import liveness
from services.ingest.form import FormFile, is_form
from services.ingest.liveness import Instance

log = logging.getLogger(__name__)

# Uploads this big are queued while they still arrive, so storing overlaps receiving. Smaller
# ones arrive in a few ms: they keep the simple path (queued complete, FindByHash before any write).
STREAM_FROM = 8 * 1024 * 1024
DRAIN_FOR = 1.0  # seconds a refused upload is still read (and dropped), so its client hears why (``_drain``)

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class Received:
    """A complete upload and the job storing it."""

    job: str
    size: int
    hash: str  # hex
    name: str
    ext: str
    note: str = ""  # why the name's extension was not kept, if it was not


class Upload:
    """One upload being received (see the module docstring); ``result`` says how it ended.

    ``result`` is ``ok``, ``refused`` (bad input, over a limit), ``cancelled`` or ``failed``.
    """

    def __init__(
        self,
        cfg: Config,
        store: JobStore,
        identity: str,
        on_bytes: Callable[[int], object],
        instance: Instance | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.instance = instance  # this ingest process, recorded in streamed jobs (liveness.py)
        self.identity = identity
        self.on_bytes = on_bytes  # counts every byte received, kept or not
        self.result = "failed"
        self.header: spool.UploadHeader | None = None

    async def receive(self, messages: AsyncIterator[ingest_pb2.UploadRequest], context: Context) -> Received:
        """Spool ``messages`` and queue the job; the spool file is gone again unless the job is queued."""
        limit = self.cfg.max_upload
        stream = idle_timeout(messages, self.cfg.limits.upload_idle_timeout)
        if self.cfg.role == "replica":  # it cannot store a record: refused before a byte is kept or a shard written
            self.result = "refused"
            await self._drain(stream)
            refuse_on_replica(self.cfg, "an upload")
        sp = spool.Spool(self.cfg.spool_dir, limit)
        committed: asyncio.Future[None] | None = None
        job = ""
        streaming = False  # the job is queued already and a worker may be storing the spool as it grows
        try:
            pieces = self._file(stream, limit)
            async with contextlib.aclosing(pieces):
                async for header, data in pieces:
                    await sp.write(data)
                    if header.declared_size is not None and sp.size > header.declared_size:
                        raise errors.InvalidInput(
                            f"more bytes arrived than the declared_size of {header.declared_size} bytes"
                        )
                    if not streaming and big(header, sp.size):
                        job = jobs.new_job_id()
                        await self._spool_as_job(job, sp)
                        streaming = True  # set before submit: a cancellation cutting it short must still abort
                        await self._queue_receiving(job, sp, header)
            if self.header is None:  # an empty stream is an empty, nameless file
                self.header = spool.UploadHeader.parse("", "", "", None, limit)
            header = self.header
            done = await sp.finish()
            if header.declared_size is not None and header.declared_size != done.size:
                raise errors.InvalidInput(
                    f"declared_size was {header.declared_size} bytes but {done.size} bytes arrived"
                )
            await client_still_there(context)
            if not streaming:
                job = jobs.new_job_id()
                path = spool.job_path(self.cfg.spool_dir, job)
                os.rename(done.path, path)
                sp.path = path
            # The file was fsynced by finish; its name too before the job is recorded and acknowledged.
            await asyncio.to_thread(spool.fsync_dir, self.cfg.spool_dir)
            if streaming:
                # Past this point the upload is complete: a cancellation no longer undoes it.
                committed = asyncio.ensure_future(self.store.received(job, size=done.size, hash_hex=done.hash.hex()))
            else:
                committed = asyncio.ensure_future(
                    self.store.submit(
                        job,
                        path=str(sp.path),
                        size=done.size,
                        hash_hex=done.hash.hex(),
                        name=header.name,
                        ext=header.ext,
                        content_type=header.content_type,
                        identity=self.identity,
                    )
                )

            def drop_unless_queued(f: asyncio.Future[None]) -> None:
                if f.cancelled() or f.exception() is not None:
                    sp.discard()  # a streamed job's worker then stalls and fails it

            committed.add_done_callback(drop_unless_queued)
            await asyncio.shield(committed)
            self.result = "ok"
        except asyncio.CancelledError:
            self.result = "cancelled"
            raise
        except (errors.InvalidInput, errors.LimitExceeded):
            self.result = "refused"
            await self._drain(stream)
            raise
        finally:
            if committed is None:
                if streaming:
                    await self._abort(job)
                sp.discard()
        log.info("upload received", extra={"job": job, "size": done.size, "ext": header.ext, "identity": self.identity})
        return Received(job, done.size, done.hash.hex(), header.name, header.ext, dropped_ext(header.name))

    async def _file(
        self, messages: AsyncIterator[ingest_pb2.UploadRequest], limit: int
    ) -> AsyncGenerator[tuple[spool.UploadHeader, bytes], None]:
        """The file's header (once known) with each piece of its bytes; a form body yields its file part's.

        ``self.header`` is set as soon as the header is known (None after an empty stream).
        """
        form: FormFile | None = None
        first: ingest_pb2.UploadRequest | None = None
        async for msg in messages:
            data = msg.body.data
            self.on_bytes(len(data))
            if first is None:
                first = msg
                if is_form(msg.body.content_type):
                    form = FormFile(msg.body.content_type)
                    if msg.HasField("declared_size"):
                        raise errors.InvalidInput(
                            "declared_size cannot be used with a multipart/form-data upload (it would count the"
                            " form, not the file)"
                        )
                else:
                    self.header = spool.UploadHeader.parse(
                        msg.name,
                        msg.content_type,
                        msg.body.content_type,
                        msg.declared_size if msg.HasField("declared_size") else None,
                        limit,
                    )
            if form is None:
                assert self.header is not None
                yield self.header, data
                continue
            pieces = form.feed(data)
            if self.header is None and form.ready:
                self.header = spool.UploadHeader.parse(
                    first.name or form.filename, first.content_type or form.content_type, "", None, limit
                )
            for piece in pieces:
                assert self.header is not None
                yield self.header, piece
        if form is not None:
            form.finish()

    async def _drain(self, stream: AsyncIterator[ingest_pb2.UploadRequest]) -> None:
        """Read and drop what the client still sends, for up to DRAIN_FOR seconds, before refusing it.

        grpc's asyncio client reports a call that the server ended while the client was
        still writing as INTERNAL ("Internal error from Core"), not with the server's
        status (grpc/aio/_call.py ``_write``: ``set_internal_error``). A client a little
        over the limit finishes sending meanwhile and gets the real refusal (too large,
        spool full); one that goes on sending is cut off after DRAIN_FOR anyway.
        """
        try:
            async with asyncio.timeout(DRAIN_FOR):
                async for msg in stream:
                    self.on_bytes(len(msg.body.data))
        except (TimeoutError, errors.GridstorError):
            pass

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
            identity=self.identity,
            receiving=True,
            ingest=str(self.instance) if self.instance is not None else "",
        )

    async def _abort(self, job: str) -> None:
        """Tell the worker of a streamed job that its upload failed, before its spool file goes."""
        aborting = asyncio.ensure_future(self.store.abort(job, f"the upload was {self.result}"))
        try:
            await asyncio.shield(aborting)
        except (asyncio.CancelledError, errors.StoreFailed) as exc:
            # The worker then finds the spool file gone or stalled and fails the job itself.
            log.warning("upload of job %s failed; could not tell its worker (%s)", job, exc)


async def client_still_there(context: Context) -> None:
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
    except Exception as exc:  # the call is gone (the batch failed): that is the answer, not an error to log
        raise asyncio.CancelledError(f"the client went away ({type(exc).__name__})") from None
    jobs.checkpoint()


def big(header: spool.UploadHeader, received: int) -> bool:
    """Whether to queue an upload now: it is (declared, or so far) at least STREAM_FROM, a batch is on its way."""
    return received >= max(STREAM_FROM, spool.BATCH_BYTES) or (
        received >= spool.BATCH_BYTES and (header.declared_size or 0) >= STREAM_FROM
    )


SWEEP_EVERY = 60.0  # seconds between sweeps of the spool folder while ingest runs
UNKNOWN_GRACE = 60.0  # a spool file renamed this recently may belong to a job being queued (ssh Process)


async def sweep_spool(directory: Path, store: JobStore, me: Instance, *, at_start: bool = False) -> int:
    """Remove spool files no live job needs and end streamed jobs whose upload can no longer arrive.

    * ``up-*.part`` files no process writes (``spool.sweep_partials``);
    * ``<job>.spool`` files of finished jobs, and of unknown ones renamed over UNKNOWN_GRACE ago;
    * ``<job>.spool`` files of streamed jobs another ingest process was receiving, once that
      process is gone (``liveness.gone``; ``at_start``: always, the spool folder is this
      process's alone): the job is aborted first, so a worker storing it stops at once.

    Returns how many files went. Runs at start and every SWEEP_EVERY seconds (``sweep_forever``).
    """
    removed = await asyncio.to_thread(spool.sweep_partials, directory)
    cut = 0
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
        if job is None:
            with contextlib.suppress(FileNotFoundError):
                if not at_start and time.time() - entry.stat().st_ctime < UNKNOWN_GRACE:
                    continue
        elif job.receiving and not job.finished:
            if job.ingest == str(me):
                continue
            if not at_start and not await liveness.gone(store.redis, job.ingest):
                continue
            await store.abort(job_id, liveness.cut_off(job.ingest))
            cut += 1
        elif not job.finished:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    if removed or cut:
        log.info(
            "spool swept: %d files removed, %d uploads cut off by a gone ingest process ended",
            removed,
            cut,
            extra={"spool": str(directory)},
        )
    return removed


async def sweep_forever(directory: Path, store: JobStore, me: Instance, every: float = SWEEP_EVERY) -> None:
    """``sweep_spool`` every ``every`` seconds, so leftovers of a crash go while the gateway runs."""
    while True:
        await asyncio.sleep(every)
        try:
            await sweep_spool(directory, store, me)
        except (errors.StoreFailed, OSError) as exc:  # Redis away or the disk in trouble: try next time
            log.warning("spool sweep failed: %s", exc)
