"""Settings of the ssh service: the config's ssh_* fields, overridable from the environment:

* ``GRIDSTOR_SSH_PORT``        SSH listen port (default 2222)
* ``GRIDSTOR_SSH_HOST``        SSH listen address (default: the config's listen_host)
* ``GRIDSTOR_HOMES_DIR``       where homes live (default ``DATA/homes``)
* ``GRIDSTOR_SSH_DEFAULT_MAX`` a home's size when EnableAccount says 0 (default 1GiB; sizes like 500MB)
* ``GRIDSTOR_RRSYNC``          rsync's restricted wrapper (default: found, see ``find_rrsync``)

The environment wins over the config, as for the other GRIDSTOR_* overrides.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from services.common.config import Config, ConfigError, parse_size

log = logging.getLogger(__name__)

# Debian 12's rsync ships rrsync as /usr/bin/rrsync; older packages kept it (gzipped) among the docs.
RRSYNC_CANDIDATES = (
    "/usr/bin/rrsync",
    "/usr/share/doc/rsync/scripts/rrsync",
    "/usr/share/doc/rsync/scripts/rrsync.gz",
)
RSYNC = "/usr/bin/rsync"  # the path rrsync itself runs


@dataclass(frozen=True)
class SshSettings:
    """Where the ssh service listens and keeps its homes and state."""

    port: int
    listen_host: str
    homes_dir: Path
    state_dir: Path  # accounts, host key, pending removals
    default_max_bytes: int
    rrsync: str  # "" = find it

    @classmethod
    def from_config(cls, cfg: Config) -> SshSettings:
        """The settings for ``cfg``; the GRIDSTOR_* environment overrides win, ConfigError names a bad value."""
        env = os.environ
        port_raw = env.get("GRIDSTOR_SSH_PORT")
        port = cfg.ssh_port
        if port_raw:
            try:
                port = int(port_raw)
            except ValueError:
                raise ConfigError(f"GRIDSTOR_SSH_PORT: expected a port number, got {port_raw!r}") from None
            if not 0 <= port <= 65535:
                raise ConfigError(f"GRIDSTOR_SSH_PORT: must be between 0 and 65535, got {port}")
        host = env.get("GRIDSTOR_SSH_HOST") or cfg.ssh_listen_host or cfg.listen_host
        homes = env.get("GRIDSTOR_HOMES_DIR") or cfg.homes_dir or cfg.data_dir / "homes"
        max_raw = env.get("GRIDSTOR_SSH_DEFAULT_MAX")
        default_max = cfg.ssh_default_max_size if max_raw is None else parse_size(max_raw, "GRIDSTOR_SSH_DEFAULT_MAX")
        if default_max <= 0:
            raise ConfigError("ssh_default_max_size: must be more than 0 bytes")
        return cls(
            port=port,
            listen_host=str(host),
            homes_dir=Path(homes).expanduser().absolute(),
            state_dir=cfg.data_dir / "ssh",
            default_max_bytes=default_max,
            rrsync=env.get("GRIDSTOR_RRSYNC") or cfg.rrsync,
        )


def find_rrsync(configured: str, state_dir: Path) -> Path | None:
    """rsync's restricted wrapper (a version with ``-munge``), or None with the reason logged."""
    candidates = [configured] if configured else list(RRSYNC_CANDIDATES)
    for cand in candidates:
        path = Path(cand)
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if path.suffix == ".gz":
            data = gzip.decompress(data)
            path = state_dir / "rrsync"
            if not path.exists() or path.read_bytes() != data:
                tmp = path.with_name(".rrsync.tmp")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
        if b"-munge" not in data:
            log.error("rrsync at %s is too old (no -munge option); rsync over ssh is disabled", cand)
            return None
        if not os.access(path, os.X_OK):
            log.error("rrsync at %s is not executable; rsync over ssh is disabled", path)
            return None
        if not os.access(RSYNC, os.X_OK):
            log.error("%s is missing (install Debian's rsync); rsync over ssh is disabled", RSYNC)
            return None
        return path
    where = configured or ", ".join(RRSYNC_CANDIDATES)
    log.error("rrsync not found (looked at %s); install Debian's rsync; rsync over ssh is disabled", where)
    return None
