"""Orphan collection: delete shards that no record references and no running job owns.

Shards become orphans when an upload dies between writing shards and storing
its record (a killed worker or ingest process: 60-160 shards per incident at
4 MiB chunks), when a repair loses its compare-and-swap and cannot delete what
it wrote, or when a delete fails. Nothing else ever removes them.

Keys of a sequential backend grow: every key handed out after a moment is at
least the backend's high water mark then (``Backend.high_water``). A
collection on a backend that answers:

1. notes every backend's high water mark with its identity, then reads the
   Redis clock and the live job leases (services/common/leases.py; no Redis,
   no collection: running jobs cannot be seen);
2. waits for maint's own repairs and backups that began before (``InFlight``);
3. takes, per backend, the newest high water mark noted at or before both
   ``now - orphan_grace`` and the oldest live lease's start, for the backend's
   current identity: the *bound*. Every key at or above it may belong to a job
   in flight (or be younger than the grace) and is left alone (``too_new``);
4. lists every record and marks the keys they reference below the bound (a
   bitmap per backend: memory is the bound / 8 bytes). A record noting another
   identity for the backend references the old data set, not this one; an old
   record without identities references whatever holds the key (kept);
5. scans each backend's keys below the bound, skipping its identity marker, and
   deletes the unreferenced ones (``delete_if_same``: not if the backend was
   wiped meanwhile).

A job that started after step 1 writes keys above the marks of step 1; one
that was running holds a lease taken after the mark used as its bound; one
that ended before step 1 stored its record before the listing of step 4. The
marks live in ``DATA/maint/watermarks.json``; one is noted every
``MARK_EVERY`` seconds too, so a long job does not hold every newer orphan.

Refusals: no record listed at all (a metadata store that lost its records
would make every shard look orphaned), Redis unreachable, a backend that does
not answer (skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.common.backends.base import SEQ_KEY_SIZE, seq_id
from services.common.config import MaintConfig
from services.common.engine import Engine, backend_identity, delete_if_same
from services.common.errors import BackendError, GridstorError
from services.common.leases import LeaseInfo
from services.common.metrics import Registry
from services.common.records import Records
from services.common.tls import write_file

log = logging.getLogger(__name__)

MARK_EVERY = 600.0  # seconds between high water marks noted between collections
KEEP_MARKS = 2 * 86400.0  # marks older than this are dropped (the newest older one is kept)
FIRST_RUN_DELAY = 600.0  # a new gateway's first scheduled collection
DELETES_IN_FLIGHT = 16
DELETE_BATCH = 256  # orphans found before their deletes run (bounds memory)
PROBE_TIMEOUT = 10.0

LeaseView = Callable[[], Awaitable[tuple[float, list[LeaseInfo]]]]


@dataclass
class BackendTally:
    """What one collection found on one backend."""

    name: str
    scanned: int = 0
    orphans: int = 0
    deleted: int = 0
    too_new: int = 0
    skipped: str = ""


@dataclass
class OrphanProgress:
    """Counters of one collection (the running one or the last)."""

    running: bool = False
    dry_run: bool = False
    started: int = 0
    finished: int = 0
    records: int = 0
    backends: list[BackendTally] = field(default_factory=list)
    error: str = ""

    @property
    def scanned(self) -> int:
        return sum(b.scanned for b in self.backends)

    @property
    def orphans(self) -> int:
        return sum(b.orphans for b in self.backends)

    @property
    def deleted(self) -> int:
        return sum(b.deleted for b in self.backends)

    @property
    def too_new(self) -> int:
        return sum(b.too_new for b in self.backends)


class InFlight:
    """maint's own shard writes in flight (repairs, backups): a collection waits for those begun before it."""

    def __init__(self) -> None:
        self._seq = 0
        self._running: set[int] = set()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self._seq += 1
        ticket = self._seq
        self._running.add(ticket)
        try:
            yield
        finally:
            self._running.discard(ticket)
            async with self._changed:
                self._changed.notify_all()

    async def drain(self) -> None:
        """Wait until every write begun before this call has ended."""
        upto = self._seq
        async with self._changed:
            await self._changed.wait_for(lambda: not any(t <= upto for t in self._running))


