"""The engine over real 0-db backends: 20 namespaces on 5 zdb processes (stop one, then two); a hung one."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.backends import open_backend
from services.common.backends.base import Backend, Mode
from services.common.backends.pool import State
from services.common.backends.zdb import ZdbBackend, ensure_namespace
from services.common.engine import BackendPool, Engine, EngineConfig, unwritten_shards
from services.common.errors import StoreFailed, Unrecoverable
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

    # Writes with a whole 4-namespace node down: below the default quorum (k+1 = 17) they fail clean;
    # an operator who lowered write_quorum to k keeps writing, with no margin left until repair.
    with pytest.raises(StoreFailed, match="16 of 20 shards written, write_quorum is 17"):
        await engine.store([os.urandom(CHUNK)])
    at_k = Engine(pool, engine._master_key, dataclasses.replace(engine.config, write_quorum=16))
    more = os.urandom(2 * CHUNK + 1)
    degraded = await at_k.store([more])
    assert unwritten_shards(degraded) == 4 * len(degraded.chunks)
    assert await collect(at_k.read(degraded)) == more

    servers[2].stop()  # eight gone: more than m
    with pytest.raises(Unrecoverable, match=r"chunk 0 has 12 good shards of 20, needs 16"):
        await collect(engine.read(record))

    for server in servers[1:3]:  # both nodes come back: their namespaces answer probes again
        server.start()
    assert all([await pool.probe(name) for name in pool.names])
    assert await collect(engine.read(record)) == data
    repaired, n = await engine.repair(degraded, await engine.soft_check(degraded))
    assert n == 4 * len(degraded.chunks) and unwritten_shards(repaired) == 0
    assert (await engine.hard_check(repaired)).ok
    await pool.close()


async def test_a_hung_zdb_is_skipped_for_writes_and_reads(
    tmp_path: Path, zdb_factory: Callable[..., ZdbProcess]
) -> None:
    """A stopped 0-db (SIGSTOP: the kernel accepts connections, nothing answers) among 19 dir backends.

    Writes: the first puts time out, its breaker opens, its shard of each chunk is left unwritten (20
    backends, k+m = 20: nowhere else to go), the upload succeeds. Reads: a data shard on it is skipped up
    front (parity instead), without waiting hedge_after per chunk. Resumed, a probe closes its breaker and
    a repair writes the missing shards onto it.
    """
    zdb = zdb_factory(datasize=8 * 1024 * 1024)
    await ensure_namespace(zdb.host, zdb.port, "hung", mode=Mode.SEQ)
    backends: dict[str, Backend] = {
        f"b{i:02d}": await open_backend(f"dir://{tmp_path}/b{i:02d}", Mode.SEQ) for i in range(19)
    }
    backends["zdb"] = await ZdbBackend.open(zdb.uri("hung"), Mode.SEQ, timeout=1.0, marked=True)
    pool = BackendPool(backends)
    engine = Engine(pool, os.urandom(32), EngineConfig(chunk_size=CHUNK, hedge_after=0.2, shard_timeout=5.0))
    data = os.urandom(24 * CHUNK)
    for _ in range(20):  # a file keeps one placement for all chunks: find one with a data shard on the zdb
        record = await engine.store([data])
        shards = record.chunks[0].shards
        if any(record.backends[s.backend] == "zdb" for s in shards[:16]):
            break
        await engine.delete_shards(record)
    else:
        pytest.fail("no placement put a data shard on the zdb")

    zdb.pause()
    try:
        written = os.urandom(10 * CHUNK)
        degraded = await engine.store([written])  # the puts to the stopped server time out: its breaker opens
        breaker = pool.breaker("zdb")
        assert breaker.state is not State.CLOSED and breaker.opened == 1
        assert [sum(s.unwritten for s in c.shards) for c in degraded.chunks] == [1] * len(degraded.chunks)
        assert "zdb" not in {degraded.backends[s.backend] for c in degraded.chunks for s in c.shards if not s.unwritten}
        assert await collect(engine.read(record)) == data  # its data shards come from parity
        assert await collect(engine.read(degraded)) == written
        assert breaker.opened == 1, "the breaker stayed open: no read waited on the stopped server"
        soft = await engine.soft_check(record)
        assert soft.unreachable_backends == {"zdb"} and not soft.unrecoverable and not soft.unreadable
    finally:
        zdb.resume()
    assert await pool.probe("zdb")
    repaired, n = await engine.repair(degraded, await engine.soft_check(degraded))
    assert n == len(degraded.chunks) and (await engine.soft_check(repaired)).ok
    assert {repaired.backends[c.shards[si].backend] for c in repaired.chunks for si in range(20)} >= {"zdb"}
    assert await collect(engine.read(repaired)) == written
    await pool.close()
