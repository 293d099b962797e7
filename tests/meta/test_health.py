"""meta's health follows what it can serve: NOT_SERVING while fewer than k shard backends answer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.common.backends.uri import DirURI, parse_uri
from services.common.config import build_config
from services.meta.service import SERVICE, build
from tests.health import NOT_SERVING, SERVING, HealthWatch
from tests.meta.conftest import CHUNK


def folder(uri: str) -> Path:
    parsed = parse_uri(uri)
    assert isinstance(parsed, DirURI)
    return Path(parsed.path)


async def test_health_follows_the_shard_backends(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.common.server")
    cfg = build_config({"data_dir": str(data_dir), "engine": {"chunk_size": CHUNK}})
    running, cleanup = await build(cfg, port=0, ready_every=0.2)
    watches = [HealthWatch(running.port, SERVICE), HealthWatch(running.port, "")]
    try:
        for w in watches:
            await w.until(SERVING)
        # m + 1 backends gone (their folders moved away): 15 of 20 answer, and reads need 16.
        gone = [folder(spec.uri) for spec in cfg.backends[: cfg.engine.m + 1]]
        for path in gone:
            path.rename(path.with_name(path.name + ".away"))
        for w in watches:
            await w.until(NOT_SERVING)
        assert "meta not serving: 15 of 20 shard backends answer; 16 are needed" in caplog.text
        for path in gone:
            path.with_name(path.name + ".away").rename(path)
        for w in watches:
            await w.until(SERVING)
        assert "meta serving again" in caplog.text
    finally:
        for w in watches:
            await w.close()
        await cleanup()


async def test_health_starts_not_serving_without_enough_backends(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.common.server")
    cfg = build_config({"data_dir": str(data_dir), "engine": {"chunk_size": CHUNK}})
    running, cleanup = await build(cfg, port=0)  # creates the backends
    await cleanup()
    for spec in cfg.backends[: cfg.engine.m + 1]:  # a file where the backend's folder should be
        path = folder(spec.uri)
        path.rename(path.with_name(path.name + ".away"))
        path.write_text("not a folder")
    running, cleanup = await build(cfg, port=0, ready_every=0.2)
    watch = HealthWatch(running.port, SERVICE)
    try:
        await watch.until(NOT_SERVING)
        assert watch.seen == [NOT_SERVING]
        assert "meta not serving yet: 15 of 20 shard backends answer; 16 are needed" in caplog.text
    finally:
        await watch.close()
        await cleanup()
