"""``python -m services.auth --config FILE [--data DIR] [--log-level LEVEL]``: run the auth service."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from services.auth.service import build
from services.common.config import load_config
from services.common.errors import InvalidInput
from services.common.logging import register_secret, setup_logging
from services.common.metrics import Registry
from services.common.rpc import run_service


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the config, serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m services.auth", description=__doc__)
    parser.add_argument("--config", help="gateway YAML config (defaults apply when omitted)")
    parser.add_argument("--data", help="data dir (overrides data_dir in the config)")
    parser.add_argument("--log-level", default=os.environ.get("GRIDSTOR_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    try:
        setup_logging("auth", args.log_level)
        cfg = load_config(args.config, data_dir=args.data)
    except InvalidInput as exc:
        print(f"auth: {exc}", file=sys.stderr)
        return 2
    register_secret(cfg.secret)
    reg = Registry()
    try:
        asyncio.run(run_service("auth", cfg, lambda: build(cfg, registry=reg), reg))
    except InvalidInput as exc:  # e.g. a key file readable by others: refuse to start, no traceback
        print(f"auth: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
