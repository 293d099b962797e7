"""A backend unreachable at start does not stop the gateway; it is retried on use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.backends.lazy import LazyBackend
from services.common.config import build_config
from services.common.engine import Engine
from services.common.errors import BackendUnavailable
from services.common.gateway import open_pool
from tests.common.engine_util import collect


async def test_pool_opens_with_a_backend_down_and_picks_it_up_later(tmp_path: Path) -> None:
    backends = [f"dir://{tmp_path}/disk{i}/shards" for i in range(21)]
    for i in range(20):
        (tmp_path / f"disk{i}").mkdir()  # disk20 is "not mounted": its parent folder is missing
    cfg = build_config({"data_dir": str(tmp_path / "data"), "backends": backends, "engine": {"chunk_size": "64KiB"}})
    pool = await open_pool(cfg)
    lazy = pool.backends["b20"]
    assert isinstance(lazy, LazyBackend)
    with pytest.raises(BackendUnavailable, match="unreachable since the gateway started"):
        await lazy.get(b"\0" * 8)

    engine = Engine(pool, os.urandom(32), cfg.engine)
    data = os.urandom(300_000)
    record = await engine.store([data])  # placed on the 20 reachable backends
    assert "b20" not in record.backends
    assert await collect(engine.read(record)) == data

    (tmp_path / "disk20").mkdir()  # the disk is mounted now
    lazy._next_try = 0.0  # skip the retry delay
    key = await lazy.put(b"back")
    assert await lazy.get(key) == b"back"
    assert lazy.batch_target() is lazy._inner  # now a real dir backend: batched writes go its way
    await pool.close()


async def test_a_malformed_uri_still_fails_the_start(tmp_path: Path) -> None:
    from services.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"backends\[3\]"):
        build_config({"data_dir": str(tmp_path), "backends": [f"dir://{tmp_path}/b{i}" for i in range(3)] + ["x"]})
