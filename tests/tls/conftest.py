"""Fixtures for the TLS tests: every test runs with a private home (the CLI's token and config stay there)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def home(private_home: Path) -> Path:
    """tests/conftest.py's private_home, for every test here."""
    return private_home
