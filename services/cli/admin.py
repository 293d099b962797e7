"""Maintenance commands: ``gridstor check ID``, ``gridstor admin scrub|orphans|repair|replicas|backup|restore|compact``.

They call the gateway's MaintService with the saved token (see ``gridstor login``).
Exit codes follow the rest of the CLI: 0 ok, 1 the answer is bad news (damage
found, replicas behind) or the call failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import getpass
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from nacl.signing import SigningKey

from gridstor.v1 import maint_pb2, maint_pb2_grpc, record_pb2
from services.cli.connect import token_path, write_private
from services.cli.failures import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliFailure
from services.cli.session import UNARY_TIMEOUT, Session
from services.common.config import load_config
from services.common.keys import SIGNING_KEY_FILE
from services.common.rpc import admin_token

Handler = Callable[[Session, argparse.Namespace], int]
LONG_TIMEOUT = 3600.0  # hard checks, repairs, backups and restores read or write whole files
POLL = 1.0


def _stub(s: Session) -> maint_pb2_grpc.MaintServiceStub:
    return maint_pb2_grpc.MaintServiceStub(s.channel("maint"))


def _check_id(text: str) -> str:
    from services.cli.commands import check_id  # the same id check as get/stat/exists

    return check_id(text)


def cmd_check(s: Session, a: argparse.Namespace) -> int:
    """Soft (every shard present) or hard (fetch, verify, decrypt, hash) check of one file; exit 1 when damaged.

    Lost shards (missing, corrupt, unwritten) are reported apart from shards on backends that do not
    answer now, which may come back with them.
    """
    file_id = _check_id(a.id)
    request = maint_pb2.CheckRequest(id=file_id, soft=not a.hard)
    with s.rpc("maint"):
        r = _stub(s).Check(request, metadata=s.auth_metadata(), timeout=LONG_TIMEOUT if a.hard else UNARY_TIMEOUT)
    damaged = [
        {
            "chunk": c.index,
            "missing": list(c.missing),
            "corrupt": list(c.corrupt),
            "unwritten": list(c.unwritten),
            "unreachable": list(c.unreachable),
        }
        for c in r.damaged
    ]
    kind = "hard" if r.hard else "soft"
    if r.ok:
        verdict = "ok"
    elif not r.recoverable:
        verdict = "LOST"
    elif not r.readable:
        verdict = "UNAVAILABLE NOW"
    elif r.error or any(c.missing or c.corrupt for c in r.damaged):
        verdict = "DAMAGED"
    else:  # only shards never written or on backends away now
        verdict = "UNDER-REPLICATED"
    lines = [f"{verdict}: {r.id} ({kind} check, {r.chunks} chunks, k={r.k} m={r.m})"]
    if r.damaged:
        lines.append(f"  lost: {r.shards_lost} shards (missing, corrupt or never written); rebuilt by a repair")
        lines.append(f"  unreachable now: {r.shards_unreachable} shards, on backends that do not answer")
    for d in damaged:
        parts = [f"{what} {d[what]}" for what in ("missing", "corrupt", "unwritten", "unreachable") if d[what]]
        lines.append(f"  chunk {d['chunk']}: {', '.join(parts)}")
    if r.unreachable_backends:
        lines.append(f"  unreachable backends: {', '.join(r.unreachable_backends)}")
    if r.replaced_backends:
        lines.append(f"  replaced backends (wiped, set up again; this file's shards on them are gone): "
                     f"{', '.join(r.replaced_backends)}")  # fmt: skip
    if r.hard:
        lines.append(f"  content hash {'matches' if r.hash_ok else 'DOES NOT match'} the id")
    if not r.ok:
        if not r.recoverable:
            lines.append("  UNRECOVERABLE: a chunk lost more than m shards (fewer than k good ones remain)")
        elif not r.readable:
            lines.append(
                "  not readable now: a chunk has fewer than k shards on answering backends (none lost for good)"
            )
        elif r.shards_lost:
            lines.append("  repairable: run `gridstor admin repair ID` (maint's repair queue does it too)")
        else:
            lines.append("  readable; full redundancy returns when the unreachable backends answer again")
    if r.error:
        lines.append(f"  error: {r.error}")
    s.result(
        "\n".join(lines),
        {
            "id": r.id,
            "ok": r.ok,
            "hard": r.hard,
            "k": r.k,
            "m": r.m,
            "chunks": r.chunks,
            "damaged": damaged,
            "recoverable": r.recoverable,
            "readable": r.readable,
            "under_replicated": r.under_replicated,
            "shards_lost": r.shards_lost,
            "shards_unreachable": r.shards_unreachable,
            "unreachable_backends": list(r.unreachable_backends),
            "replaced_backends": list(r.replaced_backends),
            "hash_ok": r.hash_ok,
            "error": r.error,
        },
    )
    return EXIT_OK if r.ok else EXIT_FAILED


def cmd_repair(s: Session, a: argparse.Namespace) -> int:
    """Rebuild a file's missing (and, with --hard, corrupt) shards; exit 1 when it could not be made whole."""
    file_id = _check_id(a.id)
    with s.rpc("maint"):
        r = _stub(s).Repair(
            maint_pb2.RepairRequest(id=file_id, hard=a.hard), metadata=s.auth_metadata(), timeout=LONG_TIMEOUT
        )
    lines = [f"{'ok' if r.ok else 'NOT REPAIRED'}: {r.id}: {r.shards_repaired} shards rebuilt"]
    lines += [f"  chunk {c.index}: shards {list(c.shards)} -> {', '.join(c.backends)}" for c in r.repaired]
    if r.shards_pending:
        lines.append(
            f"  {r.shards_pending} shards pending: their backends do not answer or no backend can take them now;"
            " the repair queue retries when backends return"
        )
    if r.unrecoverable:
        lines.append(f"  UNRECOVERABLE chunks: {list(r.unrecoverable)}")
    if r.error:
        lines.append(f"  error: {r.error}")
    s.result(
        "\n".join(lines),
        {
            "id": r.id,
            "ok": r.ok,
            "shards_repaired": r.shards_repaired,
            "repaired": [
                {"chunk": c.index, "shards": list(c.shards), "backends": list(c.backends)} for c in r.repaired
            ],
            "unrecoverable": list(r.unrecoverable),
            "shards_pending": r.shards_pending,
            "error": r.error,
        },
    )
    return EXIT_OK if r.ok else EXIT_FAILED


