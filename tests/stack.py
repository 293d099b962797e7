"""meta + ingest (with its store worker processes) + maint over one real redis, in-process on free ports.

For the fault tests that need the whole write path and maint together: degraded uploads and the repair
queue, orphans of killed workers, metadata outages. meta can be stopped and started again on the same
port (an outage), maint runs with or without its schedules::

    stack = await Stack.start(tmp_path, redis_server, backends=..., maint={"orphan_grace": 0})
    job = await stack.upload(data)
    ...
    await stack.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis

from gridstor.v1 import ingest_pb2, ingest_pb2_grpc, maint_pb2, maint_pb2_grpc, meta_pb2, meta_pb2_grpc
from services.common.backends import Mode, open_backend
from services.common.config import Config, build_config
from services.common.engine import FileRecord
from services.common.gateway import service_metadata
from services.common.jobs import WORKER_PREFIX
from services.common.metrics import Registry
from services.ingest import service as ingest_service
from services.maint import service as maint_service
from services.meta import service as meta_service
from tests.helpers import Served, free_port, wait_until_async
from tests.ingest.conftest import requests
from tests.maint.conftest import dir_backends as maint_dir_backends
from tests.maint.conftest import names, operator_channel
from tests.redis_server import RedisProcess

# Deadlines on the stack's own calls: a call or a stop that never ends fails its test with the call named,
# instead of holding the whole run (a hang once seen in a full run was never reproduced alone).
RPC_DEADLINE = 120.0  # seconds (a Status with wait gets its wait on top)
STOP_DEADLINE = 60.0
CHUNK = "64KiB"
QUIET_MAINT = {
    "scrub_interval": 0,
    "cleanup_interval": 0,
    "backup_interval": 0,
    "orphan_interval": 0,
    "scrub_files_per_second": 10000,
    "scrub_bytes_per_second": "10GB",
}


@dataclasses.dataclass
class Stack:
    """The three services over ``cfg``; see the module docstring."""

    cfg: Config
    redis: aioredis.Redis
    meta_port: int
    ingest_registry: Registry
    maint_registry: Registry
    schedules: bool
    meta: Served | None = None
    ingest: Served | None = None
    maint: Served | None = None
    _channels: list[grpc.aio.Channel] = dataclasses.field(default_factory=list)
    _admin: maint_pb2_grpc.MaintServiceAsyncStub | None = None

    @classmethod
    async def start(
        cls,
        tmp_path: Path,
        redis_server: RedisProcess,
        *,
        backends: Sequence[Any] | None = None,
        maint: dict[str, Any] | None = None,
        schedules: bool = True,
        **settings: Any,
    ) -> Stack:
        raw: dict[str, Any] = {
            "data_dir": str(tmp_path / "gw"),
            "redis": redis_server.url,
            "engine": {"chunk_size": CHUNK, "hedge_after": 0.5},
            "workers": 1,
            "maint": {**QUIET_MAINT, **(maint or {})},
            "ports": {"meta": free_port()},
            **settings,
        }
        if backends is not None:
            raw["backends"] = list(backends)
        cfg = build_config(raw)
        stack = cls(
            cfg,
            aioredis.Redis.from_url(redis_server.url, decode_responses=True),
            cfg.ports["meta"],
            Registry(),
            Registry(),
            schedules,
        )
        try:
            await stack._start_services()
        except BaseException:
            await stack.stop()  # whatever did start: a test failing here must not leave worker processes
            raise
        return stack

    async def _start_services(self) -> None:
        stack, cfg, schedules = self, self.cfg, self.schedules
        await stack.start_meta()
        stack.ingest = await Served.start(ingest_service.build, cfg, registry=stack.ingest_registry)
        # The store workers open the backends as they start (a dir backend creates a missing folder then):
        # wait until one reports, so a test that takes a backend away afterwards finds it taken away.
        await wait_until_async(lambda: stack.redis.keys(WORKER_PREFIX + "*"), "a store worker to report", within=60)
        stack.maint = await Served.start(
            maint_service.build, cfg, registry=stack.maint_registry, options={"schedules": schedules}
        )
        admin = operator_channel(cfg, stack.maint.port)
        stack._channels.append(admin)
        stack._admin = maint_pb2_grpc.MaintServiceStub(admin)

    async def start_meta(self) -> None:
        """Start meta (again) on its port."""
        self.meta = await Served.start(meta_service.build, self.cfg, port=self.meta_port)

    async def stop_meta(self) -> None:
        if self.meta is not None:
            await self.meta.stop()
            self.meta = None

    async def stop(self) -> None:
        for served in (self.maint, self.ingest, self.meta):
            if served is not None:
                async with asyncio.timeout(STOP_DEADLINE):  # a service that does not stop fails the test, not CI
                    await served.stop()
        for ch in self._channels:
            await ch.close(None)
        await self.redis.aclose()

    @property
    def maint_port(self) -> int:
        assert self.maint is not None
        return self.maint.port

    # -- stubs ---------------------------------------------------------------------------------------------

    @property
    def ingest_stub(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        assert self.ingest is not None
        return ingest_pb2_grpc.IngestServiceStub(self.ingest.channel)

    @property
    def meta_stub(self) -> meta_pb2_grpc.MetaServiceAsyncStub:
        assert self.meta is not None
        return meta_pb2_grpc.MetaServiceStub(self.meta.channel)

    @property
    def maint_stub(self) -> maint_pb2_grpc.MaintServiceAsyncStub:
        assert self.maint is not None
        return maint_pb2_grpc.MaintServiceStub(self.maint.channel)

    @property
    def admin(self) -> maint_pb2_grpc.MaintServiceAsyncStub:
        assert self._admin is not None, "the stack has not started"
        return self._admin

    @property
    def internal(self) -> tuple[tuple[str, str], ...]:
        return service_metadata(self.cfg, "ingest")

    # -- the write path ------------------------------------------------------------------------------------

    async def upload(self, data: bytes, name: str = "file.bin") -> str:
        """Upload ``data``; its job id."""
        reply = await self.ingest_stub.Upload(iter(requests(data, name)), timeout=RPC_DEADLINE)
        return reply.job

    async def status(self, job: str, *, wait: int = 0) -> ingest_pb2.StatusReply:
        request = ingest_pb2.StatusRequest(job=job, wait=bool(wait), timeout_seconds=wait)
        return await self.ingest_stub.Status(request, timeout=wait + RPC_DEADLINE)

    async def stored(self, data: bytes, name: str = "file.bin") -> str:
        """Upload ``data`` and wait for its job to end DONE; the file id."""
        job = await self.upload(data, name)
        status = await self.status(job, wait=120)
        assert status.result == status.file_id and status.file_id, status
        return status.file_id

    async def download(self, file_id: str) -> bytes:
        call = self.meta_stub.Download(meta_pb2.DownloadRequest(id=file_id), timeout=RPC_DEADLINE)
        return b"".join([m.data async for m in call])

    async def record(self, file_id: str) -> FileRecord:
        reply = await self.meta_stub.GetRecord(meta_pb2.GetRecordRequest(id=file_id), metadata=self.internal)
        return reply.record

    async def check(self, file_id: str, *, hard: bool = False) -> maint_pb2.CheckReply:
        return await self.maint_stub.Check(maint_pb2.CheckRequest(id=file_id, soft=not hard))

    async def collect_orphans(self, *, dry_run: bool = False) -> maint_pb2.OrphanProgress:
        """Run one orphan collection to its end; its counters."""
        reply = await self.admin.CollectOrphans(maint_pb2.CollectOrphansRequest(dry_run=dry_run))
        assert reply.started

        async def progress() -> maint_pb2.OrphanProgress:
            return (await self.maint_stub.OrphanStatus(maint_pb2.OrphanStatusRequest())).progress

        ended: maint_pb2.OrphanProgress = await wait_until_async(
            progress, "the orphan collection to end", until=lambda p: p.state == maint_pb2.SCRUB_STATE_IDLE, within=120
        )
        return ended

    async def keys(self, *, markers: bool = False) -> dict[str, set[bytes]]:
        """Every key each shard backend holds, identity markers left out (``markers``: only those; none for dir)."""
        out: dict[str, set[bytes]] = {}
        for spec in self.cfg.backends:
            backend = await open_backend(spec.uri, Mode.SEQ, marked=True)
            try:
                marker = backend.marker_key
                out[spec.name] = {k async for k in backend.scan() if (k == marker) == markers}
            finally:
                await backend.close()
        return out

    async def referenced(self) -> dict[str, set[bytes]]:
        """Every key the records reference, per backend (by listing them at meta)."""
        out: dict[str, set[bytes]] = {spec.name: set() for spec in self.cfg.backends}
        request = meta_pb2.ListRecordsRequest()
        async for reply in self.meta_stub.ListRecords(request, metadata=self.internal):
            r = reply.record
            for chunk in r.chunks:
                for s in chunk.shards:
                    if not s.unwritten:
                        out.setdefault(r.backends[s.backend], set()).add(bytes(s.key))
        return out


def dir_backends(root: Path, n: int = 20) -> list[dict[str, str]]:
    """``n`` dir backends b00.. under ``root`` (made here: a dir backend creates its folder, not the parent)."""
    root.mkdir(parents=True, exist_ok=True)
    return maint_dir_backends(root, names(n))


def move_away(root: Path, names: Sequence[str]) -> None:
    """Take dir backends away (a disk gone) by renaming their folders."""
    for name in names:
        os.rename(root / name, root / f"{name}-away")


def put_back(root: Path, names: Sequence[str]) -> None:
    for name in names:
        os.rename(root / f"{name}-away", root / name)
