"""``python -m services.meta [--config FILE] [--data DIR]``: run the meta service until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.config import ConfigError, load_config
from services.common.errors import GridstorError
from services.common.logging import setup_logging
from services.common.metrics import Registry
from services.common.rpc import run_service
from services.common.tuning import tune_malloc
from services.meta.service import NAME, build


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the config and serve; 2 for a bad config, 1 when the start fails."""
    parser = argparse.ArgumentParser(prog="python -m services.meta", description="gridstor meta service")
    parser.add_argument("--config", metavar="FILE", help="gateway config (YAML); defaults when omitted")
    parser.add_argument("--data", metavar="DIR", help="data dir (overrides the config's data_dir)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    args = parser.parse_args(argv)
    try:
        setup_logging(NAME, args.log_level)
        cfg = load_config(args.config, data_dir=args.data)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except GridstorError as exc:  # a bad --log-level
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 2
    tune_malloc()
    registry = Registry()
    try:
        asyncio.run(run_service(NAME, cfg, lambda: build(cfg, registry=registry), registry))
    except GridstorError as exc:  # a backend or key file that cannot be opened, a port in use ...
        print(f"{NAME}: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
