"""Check one file and repair it: the engine finds and rebuilds shards, meta swaps the record atomically.

A repair writes the rebuilt shards first (onto healthy backends holding no
other shard of that chunk; the engine picks them), then asks meta to replace
the record only if it still equals the one the repair started from. When
another repair won that race, the shards just written are removed and the
whole thing runs again on the fresh record.

Lost shards (missing, corrupt, unwritten) are rebuilt; shards on a backend that
does not answer are left alone (it may come back with them) until it has been
down for ``rebuild_after`` seconds, then they are rebuilt elsewhere too. A
rebuilt shard no backend can take now (exactly k+m backends, one of them down)
is marked unwritten: the file stays under-replicated (``pending``) and the repair
queue tries again when backends return.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.common.engine import CheckReport, Engine, FileRecord, unwritten_shards
from services.common.errors import Conflict, StoreFailed, Unrecoverable
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
    pending: int = 0  # shards still absent afterwards: unwritten (no backend took them) or on unreachable backends
    error: str = ""
    report: CheckReport | None = None


async def check(engine: Engine, records: Records, file_id: str, *, hard: bool) -> tuple[Entry, CheckReport]:
    """Look the file up and check it (soft: every shard present; hard: fetch, verify, decrypt, hash)."""
    entry = await records.get(file_id)
    report = await (engine.hard_check(entry.record) if hard else engine.soft_check(entry.record))
    return entry, report


def fixes(old: FileRecord, new: FileRecord) -> list[ChunkFix]:
    """Per chunk, the shards ``new`` has written somewhere else than ``old`` (the rebuilt ones)."""
    out: list[ChunkFix] = []
    for ci, (a, b) in enumerate(zip(old.chunks, new.chunks, strict=True)):
        moved = [
            si
            for si, (sa, sb) in enumerate(zip(a.shards, b.shards, strict=True))
            if not sb.unwritten
            and (sa.unwritten or old.backends[sa.backend] != new.backends[sb.backend] or sa.key != sb.key)
        ]
        if moved:
            out.append(ChunkFix(ci, moved, [new.backends[b.shards[si].backend] for si in moved]))
    return out


def pending(old: FileRecord, new: FileRecord, report: CheckReport) -> int:
    """Shards absent after a repair of ``old`` into ``new``: unwritten, or still on an unreachable backend."""
    unwritten = unwritten_shards(new)
    away = 0
    for h in report.chunks:
        a, b = old.chunks[h.index].shards, new.chunks[h.index].shards
        away += sum(1 for si in h.unreachable if not b[si].unwritten and a[si] == b[si])
    return unwritten + away


async def _drop_new_shards(engine: Engine, old: FileRecord, new: FileRecord) -> None:
    """Delete the shards a lost compare-and-swap left behind (those in ``new`` only)."""
    for fix in fixes(old, new):
        for si in fix.shards:
            await engine.delete_ref(new, new.chunks[fix.index].shards[si])


def written_off(engine: Engine, report: CheckReport, rebuild_after: float | None) -> frozenset[str]:
    """The unreachable backends down for ``rebuild_after`` seconds or more: their shards count as lost."""
    if rebuild_after is None:
        return frozenset()
    return frozenset(n for n in report.unreachable_backends if engine.pool.down_for(n) >= rebuild_after)


async def repair(
    engine: Engine,
    records: Records,
    file_id: str,
    *,
    hard: bool = False,
    entry: Entry | None = None,
    report: CheckReport | None = None,
    dry_run: bool = False,
    rebuild_after: float | None = None,
) -> RepairResult:
    """Find damage (``report`` or a new check) and rebuild it; the record is replaced with compare-and-swap.

    ``entry``/``report`` let the scrubber reuse the check it just made; after a
    lost compare-and-swap both are read again. Nothing is ever dropped: a file
    with a chunk that lost more than m shards is left as it is and reported.
    ``rebuild_after``: seconds after which an unreachable backend's shards are
    rebuilt elsewhere (None: never).
    """
    result = RepairResult(file_id)
    for _ in range(CAS_ATTEMPTS):
        if entry is None or report is None:
            entry, report = await check(engine, records, file_id, hard=hard)
        result.file_id = entry.file_id
        result.report = report
        result.damaged = bool(report.damaged) or not report.ok
        gone = written_off(engine, report, rebuild_after)
        result.unrecoverable = [h.index for h in report.unrecoverable]
        if result.unrecoverable:
            n = len(result.unrecoverable)
            result.error = f"{n} chunk(s) have fewer than {report.k} good shards (lost more than {report.m})"
            return result
        if not report.damaged:
            result.ok = report.ok
            result.error = report.error
            return result
        result.pending = pending(entry.record, entry.record, report)
        if dry_run:
            return result
        try:
            new, rewritten = await engine.repair(entry.record, report, rebuild_unreachable=gone)
        except Unrecoverable as exc:  # shards vanished or were found corrupt during the repair: look closer
            result.error = str(exc)
            entry = report = None
            hard = True
            continue
        except StoreFailed as exc:
            result.error = str(exc)
            return result
        result.pending = pending(entry.record, new, report)
        if new == entry.record:  # nothing could be placed or marked: the backends it needs are away
            result.error = f"{result.pending} shard(s) wait for backends to answer or take writes"
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
        result.ok = result.pending == 0
        result.error = "" if result.ok else f"{result.pending} shard(s) wait for backends to answer or take writes"
        log.info(
            "repaired %s: %d shards rebuilt, %d pending",
            entry.file_id,
            rewritten,
            result.pending,
            extra={"chunks": [f.index for f in result.fixes]},
        )
        return result
    result.error = result.error or f"the record kept changing during {CAS_ATTEMPTS} repair attempts"
    return result
