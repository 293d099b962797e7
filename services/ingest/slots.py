"""Worker slots: a stable consumer name per slot, one process per slot, one job working at a time.

* ``consumer_name(slot, spool_dir)`` is ``<host>-<tag>-ingest-<slot>``: the same for every
  process the pool starts in that slot (``tag`` is a short hash of the spool folder, so two
  gateways on one host sharing a Redis keep apart). A worker restarted in its slot reads
  its predecessor's pending entries first (XREADGROUP from id 0) and carries them on at
  once, instead of waiting for XAUTOCLAIM's idle time.
* ``SlotLock`` (an flock on ``DATA/ingest/worker-<slot>.lock``, dropped by the kernel when
  the process dies) makes sure the new process starts reading only once its predecessor
  is gone: two live processes under one consumer name would both work its entries.
* ``Lane``: a worker holds several jobs but works on one at a time. A streamed job whose
  upload has not arrived yet steps aside (``Ticket.step_aside``), so the worker takes the
  next queued job meanwhile; a slow or stalled upload never holds up the queue behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_POLL = 0.1  # seconds between tries for a slot lock held by the previous process


def slot_tag(spool_dir: Path) -> str:
    """A short, stable tag of a gateway's spool folder."""
    return hashlib.sha256(str(spool_dir.absolute()).encode()).hexdigest()[:6]


def consumer_name(slot: int, spool_dir: Path) -> str:
    """The consumer name of worker slot ``slot`` of the gateway spooling into ``spool_dir`` on this host."""
    return f"{socket.gethostname()}-{slot_tag(spool_dir)}-ingest-{slot}"


class SlotLock:
    """The flock that makes one process at a time the worker of a slot."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until the slot is ours (True) or ``stop`` is set (False)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                if waited:
                    log.info("the previous worker of this slot is gone; taking over its jobs")
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
            if not waited:
                log.info("waiting for the previous worker of this slot to stop", extra={"lock": str(self.path)})
                waited = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOCK_POLL)
            if stop.is_set():
                os.close(fd)
                return False

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Lane:
    """One worker's single working lane; see the module docstring."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting = 0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def take(self) -> Ticket:
        """Wait for the lane and hold it: the job's ticket."""
        ticket = Ticket(self)
        ticket.held = False
        await ticket.resume()
        return ticket

    async def _acquire(self) -> None:
        self._waiting += 1
        try:
            while self._busy:
                await self._changed.wait()
        except BaseException:  # cancelled while waiting: one waiter less (``idle`` may be waiting for that)
            self._waiting -= 1
            self._notify()
            raise
        self._waiting -= 1
        self._busy = True

    def _release(self) -> None:
        self._busy = False
        self._notify()

    async def idle(self, stop: asyncio.Event) -> bool:
        """Wait until nobody holds or waits for the lane (True), or for ``stop`` (False)."""
        while self._busy or self._waiting:
            changed = asyncio.ensure_future(self._changed.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({changed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stopping.cancel()
            if stop.is_set():
                return False
        return not stop.is_set()


class Ticket:
    """A job's hold on the lane: given up while its upload is awaited, taken back when bytes arrive."""

    def __init__(self, lane: Lane) -> None:
        self._lane = lane
        self.held = True

    def step_aside(self) -> None:
        """Let the worker take another job while this one waits for its upload."""
        if self.held:
            self.held = False
            self._lane._release()

    async def resume(self) -> None:
        """Take the lane back (waiting for the job that has it meanwhile)."""
        if not self.held:
            await self._lane._acquire()
            self.held = True

    def done(self) -> None:
        """The job has ended: free the lane if it holds it."""
        self.step_aside()
