"""The launcher's two exceptions: a failed start (with its exit code) and a requested stop."""

from __future__ import annotations


class LaunchError(Exception):
    """Starting (or running) the suite failed; the message says what and what to do."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Stop(Exception):
    """A stop was requested (SIGINT / SIGTERM)."""
