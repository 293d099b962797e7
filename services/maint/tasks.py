"""maint's work beside its RPCs: repairs, orphan collection, backups, restores, compaction, home cleanup, schedules.

Background tasks (master role): the scrub schedule, the repair queue of
under-replicated files (services/maint/repairs.py), orphan collection
(services/maint/orphans.py), metadata backups, compaction of the dir://
backends (services/maint/compaction.py) and home cleanup. A ``role: replica``
gateway serves Check, ScrubStatus, OrphanStatus, ReplicaStatus and dry-run
scrubs from its replica and refuses the writing methods with
FAILED_PRECONDITION (``writable``).

maint's own shard writes (repairs, backups) are tracked by ``InFlight`` so an
orphan collection waits for those that began before it; the store workers'
are covered by their job leases in Redis (services/common/leases.py), which
maint reads through its Redis client (``redis_url``, the job queue's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import RedisError

from services.common import errors, jobs
from services.common.config import Config
from services.common.engine import CheckReport, Engine, FileRecord
from services.common.leases import LeaseInfo, live_leases, server_time
from services.common.metrics import Registry
from services.common.records import Entry, Records
from services.common.repairqueue import RepairQueue
from services.maint import backup as backups
from services.maint import checks, cleanup
from services.maint.compaction import Compactor
from services.maint.orphans import InFlight, OrphanCollector, OrphanMetrics
from services.maint.repairs import RepairQueueRunner
from services.maint.scrub import Scrubber, ScrubMetrics

log = logging.getLogger(__name__)

REPLICA_REFUSAL = "this gateway is a read-only replica: {} runs on the master gateway"
FIRST_BACKUP_DELAY = 60.0  # let meta come up before the first scheduled backup
BACKUP_RETRY = 300.0


class Maint:
    """maint's state: the engine, the records client, the scrubber and the schedules."""

    def __init__(self, cfg: Config, engine: Engine, records: Records, registry: Registry) -> None:
        self.cfg = cfg
        self.engine = engine
        self.records = records
        self.redis = jobs.connect(cfg.redis_url)
        self.queue = RepairQueue(self.redis)
        self.inflight = InFlight()
        self.scrubber = Scrubber(
            engine,
            records,
            cfg.maint,
            state_path=cfg.data_dir / "maint" / "scrub.json",
            metrics=ScrubMetrics(registry),
            repair=self.repair_entry,
        )
        self.orphans = OrphanCollector(
            engine,
            records,
            self._leases,
            self.inflight,
            cfg.maint,
            marks_path=cfg.data_dir / "maint" / "watermarks.json",
            metrics=OrphanMetrics(registry),
        )
        self.repair_queue = RepairQueueRunner(self.queue, engine.pool, self._queued_repair, registry)
        self.cleanup_removed = registry.counter("maint_cleanup_files_removed_total", "Files removed from full homes")
        self.cleanup_bytes = registry.counter("maint_cleanup_bytes_removed_total", "Bytes removed from full homes")
        self.backups = registry.counter("maint_backups_total", "Metadata backups stored")
        self.last_backup = registry.gauge("maint_last_backup_timestamp_seconds", "Unix time of the last backup")
        self.compactor = Compactor(cfg, registry)
        self._backup_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def replica(self) -> bool:
        return self.cfg.role == "replica"

    def writable(self, method: str) -> None:
        if self.replica:
            raise errors.Refused(REPLICA_REFUSAL.format(method))

    # -- repairs ----------------------------------------------------------------------

    async def repair(self, file_id: str, *, hard: bool = False) -> checks.RepairResult:
        """Repair one file now (the Repair RPC); left under-replicated, it goes into the repair queue."""
        self.writable("Repair")
        return await self._repair(file_id, hard=hard)

    async def repair_entry(self, entry: Entry, report: CheckReport) -> checks.RepairResult:
        """The scrubber's repair of a file it just checked (same bookkeeping as ``repair``)."""
        return await self._repair(entry.file_id, entry=entry, report=report)

    async def _queued_repair(self, file_id: str) -> checks.RepairResult:
        """The repair queue's retry: a file still pending stays in the queue, not added again."""
        return await self._repair(file_id, requeue=False)

    async def _repair(
        self,
        file_id: str,
        *,
        requeue: bool = True,
        hard: bool = False,
        entry: Entry | None = None,
        report: CheckReport | None = None,
    ) -> checks.RepairResult:
        """``checks.repair`` counted as work in flight; with ``requeue``, left under-replicated it is queued."""
        async with self.inflight.track():
            result = await checks.repair(
                self.engine,
                self.records,
                file_id,
                hard=hard,
                entry=entry,
                report=report,
                rebuild_after=self.cfg.maint.rebuild_unreachable_after,
            )
        if requeue:
            await self._requeue(result)
        return result

    async def _requeue(self, result: checks.RepairResult) -> None:
        if result.ok or result.unrecoverable or not result.pending:
            return
        try:
            await self.queue.add(result.file_id)
        except errors.StoreFailed as exc:
            log.warning("%s stays under-replicated and cannot be queued for a retry: %s", result.file_id, exc)

    async def queue_size(self) -> int:
        """Files in the repair queue; -1 when it cannot be read."""
        try:
            return await self.queue.size()
        except errors.StoreFailed:
            return -1

    async def _leases(self) -> tuple[float, list[LeaseInfo]]:
        """The Redis clock and the live job leases (StoreFailed when Redis cannot be read)."""
        try:
            return await server_time(self.redis), await live_leases(self.redis)
        except (RedisError, OSError) as exc:
            raise errors.StoreFailed(f"the job queue (redis) is unavailable: {exc}") from None

    def collect_orphans(self, *, dry_run: bool = False) -> bool:
        """Start an orphan collection now; False when one runs already."""
        if not dry_run:
            self.writable("CollectOrphans (other than dry_run)")
        return self.orphans.start(dry_run=dry_run)

    async def backup(self) -> backups.BackupResult:
        """Store a metadata snapshot now (one at a time)."""
        self.writable("Backup")
        async with self._backup_lock, self.inflight.track():
            result = await backups.backup(self.engine, self.records, self.cfg.data_dir)
        self.backups.inc()
        self.last_backup.set(result.created)
        return result

    async def restore(self, backup_id: str, record: FileRecord | None, force: bool) -> backups.RestoreResult:
        """Rebuild the master metadata namespace from a snapshot."""
        self.writable("Restore")
        record = backups.snapshot_record(backup_id, record)
        if record is None:
            if not backup_id:
                raise errors.InvalidInput("Restore needs backup_id or the backup's record")
            record = (await self.records.get(backup_id)).record
        store = await backups.open_master_store(self.cfg)
        try:
            return await backups.restore(self.engine, store, record, force=force)
        finally:
            await store.close()

    def sweep(self) -> None:
        """One pass of home cleanup over every SSH account (blocking: run in a thread)."""
        for removed in cleanup.sweep_homes(self.cfg).values():
            self.cleanup_removed.inc(len(removed))
            self.cleanup_bytes.inc(sum(r.allocated for r in removed))

    # -- schedules ------------------------------------------------------------------

    def start(self) -> None:
        if not self.replica:
            self._spawn(self.scrubber.run_schedule(), "scrub-schedule")
            self._spawn(self.repair_queue.run(), "repair-queue")
            self._spawn(self.orphans.run_schedule(), "orphan-collection")
            if self.cfg.maint.backup_interval > 0:
                self._spawn(self._backup_schedule(), "backup-schedule")
            if self.cfg.maint.compact_interval > 0:
                self._spawn(self.compactor.schedule(), "compaction-schedule")
        if self.cfg.maint.cleanup_interval > 0:
            self._spawn(self._cleanup_schedule(), "home-cleanup")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("maint background task %s failed", name)

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def _backup_schedule(self) -> None:
        await asyncio.sleep(FIRST_BACKUP_DELAY)
        interval = self.cfg.maint.backup_interval
        while True:
            delay = await backups.newest_backup_time(self.cfg.data_dir) + interval - time.time()
            if delay > 0:
                await asyncio.sleep(min(delay, 300.0))
                continue
            try:
                await self.backup()
            except errors.GridstorError as exc:
                log.warning("scheduled metadata backup failed (retrying later): %s", exc)
                await asyncio.sleep(BACKUP_RETRY)

    async def _cleanup_schedule(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except (OSError, errors.GridstorError) as exc:
                log.warning("home cleanup failed: %s", exc)
            await asyncio.sleep(self.cfg.maint.cleanup_interval)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.compactor.close()
        await self.scrubber.close()
        await self.orphans.close()
        await jobs.disconnect(self.redis)
