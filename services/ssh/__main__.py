"""``python -m services.ssh [--config FILE] [--data DIR]``: run the ssh service (gRPC + SSH server) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from services.common.config import ConfigError, load_config
from services.common.errors import GridstorError
from services.common.logging import register_secret, setup_logging
from services.common.metrics import Registry
from services.common.rpc import run_service
from services.ssh.service import NAME, build
from services.ssh.settings import SshSettings


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the config and serve; 2 for a bad config, 1 when the start fails."""
    parser = argparse.ArgumentParser(prog="python -m services.ssh", description="gridstor ssh service")
    parser.add_argument("--config", metavar="FILE", help="gateway config (YAML); defaults when omitted")
    parser.add_argument("--data", metavar="DIR", help="data dir (overrides the config's data_dir)")
    parser.add_argument("--log-level", default=os.environ.get("GRIDSTOR_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    try:
        setup_logging(NAME, args.log_level)
        cfg = load_config(args.config, data_dir=args.data)
        SshSettings.from_config(cfg)  # a bad GRIDSTOR_SSH_* value stops the start here, with its message
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except GridstorError as exc:  # a bad --log-level
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 2
    register_secret(cfg.secret)
    # asyncssh logs every channel and SFTP request at INFO; our own log says what matters.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    registry = Registry()
    try:
        asyncio.run(run_service(NAME, cfg, lambda: build(cfg, registry=registry), registry))
    except GridstorError as exc:  # a damaged accounts file, a port in use, Redis down ...
        print(f"{NAME}: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the SSH port cannot be bound
        print(f"{NAME}: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
