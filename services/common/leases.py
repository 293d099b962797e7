"""Job leases in Redis: what maint's orphan collector must not touch.

A store worker takes a lease before it writes the first shard of a job and
gives it back once the job's record is stored (or its shards deleted). The
lease is a Redis key with a TTL, renewed while the job runs:

* ``gridstor:lease:<name>``: ``"<token> <since> <owner>"``, ``since`` being the
  Redis server's clock (``TIME``) when it was taken. The orphan collector keeps
  every key a backend handed out after the newest high water mark it noted at
  or before the oldest live lease's ``since`` (services/maint/orphans.py), so
  the shards of a job in flight are never collected, however long it runs.

A lease is one per job (the name is the job id): a worker that takes a job
over (its first worker died) overwrites it, so the dead attempt's shards
become collectable at once, and the old attempt, should it still be running,
finds its lease gone at the next renewal. A holder checks its lease
(``Lease.check``) before it commits a record: a lease not renewed for
``ttl - MARGIN`` seconds may have expired and been collected around, so the
job must not reference those shards. The TTL outlives the longest outage a
job waits out (``outage_wait``), during which renewals may fail.

The collector lists live leases (``live_leases``); when Redis cannot be read it cannot
know which jobs run, and it does not collect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import errors, jobs

log = logging.getLogger(__name__)

PREFIX = "gridstor:lease:"
MARGIN = 60.0  # a lease not renewed for ttl - MARGIN seconds counts as lost to its holder

# Renew only while the lease is still ours (a takeover overwrites it).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# Take (or overwrite) a lease: "<token> <since> <owner>", since = the server's clock, in one round trip.
_WRITE = """
local t = redis.call('TIME')
local value = ARGV[1] .. ' ' .. t[1] .. '.' .. string.format('%06d', tonumber(t[2])) .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return value
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(errors.StoreFailed):
    """The job's lease lapsed or was taken over: its shards may be collected, so its record must not be stored."""


@dataclass(frozen=True)
class LeaseInfo:
    """A live lease as the orphan collector sees it."""

    name: str
    since: float  # Redis server time when it was taken
    owner: str


class Lease:
    """A lease being held; see the module docstring."""

    def __init__(self, name: str, value: str, ttl: float) -> None:
        self.name = name
        self.value = value
        self.ttl = ttl
        self.renewed = time.monotonic()
        self.lost = ""

    def check(self) -> None:
        """Raise LeaseLost unless the lease is surely still held."""
        if self.lost:
            raise LeaseLost(f"the job's lease was lost ({self.lost}); storing it again")
        idle = time.monotonic() - self.renewed
        if idle > self.ttl - MARGIN:
            raise LeaseLost(f"the job's lease was not renewed for {idle:.0f} s (the job queue was away); storing again")


async def server_time(redis: aioredis.Redis) -> float:
    """The Redis server's clock (TIME), the one clock leases and high water marks share."""
    secs, micros = await redis.time()
    return float(secs) + float(micros) / 1e6


class Leases:
    """Take, renew, give back and list leases; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, ttl: float, owner: str = "") -> None:
        if ttl <= MARGIN:
            raise errors.InvalidInput(f"a lease TTL must be over {MARGIN:g} s, got {ttl:g}")
        self.redis = redis
        self.ttl = ttl
        self.owner = owner or f"pid{os.getpid()}"
        self._write = redis.register_script(_WRITE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def every(self) -> float:
        """Seconds between renewals."""
        return min(30.0, max(1.0, self.ttl / 10))

    async def _take(self, name: str, retry_for: float) -> str:
        """Write the lease ``name``, retrying while Redis does not answer for up to ``retry_for`` seconds."""
        token = os.urandom(8).hex()
        try:
            value = await jobs.despite_outage(
                f"lease {name}",
                lambda: self._write(keys=[PREFIX + name], args=[token, self.owner, int(self.ttl * 1000)]),
                retry_for,
                delay=0.2,
            )
        except (RedisError, OSError) as exc:
            raise errors.StoreFailed(
                f"cannot take a lease for {name}: the job queue (redis) is unavailable: {exc}"
            ) from None
        return value.decode() if isinstance(value, bytes) else str(value)

    @contextlib.asynccontextmanager
    async def hold(self, name: str, *, retry_for: float = 0.0) -> AsyncIterator[Lease]:
        """Take the lease ``name`` (retrying ``retry_for`` s while Redis is away), renew it, give it back at the end.

        StoreFailed when Redis does not answer in time: no shard may be written without a lease.
        """
        value = await self._take(name, retry_for)
        lease = Lease(name, value, self.ttl)
        task = asyncio.create_task(self._keep(lease), name=f"lease-{name}")
        try:
            yield lease
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await self._release(keys=[PREFIX + name], args=[value])
            except (RedisError, OSError) as exc:  # it lapses after its TTL
                log.warning("lease %s not given back (it lapses in %.0f s): %s", name, self.ttl, exc)

    async def _keep(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                held = await self._renew(keys=[PREFIX + lease.name], args=[lease.value, int(self.ttl * 1000)])
            except (RedisError, OSError) as exc:
                log.debug("lease %s not renewed now: %s", lease.name, exc)
                continue
            if not held:
                lease.lost = "another worker took the job over, or it lapsed"
                log.warning("lease %s lost: %s", lease.name, lease.lost)
                return
            lease.renewed = time.monotonic()


async def live_leases(redis: aioredis.Redis) -> list[LeaseInfo]:
    """Every live lease (raises RedisError when Redis cannot be read)."""
    names = [key async for key in redis.scan_iter(match=PREFIX + "*", count=500)]
    if not names:
        return []
    values = await redis.mget(names)
    out: list[LeaseInfo] = []
    for key, value in zip(names, values, strict=True):
        if value is None:
            continue  # given back meanwhile
        parts = str(value).split(" ", 2)
        try:
            since = float(parts[1])
        except (IndexError, ValueError):
            since = 0.0  # unreadable: protect everything it might own
        out.append(LeaseInfo(str(key)[len(PREFIX) :], since, parts[2] if len(parts) > 2 else ""))
    return out