def _when(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch)) if epoch else "never"


def _progress(p: maint_pb2.ScrubProgress) -> dict[str, Any]:
    return {
        "state": maint_pb2.ScrubState.Name(p.state).removeprefix("SCRUB_STATE_").lower(),
        "hard": p.hard,
        "dry_run": p.dry_run,
        "started": p.started,
        "finished": p.finished,
        "cursor": p.cursor,
        "files_checked": p.files_checked,
        "files_damaged": p.files_damaged,
        "files_repaired": p.files_repaired,
        "shards_repaired": p.shards_repaired,
        "files_unrecoverable": p.files_unrecoverable,
        "unrecoverable_ids": list(p.unrecoverable_ids),
        "last_full_pass": p.last_full_pass,
        "last_hard_pass": p.last_hard_pass,
        "files_pending": p.files_pending,
    }


def _progress_text(p: maint_pb2.ScrubProgress) -> str:
    d = _progress(p)
    kind = ("hard" if p.hard else "soft") + (" dry-run" if p.dry_run else "")
    lines = [
        f"scrub {d['state']} ({kind} pass started {_when(p.started)}"
        + (f", finished {_when(p.finished)})" if p.finished else ")"),
        f"  checked {p.files_checked}, damaged {p.files_damaged}, repaired {p.files_repaired}"
        f" ({p.shards_repaired} shards), waiting for backends {p.files_pending}, unrecoverable"
        f" {p.files_unrecoverable}",
        f"  last full pass {_when(p.last_full_pass)}, last hard pass {_when(p.last_hard_pass)}",
    ]
    lines += [f"  unrecoverable: {fid}" for fid in p.unrecoverable_ids]
    return "\n".join(lines)


_P = TypeVar("_P", maint_pb2.ScrubProgress, maint_pb2.OrphanProgress)


def _start_or_follow(
    s: Session,
    a: argparse.Namespace,
    status: Callable[[], _P],
    start: Callable[[], tuple[bool, _P]],
    what: str,
) -> _P:
    """--status: the running or last run's progress; else start one (or join the running one); --wait: to its end."""
    with s.rpc("maint"):
        if a.status:
            progress = status()
        else:
            started, progress = start()
            if not started:
                s.note(f"gridstor: {what} is already running; showing its progress")
        while a.wait and progress.state == maint_pb2.SCRUB_STATE_RUNNING:
            time.sleep(POLL)
            progress = status()
    return progress


