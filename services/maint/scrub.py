"""The scrubber: walk every record, check it, repair what is damaged, report what cannot be saved.

A pass pages through the metadata in id order (ListRecords, ``PAGE`` records a
call), soft-checks every file (every shard present), or hard-checks it on the
slower cycle (every ``hard_every``-th pass: every shard fetched and verified,
decrypted, the content hash compared). Damage is repaired through
``checks.repair`` (rebuilt shards on backends holding no other shard of the
chunk, record swapped with compare-and-swap). A soft check finds shards that
are missing, of the wrong size, or on a backend wiped and set up again (its
identity changed), and tells them from shards on backends that do not answer
now; those wait for their backend (``rebuild_unreachable_after``), and a file
left under-replicated goes into the repair queue (services/maint/repairs.py),
retried as soon as a backend returns. A soft pass that found damage makes the
next scheduled pass hard: damage comes in groups (a failing disk), and only
checksums find a corrupt shard of the right size. A file that lost more than m
shards of a chunk, or whose content no longer hashes to its id, is
unrecoverable: it is logged, counted, listed in the progress and left in place,
never dropped.

``RateLimiter`` keeps a pass to a budget of files and shard bytes per second so
it never starves uploads and downloads; a pass over many files simply takes
longer. The schedule (``scrub_interval``) and the hard cycle survive restarts
in ``DATA/maint/scrub.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from services.common.config import MaintConfig
from services.common.engine import CheckReport, Engine, FileRecord
from services.common.errors import GridstorError
from services.common.metrics import Registry
from services.common.records import Entry, Records
from services.common.tls import write_file
from services.maint import checks

Repair = Callable[[Entry, CheckReport], Awaitable[checks.RepairResult]]

log = logging.getLogger(__name__)

PAGE = 256
MAX_LISTED = 1000  # unrecoverable ids kept in the progress (all are logged and counted)
RETRY_AFTER = 60.0  # seconds before a pass that could not list the metadata is tried again
FIRST_PASS_DELAY = 300.0  # seconds from the first start of a gateway to its first scheduled pass


class RateLimiter:
    """A budget of files and bytes per second; ``take`` sleeps until the work fits it (bursts up to 1 s)."""

    def __init__(
        self,
        files_per_second: float,
        bytes_per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        burst: float = 1.0,
    ) -> None:
        self.files_per_second = files_per_second
        self.bytes_per_second = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._burst = burst
        self._t = clock()

    def cost(self, files: int = 0, nbytes: int = 0) -> float:
        """Seconds of budget that work uses."""
        return files / self.files_per_second + nbytes / self.bytes_per_second

    async def take(self, files: int = 0, nbytes: int = 0) -> None:
        now = self._clock()
        self._t = max(self._t, now - self._burst) + self.cost(files, nbytes)
        delay = self._t - now
        if delay > 0:
            await self._sleep(delay)


def stored_bytes(record: FileRecord) -> int:
    """Shard bytes a hard check of ``record`` reads (ciphertext times (k+m)/k)."""
    cipher = sum(c.cipher_size for c in record.chunks)
    return cipher * (record.k + record.m) // max(1, record.k)


@dataclass
class Progress:
    """Counters of one scrub pass (the running one or the last)."""

    running: bool = False
    hard: bool = False
    dry_run: bool = False
    started: int = 0
    finished: int = 0
    cursor: int = 0
    files_checked: int = 0
    files_damaged: int = 0
    files_repaired: int = 0
    shards_repaired: int = 0
    files_unrecoverable: int = 0
    unrecoverable_ids: list[str] = field(default_factory=list)
    last_full_pass: int = 0
    last_hard_pass: int = 0
    files_pending: int = 0
    error: str = ""


@dataclass
class ScrubState:
    """What the schedule remembers across restarts."""

    last_started: float = 0.0
    last_full_pass: int = 0
    last_hard_pass: int = 0
    passes_since_hard: int = 0

    @classmethod
    def load(cls, path: Path | None) -> ScrubState:
        if path is None:
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: raw[k] for k in asdict(cls()) if k in raw})
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError) as exc:
            log.warning("scrub state %s is unreadable (%s); starting afresh", path, exc)
            return cls()

    def save(self, path: Path | None) -> None:
        if path is None:
            return
        write_file(path, (json.dumps(asdict(self)) + "\n").encode(), 0o644)


class ScrubMetrics:
    """What the scrubber reports to Prometheus."""

    def __init__(self, registry: Registry) -> None:
        self.checked = registry.counter("maint_scrub_files_checked_total", "Files checked by scrub passes")
        self.damaged = registry.counter("maint_scrub_files_damaged_total", "Files found with missing or corrupt shards")
        self.repaired = registry.counter("maint_scrub_files_repaired_total", "Files repaired back to k+m shards")
        self.shards = registry.counter("maint_scrub_shards_repaired_total", "Shards rebuilt by scrub passes")
        self.unrecoverable_found = registry.counter(
            "maint_scrub_unrecoverable_found_total", "Unrecoverable files found (once per pass that saw them)"
        )
        self.unrecoverable = registry.gauge(
            "maint_scrub_unrecoverable_files", "Unrecoverable files found by the last complete pass"
        )
        self.last_full_pass = registry.gauge(
            "maint_scrub_last_full_pass_timestamp_seconds", "Unix time the last complete scrub pass ended"
        )
        self.last_hard_pass = registry.gauge(
            "maint_scrub_last_hard_pass_timestamp_seconds", "Unix time the last complete hard scrub pass ended"
        )
        self.running = registry.gauge("maint_scrub_running", "1 while a scrub pass runs")


class Scrubber:
    """Runs scrub passes on demand (``start``) and on schedule (``run_schedule``); one at a time."""

    def __init__(
        self,
        engine: Engine,
        records: Records,
        cfg: MaintConfig,
        *,
        state_path: Path | None = None,
        metrics: ScrubMetrics | None = None,
        limiter: RateLimiter | None = None,
        page: int = PAGE,
        repair: Repair | None = None,
    ) -> None:
        self.engine = engine
        self.repair: Repair = repair or self._repair
        self.records = records
        self.cfg = cfg
        self.state_path = state_path
        self.state = ScrubState.load(state_path)
        self.metrics = metrics or ScrubMetrics(Registry())
        self.limiter = limiter or RateLimiter(cfg.scrub_files_per_second, cfg.scrub_bytes_per_second)
        self.page = page
        self.progress = Progress(last_full_pass=self.state.last_full_pass, last_hard_pass=self.state.last_hard_pass)
        self._task: asyncio.Task[Progress] | None = None
        self._retry_at = 0.0
        self.metrics.last_full_pass.set(self.state.last_full_pass)
        self.metrics.last_hard_pass.set(self.state.last_hard_pass)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> Progress:
        """A copy of the running pass's counters, or of the last pass's."""
        return replace(self.progress, unrecoverable_ids=list(self.progress.unrecoverable_ids))

    def start(self, *, hard: bool = False, dry_run: bool = False) -> bool:
        """Start a pass now; False (and nothing changes) when one is running already."""
        if self.running:
            return False
        self.progress = Progress(
            running=True,
            hard=hard,
            dry_run=dry_run,
            started=int(time.time()),
            last_full_pass=self.state.last_full_pass,
            last_hard_pass=self.state.last_hard_pass,
        )
        self.state.last_started = time.time()
        self._task = asyncio.create_task(self._pass(self.progress), name="scrub-pass")
        return True

    async def wait(self) -> Progress:
        """Wait for the running pass (if any) to end; its final counters."""
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.status()

    async def run_schedule(self) -> None:
        """Start passes every ``scrub_interval`` seconds (hard every ``hard_every``-th); returns only if disabled."""
        interval = self.cfg.scrub_interval
        if interval <= 0:
            return
        if not self.state.last_started:  # a new gateway: let the other services come up first
            self._retry_at = time.time() + min(interval, FIRST_PASS_DELAY)
        while True:
            due = max(self.state.last_started + interval, self._retry_at)
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(min(delay, 60.0))  # re-read: an on-demand pass moves the schedule
                continue
            hard = self.state.passes_since_hard + 1 >= self.cfg.hard_every
            if self.start(hard=hard):
                log.info("scheduled scrub pass starting", extra={"hard": hard})
            await self.wait()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- one pass -----------------------------------------------------------------

    async def _pass(self, p: Progress) -> Progress:
        self.metrics.running.set(1)
        after: int | None = None
        try:
            while True:
                page = [e async for e in self.records.list(after, self.page)]
                if not page:
                    break
                for entry in page:
                    await self._one(entry, p)
                    after = p.cursor = entry.meta_id
        except Exception as exc:  # meta unreachable, or a bug: the pass ends, the schedule tries again later
            p.error = f"the pass stopped after id {p.cursor:08x}: {exc}"
            if isinstance(exc, GridstorError):
                log.warning("scrub pass stopped: %s", exc)
            else:
                log.exception("scrub pass failed")
            self._retry_at = time.time() + RETRY_AFTER
        finally:
            self.metrics.running.set(0)
            p.running = False
            p.finished = int(time.time())
        if not p.error:
            p.last_full_pass = self.state.last_full_pass = p.finished
            self.metrics.last_full_pass.set(p.finished)
            self.metrics.unrecoverable.set(p.files_unrecoverable)
            if p.hard:
                p.last_hard_pass = self.state.last_hard_pass = p.finished
                self.metrics.last_hard_pass.set(p.finished)
                self.state.passes_since_hard = 0
            elif p.files_damaged:
                # Damage comes in groups (a failing disk): hard-check next, so corrupt shards of the right
                # size, which only checksums reveal, are found too.
                self.state.passes_since_hard = max(self.state.passes_since_hard + 1, self.cfg.hard_every - 1)
            else:
                self.state.passes_since_hard += 1
            try:
                await asyncio.to_thread(self.state.save, self.state_path)
            except OSError as exc:
                log.warning("cannot save the scrub state: %s", exc)
        log.info(
            "scrub pass ended",
            extra={
                "hard": p.hard,
                "checked": p.files_checked,
                "damaged": p.files_damaged,
                "repaired": p.files_repaired,
                "unrecoverable": p.files_unrecoverable,
            },
        )
        return p

    async def _one(self, entry: Entry, p: Progress) -> None:
        record = entry.record
        await self.limiter.take(files=1, nbytes=stored_bytes(record) if p.hard else 0)
        try:
            report = await (self.engine.hard_check(record) if p.hard else self.engine.soft_check(record))
        except GridstorError as exc:  # a record the engine refuses (unknown version ...)
            self._unrecoverable(p, entry.file_id, f"cannot be checked: {exc}")
            return
        p.files_checked += 1
        self.metrics.checked.inc()
        if report.ok:
            return
        p.files_damaged += 1
        self.metrics.damaged.inc()
        if report.unrecoverable or not report.damaged:
            # Below k good shards, or every shard fine but the content is wrong: nothing to rebuild from.
            reason = report.error or f"{len(report.unrecoverable)} chunk(s) below {report.k} good shards"
            self._unrecoverable(p, entry.file_id, reason)
            return
        if p.dry_run:
            return
        chunk_bytes = max((c.cipher_size for c in record.chunks), default=0)
        await self.limiter.take(nbytes=len(report.damaged) * chunk_bytes * (record.k + record.m) // max(1, record.k))
        try:
            result = await self.repair(entry, report)
        except GridstorError as exc:
            log.warning("repair of %s failed: %s", entry.file_id, exc)
            return
        except Exception:  # one file must not end the pass
            log.exception("repair of %s failed", entry.file_id)
            return
        if result.unrecoverable:
            self._unrecoverable(p, entry.file_id, result.error)
            return
        if result.shards_repaired:
            p.shards_repaired += result.shards_repaired
            self.metrics.shards.inc(result.shards_repaired)
        if result.ok and result.shards_repaired:
            p.files_repaired += 1
            self.metrics.repaired.inc()
        elif result.pending:  # waits for backends: the repair queue has it
            p.files_pending += 1
        elif not result.ok:
            log.warning("repair of %s did not finish: %s", entry.file_id, result.error)

    async def _repair(self, entry: Entry, report: CheckReport) -> checks.RepairResult:
        return await checks.repair(
            self.engine,
            self.records,
            entry.file_id,
            entry=entry,
            report=report,
            rebuild_after=self.cfg.rebuild_unreachable_after,
        )

    def _unrecoverable(self, p: Progress, file_id: str, reason: str) -> None:
        p.files_unrecoverable += 1
        self.metrics.unrecoverable_found.inc()
        if len(p.unrecoverable_ids) < MAX_LISTED:
            p.unrecoverable_ids.append(file_id)
        log.error("file is unrecoverable (kept, not dropped): %s", file_id, extra={"reason": reason})
