"""Per-process caps on concurrent streams, so a process's memory is bounded by its caps, not by its callers.

A ``Gate`` lets ``limit`` streams (downloads in a meta process, uploads in an ingest
process) run at once. A stream past that waits for a slot (backpressure: an upload
waiting is not read, so HTTP/2 flow control holds its client back) for up to ``wait``
seconds, then gets ``errors.Busy`` (RESOURCE_EXHAUSTED with a retry-after; the CLI
says "gateway busy"). ``limit`` 0 means no cap.

``read_ahead`` shares a meta process's read-ahead budget among its running downloads:
each gets at least the chunk it is sending and the one being fetched, more only while
few run. When a gate empties, the memory its streams used is handed back to the
system (``tuning.release_memory``): glibc keeps freed heap otherwise.

This module imports no grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

from services.common import errors, tuning

log = logging.getLogger(__name__)

RELEASE_AFTER = 1.0  # seconds a gate must stay empty before its memory is released


class Gate:
    """At most ``limit`` holders at once in this process; see the module docstring."""

    def __init__(self, what: str, limit: int, wait: float) -> None:
        self.what = what  # e.g. "downloads of this meta process"
        self.limit = limit
        self.wait = wait
        self.active = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(limit) if limit > 0 else None
        self._release: asyncio.TimerHandle | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; Busy when none frees up within ``wait`` seconds."""
        if self._free is not None:
            self.waiting += 1
            try:
                async with asyncio.timeout(self.wait):
                    await self._free.acquire()
            except TimeoutError:
                raise errors.Busy(
                    f"the gateway is at its limit of {self.limit} concurrent {self.what}, and no slot freed up"
                    f" within {self.wait:g} s; try again shortly",
                    retry_after=max(1, math.ceil(self.wait / 10)),
                ) from None
            finally:
                self.waiting -= 1
        self.active += 1
        if self._release is not None:
            self._release.cancel()
            self._release = None
        try:
            yield
        finally:
            self.active -= 1
            if self._free is not None:
                self._free.release()
            if self.active == 0:
                self._release = asyncio.get_running_loop().call_later(RELEASE_AFTER, self._release_memory)

    def _release_memory(self) -> None:
        self._release = None
        if self.active == 0:
            freed = tuning.release_memory()
            log.debug("%s: idle; released memory to the system", self.what, extra={"trimmed": freed})


def read_ahead(budget: int, chunk_size: int, running: int, most: int) -> int:
    """Chunks one of ``running`` downloads may fetch ahead: its share of ``budget`` bytes, 1 to ``most``."""
    share = budget // max(1, running) // max(1, chunk_size)
    return max(1, min(most, share))
