"""``python -m services.ingest [--config FILE] [--data DIR] [--log-level LEVEL]``: run the ingest service.

The service spawns its store workers (``python -m services.ingest.worker``) itself.
"""

from __future__ import annotations

import sys

from services.common.service_main import service_main
from services.ingest.service import build
from services.ingest.worker import claim_idle_ms


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    # tune: upload messages (256 KiB) held for a spool batch would each be a fresh mmap without it
    # (measured 370 -> 510-550 MB/s received on 100 MiB uploads). claim_idle_ms: a bad
    # GRIDSTOR_CLAIM_IDLE_MS stops the start here, not in every worker.
    return service_main(
        "ingest", build, argv, description="gridstor ingest service", tune=True, check=lambda _: claim_idle_ms()
    )


if __name__ == "__main__":
    sys.exit(main())
