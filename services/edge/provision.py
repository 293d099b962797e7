"""``python -m services.edge.provision --config FILE``: create the 0-db namespaces a config names.

For a deployment that runs its own 0-db servers (compose/): every ``zdb://`` URI of the
config gets its namespace, in the mode it needs (shards and the master's records sequential;
the hash index and metadata replicas user-key) and with the password the URI carries. Idempotent: existing
namespaces are left as they are (a mode that differs on a non-empty namespace is an error).
The 0-db admin password comes from $ZDB_ADMIN_PASSWORD (never from the config or argv).
On the ThreeFold Grid the grid creates the namespaces; this step is not needed there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass

from services.common.backends import Mode
from services.common.backends.uri import ZdbURI, parse_uri
from services.common.backends.zdb import ensure_namespace
from services.common.config import Config, ConfigError, load_config
from services.common.errors import BackendUnavailable, GridstorError

ADMIN_ENV = "ZDB_ADMIN_PASSWORD"


@dataclass(frozen=True)
class Namespace:
    uri: ZdbURI
    mode: Mode
    role: str  # what the config uses it for, for messages


def namespaces(cfg: Config) -> list[Namespace]:
    """Every 0-db namespace ``cfg`` names, with the mode it needs; dir:// backends are skipped."""
    wanted: list[tuple[str, Mode, str]] = [(b.uri, Mode.SEQ, f"backend {b.name}") for b in cfg.backends]
    md = cfg.metadata
    if md is not None:
        # A master allocates ids in a sequential namespace and keeps a hash index; replicas are keyed by
        # the master's ids (user-key). A replica gateway (metadata.mode user) reads one such replica.
        if getattr(md, "mode", "seq") == "user":
            wanted.append((md.uri, Mode.USER, "metadata replica (read by this gateway)"))
        else:
            wanted.append((md.uri, Mode.SEQ, "metadata records"))
            wanted.append((md.index_uri, Mode.USER, "metadata hash index"))
        wanted += [(r, Mode.USER, f"metadata replica {i}") for i, r in enumerate(md.replicas)]
    out = []
    for uri, mode, role in wanted:
        parsed = parse_uri(uri)
        if isinstance(parsed, ZdbURI):
            out.append(Namespace(parsed, mode, role))
    return out


async def provision(cfg: Config, admin_password: str | None, wait: float) -> list[str]:
    """Ensure every namespace; retry unreachable servers for up to ``wait`` seconds. One line per namespace."""
    lines = []
    for ns in namespaces(cfg):
        deadline = time.monotonic() + wait
        while True:
            try:
                await ensure_namespace(
                    ns.uri.host,
                    ns.uri.port,
                    ns.uri.namespace,
                    mode=ns.mode,
                    password=ns.uri.password,
                    admin_password=admin_password,
                )
                break
            except BackendUnavailable as exc:
                # Only "cannot connect" is worth a retry (a 0-db still starting); its subclasses
                # (namespace missing after NSNEW, wrong mode) are answers.
                if type(exc) is not BackendUnavailable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        lines.append(f"ok  {ns.uri.redacted}  ({ns.role}, {ns.mode.name.lower()})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.edge.provision", description=__doc__.split("\n")[0])
    parser.add_argument("--config", metavar="FILE", required=True, help="gateway config (YAML)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for 0-db servers to come up")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        lines = asyncio.run(provision(cfg, os.environ.get(ADMIN_ENV) or None, args.wait))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except GridstorError as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines) if lines else "provision: the config names no zdb:// namespace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
