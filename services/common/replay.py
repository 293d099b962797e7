"""Signed messages that work once: the replay store auth's logins and ssh's account proofs share.

A message is keyed by a digest of what was signed (ed25519 is deterministic, so this also
catches any re-encoding of a signature); its first use is recorded in Redis with ``SET NX``
and an expiry past the whole window the message could be accepted in, so every process
sharing that Redis refuses a replay. Without the store a replay cannot be ruled out, so a
Redis failure refuses the message (BackendUnavailable) rather than failing open.
"""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import errors

REPLAY_PREFIX = "gridstor:auth:used:"


class ReplayGuard(Protocol):
    """Remembers signed messages already used."""

    async def first_use(self, digest: str, ttl: int) -> bool:
        """True the first time ``digest`` is seen within ``ttl`` seconds, False afterwards."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...


class RedisReplayGuard:
    """Used-message digests in Redis, shared by every process of the gateway."""

    def __init__(self, client: aioredis.Redis, prefix: str = REPLAY_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str) -> RedisReplayGuard:
        """A guard on the Redis at ``url`` (connects lazily)."""
        return cls(aioredis.from_url(url))

    async def first_use(self, digest: str, ttl: int) -> bool:
        """Atomically mark ``digest`` used; False if another request (or process) did first."""
        try:
            return bool(await self.client.set(self.prefix + digest, b"1", nx=True, ex=ttl))
        except RedisError as exc:
            raise errors.BackendUnavailable(
                "redis", f"replay-protection store unreachable ({type(exc).__name__}); try again"
            ) from None

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()
