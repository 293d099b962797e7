"""maint's side of the repair queue (services/common/repairqueue.py): under-replicated files first.

``RepairQueueRunner.run`` looks at the queue every ``POLL`` seconds and
repairs every file whose attempt is due: at once for a file a store worker
just queued (a degraded upload), ``RETRY`` seconds later for one a repair could
not finish. Whenever a backend comes back (a circuit breaker closes: the pool's
``generation`` grows), every queued file is tried at once, without waiting for
its time or for the next scrub pass. A file back to k+m, or no longer stored,
leaves the queue; one that lost more than m shards is logged and left to scrub.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from services.common.backends.pool import BackendPool
from services.common.errors import GridstorError, NotFound, StoreFailed
from services.common.metrics import Registry
from services.common.repairqueue import RepairQueue
from services.maint.checks import RepairResult

log = logging.getLogger(__name__)

POLL = 2.0  # seconds between looks at the queue
RETRY = 300.0  # seconds before a file a repair could not finish is tried again (unless a backend returns sooner)
BATCH = 256
MAX_BACKOFF = 60.0


class RepairQueueRunner:
    """Drains the repair queue; see the module docstring."""

    def __init__(
        self,
        queue: RepairQueue,
        pool: BackendPool,
        repair: Callable[[str], Awaitable[RepairResult]],
        registry: Registry,
    ) -> None:
        self.queue = queue
        self.pool = pool
        self.repair = repair
        self.size = registry.gauge("maint_repair_queue_files", "Under-replicated files waiting in the repair queue")
        self.repaired = registry.counter("maint_repair_queue_repaired_total", "Queued files brought back to k+m shards")

    async def run(self) -> None:
        seen = self.pool.generation
        delay = POLL
        while True:
            try:
                returned = self.pool.generation != seen
                seen = self.pool.generation
                if returned:
                    log.info("a backend came back: trying every queued under-replicated file now")
                await self.round(everything=returned)
                self.size.set(await self.queue.size())
                delay = POLL
            except StoreFailed as exc:  # redis away: the queue waits
                log.debug("repair queue unavailable: %s", exc)
                delay = min(delay * 2, MAX_BACKOFF)
            await asyncio.sleep(delay)

    async def round(self, *, everything: bool = False) -> int:
        """Repair the due files (``everything``: every queued file once); how many are back to k+m."""
        fixed = 0
        tried: set[str] = set()
        while True:
            ids = [fid for fid in await self.queue.due(BATCH, everything=everything) if fid not in tried]
            if not ids:
                return fixed
            for file_id in ids:
                tried.add(file_id)
                fixed += await self._one(file_id)

    async def _one(self, file_id: str) -> int:
        try:
            result = await self.repair(file_id)
        except NotFound:
            await self.queue.done(file_id)
            return 0
        except StoreFailed:
            raise
        except GridstorError as exc:
            log.warning("queued repair of %s failed (retrying later): %s", file_id, exc)
            await self.queue.add(file_id, time.time() + RETRY)
            return 0
        if result.ok:
            await self.queue.done(file_id)
            self.repaired.inc()
            log.info("%s is back to k+m shards", file_id)
            return 1
        if result.unrecoverable:
            await self.queue.done(file_id)  # nothing to rebuild from: scrub reports it
            return 0
        await self.queue.add(file_id, time.time() + RETRY)
        return 0
