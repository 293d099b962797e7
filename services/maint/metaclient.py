"""``Records`` over meta's internal RPCs, with status codes turned back into domain errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from gridstor.v1 import meta_pb2, meta_pb2_grpc
from services.common import errors
from services.common.config import Config
from services.common.engine import FileRecord
from services.common.gateway import ServiceCredentials, channel
from services.maint.records import Entry

UNARY_TIMEOUT = 60.0

_ERRORS: dict[grpc.StatusCode, Callable[[str], errors.GridstorError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.ABORTED: errors.Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: errors.Refused,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceeded,
}


def domain_error(exc: grpc.aio.AioRpcError) -> errors.GridstorError:
    """The domain error a failed meta call stands for (meta being unreachable is BackendUnavailable)."""
    details = exc.details() or exc.code().name
    make = _ERRORS.get(exc.code())
    if make is not None:
        return make(details)
    return errors.BackendUnavailable("meta service", f"{exc.code().name}: {details}")


class MetaRecords:
    """Records through meta's GetRecord / UpdateRecord / PutRecord / ListRecords, with a service token."""

    def __init__(self, chan: grpc.aio.Channel, token: Callable[[], tuple[tuple[str, str], ...]]) -> None:
        self.channel = chan
        self.stub = meta_pb2_grpc.MetaServiceStub(chan)
        self._metadata = token

    @classmethod
    def for_config(cls, cfg: Config, name: str = "maint") -> MetaRecords:
        """A client of this gateway's meta service (cfg.address("meta")) calling as ``service:<name>``."""
        return cls(channel(cfg, "meta"), ServiceCredentials(cfg, name))

    async def get(self, file_id: str) -> Entry:
        try:
            reply = await self.stub.GetRecord(
                meta_pb2.GetRecordRequest(id=file_id), metadata=self._metadata(), timeout=UNARY_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc) from None
        return Entry(reply.meta_id, reply.file_id, reply.record)

    async def update(self, file_id: str, record: FileRecord, expected: FileRecord) -> None:
        request = meta_pb2.UpdateRecordRequest(id=file_id, record=record, expected=expected)
        try:
            await self.stub.UpdateRecord(request, metadata=self._metadata(), timeout=UNARY_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc) from None

    async def put(self, record: FileRecord) -> tuple[Entry, bool]:
        try:
            reply = await self.stub.PutRecord(
                meta_pb2.PutRecordRequest(record=record), metadata=self._metadata(), timeout=UNARY_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc) from None
        return Entry(reply.meta_id, reply.file_id, record), reply.deduplicated

    async def list(self, after: int | None = None, limit: int = 0) -> AsyncIterator[Entry]:
        request = meta_pb2.ListRecordsRequest(limit=limit)
        if after is not None:
            request.after = after
        call = self.stub.ListRecords(request, metadata=self._metadata())
        try:
            async for reply in call:
                yield Entry(reply.meta_id, reply.file_id, reply.record)
        except grpc.aio.AioRpcError as exc:
            raise domain_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close(None)
