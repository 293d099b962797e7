"""The internal record methods: PutRecord (dedup), FindByHash, GetRecord, UpdateRecord (CAS), ListRecords."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import pytest

from gridstor.v1 import meta_pb2
from services.common import tokens
from services.common.engine import FileRecord
from services.common.keys import signing_key
from tests.helpers import rpc_error
from tests.meta.conftest import MetaServer


async def get(meta: MetaServer, file_id: str) -> meta_pb2.GetRecordReply:
    return await meta.stub.GetRecord(meta_pb2.GetRecordRequest(id=file_id), metadata=meta.auth)


async def list_records(meta: MetaServer, **kw: Any) -> list[meta_pb2.ListRecordsReply]:
    return [r async for r in meta.stub.ListRecords(meta_pb2.ListRecordsRequest(**kw), metadata=meta.auth)]


async def test_put_and_get_record(meta: MetaServer) -> None:
    record = await meta.engine.store([b"hello world"], ext=".txt", content_type="text/plain")
    reply = await meta.put(record)
    assert not reply.deduplicated
    assert reply.file_id == f"{record.hash.hex()}{reply.meta_id:08x}.txt"
    got = await get(meta, reply.file_id)
    assert got.record == record
    assert got.meta_id == reply.meta_id
    assert got.file_id == reply.file_id
    assert (await get(meta, reply.file_id.removesuffix(".txt"))).file_id == reply.file_id


async def test_dedup_returns_the_first_record_and_writes_nothing(meta: MetaServer) -> None:
    data = os.urandom(300_000)
    first = await meta.engine.store([data], ext=".bin")
    second = await meta.engine.store([data], ext=".dat")  # same content, other shards and extension
    assert first.hash == second.hash
    a = await meta.put(first)
    b = await meta.put(second)
    assert not a.deduplicated
    assert b.deduplicated
    assert (b.meta_id, b.file_id) == (a.meta_id, a.file_id)  # the stored record's extension
    assert [r.meta_id for r in await list_records(meta)] == [a.meta_id]
    assert (await get(meta, a.file_id)).record == first
    reg = meta.registry
    assert reg.counter("meta_records_stored_total", "").value() == 1
    assert reg.counter("meta_dedup_hits_total", "").value() == 1


async def test_concurrent_puts_of_one_content_store_one_record(meta: MetaServer) -> None:
    data = os.urandom(50_000)
    records = [await meta.engine.store([data]) for _ in range(6)]
    replies = await asyncio.gather(*(meta.put(r) for r in records))
    assert sum(not r.deduplicated for r in replies) == 1
    assert len({r.meta_id for r in replies}) == 1
    assert len(await list_records(meta)) == 1


async def test_find_by_hash(meta: MetaServer) -> None:
    record = await meta.engine.store([b"findable"], ext=".txt")
    put = await meta.put(record)
    found = await meta.stub.FindByHash(meta_pb2.FindByHashRequest(hash=record.hash), metadata=meta.auth)
    assert (found.found, found.meta_id, found.file_id) == (True, put.meta_id, put.file_id)
    missing = await meta.stub.FindByHash(meta_pb2.FindByHashRequest(hash=os.urandom(24)), metadata=meta.auth)
    assert not missing.found
    assert missing.file_id == ""
    err = await rpc_error(meta.stub.FindByHash(meta_pb2.FindByHashRequest(hash=b"short"), metadata=meta.auth))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "hash must be 24 raw bytes (BLAKE3-192), got 5"


async def test_put_refuses_bad_records(meta: MetaServer) -> None:
    good = await meta.engine.store([os.urandom(3 * 256 * 1024 + 1)])

    def broken(change: Any) -> FileRecord:
        r = FileRecord()
        r.CopyFrom(good)
        change(r)
        return r

    cases = [
        (meta_pb2.PutRecordRequest(), "PutRecord needs a record"),
        (meta_pb2.PutRecordRequest(record=broken(lambda r: setattr(r, "hash", b"x" * 5))), "hash must be 24 bytes"),
        (meta_pb2.PutRecordRequest(record=broken(lambda r: r.chunks.pop())), "needs 4 chunks, it lists 3"),
        (meta_pb2.PutRecordRequest(record=broken(lambda r: r.chunks[1].shards.pop())), "lists 19 shards"),
        (meta_pb2.PutRecordRequest(record=broken(lambda r: setattr(r, "size", r.size + 1))), "chunk 3 holds 1"),
        (meta_pb2.PutRecordRequest(record=broken(lambda r: setattr(r, "version", 9))), "version 9"),
        (meta_pb2.PutRecordRequest(record=broken(lambda r: setattr(r, "ext", ".BAD"))), "extension '.BAD'"),
        (meta_pb2.PutRecordRequest(record=broken(lambda r: r.ClearField("wrapped_key"))), "no wrapped file key"),
    ]
    for request, needle in cases:
        err = await rpc_error(meta.stub.PutRecord(request, metadata=meta.auth))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in err.details()
    assert await list_records(meta) == []


async def test_update_record_compare_and_swap(meta: MetaServer) -> None:
    data = os.urandom(100_000)
    file_id = (await meta.put(await meta.engine.store([data], ext=".bin"))).file_id
    original = (await get(meta, file_id)).record

    changed = FileRecord()
    changed.CopyFrom(original)
    changed.content_type = "application/x-test"
    reply = await meta.stub.UpdateRecord(
        meta_pb2.UpdateRecordRequest(id=file_id, record=changed, expected=original), metadata=meta.auth
    )
    assert reply.file_id == file_id
    assert (await get(meta, file_id)).record == changed

    stale = FileRecord()
    stale.CopyFrom(original)
    stale.content_type = "text/plain"
    err = await rpc_error(
        meta.stub.UpdateRecord(
            meta_pb2.UpdateRecordRequest(id=file_id, record=stale, expected=original), metadata=meta.auth
        )
    )
    assert err.code() == grpc.StatusCode.ABORTED
    assert "changed since it was read" in err.details()
    assert (await get(meta, file_id)).record == changed

    # Without `expected` the update is unconditional.
    await meta.stub.UpdateRecord(meta_pb2.UpdateRecordRequest(id=file_id, record=stale), metadata=meta.auth)
    assert (await get(meta, file_id)).record == stale
    got = await meta.fetch(file_id)
    assert got.data == data
    assert got.messages[0].content_type == "text/plain"


async def test_update_record_refusals(meta: MetaServer) -> None:
    file_id = (await meta.put(await meta.engine.store([b"one"]))).file_id
    other = await meta.engine.store([b"two"])
    current = (await get(meta, file_id)).record

    err = await rpc_error(
        meta.stub.UpdateRecord(meta_pb2.UpdateRecordRequest(id=file_id, record=other), metadata=meta.auth)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "would change its content hash" in err.details()

    unknown = os.urandom(24).hex() + "000000ff"
    err = await rpc_error(
        meta.stub.UpdateRecord(meta_pb2.UpdateRecordRequest(id=unknown, record=current), metadata=meta.auth)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND

    err = await rpc_error(meta.stub.UpdateRecord(meta_pb2.UpdateRecordRequest(id=file_id), metadata=meta.auth))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "UpdateRecord needs a record"

    err = await rpc_error(
        meta.stub.UpdateRecord(meta_pb2.UpdateRecordRequest(id="bad", record=current), metadata=meta.auth)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "56 hex" in err.details()
    assert (await get(meta, file_id)).record == current


async def test_list_records_in_id_order(meta: MetaServer) -> None:
    ids = [await meta.store(os.urandom(1000 + i), ext=".bin") for i in range(5)]
    listed = await list_records(meta)
    assert [r.file_id for r in listed] == ids
    assert [r.meta_id for r in listed] == sorted(r.meta_id for r in listed)
    assert all(r.record.size == 1000 + i for i, r in enumerate(listed))
    after = await list_records(meta, after=listed[1].meta_id)
    assert [r.file_id for r in after] == ids[2:]
    assert [r.file_id for r in await list_records(meta, after=listed[0].meta_id, limit=2)] == ids[1:3]
    assert [r.file_id for r in await list_records(meta, limit=1)] == ids[:1]
    assert await list_records(meta, after=listed[-1].meta_id) == []


INTERNAL = [
    ("PutRecord", meta_pb2.PutRecordRequest()),
    ("FindByHash", meta_pb2.FindByHashRequest(hash=b"\0" * 24)),
    ("GetRecord", meta_pb2.GetRecordRequest(id="a" * 56)),
    ("UpdateRecord", meta_pb2.UpdateRecordRequest(id="a" * 56)),
    ("ListRecords", meta_pb2.ListRecordsRequest()),
]


async def call(meta: MetaServer, method: str, request: Any, metadata: Any) -> None:
    if method == "ListRecords":
        [r async for r in meta.stub.ListRecords(request, metadata=metadata)]
    else:
        await getattr(meta.stub, method)(request, metadata=metadata)


@pytest.mark.parametrize(("method", "request_"), INTERNAL)
async def test_internal_methods_need_a_service_token(meta: MetaServer, method: str, request_: Any) -> None:
    # Public mode (the default) opens user methods, never the internal ones.
    err = await rpc_error(call(meta, method, request_, ()))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no token" in err.details()
    user = tokens.issue(signing_key(meta.cfg.data_dir), "alice", 3600)[0]
    err = await rpc_error(call(meta, method, request_, (("authorization", f"Bearer {user}"),)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == f"{method} is internal to the gateway's services"
    err = await rpc_error(call(meta, method, request_, (("authorization", "Bearer gs1.forged.token"),)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_replica_refuses_writes_and_serves_reads(start_meta: Any) -> None:
    master: MetaServer = await start_meta()
    data = os.urandom(40_000)
    file_id = await master.store(data, ext=".bin")
    replica: MetaServer = await start_meta(role="replica")
    record = await replica.engine.store([os.urandom(10)])
    err = await rpc_error(replica.put(record))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "this gateway is a read-only replica"
    current = (await get(replica, file_id)).record
    err = await rpc_error(
        replica.stub.UpdateRecord(meta_pb2.UpdateRecordRequest(id=file_id, record=current), metadata=replica.auth)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "this gateway is a read-only replica"
    assert (await replica.fetch(file_id)).data == data
    assert (await replica.stub.Exists(meta_pb2.ExistsRequest(id=file_id))).exists
    assert [r.file_id for r in await list_records(replica)] == [file_id]
    await replica.engine.delete_shards(record)
