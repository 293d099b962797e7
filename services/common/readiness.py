"""Whether a service can serve now: the checks behind its gRPC health status.

A service hands ``services.common.server.create_server`` a readiness check: a
coroutine answering ``Ready(True)`` or ``Ready(False, reason)``. The server
polls it every few seconds and reports NOT_SERVING (logging the reason) while
it fails. The checks here are the pieces services combine with ``all_of``:
enough shard backends answering, the metadata store answering, Redis answering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import errors
from services.common.backends import Backend

PROBE_TIMEOUT = 3.0  # seconds one backend or Redis may take to answer a probe


@dataclass(frozen=True)
class Ready:
    """A readiness answer: serving, or not and why (for the log; never sent to clients)."""

    serving: bool
    reason: str = ""


READY = Ready(True)
Readiness = Callable[[], Awaitable[Ready]]


async def answers(backend: Backend) -> bool:
    """Whether ``backend`` answers ``info`` within PROBE_TIMEOUT seconds."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await backend.info()
    except (errors.GridstorError, OSError, TimeoutError):
        return False
    return True


async def backends(pool: Iterable[Backend], need: int, what: str = "shard backends") -> Ready:
    """Serving while at least ``need`` of the backends answer (probed together)."""
    probed = list(pool)
    up = sum(await asyncio.gather(*(answers(b) for b in probed)))
    if up >= need:
        return READY
    return Ready(False, f"{up} of {len(probed)} {what} answer; {need} are needed")


async def store(backend: Backend, what: str) -> Ready:
    """Serving while ``backend`` (e.g. the metadata namespace) answers."""
    if await answers(backend):
        return READY
    return Ready(False, f"the {what} ({backend.name}) does not answer")


async def redis(client: aioredis.Redis, what: str) -> Ready:
    """Serving while Redis answers PING."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return Ready(False, f"redis ({what}) does not answer: {exc or type(exc).__name__}")
    return READY


def all_of(*checks: Readiness) -> Readiness:
    """A check serving while every one of ``checks`` does (the first failure's reason otherwise)."""

    async def check() -> Ready:
        for one in checks:
            ready = await one()
            if not ready.serving:
                return ready
        return READY

    return check
