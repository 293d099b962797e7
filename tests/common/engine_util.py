"""Helpers shared by engine tests and benchmarks: pools of real dir backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from services.common.backends import Mode, open_backend
from services.common.engine import BackendPool, Engine, FileRecord


async def make_pool(root: Path, n: int, cooldown: float = 30.0) -> BackendPool:
    """``n`` dir backends named b00, b01, ... under ``root``."""
    backends = {f"b{i:02d}": await open_backend(f"dir://{root}/b{i:02d}", Mode.SEQ) for i in range(n)}
    return BackendPool(backends, cooldown=cooldown)


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


async def corrupt_shard(engine: Engine, record: FileRecord, chunk: int, shard: int) -> None:
    """Flip one byte in the middle of a stored shard, in place on its backend."""
    ref = record.chunks[chunk].shards[shard]
    backend = engine.pool.backends[record.backends[ref.backend]]
    value = await backend.get(ref.key)
    assert value is not None
    flipped = bytearray(value)
    flipped[len(flipped) // 2] ^= 0x40
    await backend.set(ref.key, bytes(flipped))
