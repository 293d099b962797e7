"""``python -m services.launcher``: arguments, the start sequence, exit codes."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from services.common.config import ConfigError, load_config
from services.common.errors import GridstorError
from services.common.service_main import positive_seconds
from services.launcher.banner import banner
from services.launcher.checks import check_ports, data_dir_lock
from services.launcher.children import MAX_RESTARTS, WINDOW
from services.launcher.config_file import CONFIG_NAME, ensure_config
from services.launcher.errors import LaunchError, Stop
from services.launcher.supervisor import START_ORDER, Launcher


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.launcher",
        description="Run redis-server and every gridstor service on this machine until Ctrl-C.",
    )
    parser.add_argument("--data", default="data", metavar="DIR", help="data dir (created if missing; default ./data)")
    parser.add_argument(
        "--config", metavar="FILE", help=f"gateway config (default DIR/{CONFIG_NAME}, written on first start)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=60.0,
        metavar="S",
        help="seconds to wait for each start (default 60)",
    )
    parser.add_argument(
        "--grace",
        type=positive_seconds,
        default=20.0,
        metavar="S",
        help="seconds a child may take to stop (default 20)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=MAX_RESTARTS,
        metavar="N",
        help=f"a child that dies is restarted; dying more than N times within --restart-window stops everything"
        f" (default {MAX_RESTARTS})",
    )
    parser.add_argument(
        "--restart-window",
        type=positive_seconds,
        default=WINDOW,
        metavar="S",
        help=f"seconds over which a child's restarts are counted (default {WINDOW:g})",
    )
    args = parser.parse_args(argv)
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must not be negative, got {args.max_restarts}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Start everything, restart what dies, until Ctrl-C / SIGTERM or a crash loop; stop everything."""
    args = parse_args(argv)
    data_dir = Path(args.data).expanduser().absolute()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gridstor: cannot create the data dir {data_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with data_dir_lock(data_dir):
            config_path, wrote = ensure_config(data_dir, args.config)
            try:
                cfg = load_config(config_path, data_dir=data_dir)
            except ConfigError as exc:
                raise LaunchError(str(exc), 2) from None
            services = list(START_ORDER)
            launcher = Launcher(
                cfg,
                config_path,
                services,
                timeout=args.timeout,
                grace=args.grace,
                max_restarts=args.max_restarts,
                window=args.restart_window,
            )
            check_ports(cfg, services, launcher.redis, config_path)
            launcher.prepare_tls()
            for sig in old_handlers:
                signal.signal(sig, launcher.on_signal)
            return run(launcher, wrote)
    except LaunchError as exc:
        print(f"gridstor: {exc}", file=sys.stderr)
        return exc.code
    except GridstorError as exc:  # e.g. a key or backend the config names that cannot be used
        print(f"gridstor: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def run(launcher: Launcher, wrote_config: bool) -> int:
    """Start, watch, stop; the exit code of the launcher."""
    try:
        launcher.start_redis()
        launcher.start_services()
        launcher.wait_healthy()
        launcher.start_envoy()
        print(banner(launcher, wrote_config), flush=True)
        launcher.watch()
    except Stop:
        print("\ngridstor: stopping ...", file=sys.stderr, flush=True)
        launcher.stop_all()
        print("gridstor: stopped.", file=sys.stderr, flush=True)
        return 0
    except LaunchError as exc:
        print(f"gridstor: {exc}", file=sys.stderr, flush=True)
        return exc.code
    finally:
        launcher.stop_all()  # after any error too; a no-op when already stopped
    return 0
