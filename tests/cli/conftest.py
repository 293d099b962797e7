"""Fixtures for the CLI tests: every test runs with a private home (the user's real token is never touched)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def home(private_home: Path) -> Path:
    """tests/conftest.py's private_home, for every test here."""
    return private_home
