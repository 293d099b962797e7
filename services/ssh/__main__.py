"""``python -m services.ssh [--config FILE] [--data DIR]``: run the ssh service (gRPC + SSH server) until SIGTERM."""

from __future__ import annotations

import logging
import sys

from services.common.service_main import service_main
from services.ssh.service import NAME, build
from services.ssh.settings import SshSettings


def main(argv: list[str] | None = None) -> int:
    """Serve; 2 for a bad config, 1 when the start fails."""
    # asyncssh logs every channel and SFTP request at INFO; our own log says what matters.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # SshSettings.from_config: a bad GRIDSTOR_SSH_* value stops the start with its message.
    return service_main(NAME, build, argv, description="gridstor ssh service", check=SshSettings.from_config)


if __name__ == "__main__":
    sys.exit(main())
