"""Fixtures for the meta service: real meta servers on port 0 over 20 dir backends in tmp_path."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.api import httpbody_pb2

from gridstor.v1 import meta_pb2, meta_pb2_grpc
from services.common import rpc
from services.common.config import build_config
from services.common.engine import Engine, FileRecord
from services.common.gateway import open_engine
from services.common.keys import signing_key
from services.meta.service import build
from tests.helpers import Served

CHUNK = 256 * 1024  # small engine chunks keep the tests fast and give many chunks per file
MiB = 1024 * 1024


@dataclass
class Fetched:
    """One Download call: its initial metadata and every message."""

    headers: dict[str, str]
    messages: list[httpbody_pb2.HttpBody]

    @property
    def data(self) -> bytes:
        return b"".join(m.data for m in self.messages)


@dataclass
class MetaServer(Served):
    """A meta server under test (tests.helpers.Served), its stub, and the test's own engine."""

    engine: Engine  # the test's own engine over the same backends, to store files in-process
    auth: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def stub(self) -> meta_pb2_grpc.MetaServiceAsyncStub:
        return meta_pb2_grpc.MetaServiceStub(self.channel)

    async def stop(self) -> None:
        if not self.stopped:
            await super().stop()
            await self.engine.pool.close()

    async def put(self, record: FileRecord) -> meta_pb2.PutRecordReply:
        return await self.stub.PutRecord(meta_pb2.PutRecordRequest(record=record), metadata=self.auth)

    async def store(self, data: bytes, ext: str = "", content_type: str = "") -> str:
        """Store ``data`` through the engine in-process, register it over gRPC; return its file id."""
        record = await self.engine.store(
            [data[i : i + 100_000] for i in range(0, len(data), 100_000)], ext=ext, content_type=content_type
        )
        reply = await self.put(record)
        assert not reply.deduplicated
        return reply.file_id

    async def fetch(self, file_id: str, offset: int = 0, length: int = 0, **kw: Any) -> Fetched:
        call = self.stub.Download(meta_pb2.DownloadRequest(id=file_id, offset=offset, length=length, **kw))
        messages = [m async for m in call]
        headers = {k: v for k, v in (await call.initial_metadata()) if isinstance(v, str)}
        return Fetched(headers, messages)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "gateway"


@pytest.fixture
async def start_meta(data_dir: Path) -> AsyncIterator[Callable[..., Awaitable[MetaServer]]]:
    """``await start_meta(**settings)``: a meta server on port 0 over ``data_dir``; all stopped afterwards."""
    started: list[MetaServer] = []

    async def start(**settings: Any) -> MetaServer:
        raw = {"data_dir": str(data_dir), "engine": {"chunk_size": CHUNK}, **settings}
        cfg = build_config(raw)
        token = rpc.service_token(signing_key(cfg.data_dir), "ingest")
        server = await MetaServer.start(
            build, cfg, engine=await open_engine(cfg), auth=(("authorization", "Bearer " + token),)
        )
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


@pytest.fixture
async def meta(start_meta: Callable[..., Awaitable[MetaServer]]) -> MetaServer:
    """A meta server with the default (embedded) config."""
    return await start_meta()
