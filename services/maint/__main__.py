"""``python -m services.maint [--config FILE] [--data DIR]``: run the maint service until SIGTERM/SIGINT.

``python -m services.maint restore --record FILE [--force] --config FILE``: rebuild the master metadata
namespace from a backup (its record, as written to DATA/backups/<time>.record), in this process: it needs
the backends and the master key, not a running gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from services.common.config import Config
from services.common.errors import GridstorError
from services.common.gateway import ensure_local_dirs, open_engine
from services.common.service_main import common_options, load, serve
from services.maint import backup as backups
from services.maint.service import NAME, build


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.maint",
        description="gridstor maint service (checks, scrub, repair, replicas, backups, home cleanup)",
        parents=[common_options()],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the service (the default)", parents=[common_options(False)])
    r = sub.add_parser(
        "restore", help="rebuild the metadata namespace from a backup record file", parents=[common_options(False)]
    )
    r.add_argument("--record", required=True, metavar="FILE", help="the backup's record (DATA/backups/<time>.record)")
    r.add_argument("--force", action="store_true", help="restore into a namespace that is not empty")
    return parser


async def restore_from_file(cfg: Config, record_path: Path, *, force: bool) -> backups.RestoreResult:
    """Restore the master metadata of ``cfg`` from a backup record file, in-process."""
    record = backups.load_record_file(record_path)
    ensure_local_dirs(cfg)
    engine = await open_engine(cfg)
    try:
        store = await backups.open_master_store(cfg)
        try:
            return await backups.restore(engine, store, record, force=force)
        finally:
            await store.close()
    finally:
        await engine.pool.close()


def main(argv: list[str] | None = None) -> int:
    """Serve, or restore; 2 for a bad config or arguments, 1 when the work fails."""
    args = _parser().parse_args(argv)
    cfg = load(NAME, args)
    if isinstance(cfg, int):
        return cfg
    if args.command == "restore":
        try:
            result = asyncio.run(restore_from_file(cfg, Path(args.record), force=args.force))
        except GridstorError as exc:
            print(f"{NAME}: restore failed: {exc}", file=sys.stderr)
            return 1
        print(f"restored {result.records} records (last id {max(0, result.last_id):08x})")
        return 0
    return serve(NAME, cfg, build, tune=True)


if __name__ == "__main__":
    sys.exit(main())
