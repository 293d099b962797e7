"""``python -m services.ingest --config FILE [--data DIR] [--log-level LEVEL]``: run the ingest service.

The service spawns its store workers (``python -m services.ingest.worker``) itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from services.common.config import load_config
from services.common.errors import InvalidInput
from services.common.logging import register_secret, setup_logging
from services.common.metrics import Registry
from services.common.rpc import run_service
from services.common.tuning import tune_malloc
from services.ingest.service import build
from services.ingest.worker import claim_idle_ms


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the config, serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m services.ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="gateway YAML config (defaults apply when omitted)")
    parser.add_argument("--data", help="data dir (overrides data_dir in the config)")
    parser.add_argument("--log-level", default=os.environ.get("GRIDSTOR_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    try:
        setup_logging("ingest", args.log_level)
        cfg = load_config(args.config, data_dir=args.data)
        claim_idle_ms()  # a bad GRIDSTOR_CLAIM_IDLE_MS stops the start here, not in every worker
    except InvalidInput as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    register_secret(cfg.secret)
    # Upload messages (256 KiB) held for a spool batch would each be a fresh mmap without it:
    # measured 370 -> 510-550 MB/s received on 100 MiB uploads.
    tune_malloc()
    reg = Registry()
    try:
        asyncio.run(run_service("ingest", cfg, lambda: build(cfg, registry=reg), reg))
    except InvalidInput as exc:  # e.g. a key file readable by others: refuse to start, no traceback
        print(f"ingest: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
