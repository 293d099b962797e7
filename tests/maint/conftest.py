"""Fixtures for maint: a real meta and a real maint server (port 0) per gateway, dir or 0-db backends."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
import yaml

from gridstor.v1 import maint_pb2, maint_pb2_grpc, meta_pb2, meta_pb2_grpc
from services.cli.app import main
from services.common import rpc
from services.common.backends import Mode, open_backend
from services.common.backends.base import SEQ_KEY_SIZE
from services.common.config import DEFAULT_PORTS, Config, build_config
from services.common.engine import Engine, FileRecord
from services.common.gateway import ensure_local_dirs, open_engine
from services.common.keys import MASTER_KEY_FILE, SIGNING_KEY_FILE, signing_key
from services.common.metrics import Registry
from services.maint import service as maint_service
from services.meta import service as meta_service
from tests.helpers import Served, wait_until_async

CHUNK = 64 * 1024  # k=16: 4 KiB shards, several chunks per file, fast tests
FAST_MAINT = {
    "scrub_interval": 0,
    "cleanup_interval": 0,
    "backup_interval": 0,
    "scrub_files_per_second": 10000,
    "scrub_bytes_per_second": "10GB",
}


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Adds ``authorization: Bearer <token>`` to every unary call of a channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self.token}")]
        details = details._replace(metadata=metadata)
        return await continuation(details, request)


def operator_channel(cfg: Config, port: int) -> grpc.aio.Channel:
    """A channel to maint on ``port`` with an operator's token: Repair, Scrub ... need one even in public mode."""
    token = rpc.admin_token(signing_key(cfg.data_dir), "tests")
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[BearerToken(token)])  # type: ignore[list-item]


def raw_config(data_dir: Path, *, backends: Sequence[Any] | None = None, **settings: Any) -> dict[str, Any]:
    """The settings of ``gateway_config`` as a YAML-ready mapping."""
    raw: dict[str, Any] = {
        "data_dir": str(data_dir),
        "engine": {"chunk_size": CHUNK, "backend_cooldown": 1.0},
        "maint": dict(FAST_MAINT),
        **settings,
    }
    if backends is not None:
        raw["backends"] = list(backends)
    return raw


def gateway_config(data_dir: Path, *, backends: Sequence[Any] | None = None, **settings: Any) -> Config:
    """A gateway config over ``data_dir`` with small chunks and no background schedules."""
    return build_config(raw_config(data_dir, backends=backends, **settings))


def dir_backends(root: Path, names: Sequence[str]) -> list[dict[str, str]]:
    return [{"name": n, "uri": f"dir://{root}/{n}"} for n in names]


def names(n: int, start: int = 0) -> list[str]:
    return [f"b{i:02d}" for i in range(start, start + n)]


@dataclass
class Gateway:
    """meta + maint of one gateway, with clients and the test's own engine over the same backends."""

    cfg: Config
    engine: Engine
    registry: Registry = field(default_factory=Registry)
    meta_port: int = 0
    maint_port: int = 0
    _meta: Served | None = None
    _maint: Served | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    meta: meta_pb2_grpc.MetaServiceAsyncStub | None = None
    maint: maint_pb2_grpc.MaintServiceAsyncStub | None = None
    _admin: maint_pb2_grpc.MaintServiceAsyncStub | None = None

    @property
    def admin(self) -> maint_pb2_grpc.MaintServiceAsyncStub:
        """MaintService with an operator's token on every call (start_maint first)."""
        assert self._admin is not None, "start maint first"
        return self._admin

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer " + rpc.service_token(signing_key(self.cfg.data_dir), "ingest")),)

    async def start_meta(self) -> None:
        """Start meta (again on its earlier port, if it ran before)."""
        self._meta = await Served.start(meta_service.build, self.cfg, port=self.meta_port)
        self.meta_port = self._meta.port
        self.meta = meta_pb2_grpc.MetaServiceStub(self._meta.channel)

    async def stop_meta(self) -> None:
        if self._meta is not None:
            await self._meta.stop()
            self._meta = None

    async def start_maint(self) -> None:
        assert self.meta_port, "start meta first: maint needs its address"
        cfg = dataclasses.replace(self.cfg, ports={**self.cfg.ports, "meta": self.meta_port})
        self._maint = await Served.start(maint_service.build, cfg, registry=self.registry, options={"schedules": False})
        self.maint_port = self._maint.port
        self.maint = maint_pb2_grpc.MaintServiceStub(self._maint.channel)
        ach = operator_channel(self.cfg, self.maint_port)
        self._channels.append(ach)
        self._admin = maint_pb2_grpc.MaintServiceStub(ach)

    async def stop(self) -> None:
        if self._maint is not None:
            await self._maint.stop()
            self._maint = None
        await self.stop_meta()
        for ch in self._channels:
            await ch.close(None)
        await self.engine.pool.close()

    # -- files ----------------------------------------------------------------------

    async def store(self, data: bytes, ext: str = ".bin", engine: Engine | None = None) -> str:
        """Store ``data`` with ``engine`` (default: the gateway's), register it with meta; the file id."""
        record = await (engine or self.engine).store(
            [data[i : i + 50_000] for i in range(0, len(data), 50_000)], ext=ext
        )
        assert self.meta is not None
        reply = await self.meta.PutRecord(meta_pb2.PutRecordRequest(record=record), metadata=self.auth)
        assert not reply.deduplicated
        return reply.file_id

    async def fetch(self, file_id: str) -> bytes:
        assert self.meta is not None
        return b"".join([m.data async for m in self.meta.Download(meta_pb2.DownloadRequest(id=file_id))])

    async def record(self, file_id: str) -> FileRecord:
        assert self.meta is not None
        return (await self.meta.GetRecord(meta_pb2.GetRecordRequest(id=file_id), metadata=self.auth)).record

    async def scrub(self, *, hard: bool = False, dry_run: bool = False) -> maint_pb2.ScrubProgress:
        """Run one scrub pass to its end; its final counters."""
        assert self.maint is not None
        reply = await self.admin.Scrub(maint_pb2.ScrubRequest(hard=hard, dry_run=dry_run))
        assert reply.started
        return await self.scrub_ended()

    async def scrub_ended(self) -> maint_pb2.ScrubProgress:
        """Wait until no scrub pass runs; the last pass's counters."""

        async def progress() -> maint_pb2.ScrubProgress:
            assert self.maint is not None
            return (await self.maint.ScrubStatus(maint_pb2.ScrubStatusRequest())).progress

        ended: maint_pb2.ScrubProgress = await wait_until_async(
            progress, "the scrub pass to end", until=lambda p: p.state == maint_pb2.SCRUB_STATE_IDLE, within=120
        )
        return ended

    async def check(self, file_id: str, *, hard: bool = False) -> maint_pb2.CheckReply:
        assert self.maint is not None
        return await self.maint.Check(maint_pb2.CheckRequest(id=file_id, soft=not hard))


