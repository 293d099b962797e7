"""MaintService over grpc.aio: a thin servicer over checks, scrub, replicas and backup (services/maint/tasks.py).

maint opens its own engine over the configured backends and reaches the
records through meta's internal RPCs with a service token, so meta stays the
one writer of the metadata (repairs swap records with compare-and-swap). Only
Restore opens the master namespace directly: it must choose the ids.
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any

import grpc

from gridstor.v1 import maint_pb2, maint_pb2_grpc
from services.common import readiness, rpc
from services.common.config import Config
from services.common.engine import CheckReport
from services.common.gateway import open_engine
from services.common.metaclient import MetaClient
from services.common.metrics import Registry
from services.common.records import Records
from services.common.server import READY_EVERY, Cleanup, Running, Wiring, create_server
from services.maint import checks, replicas
from services.maint.compaction import Pass
from services.maint.orphans import OrphanProgress
from services.maint.scrub import Progress
from services.maint.tasks import Maint

log = logging.getLogger(__name__)

NAME = "maint"
SERVICE = "gridstor.v1.MaintService"
# Read-only methods need a token unless the gateway is public; the ones that change or
# expose stored data need an operator's token in every mode.
POLICY = rpc.Policy(admin=frozenset({"Repair", "Scrub", "Backup", "Restore", "Compact", "CollectOrphans"}))

Context = grpc.aio.ServicerContext[Any, Any]


def progress_message(p: Progress) -> maint_pb2.ScrubProgress:
    """The proto form of scrub counters."""
    return maint_pb2.ScrubProgress(
        state=maint_pb2.SCRUB_STATE_RUNNING if p.running else maint_pb2.SCRUB_STATE_IDLE,
        hard=p.hard,
        dry_run=p.dry_run,
        started=p.started,
        finished=p.finished,
        cursor=p.cursor,
        files_checked=p.files_checked,
        files_damaged=p.files_damaged,
        files_repaired=p.files_repaired,
        shards_repaired=p.shards_repaired,
        files_unrecoverable=p.files_unrecoverable,
        unrecoverable_ids=p.unrecoverable_ids,
        last_full_pass=p.last_full_pass,
        last_hard_pass=p.last_hard_pass,
        files_pending=p.files_pending,
    )


def orphan_message(p: OrphanProgress) -> maint_pb2.OrphanProgress:
    """The proto form of orphan collection counters."""
    return maint_pb2.OrphanProgress(
        state=maint_pb2.SCRUB_STATE_RUNNING if p.running else maint_pb2.SCRUB_STATE_IDLE,
        dry_run=p.dry_run,
        started=p.started,
        finished=p.finished,
        records=p.records,
        scanned=p.scanned,
        orphans=p.orphans,
        deleted=p.deleted,
        too_new=p.too_new,
        backends=[
            maint_pb2.OrphanBackend(
                name=b.name,
                scanned=b.scanned,
                orphans=b.orphans,
                deleted=b.deleted,
                too_new=b.too_new,
                skipped=b.skipped,
            )
            for b in p.backends
        ],
        error=p.error,
    )


def check_reply(file_id: str, report: CheckReport) -> maint_pb2.CheckReply:
    """The proto form of a check: lost (missing, corrupt, unwritten) apart from unreachable now."""
    return maint_pb2.CheckReply(
        id=file_id,
        ok=report.ok,
        hard=report.hard,
        k=report.k,
        m=report.m,
        chunks=len(report.chunks),
        damaged=[
            maint_pb2.ChunkHealth(
                index=h.index, missing=h.missing, corrupt=h.corrupt, unreachable=h.unreachable, unwritten=h.unwritten
            )
            for h in report.damaged
        ],
        recoverable=not report.unrecoverable,
        hash_ok=report.hash_ok is True,
        error=report.error,
        readable=not report.unreadable,
        under_replicated=bool(report.damaged),
        shards_lost=report.lost,
        shards_unreachable=report.unreachable,
        unreachable_backends=sorted(report.unreachable_backends),
        replaced_backends=sorted(report.replaced_backends),
    )


def compact_reply(run: Pass, started: bool) -> maint_pb2.CompactReply:
    """The proto form of a compaction pass."""
    return maint_pb2.CompactReply(
        started=started,
        running=run.running,
        started_at=int(run.started),
        finished_at=int(run.finished),
        freed_bytes=run.freed,
        segments=run.segments,
        skipped=run.skipped,
        backends=[
            maint_pb2.CompactedBackend(
                name=b.name,
                segments=b.result.segments,
                freed_bytes=b.result.freed,
                moved_bytes=b.result.moved_bytes,
                skipped=b.result.skipped,
                dead_bytes=b.dead_bytes,
                error=b.error,
            )
            for b in run.backends
        ],
    )


class MaintServicer(maint_pb2_grpc.MaintServiceServicer):
    """Unpacks requests, calls the domain modules, builds replies."""

    def __init__(self, maint: Maint) -> None:
        self.maint = maint

    async def Check(self, request: maint_pb2.CheckRequest, context: Context) -> maint_pb2.CheckReply:
        soft = request.soft if request.HasField("soft") else True
        entry, report = await checks.check(self.maint.engine, self.maint.records, request.id, hard=not soft)
        return check_reply(entry.file_id, report)

    async def Repair(self, request: maint_pb2.RepairRequest, context: Context) -> maint_pb2.RepairReply:
        result = await self.maint.repair(request.id, hard=request.hard)
        return maint_pb2.RepairReply(
            id=result.file_id,
            ok=result.ok,
            shards_repaired=result.shards_repaired,
            repaired=[maint_pb2.ChunkRepair(index=f.index, shards=f.shards, backends=f.backends) for f in result.fixes],
            unrecoverable=result.unrecoverable,
            error=result.error,
            shards_pending=result.pending,
        )

    async def Scrub(self, request: maint_pb2.ScrubRequest, context: Context) -> maint_pb2.ScrubReply:
        if not request.dry_run:
            self.maint.writable("Scrub (other than dry_run)")
        started = self.maint.scrubber.start(hard=request.hard, dry_run=request.dry_run)
        return maint_pb2.ScrubReply(started=started, progress=progress_message(self.maint.scrubber.status()))

    async def ScrubStatus(self, request: maint_pb2.ScrubStatusRequest, context: Context) -> maint_pb2.ScrubStatusReply:
        return maint_pb2.ScrubStatusReply(
            progress=progress_message(self.maint.scrubber.status()), repair_queue=await self.maint.queue_size()
        )

    async def CollectOrphans(
        self, request: maint_pb2.CollectOrphansRequest, context: Context
    ) -> maint_pb2.CollectOrphansReply:
        started = self.maint.collect_orphans(dry_run=request.dry_run)
        return maint_pb2.CollectOrphansReply(started=started, progress=orphan_message(self.maint.orphans.status()))

    async def OrphanStatus(
        self, request: maint_pb2.OrphanStatusRequest, context: Context
    ) -> maint_pb2.OrphanStatusReply:
        return maint_pb2.OrphanStatusReply(progress=orphan_message(self.maint.orphans.status()))

    async def ReplicaStatus(
        self, request: maint_pb2.ReplicaStatusRequest, context: Context
    ) -> maint_pb2.ReplicaStatusReply:
        report = await replicas.replica_status(self.maint.cfg)
        return maint_pb2.ReplicaStatusReply(
            role=report.role,
            master_reachable=report.master_reachable,
            master_last_id=max(0, report.master_last_id),
            master_entries=report.master_entries,
            replicas=[
                maint_pb2.ReplicaInfo(
                    name=r.name,
                    reachable=r.reachable,
                    last_id=max(0, r.last_id),
                    entries=r.entries,
                    lag=r.lag,
                    error=r.error,
                )
                for r in report.replicas
            ],
            in_sync=report.in_sync,
        )

    async def Backup(self, request: maint_pb2.BackupRequest, context: Context) -> maint_pb2.BackupReply:
        result = await self.maint.backup()
        return maint_pb2.BackupReply(
            backup_id=result.backup_id,
            records=result.records,
            last_id=max(0, result.last_id),
            size=result.size,
            created=result.created,
            record=result.record,
        )

    async def Compact(self, request: maint_pb2.CompactRequest, context: Context) -> maint_pb2.CompactReply:
        self.maint.writable("Compact")
        compactor = self.maint.compactor
        started = compactor.start(min_dead=0.0)  # asked for: every segment with a dead byte
        if request.wait:
            await compactor.wait()
        return compact_reply(compactor.last, started)

    async def Restore(self, request: maint_pb2.RestoreRequest, context: Context) -> maint_pb2.RestoreReply:
        record = request.record if request.HasField("record") else None
        result = await self.maint.restore(request.backup_id, record, request.force)
        return maint_pb2.RestoreReply(records=result.records, last_id=max(0, result.last_id))


async def build(
    cfg: Config,
    *,
    port: int | None = None,
    registry: Registry | None = None,
    records: Records | None = None,
    schedules: bool = True,
    ready_every: float = READY_EVERY,
) -> tuple[Running, Cleanup]:
    """Open the engine and a meta client, start the server and the schedules; return it and an async cleanup.

    ``records`` replaces the meta client (tests); ``schedules=False`` starts no background task.
    Serving while at least k shard backends answer.
    """

    async def setup(stack: contextlib.AsyncExitStack) -> Wiring:
        engine = await open_engine(cfg)
        stack.push_async_callback(engine.pool.close)
        source = records
        if source is None:
            client = source = MetaClient.for_config(cfg, NAME)
            stack.push_async_callback(client.close)
        maint = Maint(cfg, engine, source, registry or Registry())
        stack.push_async_callback(maint.close)
        if schedules:
            maint.start()
        ready = partial(readiness.backends, engine.pool, cfg.engine.k)
        return Wiring(
            SERVICE, partial(maint_pb2_grpc.add_MaintServiceServicer_to_server, MaintServicer(maint)), POLICY, ready
        )

    return await create_server(cfg, NAME, setup, port=port, ready_every=ready_every)
