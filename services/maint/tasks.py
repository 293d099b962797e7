"""maint's work beside its RPCs: backups, restores, home cleanup and the schedules that run them.

Background tasks (master role): the scrub schedule, metadata backups, compaction
of the dir:// backends (services/maint/compaction.py) and home cleanup. A
``role: replica`` gateway serves Check, ScrubStatus,
ReplicaStatus and dry-run scrubs from its replica and refuses the writing
methods with FAILED_PRECONDITION (``writable``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from services.common import errors
from services.common.config import Config
from services.common.engine import Engine, FileRecord
from services.common.metrics import Registry
from services.common.records import Records
from services.maint import backup as backups
from services.maint import cleanup
from services.maint.compaction import Compactor
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
        self.scrubber = Scrubber(
            engine,
            records,
            cfg.maint,
            state_path=cfg.data_dir / "maint" / "scrub.json",
            metrics=ScrubMetrics(registry),
        )
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

    async def backup(self) -> backups.BackupResult:
        """Store a metadata snapshot now (one at a time)."""
        self.writable("Backup")
        async with self._backup_lock:
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
            self.cleanup_bytes.inc(sum(r.size for r in removed))

    # -- schedules ------------------------------------------------------------------

    def start(self) -> None:
        if not self.replica:
            self._spawn(self.scrubber.run_schedule(), "scrub-schedule")
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
