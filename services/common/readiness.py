"""Whether a service can serve now: the checks behind its gRPC health status.

A service hands ``services.common.server.create_server`` a readiness check: a
coroutine answering ``Ready(True)`` or ``Ready(False, reason)``. The server
polls it every few seconds and reports NOT_SERVING (logging the reason) while
it fails. The checks here are the pieces services combine with ``all_of``:
enough shard backends answering (through their circuit breakers), the metadata
store answering, Redis answering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import errors
from services.common.backends import Backend
from services.common.backends.pool import BackendPool

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


async def backends(pool: BackendPool, need: int, what: str = "shard backends") -> Ready:
    """Serving while at least ``need`` of the pool's backends answer.

    The probes go through the pool's circuit breakers (``BackendPool.probe_all``):
    a backend whose breaker is open is not asked again before its time and
    counts as down; a probe that fails opens a breaker, one that answers closes it.
    """
    await pool.probe_all()
    up = sum(pool.usable(n) for n in pool.names)
    if up >= need:
        return READY
    down = [f"{n} ({pool.breaker(n).reason or 'down'})" for n in pool.names if not pool.usable(n)]
    shown = "; ".join(down[:3]) + (f"; {len(down) - 3} more" if len(down) > 3 else "")
    return Ready(False, f"{up} of {len(pool.names)} {what} answer; {need} are needed (down: {shown})")


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
