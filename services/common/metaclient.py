"""The one client of meta's internal RPCs, calling with a service token; failures come back as domain errors.

Used by maint (``Records``: get, update, put, list) and by ingest's store
workers (find_by_hash, put, get, add_extension). A status from meta becomes the domain error
it stands for (``rpc.error_for``); meta unreachable is BackendUnavailable.
With ``retry_for`` a call to an unreachable meta (UNAVAILABLE: meta down, or
its metadata store; with ``retry_deadline`` also DEADLINE_EXCEEDED: meta hung)
is retried with backoff for that many seconds before it fails; ``on_wait`` hears
why while it waits (and None once a call gets through; a context variable, so
each task hears of its own calls), so a store worker can show the reason in its
job's Status. Every call meta makes is safe to repeat:
a repeated PutRecord of the same content answers with the first record (dedup).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gridstor.v1 import meta_pb2, meta_pb2_grpc
from services.common import rpc
from services.common.config import Config
from services.common.engine import FileRecord
from services.common.errors import BackendUnavailable
from services.common.gateway import ServiceCredentials, channel
from services.common.records import Entry

log = logging.getLogger(__name__)

UNARY_TIMEOUT = 60.0
SERVICE = "meta"

#: Told why a call waits (meta unreachable) while it retries, and None once a call gets through: set by
#: the task making the calls (a store worker's job), so concurrent jobs each hear about their own calls.
on_wait: contextvars.ContextVar[Callable[[str | None], Awaitable[None]] | None] = contextvars.ContextVar(
    "meta_on_wait", default=None
)

_T = TypeVar("_T")


class MetaClient:
    """meta's GetRecord / UpdateRecord / PutRecord / ListRecords / FindByHash (implements ``Records``)."""

    def __init__(
        self,
        chan: grpc.aio.Channel,
        token: Callable[[], tuple[tuple[str, str], ...]],
        *,
        retry_for: float = 0.0,
        retry_deadline: bool = False,
        timeout: float = UNARY_TIMEOUT,
    ) -> None:
        self.channel = chan
        self.stub = meta_pb2_grpc.MetaServiceStub(chan)
        self._metadata = token
        self.retry_for = retry_for
        self.timeout = timeout
        self.retry_codes = {grpc.StatusCode.UNAVAILABLE}
        if retry_deadline:
            self.retry_codes.add(grpc.StatusCode.DEADLINE_EXCEEDED)

    @classmethod
    def for_config(
        cls,
        cfg: Config,
        name: str,
        *,
        retry_for: float = 0.0,
        retry_deadline: bool = False,
        timeout: float = UNARY_TIMEOUT,
    ) -> MetaClient:
        """A client of this gateway's meta service (cfg.address("meta")) calling as ``service:<name>``."""
        return cls(
            channel(cfg, SERVICE),
            ServiceCredentials(cfg, name),
            retry_for=retry_for,
            retry_deadline=retry_deadline,
            timeout=timeout,
        )

    async def _call(self, method: str, fn: Callable[..., Awaitable[_T]], request: Any) -> _T:
        """Call ``fn``; while meta is unreachable retry with backoff for up to ``retry_for`` seconds."""
        give_up = time.monotonic() + self.retry_for
        delay = 0.2
        waited = False
        hook = on_wait.get()
        while True:
            try:
                reply = await fn(request, metadata=self._metadata(), timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in self.retry_codes and time.monotonic() + delay < give_up:
                    why = f"{exc.code().name}: {exc.details() or exc.code().name}"
                    log.warning("meta %s unavailable (%s); retrying in %.1fs", method, why, delay)
                    if hook is not None:
                        waited = True
                        await hook(why)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                error = rpc.rpc_error(exc, SERVICE)
                if waited and isinstance(error, BackendUnavailable):
                    error = BackendUnavailable(error.backend, f"{error.reason} (still, after {self.retry_for:g} s)")
                raise error from None
            if waited and hook is not None:
                await hook(None)
            return reply

    async def get(self, file_id: str) -> Entry:
        reply = await self._call("GetRecord", self.stub.GetRecord, meta_pb2.GetRecordRequest(id=file_id))
        return Entry(reply.meta_id, reply.file_id, reply.record)

    async def update(self, file_id: str, record: FileRecord, expected: FileRecord) -> None:
        request = meta_pb2.UpdateRecordRequest(id=file_id, record=record, expected=expected)
        await self._call("UpdateRecord", self.stub.UpdateRecord, request)

    async def put(self, record: FileRecord) -> tuple[Entry, bool]:
        reply = await self._call("PutRecord", self.stub.PutRecord, meta_pb2.PutRecordRequest(record=record))
        return Entry(reply.meta_id, reply.file_id, record), reply.deduplicated

    async def find_by_hash(self, digest: bytes) -> str | None:
        """The file id of stored content hashing to ``digest``, or None."""
        reply = await self._call("FindByHash", self.stub.FindByHash, meta_pb2.FindByHashRequest(hash=digest))
        return reply.file_id if reply.found else None

    async def add_extension(self, file_id: str, ext: str, content_type: str) -> str:
        """Note that the content behind ``file_id`` was uploaded as ``ext`` too; the file id to answer."""
        request = meta_pb2.AddExtensionRequest(id=file_id, ext=ext, content_type=content_type)
        reply = await self._call("AddExtension", self.stub.AddExtension, request)
        return reply.file_id

    async def list(self, after: int | None = None, limit: int = 0) -> AsyncIterator[Entry]:
        request = meta_pb2.ListRecordsRequest(limit=limit)
        if after is not None:
            request.after = after
        call = self.stub.ListRecords(request, metadata=self._metadata())
        try:
            async for reply in call:
                yield Entry(reply.meta_id, reply.file_id, reply.record)
        except grpc.aio.AioRpcError as exc:
            raise rpc.rpc_error(exc, SERVICE) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close(None)
