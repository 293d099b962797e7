"""Check one file and repair it: the engine finds and rebuilds shards, meta swaps the record atomically.

A repair writes the rebuilt shards first (onto healthy backends holding no
other shard of that chunk; the engine picks them), then asks meta to replace
the record only if it still equals the one the repair started from. When
another repair won that race, the shards just written are removed and the
whole thing runs again on the fresh record.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from services.common.engine import CheckReport, Engine, FileRecord
from services.common.errors import BackendError, Conflict, StoreFailed, Unrecoverable
from services.common.records import Entry, Records

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class ChunkFix:
    """The shards one repair rewrote in one chunk and the backends they went to."""

    index: int
    shards: list[int]
    backends: list[str]


@dataclass
class RepairResult:
    """What a repair of one file did."""

    file_id: str
    ok: bool = False  # every chunk has k+m healthy shards now
    damaged: bool = False  # the check found anything wrong
    shards_repaired: int = 0
    fixes: list[ChunkFix] = field(default_factory=list)
    unrecoverable: list[int] = field(default_factory=list)  # chunk indexes below k good shards
    error: str = ""
    report: CheckReport | None = None


async def check(engine: Engine, records: Records, file_id: str, *, hard: bool) -> tuple[Entry, CheckReport]:
    """Look the file up and check it (soft: every shard present; hard: fetch, verify, decrypt, hash)."""
    entry = await records.get(file_id)
    report = await (engine.hard_check(entry.record) if hard else engine.soft_check(entry.record))
    return entry, report


def fixes(old: FileRecord, new: FileRecord) -> list[ChunkFix]:
    """Per chunk, the shards whose location differs between ``old`` and ``new``."""
    out: list[ChunkFix] = []
    for ci, (a, b) in enumerate(zip(old.chunks, new.chunks, strict=True)):
        moved = [
            si
            for si, (sa, sb) in enumerate(zip(a.shards, b.shards, strict=True))
            if old.backends[sa.backend] != new.backends[sb.backend] or sa.key != sb.key
        ]
        if moved:
            out.append(ChunkFix(ci, moved, [new.backends[b.shards[si].backend] for si in moved]))
    return out


async def _drop_new_shards(engine: Engine, old: FileRecord, new: FileRecord) -> None:
    """Delete the shards a lost compare-and-swap left behind (those in ``new`` only)."""
    for fix in fixes(old, new):
        for si in fix.shards:
            ref = new.chunks[fix.index].shards[si]
            backend = engine.pool.get(new.backends[ref.backend])
            if backend is not None:
                with contextlib.suppress(BackendError):
                    await backend.delete(ref.key)


async def repair(
    engine: Engine,
    records: Records,
    file_id: str,
    *,
    hard: bool = False,
    entry: Entry | None = None,
    report: CheckReport | None = None,
    dry_run: bool = False,
) -> RepairResult:
    """Find damage (``report`` or a new check) and rebuild it; the record is replaced with compare-and-swap.

    ``entry``/``report`` let the scrubber reuse the check it just made; after a
    lost compare-and-swap both are read again. Nothing is ever dropped: a file
    with a chunk below k good shards is left as it is and reported.
    """
    result = RepairResult(file_id)
    for _ in range(CAS_ATTEMPTS):
        if entry is None or report is None:
            entry, report = await check(engine, records, file_id, hard=hard)
        result.file_id = entry.file_id
        result.report = report
        result.damaged = bool(report.damaged) or not report.ok
        result.unrecoverable = [h.index for h in report.unrecoverable]
        if result.unrecoverable:
            result.error = f"{len(result.unrecoverable)} chunk(s) have fewer than {report.k} good shards"
            return result
        if not report.damaged:
            result.ok = report.ok
            result.error = report.error
            return result
        if dry_run:
            return result
        try:
            new, rewritten = await engine.repair(entry.record, report)
        except Unrecoverable as exc:  # shards vanished or were found corrupt during the repair: look closer
            result.error = str(exc)
            entry = report = None
            hard = True
            continue
        except StoreFailed as exc:
            result.error = str(exc)
            return result
        try:
            await records.update(entry.file_id, new, entry.record)
        except Conflict:
            log.info("record of %s changed during its repair; trying again", entry.file_id)
            await _drop_new_shards(engine, entry.record, new)
            entry = report = None
            continue
        except BaseException:
            # The record was not replaced (meta unreachable ...): the new shards are orphans.
            await _drop_new_shards(engine, entry.record, new)
            raise
        result.shards_repaired += rewritten
        result.fixes = fixes(entry.record, new)
        result.ok = True
        result.error = ""
        log.info(
            "repaired %s: %d shards rebuilt",
            entry.file_id,
            rewritten,
            extra={"chunks": [f.index for f in result.fixes]},
        )
        return result
    result.error = result.error or f"the record kept changing during {CAS_ATTEMPTS} repair attempts"
    return result
