"""``python -m services.meta [--config FILE] [--data DIR]``: run the meta service until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from services.common.service_main import service_main
from services.meta.service import NAME, build


def main(argv: list[str] | None = None) -> int:
    """Serve; 2 for a bad config, 1 when the start fails."""
    return service_main(NAME, build, argv, description="gridstor meta service", tune=True)


if __name__ == "__main__":
    sys.exit(main())