async def delete_shard(engine: Engine, record: FileRecord, chunk: int, shard: int) -> None:
    ref = record.chunks[chunk].shards[shard]
    await engine.pool.backends[record.backends[ref.backend]].delete(ref.key)


def shard_backends(record: FileRecord) -> set[str]:
    """Every backend a record's shards are on."""
    return {record.backends[s.backend] for c in record.chunks for s in c.shards}


def copy_keys(src: Path, dst: Path) -> None:
    """Give another gateway the same master and signing keys (a replica gateway must decrypt the files)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MASTER_KEY_FILE, SIGNING_KEY_FILE):
        shutil.copy2(src / name, dst / name)
        os.chmod(dst / name, 0o600)


async def stored_values(uri: str, mode: Mode, *, key_size: int | None = None) -> dict[int, bytes]:
    """Every value a backend holds, by its key read as a little-endian id (only keys of ``key_size`` bytes if given)."""
    backend = await open_backend(uri, mode)
    try:
        out: dict[int, bytes] = {}
        async for key in backend.scan():
            if key_size is None or len(key) == key_size:
                value = await backend.get(key)
                assert value is not None
                out[int.from_bytes(key, "little")] = value
        return out
    finally:
        await backend.close()


async def raw_records(cfg: Config) -> dict[int, bytes]:
    """The stored values of the master records namespace, by id (read directly)."""
    assert cfg.metadata is not None
    return await stored_values(cfg.metadata.uri, Mode.SEQ)


async def replica_records(uri: str) -> dict[int, bytes]:
    """A metadata replica's records by id (read directly; its cursor left out)."""
    return await stored_values(uri, Mode.USER, key_size=SEQ_KEY_SIZE)


class HasPorts(Protocol):
    @property
    def meta_port(self) -> int: ...
    @property
    def maint_port(self) -> int: ...


async def gridstor(gw: HasPorts, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run the CLI (in a thread: it makes blocking calls to servers on this loop); (exit code, stdout, stderr)."""
    config = tmp_path / "cli.yaml"
    ports = {**DEFAULT_PORTS, "meta": gw.meta_port, "maint": gw.maint_port}
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "cli-data"), "ports": ports}))
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, [*args, "--config", str(config)], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def gateways() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """``await gateways(cfg, meta=True, maint=True)``: a gateway over ``cfg``; all stopped afterwards."""
    started: list[Gateway] = []

    async def make(cfg: Config, *, meta: bool = True, maint: bool = True) -> Gateway:
        ensure_local_dirs(cfg)
        gw = Gateway(cfg, await open_engine(cfg))
        started.append(gw)
        if meta:
            await gw.start_meta()
        if maint:
            await gw.start_maint()
        return gw

    yield make
    for gw in reversed(started):
        await gw.stop()
