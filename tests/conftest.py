"""Fixtures for every test: a clean environment, real 0-db and redis servers, a private home."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.launcher_proc import Launcher
from tests.helpers import clear_gridstor_env
from tests.redis_server import RedisProcess
from tests.zdb_server import ZdbProcess, start_zdb

# -- environment -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GRIDSTOR_* variable from the developer's shell changes what a test builds or runs."""
    clear_gridstor_env(monkeypatch)


@pytest.fixture
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and XDG_CONFIG_HOME in a temp dir: the user's real token and config are never touched."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    return home


# -- 0-db --------------------------------------------------------------------


@pytest.fixture
def zdb_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ZdbProcess]]:
    """Start real zdb servers: ``zdb_factory(admin=None, mode=None, datasize=...)``; all stopped after the test.

    Skips the test when no zdb binary is available (see tests/zdb_server.py).
    """
    started: list[ZdbProcess] = []

    def factory(admin: str | None = None, **kwargs: Any) -> ZdbProcess:
        root: Path = tmp_path_factory.mktemp("zdb")
        proc = start_zdb(root, admin, **kwargs)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()
        # zdb fallocates --datasize bytes per namespace: don't leave that in pytest's kept temp dirs.
        shutil.rmtree(proc.root, ignore_errors=True)


@pytest.fixture
def zdb_server(zdb_factory: Callable[..., ZdbProcess]) -> ZdbProcess:
    """A fresh zdb (mixed mode, no admin password) for one test."""
    return zdb_factory()


# -- redis ---------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A fresh redis-server on a unix socket (append-only) for one test."""
    proc = RedisProcess(tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc
    proc.stop()


# -- the launcher ----------------------------------------------------------------


@pytest.fixture
def launched() -> Iterator[list[Launcher]]:
    """Launchers a test started (append them); any still running at the end is killed (its children follow)."""
    started: list[Launcher] = []
    yield started
    for launcher in started:
        launcher.kill()
