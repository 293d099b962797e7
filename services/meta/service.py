"""MetaService over grpc.aio: a thin servicer over the catalog, the download planner and the engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

import grpc
from google.api import httpbody_pb2

from gridstor.v1 import meta_pb2, meta_pb2_grpc
from services.common import capacity, errors, readiness, rpc
from services.common.capacity import Gate
from services.common.config import Config, LimitsConfig
from services.common.engine import Engine
from services.common.gateway import open_engine, open_metastore
from services.common.metrics import Registry
from services.common.server import READY_EVERY, Cleanup, Running, Wiring, create_server
from services.meta import download, web
from services.meta.catalog import Catalog, file_info

NAME = "meta"
SERVICE = "gridstor.v1.MetaService"
POLICY = rpc.Policy(
    public=frozenset({"Download", "Exists", "Stat"}),
    internal=frozenset({"PutRecord", "FindByHash", "GetRecord", "UpdateRecord", "ListRecords", "AddExtension"}),
)

Context = grpc.aio.ServicerContext[Any, Any]


class Metrics:
    """What meta reports to Prometheus."""

    def __init__(self, registry: Registry) -> None:
        self.downloads = registry.counter("meta_downloads_total", "Downloads whose stream started")
        self.http = registry.counter(
            "meta_http_downloads_total", "REST downloads (through Envoy) by method and HTTP status answered"
        )
        self.bytes_sent = registry.counter("meta_download_bytes_total", "File bytes sent by Download")
        self.errors = registry.counter("meta_errors_total", "Failed meta calls, by method and status code")
        self.stored = registry.counter("meta_records_stored_total", "New records stored by PutRecord")
        self.dedup = registry.counter("meta_dedup_hits_total", "PutRecord calls answered with an existing record")

    @contextlib.contextmanager
    def observe(self, method: str) -> Iterator[None]:
        """Count a domain error of ``method`` under the status code it maps to, and let it go on."""
        try:
            yield
        except errors.GridstorError as exc:
            self.errors.inc(method=method, code=rpc.status_for(exc)[0].name)
            raise


class MetaServicer(meta_pb2_grpc.MetaServiceServicer):
    """Unpacks requests, calls the catalog / engine, builds replies."""

    def __init__(self, catalog: Catalog, engine: Engine, metrics: Metrics, limits: LimitsConfig | None = None) -> None:
        self.catalog = catalog
        self.engine = engine
        self.metrics = metrics
        limits = limits or LimitsConfig()
        # Memory is bounded per process: so many downloads at once, a read-ahead budget shared among them.
        self.downloads = Gate("downloads in this meta process", limits.downloads_per_process, limits.busy_wait)
        self.read_budget = limits.download_read_ahead

    async def Download(
        self, request: meta_pb2.DownloadRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        with self.metrics.observe("Download"):
            http = web.Request.from_metadata(context.invocation_metadata() or ())
            plan = await download.plan(
                self.catalog,
                request.id,
                request.offset,
                request.length,
                filename=request.filename,
                attachment=request.attachment,
                http=http,
            )
            if http is not None:
                self.metrics.http.inc(method=http.method, status=str(plan.status))
            if plan.body is not None:  # HEAD, 304, 412, 416: no file bytes
                await context.send_initial_metadata(plan.headers)
                yield httpbody_pb2.HttpBody(content_type=plan.content_type, data=plan.body)
                return
            async with self.downloads.slot():
                stream = self.engine.read(plan.entry.record, plan.offset, plan.length, ahead=self._ahead(plan))
                async with contextlib.aclosing(download.reslice(stream)) as body:
                    # Pull the first piece before anything is sent, so too few shards is a clean UNAVAILABLE.
                    first = await anext(body, b"")
                    await context.send_initial_metadata(plan.headers)
                    self.metrics.downloads.inc()
                    yield httpbody_pb2.HttpBody(content_type=plan.content_type, data=first)
                    self.metrics.bytes_sent.inc(len(first))
                    async for piece in body:
                        yield httpbody_pb2.HttpBody(data=piece)
                        self.metrics.bytes_sent.inc(len(piece))

    def _ahead(self, plan: download.Plan) -> Callable[[], int]:
        """How many chunks this download may fetch ahead now: its share of the process's read-ahead budget."""
        chunk_size = plan.entry.record.chunk_size
        most = self.engine.config.read_ahead
        return lambda: capacity.read_ahead(self.read_budget, chunk_size, self.downloads.active, most)

    async def Exists(self, request: meta_pb2.ExistsRequest, context: Context) -> meta_pb2.ExistsReply:
        with self.metrics.observe("Exists"):
            entry = await self.catalog.exists(request.id)
        if entry is None:
            return meta_pb2.ExistsReply(exists=False)
        return meta_pb2.ExistsReply(exists=True, id=entry.file_id)

    async def Stat(self, request: meta_pb2.StatRequest, context: Context) -> meta_pb2.StatReply:
        with self.metrics.observe("Stat"):
            entry = await self.catalog.lookup(request.id)
        return meta_pb2.StatReply(info=file_info(entry))

    async def PutRecord(self, request: meta_pb2.PutRecordRequest, context: Context) -> meta_pb2.PutRecordReply:
        with self.metrics.observe("PutRecord"):
            if not request.HasField("record"):
                raise errors.InvalidInput("PutRecord needs a record")
            entry, deduplicated = await self.catalog.put(request.record)
        (self.metrics.dedup if deduplicated else self.metrics.stored).inc()
        return meta_pb2.PutRecordReply(meta_id=entry.meta_id, file_id=entry.file_id, deduplicated=deduplicated)

    async def FindByHash(self, request: meta_pb2.FindByHashRequest, context: Context) -> meta_pb2.FindByHashReply:
        with self.metrics.observe("FindByHash"):
            entry = await self.catalog.find_by_hash(request.hash)
        if entry is None:
            return meta_pb2.FindByHashReply(found=False)
        return meta_pb2.FindByHashReply(found=True, meta_id=entry.meta_id, file_id=entry.file_id)

    async def GetRecord(self, request: meta_pb2.GetRecordRequest, context: Context) -> meta_pb2.GetRecordReply:
        with self.metrics.observe("GetRecord"):
            entry = await self.catalog.lookup(request.id)
        return meta_pb2.GetRecordReply(record=entry.record, meta_id=entry.meta_id, file_id=entry.file_id)

    async def UpdateRecord(self, request: meta_pb2.UpdateRecordRequest, context: Context) -> meta_pb2.UpdateRecordReply:
        with self.metrics.observe("UpdateRecord"):
            if not request.HasField("record"):
                raise errors.InvalidInput("UpdateRecord needs a record")
            expected = request.expected if request.HasField("expected") else None
            entry = await self.catalog.update(request.id, request.record, expected)
        return meta_pb2.UpdateRecordReply(meta_id=entry.meta_id, file_id=entry.file_id)

    async def AddExtension(self, request: meta_pb2.AddExtensionRequest, context: Context) -> meta_pb2.AddExtensionReply:
        with self.metrics.observe("AddExtension"):
            file_id = await self.catalog.add_extension(request.id, request.ext, request.content_type)
        return meta_pb2.AddExtensionReply(file_id=file_id)

    async def ListRecords(
        self, request: meta_pb2.ListRecordsRequest, context: Context
    ) -> AsyncIterator[meta_pb2.ListRecordsReply]:
        with self.metrics.observe("ListRecords"):
            after = request.after if request.HasField("after") else None
            async with contextlib.aclosing(self.catalog.scan(after, request.limit)) as entries:
                async for entry in entries:
                    yield meta_pb2.ListRecordsReply(meta_id=entry.meta_id, file_id=entry.file_id, record=entry.record)


async def build(
    cfg: Config, *, port: int | None = None, registry: Registry | None = None, ready_every: float = READY_EVERY
) -> tuple[Running, Cleanup]:
    """Open the metadata store and the engine, start the server; return it and an async cleanup.

    Serving while the metadata namespace and at least k shard backends answer.
    """

    async def setup(stack: contextlib.AsyncExitStack) -> Wiring:
        store = await open_metastore(cfg)
        stack.push_async_callback(store.close)
        engine = await open_engine(cfg)
        stack.push_async_callback(engine.pool.close)
        catalog = Catalog(store, read_only=cfg.role == "replica")
        servicer = MetaServicer(catalog, engine, Metrics(registry or Registry()), cfg.limits)
        ready = readiness.all_of(
            partial(readiness.store, store.records, "metadata namespace"),
            partial(readiness.backends, engine.pool, cfg.engine.k),
        )
        return Wiring(SERVICE, partial(meta_pb2_grpc.add_MetaServiceServicer_to_server, servicer), POLICY, ready)

    return await create_server(cfg, NAME, setup, port=port, ready_every=ready_every)
