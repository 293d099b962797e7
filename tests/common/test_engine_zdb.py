"""The engine over real 0-db backends: 20 namespaces on 5 zdb processes; stop one, then two."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from services.common.backends.base import Backend, Mode
from services.common.backends.zdb import ZdbBackend, ensure_namespace
from services.common.engine import BackendPool, Engine, EngineConfig
from services.common.errors import Unrecoverable
from tests.common.engine_util import collect, corrupt_shard
from tests.zdb_server import ZdbProcess

pytestmark = pytest.mark.zdb

CHUNK = 64 * 1024


async def test_reads_survive_a_stopped_zdb_and_fail_clearly_past_m(zdb_factory: Callable[..., ZdbProcess]) -> None:
    servers = [zdb_factory(datasize=4 * 1024 * 1024) for _ in range(5)]
    backends: dict[str, Backend] = {}
    for s, zdb in enumerate(servers):
        for n in range(4):  # 4 namespaces per server: stopping one server takes m=4 backends away
            ns = f"shards{s}{n}"
            await ensure_namespace(zdb.host, zdb.port, ns, mode=Mode.SEQ)
            backends[ns] = await ZdbBackend.open(zdb.uri(ns), Mode.SEQ, timeout=2.0)
    pool = BackendPool(backends)
    engine = Engine(pool, os.urandom(32), EngineConfig(chunk_size=CHUNK, hedge_after=0.5, shard_timeout=3.0))
    data = os.urandom(3 * CHUNK + 777)
    record = await engine.store([data])
    assert await collect(engine.read(record)) == data

    await corrupt_shard(engine, record, chunk=2, shard=0)  # a flipped byte on a running zdb
    assert await collect(engine.read(record)) == data
    hard = await engine.hard_check(record)
    assert [(c.index, c.corrupt) for c in hard.damaged] == [(2, [0])]
    record, rewritten = await engine.repair(record, hard)
    assert rewritten == 1 and (await engine.hard_check(record)).ok

    servers[1].stop()  # four backends gone
    assert await collect(engine.read(record)) == data
    assert await collect(engine.read(record, CHUNK - 3, CHUNK + 6)) == data[CHUNK - 3 : 2 * CHUNK + 3]
    soft = await engine.soft_check(record)
    assert all(len(c.unreachable) == 4 and not c.missing for c in soft.chunks)  # down, not lost

    servers[2].stop()  # eight gone: more than m
    with pytest.raises(Unrecoverable, match=r"chunk 0 has 12 good shards of 20, needs 16"):
        await collect(engine.read(record))
    await pool.close()
