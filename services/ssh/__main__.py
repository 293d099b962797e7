"""``python -m services.ssh [--config FILE] [--data DIR]``: run the ssh service (gRPC + SSH server) until SIGTERM."""

from __future__ import annotations

import logging
import sys

from services.common.service_main import service_main
from services.ssh.service import NAME, build


def main(argv: list[str] | None = None) -> int:
    """Serve; 2 for a bad config, 1 when the start fails."""
    # asyncssh logs every channel and SFTP request at INFO; our own log says what matters.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return service_main(NAME, build, argv, description="gridstor ssh service")


if __name__ == "__main__":
    sys.exit(main())
