"""ingest's health: NOT_SERVING until its store workers report they can store, and while Redis is away."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from services.common.backends.uri import DirURI, parse_uri
from services.common.config import build_config
from services.ingest import service as ingest_service
from services.ingest.service import SERVICE_NAME
from services.meta import service as meta_service
from tests.health import NOT_SERVING, SERVING, HealthWatch
from tests.redis_server import RedisProcess


async def test_health_follows_redis(
    tmp_path: Path, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.common.server")
    raw = {"data_dir": str(tmp_path / "data"), "redis": redis_server.url, "workers": 1}
    meta_running, meta_cleanup = await meta_service.build(build_config(raw), port=0)
    cfg = build_config(raw | {"ports": {"meta": meta_running.port}})
    running, cleanup = await ingest_service.build(cfg, port=0, ready_every=0.2)
    watch = HealthWatch(running.port, SERVICE_NAME)
    try:
        await watch.until(SERVING)  # once the worker process has reported
        redis_server.stop()
        await watch.until(NOT_SERVING)
        assert "ingest not serving: the job queue (redis) is unavailable" in caplog.text
        redis_server.start()  # the same socket and append-only file
        await watch.until(SERVING)
        assert "ingest serving again" in caplog.text
    finally:
        await watch.close()
        await cleanup()
        await meta_cleanup()


async def test_health_follows_what_the_workers_can_reach(tmp_path: Path, redis_server: RedisProcess) -> None:
    """A worker stores a chunk when write_quorum (k+1 = 17) of its shards land on distinct backends.

    With one of the 20 backends gone ingest still serves (degraded writes); with four gone it cannot.
    """
    raw = {"data_dir": str(tmp_path / "data"), "redis": redis_server.url, "workers": 1}
    meta_running, meta_cleanup = await meta_service.build(build_config(raw), port=0)
    cfg = build_config(raw | {"ports": {"meta": meta_running.port}})
    running, cleanup = await ingest_service.build(cfg, port=0, ready_every=0.2)
    watch = HealthWatch(running.port, SERVICE_NAME)
    folders = []
    for spec in cfg.backends[:4]:
        parsed = parse_uri(spec.uri)
        assert isinstance(parsed, DirURI)
        folders.append(Path(parsed.path))
    try:
        await watch.until(SERVING)
        for folder in folders:
            shutil.move(folder, folder.with_name(folder.name + "-away"))
        await watch.until(NOT_SERVING)
        for folder in folders[1:]:  # three back: 19 of 20 take writes, over the quorum of 17
            shutil.move(folder.with_name(folder.name + "-away"), folder)
        await watch.until(SERVING)
        assert watch.seen[-2:] == [NOT_SERVING, SERVING]
    finally:
        await watch.close()
        await cleanup()
        await meta_cleanup()
