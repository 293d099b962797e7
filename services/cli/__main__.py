"""``python -m services.cli`` (installed as ``gridstor``)."""

import sys

from services.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
