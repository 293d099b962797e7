"""Compaction of the dir:// backends: on a schedule and when an operator asks (``gridstor admin compact``).

Deleted shards (failed or duplicate store attempts, shards replaced by a repair)
and overwritten records leave dead bytes in a dir backend's segment files until
it is compacted. maint compacts every ``dir://`` shard backend, and on a master
the metadata namespaces when they are ``dir://`` too, one backend after the
other, segment by segment (services/common/backends/dirstore/compact.py: little
free space needed, writers pause for one segment at a time). A scheduled pass
(every ``maint.compact_interval`` seconds) rewrites segments at least
``maint.compact_min_dead`` dead; a pass asked for rewrites every segment with a
dead byte. zdb:// backends are 0-db's to compact.

Metrics: ``maint_compact_freed_bytes_total``, ``maint_compact_segments_total``,
``maint_compact_passes_total``, ``maint_dead_bytes`` (per backend, after the last
pass) and ``maint_compact_last_timestamp_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from services.common import errors
from services.common.backends import Mode
from services.common.backends.dirstore import CompactResult, DirBackend
from services.common.backends.uri import DirURI, parse_uri
from services.common.config import Config
from services.common.metrics import Registry

log = logging.getLogger(__name__)


@dataclass
class Compacted:
    """One backend's outcome in a pass."""

    name: str
    result: CompactResult = field(default_factory=CompactResult)
    dead_bytes: int = 0
    error: str = ""


@dataclass
class Pass:
    """A compaction pass: when, and what it did so far."""

    started: float = 0.0
    finished: float = 0.0
    backends: list[Compacted] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return bool(self.started) and not self.finished

    @property
    def freed(self) -> int:
        return sum(b.result.freed for b in self.backends)

    @property
    def segments(self) -> int:
        return sum(b.result.segments for b in self.backends)

    @property
    def skipped(self) -> int:
        return sum(b.result.skipped for b in self.backends)


def dir_backends(cfg: Config) -> list[tuple[str, DirURI, Mode]]:
    """The dir:// namespaces this gateway writes: shard backends, and (master) the metadata namespaces."""
    out: list[tuple[str, DirURI, Mode]] = []
    for spec in cfg.backends:
        uri = parse_uri(spec.uri)
        if isinstance(uri, DirURI):
            out.append((spec.name, uri, Mode.SEQ))
    if cfg.role == "master":
        for what, raw, mode in (
            ("metadata records", cfg.metadata.uri, Mode.SEQ),
            ("metadata index", cfg.metadata.index_uri, Mode.USER),
        ):
            uri = parse_uri(raw)
            if isinstance(uri, DirURI):
                out.append((what, uri, mode))
    return out


class Compactor:
    """Runs compaction passes, one at a time; see the module docstring."""

    def __init__(self, cfg: Config, registry: Registry) -> None:
        self.cfg = cfg
        self.last = Pass()
        self._task: asyncio.Task[None] | None = None
        self.freed = registry.counter("maint_compact_freed_bytes_total", "Disk bytes compaction gave back")
        self.moved = registry.counter("maint_compact_moved_bytes_total", "Live bytes compaction copied")
        self.removed = registry.counter("maint_compact_segments_total", "Segment files compaction removed")
        self.passes = registry.counter("maint_compact_passes_total", "Compaction passes, by how they ended")
        self.dead = registry.gauge("maint_dead_bytes", "Dead bytes in a dir:// backend after the last pass")
        self.when = registry.gauge("maint_compact_last_timestamp_seconds", "Unix time the last pass ended")

    def start(self, min_dead: float) -> bool:
        """Start a pass now unless one runs (False: it keeps going)."""
        if self._task is not None and not self._task.done():
            return False
        self.last = Pass(started=time.time())
        self._task = asyncio.create_task(self._run(self.last, min_dead), name="compaction")
        return True

    async def wait(self) -> None:
        """Until the running pass (if any) has ended."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self, run: Pass, min_dead: float) -> None:
        try:
            for name, uri, mode in dir_backends(self.cfg):
                run.backends.append(await self._one(name, uri, mode, min_dead))
        finally:
            run.finished = time.time()
            self.when.set(run.finished)
            self.passes.inc(result="error" if any(b.error for b in run.backends) else "ok")
        log.info(
            "compaction pass done: %d bytes freed, %d segments removed, %d skipped for lack of space",
            run.freed,
            run.segments,
            run.skipped,
            extra={"backends": len(run.backends), "seconds": round(run.finished - run.started, 1)},
        )

    async def _one(self, name: str, uri: DirURI, mode: Mode, min_dead: float) -> Compacted:
        out = Compacted(name)
        try:
            backend = await DirBackend.open(uri, mode, create=False)
        except errors.BackendError as exc:
            out.error = exc.reason
            log.warning("compaction: %s not compacted: %s", name, exc)
            return out
        try:
            out.result = await backend.compact(min_dead)
            out.dead_bytes = (await backend.usage()).dead_bytes
        except errors.BackendError as exc:
            out.error = exc.reason
            log.warning("compaction: %s: %s", name, exc)
        finally:
            await backend.close()
        self.freed.inc(max(0, out.result.freed))
        self.moved.inc(out.result.moved_bytes)
        self.removed.inc(out.result.segments)
        self.dead.set(out.dead_bytes, backend=name)
        return out

    async def schedule(self) -> None:
        """A pass every ``maint.compact_interval`` seconds (the first one interval after the start)."""
        interval = self.cfg.maint.compact_interval
        while True:
            await asyncio.sleep(interval)
            if self.start(self.cfg.maint.compact_min_dead):
                await self.wait()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