def cmd_scrub(s: Session, a: argparse.Namespace) -> int:
    """Start a scrub pass (or show the running / last one with --status); --wait follows it to its end."""
    stub = _stub(s)
    queued = [-1]

    def status() -> maint_pb2.ScrubProgress:
        reply = stub.ScrubStatus(maint_pb2.ScrubStatusRequest(), metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT)
        queued[0] = reply.repair_queue
        return reply.progress

    def start() -> tuple[bool, maint_pb2.ScrubProgress]:
        request = maint_pb2.ScrubRequest(hard=a.hard, dry_run=a.dry_run)
        reply = stub.Scrub(request, metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT)
        return reply.started, reply.progress

    progress = _start_or_follow(s, a, status, start, "a scrub pass")
    text, data = _progress_text(progress), _progress(progress)
    if a.status:
        n = queued[0]
        text += f"\n  repair queue: {n if n >= 0 else 'unknown (redis unreachable)'} under-replicated files"
        data["repair_queue"] = n
    s.result(text, data)
    return EXIT_FAILED if progress.files_unrecoverable else EXIT_OK


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_compact(s: Session, a: argparse.Namespace) -> int:
    """Give back the space of deleted shards in the dir:// backends now; --wait for the pass to end."""
    with s.rpc("maint"):
        r = _stub(s).Compact(
            maint_pb2.CompactRequest(wait=a.wait),
            metadata=s.auth_metadata(),
            timeout=LONG_TIMEOUT if a.wait else UNARY_TIMEOUT,
        )
    if not r.started:
        s.note("gridstor: a compaction pass is already running; showing its progress")
    state = "running" if r.running else "done"
    lines = [
        f"compaction {state} (started {_when(r.started_at)}): {_mb(r.freed_bytes)} freed,"
        f" {r.segments} segments removed, {r.skipped} skipped for lack of free space"
    ]
    for b in r.backends:
        if b.error:
            lines.append(f"  {b.name}: NOT COMPACTED: {b.error}")
        else:
            lines.append(
                f"  {b.name}: {_mb(b.freed_bytes)} freed, {b.segments} segments removed ({_mb(b.moved_bytes)} moved),"
                f" {_mb(b.dead_bytes)} dead left" + (f", {b.skipped} skipped" if b.skipped else "")
            )
    if r.running and not r.backends:
        lines.append("  (no backend done yet: `gridstor admin compact --wait` follows a pass to its end)")
    s.result(
        "\n".join(lines),
        {
            "running": r.running,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "freed_bytes": r.freed_bytes,
            "segments": r.segments,
            "skipped": r.skipped,
            "backends": [
                {
                    "name": b.name,
                    "freed_bytes": b.freed_bytes,
                    "segments": b.segments,
                    "moved_bytes": b.moved_bytes,
                    "skipped": b.skipped,
                    "dead_bytes": b.dead_bytes,
                    "error": b.error,
                }
                for b in r.backends
            ],
        },
    )
    return EXIT_FAILED if any(b.error for b in r.backends) else EXIT_OK


def _orphans(p: maint_pb2.OrphanProgress) -> dict[str, Any]:
    return {
        "state": maint_pb2.ScrubState.Name(p.state).removeprefix("SCRUB_STATE_").lower(),
        "dry_run": p.dry_run,
        "started": p.started,
        "finished": p.finished,
        "records": p.records,
        "scanned": p.scanned,
        "orphans": p.orphans,
        "deleted": p.deleted,
        "too_new": p.too_new,
        "backends": [
            {
                "name": b.name,
                "scanned": b.scanned,
                "orphans": b.orphans,
                "deleted": b.deleted,
                "too_new": b.too_new,
                "skipped": b.skipped,
            }
            for b in p.backends
        ],
        "error": p.error,
    }


def _orphans_text(p: maint_pb2.OrphanProgress) -> str:
    state = maint_pb2.ScrubState.Name(p.state).removeprefix("SCRUB_STATE_").lower()
    kind = "dry run" if p.dry_run else "collection"
    lines = [
        f"orphans {state} ({kind} started {_when(p.started)}"
        + (f", finished {_when(p.finished)})" if p.finished else ")"),
        f"  {p.records} records listed; {p.scanned} shard keys judged, {p.orphans} orphans,"
        f" {p.deleted} deleted; {p.too_new} too new to judge (uploads in flight, orphan_grace)",
    ]
    for b in p.backends:
        if b.orphans or b.skipped:
            note = f" (skipped: {b.skipped})" if b.skipped else ""
            lines.append(f"  {b.name}: {b.orphans} orphans, {b.deleted} deleted of {b.scanned} judged{note}")
    if p.error:
        lines.append(f"  error: {p.error}")
    return "\n".join(lines)


