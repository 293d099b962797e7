"""The ``gridstor`` command-line client: ``gridstor COMMAND ...`` == ``python -m services.cli COMMAND ...``."""

from services.cli.app import main

__all__ = ["main"]
