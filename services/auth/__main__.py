"""``python -m services.auth [--config FILE] [--data DIR] [--log-level LEVEL]``: run the auth service."""

from __future__ import annotations

import sys

from services.auth.service import build
from services.common.service_main import service_main


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; 2 for a bad config or key file."""
    return service_main("auth", build, argv, description="gridstor auth service")


if __name__ == "__main__":
    sys.exit(main())
