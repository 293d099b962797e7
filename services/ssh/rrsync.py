"""rsync's restricted wrapper (rrsync) for rsync over SSH: the configured one (``ssh.rrsync``) or one found here."""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Debian 12's rsync ships rrsync as /usr/bin/rrsync; older packages kept it (gzipped) among the docs.
RRSYNC_CANDIDATES = (
    "/usr/bin/rrsync",
    "/usr/share/doc/rsync/scripts/rrsync",
    "/usr/share/doc/rsync/scripts/rrsync.gz",
)
RSYNC = "/usr/bin/rsync"  # the path rrsync itself runs


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
