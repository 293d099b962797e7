"""``python -m services.launcher --data DIR [--config FILE]`` (``make up``)."""

from __future__ import annotations

import sys

from services.launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
