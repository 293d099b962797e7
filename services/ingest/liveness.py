"""Which ingest processes are alive, so an upload that can no longer arrive fails at once.

A big upload is queued while it still arrives (a streamed job, ``receiving``): only the
ingest process receiving it can complete it. That process is an ``Instance``
(``<host>:<pid>:<boot>``, the boot part random per start), recorded in the job hash
(field ``ingest``). While it runs it keeps the key ``gridstor:ingest:live:<instance>``
alive (``TTL`` seconds, renewed every ``RENEW`` s) and deletes it when it stops.

A worker storing a streamed job whose file stopped growing asks ``gone`` whether that
process still exists: no key, or (on this host) no such pid. Then the upload can no
longer arrive, and the job is ended at once with a clear reason instead of after a stall
timeout. A new ingest process on the same spool folder also ends, at start, the streamed
jobs its predecessor was receiving (services/ingest/upload.py ``sweep_spool``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import jobs

log = logging.getLogger(__name__)

PREFIX = "gridstor:ingest:live:"
CUT_OFF = "its upload was cut off: the ingest process receiving it ({}) is gone; upload the file again"
TTL = 10.0  # seconds the key outlives its last renewal (an ingest killed with SIGKILL)
RENEW = 2.0


@dataclass(frozen=True)
class Instance:
    """One ingest process: host, pid and a random boot id (a pid can be reused after a restart)."""

    host: str
    pid: int
    boot: str

    @classmethod
    def this_process(cls) -> Instance:
        return cls(socket.gethostname(), os.getpid(), os.urandom(4).hex())

    @classmethod
    def parse(cls, text: str) -> Instance | None:
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        try:
            return cls(host, int(pid), rest) if host and rest else None
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.boot}"

    @property
    def key(self) -> str:
        return PREFIX + str(self)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _process_gone(instance: Instance) -> bool:
    """Whether ``instance`` ran on this host and its pid no longer exists (it cannot be the same process)."""
    if instance.host != socket.gethostname():
        return False
    if instance.pid == os.getpid():
        return False
    try:
        os.kill(instance.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user took the pid: ours is gone
        return True
    return False


async def gone(redis: aioredis.Redis, recorded: str) -> bool:
    """Whether the ingest process ``recorded`` in a job is gone for sure (False when unknown or Redis fails)."""
    instance = Instance.parse(recorded)
    if instance is None:
        return False
    if _process_gone(instance):
        return True
    try:
        return not await redis.exists(instance.key)
    except RedisError as exc:
        log.debug("liveness of %s unknown: %s", instance, exc)
        return False


class Heartbeat:
    """Keeps this process's liveness key in Redis while it runs; ``stop`` deletes it."""

    def __init__(self, redis: aioredis.Redis, instance: Instance) -> None:
        self.redis = redis
        self.instance = instance
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._renew()
        self._task = asyncio.create_task(self._run(), name="ingest-liveness")

    async def _renew(self) -> None:
        try:
            await self.redis.set(self.instance.key, "1", px=int(TTL * 1000))
        except RedisError as exc:  # the queue's trouble is reported by health; the key lapses meanwhile
            log.debug("liveness key not renewed: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(RENEW)
            await self._renew()

    async def stop(self) -> None:
        if self._task is not None:
            await jobs.cancel_and_wait(self._task)
            self._task = None
        try:
            await self.redis.delete(self.instance.key)
        except RedisError as exc:
            log.debug("liveness key not removed (it lapses): %s", exc)


def cut_off(recorded: str) -> str:
    """The reason a streamed job ends with when the ingest process ``recorded`` in it is gone."""
    instance = Instance.parse(recorded)
    return CUT_OFF.format(instance.describe() if instance is not None else "unknown")
