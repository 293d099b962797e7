"""``python -m services.edge.certs --config FILE [--config F2] --out DIR [--name N]``: a deployment's certificates.

Makes (or keeps) a private CA in ``DIR/ca.pem`` + ``DIR/ca.key`` and issues
``DIR/server.pem`` + ``DIR/server.key`` for every name the configs need (loopback,
listen_host, the per-service ``hosts``, ``tls.names``) plus ``--name``. Run again
after adding a name: the certificate is re-issued from the same CA, so clients
keep trusting ``ca.pem``. Keys are written 0600; the CA key is needed only to issue
certificates (keep it off the gateway if you can). compose/certs/README.md shows
how the compose deployment mounts the result.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.common import tls
from services.common.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """0 when the certificates are in place, 2 for a bad config or a file that cannot be used, 1 if --owner fails."""
    parser = argparse.ArgumentParser(prog="python -m services.edge.certs", description=__doc__.split("\n")[0])
    parser.add_argument("--config", metavar="FILE", action="append", default=[], help="gateway config(s) (YAML)")
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="folder for ca.pem, server.pem, keys")
    parser.add_argument("--name", metavar="NAME", action="append", default=[], help="one more DNS name or IP")
    parser.add_argument(
        "--owner", metavar="UID[:GID]", help="give server.key to this user (the compose containers run as 10001)"
    )
    args = parser.parse_args(argv)
    names: list[str] = []
    try:
        configs = [load_config(c) for c in args.config] or [load_config(None)]
        for cfg in configs:
            names += [n for n in tls.wanted_names(cfg) if n not in names]
        names += [n for n in args.name if n not in names]
        out: Path = args.out
        files = tls.TlsFiles(
            ca=out / "ca.pem",
            cert=out / "server.pem",
            key=out / "server.key",
            edge_cert=out / "server.pem",
            edge_key=out / "server.key",
            ca_key=out / tls.CA_KEY_NAME,
        )
        report = tls.ensure_issued(files, names)
    except ConfigError as exc:  # TlsError included
        print(exc, file=sys.stderr)
        return 2
    if args.owner:
        uid, _, gid = args.owner.partition(":")
        try:
            os.chown(files.key, int(uid), int(gid) if gid else -1)
        except (ValueError, OSError) as exc:
            print(f"cannot give {files.key} to {args.owner}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 1
    for line in report.lines() or [f"kept {files.cert}: current, issued by {files.ca}"]:
        print(line)
    expires = f"{report.expires:%Y-%m-%d}" if report.expires else "?"
    print(f"names: {', '.join(report.names)}; valid until {expires}")
    print(f"clients trust {files.ca}; the services and Envoy read server.pem and server.key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
