"""Fixtures for the CLI tests: a clean environment and a private config home per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GRIDSTOR_* variable leaks in, and ~/.config is a temp dir (the user's real token is never touched)."""
    for name in list(os.environ):
        if name.startswith("GRIDSTOR_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    return home
