"""Fixtures for the ingest service: real meta + ingest servers on port 0, worker processes, real redis."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis
from google.api import httpbody_pb2

from gridstor.v1 import ingest_pb2, ingest_pb2_grpc, meta_pb2, meta_pb2_grpc
from services.common.backends import Mode, open_backend
from services.common.config import Config, build_config
from services.common.metrics import Registry
from services.ingest import service as ingest_service
from services.meta import service as meta_service
from tests.redis_server import RedisProcess

MiB = 1024 * 1024
MESSAGE = 256 * 1024


@dataclass
class Suite:
    cfg: Config
    ingest: ingest_pb2_grpc.IngestServiceAsyncStub
    meta: meta_pb2_grpc.MetaServiceAsyncStub
    redis: aioredis.Redis
    registry: Registry
    ingest_port: int = 0

    @property
    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.cfg.spool_dir))

    async def upload(
        self,
        data: bytes,
        name: str = "file.bin",
        *,
        message: int = MESSAGE,
        declared_size: int | None = None,
        content_type: str = "",
        metadata: Any = None,
    ) -> ingest_pb2.UploadReply:
        return await self.ingest.Upload(
            iter(requests(data, name, message=message, declared_size=declared_size, content_type=content_type)),
            metadata=metadata,
        )

    async def wait(self, job: str, seconds: int = 60) -> ingest_pb2.StatusReply:
        return await self.ingest.Status(ingest_pb2.StatusRequest(job=job, wait=True, timeout_seconds=seconds))

    async def download(self, file_id: str) -> bytes:
        parts = [m.data async for m in self.meta.Download(meta_pb2.DownloadRequest(id=file_id))]
        return b"".join(parts)

    async def shard_count(self) -> int:
        """Shards stored on all backends."""
        total = 0
        for spec in self.cfg.backends:
            backend = await open_backend(spec.uri, Mode.SEQ)
            try:
                total += len([k async for k in backend.scan()])
            finally:
                await backend.close()
        return total

    async def job_hash(self, job: str) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(f"gridstor:job:{job}"))


def requests(
    data: bytes, name: str, *, message: int = MESSAGE, declared_size: int | None = None, content_type: str = ""
) -> list[ingest_pb2.UploadRequest]:
    """An upload stream: the header in the first message, then the bytes."""
    out = []
    for off in range(0, max(len(data), 1), message):
        out.append(ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=data[off : off + message])))
    out[0].name = name
    out[0].content_type = content_type
    if declared_size is not None:
        out[0].declared_size = declared_size
    return out


SuiteFactory = Callable[..., Awaitable[Suite]]


@pytest.fixture
async def suite_factory(tmp_path: Path, redis_server: RedisProcess) -> AsyncIterator[SuiteFactory]:
    """Start meta then ingest (with its worker processes) over 20 dir backends; all stopped afterwards."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(**overrides: Any) -> Suite:
        raw: dict[str, Any] = {
            "data_dir": str(tmp_path / f"data{len(cleanups)}"),
            "redis": redis_server.url,
            "engine": {"chunk_size": "256KiB"},
            "workers": 1,
        }
        raw.update(overrides)
        meta_running, meta_cleanup = await meta_service.build(build_config(raw), port=0)
        cleanups.append(meta_cleanup)
        cfg = build_config(raw | {"ports": {"meta": meta_running.port}})
        registry = Registry()
        running, cleanup = await ingest_service.build(cfg, port=0, registry=registry)
        cleanups.append(cleanup)
        ch_ingest = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        ch_meta = grpc.aio.insecure_channel(f"127.0.0.1:{meta_running.port}")
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)

        async def close_clients() -> None:
            await ch_ingest.close(None)
            await ch_meta.close(None)
            await client.aclose()

        cleanups.append(close_clients)
        return Suite(
            cfg,
            ingest_pb2_grpc.IngestServiceStub(ch_ingest),
            meta_pb2_grpc.MetaServiceStub(ch_meta),
            client,
            registry,
            running.port,
        )

    yield start
    for fn in reversed(cleanups):
        with contextlib.suppress(Exception):
            await fn()