def cmd_orphans(s: Session, a: argparse.Namespace) -> int:
    """Collect orphan shards (no record references them, no running job owns them); --wait follows it to its end."""
    stub = _stub(s)

    def status() -> maint_pb2.OrphanProgress:
        return stub.OrphanStatus(
            maint_pb2.OrphanStatusRequest(), metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT
        ).progress

    def start() -> tuple[bool, maint_pb2.OrphanProgress]:
        request = maint_pb2.CollectOrphansRequest(dry_run=a.dry_run)
        reply = stub.CollectOrphans(request, metadata=s.auth_metadata(), timeout=UNARY_TIMEOUT)
        return reply.started, reply.progress

    progress = _start_or_follow(s, a, status, start, "an orphan collection")
    s.result(_orphans_text(progress), _orphans(progress))
    return EXIT_FAILED if progress.error else EXIT_OK


def cmd_replicas(s: Session, a: argparse.Namespace) -> int:
    """Whether every metadata replica holds the master's last id; exit 1 when not in sync."""
    with s.rpc("maint"):
        r = _stub(s).ReplicaStatus(maint_pb2.ReplicaStatusRequest(), metadata=s.auth_metadata(), timeout=120.0)
    master = f"{r.master_last_id:08x} ({r.master_entries} records)" if r.master_reachable else "UNREACHABLE"
    lines = [f"{'in sync' if r.in_sync else 'NOT in sync'} (this gateway: {r.role}); master last id {master}"]
    for rep in r.replicas:
        if rep.reachable:
            lines.append(f"  {rep.name}: last id {rep.last_id:08x}, {rep.entries} records, lag {rep.lag}")
        else:
            lines.append(f"  {rep.name}: UNREACHABLE ({rep.error})")
    if not r.replicas:
        lines.append("  no replicas configured")
    s.result(
        "\n".join(lines),
        {
            "role": r.role,
            "in_sync": r.in_sync,
            "master_reachable": r.master_reachable,
            "master_last_id": r.master_last_id,
            "master_entries": r.master_entries,
            "replicas": [
                {
                    "name": x.name,
                    "reachable": x.reachable,
                    "last_id": x.last_id,
                    "entries": x.entries,
                    "lag": x.lag,
                    "error": x.error,
                }
                for x in r.replicas
            ],
        },
    )
    return EXIT_OK if r.in_sync else EXIT_FAILED


def cmd_backup(s: Session, a: argparse.Namespace) -> int:
    """Store a metadata snapshot in the pool; -o keeps its record (needed to restore) in a file of yours."""
    with s.rpc("maint"):
        r = _stub(s).Backup(maint_pb2.BackupRequest(), metadata=s.auth_metadata(), timeout=LONG_TIMEOUT)
    saved = ""
    if a.output:
        path = Path(a.output).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(r.record.SerializeToString(deterministic=True))
        path.chmod(0o600)
        saved = str(path)
    s.result(
        f"backup {r.backup_id}: {r.records} records (last id {r.last_id:08x}), {r.size} bytes"
        + (f"; record saved to {saved}" if saved else ""),
        {
            "backup_id": r.backup_id,
            "records": r.records,
            "last_id": r.last_id,
            "size": r.size,
            "created": r.created,
            "record_file": saved,
        },
    )
    if not saved:
        s.note(
            "gridstor: keep the backup's record off the metadata machines (-o FILE saves it here; the gateway"
            " keeps a copy in DATA/backups/): without it a restore after losing all metadata is impossible"
        )
    return EXIT_OK


def cmd_restore(s: Session, a: argparse.Namespace) -> int:
    """Rebuild the metadata namespace from a backup (its record file, or its id while the metadata still holds it)."""
    if not a.record and not a.id:
        raise CliFailure(
            "restore needs --record FILE (or --id BACKUP_ID while the metadata still holds it)", EXIT_USAGE
        )
    request = maint_pb2.RestoreRequest(backup_id=a.id or "", force=a.force)
    if a.record:
        try:
            request.record.CopyFrom(record_pb2.FileRecord.FromString(Path(a.record).expanduser().read_bytes()))
        except OSError as exc:
            raise CliFailure(f"cannot read the backup record {a.record}: {exc.strerror}", EXIT_USAGE) from None
        except DecodeError:
            raise CliFailure(f"{a.record} is not a backup record file", EXIT_USAGE) from None
    if a.id:
        _check_id(a.id)
    with s.rpc("maint"):
        r = _stub(s).Restore(request, metadata=s.auth_metadata(), timeout=LONG_TIMEOUT)
    s.result(f"restored {r.records} records (last id {r.last_id:08x})", {"records": r.records, "last_id": r.last_id})
    return EXIT_OK