class Watermarks:
    """High water marks noted per backend: ``name -> [[time, identity hex, mark], ...]``, oldest first."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.marks: dict[str, list[tuple[float, str, int]]] = {}
        if path is not None:
            try:
                raw = json.loads(path.read_text())
                self.marks = {str(n): [(float(t), str(i), int(h)) for t, i, h in v] for n, v in raw.items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError) as exc:
                log.warning("high water marks %s are unreadable (%s); starting afresh", path, exc)

    def note(self, name: str, when: float, identity: bytes, mark: int) -> None:
        entries = self.marks.setdefault(name, [])
        entries.append((when, identity.hex(), mark))
        old = [e for e in entries if e[0] < when - KEEP_MARKS]
        if len(old) > 1:  # keep the newest of the old ones: a long-running lease may still need it
            self.marks[name] = entries[len(old) - 1 :]

    def floor(self, name: str, identity: bytes, limit: float) -> int | None:
        """The newest mark noted at or before ``limit`` for this identity of the backend; None when there is none."""
        best: tuple[float, int] | None = None
        for when, ident, mark in self.marks.get(name, []):
            if when <= limit and ident == identity.hex() and (best is None or when >= best[0]):
                best = (when, mark)
        return None if best is None else best[1]

    def save(self) -> None:
        if self.path is None:
            return
        marks = {n: [list(e) for e in v] for n, v in self.marks.items()}
        write_file(self.path, (json.dumps(marks) + "\n").encode(), 0o644)


class OrphanMetrics:
    """What orphan collection reports to Prometheus."""

    def __init__(self, registry: Registry) -> None:
        self.found = registry.counter("maint_orphans_found_total", "Orphan shards found by collections")
        self.deleted = registry.counter("maint_orphans_deleted_total", "Orphan shards deleted")
        self.last_run = registry.gauge(
            "maint_orphans_last_run_timestamp_seconds", "Unix time the last complete orphan collection ended"
        )
        self.running = registry.gauge("maint_orphans_running", "1 while an orphan collection runs")


class OrphanCollector:
    """Runs collections on demand (``start``) and on schedule (``run_schedule``); one at a time."""

    def __init__(
        self,
        engine: Engine,
        records: Records,
        leases: LeaseView,
        inflight: InFlight,
        cfg: MaintConfig,
        *,
        marks_path: Path | None = None,
        metrics: OrphanMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.records = records
        self.leases = leases
        self.inflight = inflight
        self.cfg = cfg
        self.watermarks = Watermarks(marks_path)
        self.metrics = metrics or OrphanMetrics(Registry())
        self.progress = OrphanProgress()
        self._task: asyncio.Task[OrphanProgress] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> OrphanProgress:
        return replace(self.progress, backends=[replace(b) for b in self.progress.backends])

    def start(self, *, dry_run: bool = False) -> bool:
        """Start a collection now; False (nothing changes) when one is running."""
        if self.running:
            return False
        self.progress = OrphanProgress(running=True, dry_run=dry_run, started=int(time.time()))
        self._task = asyncio.create_task(self._run(self.progress), name="orphan-collection")
        return True

    async def wait(self) -> OrphanProgress:
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.status()

    async def run_schedule(self) -> None:
        """Note high water marks every MARK_EVERY seconds; collect every ``orphan_interval`` (0: marks only)."""
        interval = self.cfg.orphan_interval
        next_run = time.monotonic() + (min(interval, FIRST_RUN_DELAY) if interval > 0 else float("inf"))
        while True:
            if time.monotonic() >= next_run and self.start():
                log.info("scheduled orphan collection starting")
                await self.wait()
                next_run = time.monotonic() + interval
            elif not self.running:
                with contextlib.suppress(GridstorError, OSError):
                    await self.note_marks()
            await asyncio.sleep(min(MARK_EVERY, max(1.0, next_run - time.monotonic())))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- one collection ------------------------------------------------------------

    async def note_marks(self, tallies: dict[str, BackendTally] | None = None) -> tuple[float, list[LeaseInfo]]:
        """Note every answering backend's high water mark, then read the clock and the live leases."""
        pool = self.engine.pool
        measured: dict[str, tuple[bytes, int]] = {}

        async def one(name: str) -> None:
            backend = pool.backends[name]
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    mark = await backend.high_water()
            except (BackendError, TimeoutError) as exc:
                pool.failed(name, exc)
                if tallies is not None:
                    tallies[name].skipped = f"does not answer: {exc}"
                return
            measured[name] = (backend.identity, mark)

        await asyncio.gather(*(one(n) for n in pool.names if pool.usable(n)))
        now, live = await self.leases()  # the clock is read after the marks: each mark is at most as old as `now`
        for name, (identity, mark) in measured.items():
            self.watermarks.note(name, now, identity, mark)
        await asyncio.to_thread(self.watermarks.save)
        return now, live

    async def _run(self, p: OrphanProgress) -> OrphanProgress:
        self.metrics.running.set(1)
        pool = self.engine.pool
        tallies = {name: BackendTally(name) for name in pool.names}
        p.backends = list(tallies.values())
        try:
            for name in pool.names:
                if not pool.usable(name):
                    tallies[name].skipped = f"unreachable ({pool.breaker(name).reason or 'circuit breaker open'})"
            try:
                now, live = await self.note_marks(tallies)
            except GridstorError as exc:
                raise GridstorError(f"running jobs cannot be seen, so nothing is collected: {exc}") from None
            await self.inflight.drain()
            limit = min([now - self.cfg.orphan_grace] + [lease.since for lease in live])
            bounds: dict[str, tuple[bytes, int]] = {}
            for name, tally in tallies.items():
                if tally.skipped:
                    continue
                identity = pool.backends[name].identity
                bound = self.watermarks.floor(name, identity, limit)
                if bound is None:
                    oldest = min(live, key=lambda lease: lease.since) if live else None
                    tally.skipped = f"no high water mark old enough yet (orphan_grace {self.cfg.orphan_grace:g} s" + (
                        f"; job {oldest.name} running since {_when(oldest.since)})" if oldest else ")"
                    )
                    continue
                bounds[name] = (identity, bound)
            referenced = await self._references(p, bounds)
            if p.records == 0:
                raise GridstorError(
                    "the metadata lists no record: refusing to delete anything (a metadata store that lost its"
                    " records would make every shard look orphaned)"
                )
            for name, (identity, bound) in bounds.items():
                await self._sweep(name, identity, bound, referenced[name], tallies[name], p.dry_run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            p.error = str(exc) if isinstance(exc, GridstorError) else f"internal error ({type(exc).__name__})"
            if isinstance(exc, GridstorError):
                log.warning("orphan collection stopped: %s", exc)
            else:
                log.exception("orphan collection failed")
        finally:
            self.metrics.running.set(0)
            p.running = False
            p.finished = int(time.time())
        if not p.error:
            self.metrics.last_run.set(p.finished)
        log.info(
            "orphan collection ended",
            extra={"dry_run": p.dry_run, "records": p.records, "orphans": p.orphans, "deleted": p.deleted},
        )
        return p

    async def _references(self, p: OrphanProgress, bounds: dict[str, tuple[bytes, int]]) -> dict[str, bytearray]:
        """A bitmap per bounded backend of the keys below its bound that some record references."""
        maps = {name: bytearray((bound + 7) // 8) for name, (_, bound) in bounds.items()}
        async for entry in self.records.list():
            p.records += 1
            record = entry.record
            # Per backend slot of the record: the bitmap its shards mark and the bound, or None.
            targets: list[tuple[bytearray, int] | None] = []
            for index, name in enumerate(record.backends):
                target = None
                if name in bounds:
                    identity, bound = bounds[name]
                    noted = backend_identity(record, index)
                    # Not the old data set of a wiped backend: its keys are not these.
                    if not (noted and identity and noted != identity):
                        target = (maps[name], bound)
                targets.append(target)
            for chunk in record.chunks:
                for ref in chunk.shards:
                    target = targets[ref.backend] if ref.backend < len(targets) else None
                    if target is None or ref.unwritten or len(ref.key) != SEQ_KEY_SIZE:
                        continue
                    bits, bound = target
                    kid = seq_id(bytes(ref.key))
                    if kid < bound:
                        bits[kid >> 3] |= 1 << (kid & 7)
        return maps

    async def _sweep(
        self, name: str, identity: bytes, bound: int, bits: bytearray, tally: BackendTally, dry_run: bool
    ) -> None:
        backend = self.engine.pool.backends[name]
        marker = backend.marker_key
        timeout = self.engine.config.shard_timeout
        sem = asyncio.Semaphore(DELETES_IN_FLIGHT)

        async def delete(key: bytes) -> None:
            async with sem:
                try:
                    if await delete_if_same(backend, key, identity, timeout):
                        tally.deleted += 1
                        self.metrics.deleted.inc()
                except (BackendError, TimeoutError) as exc:
                    log.warning("orphan %s on %s not deleted: %s", key.hex(), name, exc)

        batch: list[bytes] = []
        try:
            async for key in backend.scan():
                if len(key) != SEQ_KEY_SIZE or key == marker:
                    continue
                kid = seq_id(key)
                if kid >= bound:
                    tally.too_new += 1
                    continue
                tally.scanned += 1
                if bits[kid >> 3] & (1 << (kid & 7)):
                    continue
                tally.orphans += 1
                self.metrics.found.inc()
                if not dry_run:
                    batch.append(key)
                    if len(batch) >= DELETE_BATCH:
                        await asyncio.gather(*(delete(k) for k in batch))
                        batch.clear()
            await asyncio.gather(*(delete(k) for k in batch))
        except (BackendError, TimeoutError) as exc:
            tally.skipped = f"scan stopped: {exc}"
        if backend.identity != identity:
            tally.skipped = tally.skipped or "the backend was replaced during the collection"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
