"""The repair queue: file ids that are under-replicated, fed by the store workers, drained by maint.

An upload that could write only ``write_quorum`` of a chunk's shards (backends
down) is stored, and its file id goes into this queue; so does a file a repair
could not bring back to k+m (a rebuilt shard with no backend to take it, or
shards on backends that do not answer). maint repairs the queued files first,
without waiting for the next full scrub pass, and again as soon as a backend
comes back (services/maint/repairs.py).

* ``gridstor:repair:queue``: sorted set, file id -> Unix time of its next attempt.
* ``gridstor:ingest:stats`` field ``degraded``: uploads stored with shards unwritten
  (mirrored into ingest's ``gridstor_ingest_degraded_writes_total``).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import errors
from services.common.jobs import STATS

QUEUE = "gridstor:repair:queue"


def _unavailable(exc: BaseException) -> errors.StoreFailed:
    return errors.StoreFailed(f"the repair queue (redis) is unavailable: {exc}")


class RepairQueue:
    """The queue of under-replicated files; every Redis failure surfaces as StoreFailed."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def degraded_upload(self, file_id: str) -> None:
        """A store worker stored ``file_id`` with shards unwritten: queue it now and count it."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zadd(QUEUE, {file_id: time.time()})
                pipe.hincrby(STATS, "degraded", 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    async def add(self, file_id: str, at: float | None = None) -> None:
        """Queue ``file_id`` for a repair at ``at`` (Unix time; now when None)."""
        try:
            await self.redis.zadd(QUEUE, {file_id: time.time() if at is None else at})
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    async def due(self, limit: int, *, everything: bool = False) -> list[str]:
        """Up to ``limit`` file ids whose attempt is due (``everything``: whatever their time), oldest first."""
        top = "+inf" if everything else time.time()
        try:
            return [str(x) for x in await self.redis.zrangebyscore(QUEUE, "-inf", top, start=0, num=limit)]
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    async def done(self, file_id: str) -> None:
        """``file_id`` is back to k+m (or gone): out of the queue."""
        try:
            await self.redis.zrem(QUEUE, file_id)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    async def size(self) -> int:
        try:
            return int(await self.redis.zcard(QUEUE))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None
