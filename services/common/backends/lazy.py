"""A backend that was unreachable when the gateway started.

A gateway must start, and serve reads, with up to m backends down. Instead of
failing the start, such a backend is wrapped: every call first tries to open
it again (at most every ``retry`` seconds) and raises ``BackendUnavailable``
with the original reason meanwhile, which the engine routes around like any
other failing backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from services.common.backends.base import Backend, BackendInfo, Mode
from services.common.errors import BackendError, BackendUnavailable


class LazyBackend(Backend):
    """Opens ``opener()`` on first use after a failed start; see the module docstring."""

    def __init__(
        self, name: str, mode: Mode, opener: Callable[[], Awaitable[Backend]], error: BackendError, retry: float = 5.0
    ) -> None:
        self.name = name
        self.mode = mode
        self._opener = opener
        self._reason = error.reason
        self._retry = retry
        self._next_try = time.monotonic() + retry
        self._inner: Backend | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def _backend(self) -> Backend:
        if self._inner is not None:
            return self._inner
        async with self._lock:
            if self._inner is not None:
                return self._inner
            if self._closed:
                raise BackendUnavailable(self.name, "the backend is closed")
            if time.monotonic() < self._next_try:
                raise BackendUnavailable(self.name, f"unreachable since the gateway started: {self._reason}")
            try:
                self._inner = await self._opener()
            except BackendError as exc:
                self._reason = exc.reason
                self._next_try = time.monotonic() + self._retry
                raise
            return self._inner

    @property
    def identity(self) -> bytes:
        return b"" if self._inner is None else self._inner.identity

    @property
    def marker_key(self) -> bytes | None:
        return None if self._inner is None else self._inner.marker_key

    async def put(self, value: bytes) -> bytes:
        return await (await self._backend()).put(value)

    def batch_target(self) -> Backend:
        """The opened backend once there is one, so batched writes go its way (``put_each``)."""
        return self if self._inner is None else self._inner.batch_target()

    async def set(self, key: bytes, value: bytes) -> None:
        await (await self._backend()).set(key, value)

    async def get(self, key: bytes) -> bytes | None:
        return await (await self._backend()).get(key)

    async def exists(self, key: bytes) -> bool:
        return await (await self._backend()).exists(key)

    async def length(self, key: bytes) -> int | None:
        return await (await self._backend()).length(key)

    async def high_water(self) -> int:
        return await (await self._backend()).high_water()

    async def delete(self, key: bytes) -> None:
        await (await self._backend()).delete(key)

    async def scan(self, after: bytes | None = None) -> AsyncIterator[bytes]:
        async for key in (await self._backend()).scan(after):
            yield key

    async def info(self) -> BackendInfo:
        return await (await self._backend()).info()

    async def close(self) -> None:
        self._closed = True
        if self._inner is not None:
            await self._inner.close()