def cmd_token(s: Session, a: argparse.Namespace) -> int:
    """Mint an operator's token from the gateway key (run on the gateway machine) and save it."""
    data_dir = Path(a.data) if a.data else (load_config(s.config).data_dir if s.config else Path("data"))
    key_file = data_dir.expanduser().absolute() / SIGNING_KEY_FILE
    try:
        seed = key_file.read_bytes()
    except FileNotFoundError:
        raise CliFailure(
            f"no gateway key at {key_file}: run this on the gateway machine, with --data naming its data dir"
        ) from None
    except PermissionError:
        raise CliFailure(
            f"cannot read {key_file}: only the gateway's operator (its file owner) may mint admin tokens"
        ) from None
    if len(seed) != 32:
        raise CliFailure(f"{key_file} is not a gateway key ({len(seed)} bytes)")
    token = admin_token(SigningKey(seed), a.name or getpass.getuser(), int(a.ttl))
    expires = int(time.time()) + int(a.ttl)
    if a.print:
        print(token, file=s.stdout)
        return EXIT_OK
    path = token_path()
    write_private(path, token + "\n")
    s.result(
        f"admin token valid until {_when(expires)}, saved to {path}",
        {"expires_at": expires, "token_file": str(path)},
    )
    return EXIT_OK


def add_commands(sub: Any, common: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``check`` and ``admin ...`` to the ``gridstor`` subcommands."""

    def command(parent: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text, parents=common)
        p.set_defaults(handler=handler)
        return p

    p = command(sub, "check", cmd_check, "check a file's shards (soft; --hard also decrypts); exit 1 when damaged")
    p.add_argument("id", metavar="ID", help="file id")
    p.add_argument("--hard", action="store_true", help="fetch and verify every shard, decrypt, compare the hash")

    admin = sub.add_parser(
        "admin",
        help="gateway maintenance: token, scrub, orphans, repair, replicas, backup, restore, compact",
        parents=common,
    )
    asub = admin.add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND", required=True)
    p = command(asub, "scrub", cmd_scrub, "start a scrub pass (check everything, repair damage)")
    p.add_argument("--hard", action="store_true", help="hard-check every file (slow: reads everything)")
    p.add_argument("--dry-run", action="store_true", help="only report damage")
    p.add_argument("--wait", action="store_true", help="follow the pass until it ends")
    p.add_argument("--status", action="store_true", help="show the running or last pass; start nothing")
    p = command(asub, "orphans", cmd_orphans, "delete shards no record references and no running job owns")
    p.add_argument("--dry-run", action="store_true", help="only count the orphans")
    p.add_argument("--wait", action="store_true", help="follow the collection until it ends")
    p.add_argument("--status", action="store_true", help="show the running or last collection; start nothing")
    p = command(asub, "repair", cmd_repair, "rebuild a file's missing (--hard: and corrupt) shards")
    p.add_argument("id", metavar="ID", help="file id")
    p.add_argument("--hard", action="store_true", help="find damage with a hard check")
    p = command(asub, "token", cmd_token, "mint an operator's token from the gateway key (on the gateway machine)")
    p.add_argument("--data", metavar="DIR", help="the gateway's data dir (default: the config's, else ./data)")
    p.add_argument("--ttl", type=int, default=3600, metavar="S", help="seconds the token is valid (default 3600)")
    p.add_argument("--name", help="who the token names in logs (default: your user name)")
    p.add_argument("--print", action="store_true", help="print the token instead of saving it")
    command(asub, "replicas", cmd_replicas, "show whether the metadata replicas are in sync; exit 1 when not")
    p = command(asub, "compact", cmd_compact, "give back the disk space of deleted shards in the dir:// backends")
    p.add_argument("--wait", action="store_true", help="answer once the pass has ended, with what it freed")
    p = command(asub, "backup", cmd_backup, "store a metadata snapshot in the pool")
    p.add_argument("-o", "--output", metavar="FILE", help="save the backup's record here (needed to restore)")
    p = command(asub, "restore", cmd_restore, "rebuild the metadata namespace from a backup")
    p.add_argument("--record", metavar="FILE", help="the backup's record file (from backup -o or DATA/backups/)")
    p.add_argument("--id", metavar="BACKUP_ID", help="the backup's file id (enough while the metadata still has it)")
    p.add_argument("--force", action="store_true", help="restore into a metadata namespace that is not empty")
