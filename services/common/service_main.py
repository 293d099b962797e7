"""The command line every service shares: ``python -m services.<name> [--config FILE] [--data DIR]``.

Exit codes: 0 after SIGTERM/SIGINT; 2 for a bad config, argument or key file
(the operator must fix something); 1 when the start fails otherwise (a port in
use, Redis or a metadata store unreachable). Errors are one line, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

from services.common.config import Config, ConfigError, load_config
from services.common.errors import GridstorError, InvalidInput
from services.common.logging import register_secret, setup_logging
from services.common.metrics import Registry
from services.common.server import Cleanup, Running, run_service
from services.common.tuning import tune_malloc

Build = Callable[..., Awaitable[tuple[Running, Cleanup]]]


def positive_seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def common_options(defaults: bool = True) -> argparse.ArgumentParser:
    """--config, --data, --log-level (as a parent parser; ``defaults=False`` for subcommands)."""
    p = argparse.ArgumentParser(add_help=False)
    d: dict[str, object] = (
        {"config": None, "data": None, "log_level": os.environ.get("GRIDSTOR_LOG_LEVEL", "INFO")}
        if defaults
        else dict.fromkeys(("config", "data", "log_level"), argparse.SUPPRESS)
    )
    p.add_argument("--config", metavar="FILE", default=d["config"], help="gateway config (YAML); defaults if omitted")
    p.add_argument("--data", metavar="DIR", default=d["data"], help="data dir (overrides the config's data_dir)")
    p.add_argument("--log-level", default=d["log_level"], help="DEBUG, INFO, WARNING, ERROR")
    return p


def load(name: str, args: argparse.Namespace, check: Callable[[Config], object] | None = None) -> Config | int:
    """Set up logging and load the config (plus a service's own ``check``); the exit code on failure."""
    try:
        setup_logging(name, args.log_level)
        cfg = load_config(args.config, data_dir=args.data)
        if check is not None:
            check(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except InvalidInput as exc:  # a bad --log-level or environment override
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    register_secret(cfg.secret)
    return cfg


def serve(name: str, cfg: Config, build: Build, *, tune: bool = False) -> int:
    """Run the service until a signal; the exit code."""
    if tune:
        tune_malloc()
    registry = Registry()
    try:
        asyncio.run(run_service(name, cfg, lambda: build(cfg, registry=registry), registry))
    except InvalidInput as exc:  # e.g. a key file readable by others
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use ...
        reason = exc.strerror if exc.strerror and exc.filename is None else exc  # no "[Errno 98]" without a path
        print(f"{name}: cannot start: {reason}", file=sys.stderr)
        return 1
    except GridstorError as exc:  # a store unreachable ...
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def service_main(
    name: str,
    build: Build,
    argv: list[str] | None,
    *,
    description: str,
    tune: bool = False,
    check: Callable[[Config], object] | None = None,
) -> int:
    """Parse the common options, load the config and serve."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}", description=description, parents=[common_options()]
    )
    cfg = load(name, parser.parse_args(argv), check)
    return cfg if isinstance(cfg, int) else serve(name, cfg, build, tune=tune)
