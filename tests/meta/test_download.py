"""Download, Exists and Stat against a real meta server over 20 dir backends."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2

from gridstor.v1 import meta_pb2, meta_pb2_grpc
from services.meta.catalog import MAX_OTHER_EXTS
from tests.common.engine_util import corrupt_shard
from tests.helpers import rpc_error
from tests.meta.conftest import CHUNK, MetaServer, MiB

SIZES = [0, 1, CHUNK - 1, CHUNK + 1, MiB - 1, MiB, MiB + 1, 3 * MiB + 12345]


def fake_id(meta_id: int = 0x63, ext: str = "") -> str:
    return os.urandom(24).hex() + f"{meta_id:08x}" + ext


@pytest.mark.parametrize("size", SIZES)
async def test_download_whole_file(meta: MetaServer, size: int) -> None:
    data = os.urandom(size)
    file_id = await meta.store(data, ext=".bin")
    got = await meta.fetch(file_id)
    assert got.data == data
    assert len(got.messages) == max(1, -(-size // MiB))
    assert all(len(m.data) == MiB for m in got.messages[:-1])  # 1 MiB messages, only the last shorter
    assert all(len(m.data) <= MiB for m in got.messages)
    assert got.messages[0].content_type == "application/octet-stream"
    assert all(m.content_type == "" for m in got.messages[1:])
    assert got.headers["x-gridstor-size"] == str(size)
    assert got.headers["x-gridstor-length"] == str(size)
    assert got.headers["content-disposition"] == f'inline; filename="{file_id}"'


RANGES = [
    (0, 1),
    (1, 0),
    (CHUNK - 1, 2),  # across a chunk boundary
    (CHUNK, CHUNK),  # exactly one chunk
    (MiB - 3, MiB + 7),  # across message and chunk boundaries
    (12345, 2 * MiB),
    (3 * MiB, 0),  # through the end
    (3 * MiB + 12344, 10),  # clamped at the end
    (100, 10 * MiB),  # length past the end is clamped
]


async def test_download_ranges(meta: MetaServer) -> None:
    size = 3 * MiB + 12345
    data = os.urandom(size)
    file_id = await meta.store(data)
    for offset, length in RANGES:
        got = await meta.fetch(file_id, offset, length)
        end = size if length == 0 else min(size, offset + length)
        assert got.data == data[offset:end], (offset, length)
        assert all(len(m.data) <= MiB for m in got.messages)
        assert got.messages[0].content_type == "application/octet-stream"
        assert got.headers["x-gridstor-size"] == str(size)
        assert got.headers["x-gridstor-offset"] == str(offset)
        assert got.headers["x-gridstor-length"] == str(end - offset)


@pytest.mark.parametrize("size", [0, 5000])
async def test_offset_at_end_gives_one_empty_message_with_type(meta: MetaServer, size: int) -> None:
    file_id = await meta.store(os.urandom(size), ext=".jpg")
    got = await meta.fetch(file_id, size)
    assert len(got.messages) == 1
    assert got.messages[0].data == b""
    assert got.messages[0].content_type == "image/jpeg"
    assert got.headers["x-gridstor-size"] == str(size)


async def test_offset_beyond_end_is_out_of_range_before_streaming(meta: MetaServer) -> None:
    file_id = await meta.store(os.urandom(5000))
    call = meta.stub.Download(meta_pb2.DownloadRequest(id=file_id, offset=5001))
    err = await rpc_error(call.read())
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert err.details() == "offset 5001 is beyond the end of the file (5000 bytes)"
    assert "x-gridstor-size" not in dict(await call.initial_metadata())  # nothing was sent before the error


@pytest.mark.parametrize(
    ("offset", "length", "needle"), [(-1, 0, "offset must not be negative"), (0, -5, "length must not be negative")]
)
async def test_negative_range_is_invalid(meta: MetaServer, offset: int, length: int, needle: str) -> None:
    file_id = await meta.store(b"abc")
    err = await rpc_error(meta.fetch(file_id, offset, length))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()


MALFORMED = [
    ("", "file id is empty"),
    ("hello", "must start with 56 hex characters, got 5"),
    ("a" * 55, "must start with 56 hex characters, got 55"),
    ("a" * 57, "must start with 56 hex characters, got 57"),
    ("A" * 56, "lowercase hex"),
    ("g" * 56, "lowercase hex"),
    ("a" * 56 + ".", "bad extension"),
    ("a" * 56 + ".JPG", "bad extension"),
    ("a" * 56 + ".j pg", "bad extension"),
    ("a" * 56 + ".a.b.c.d", "bad extension"),
    ("a" * 56 + "/../x", "must start with 56 hex characters"),
    ("a" * 200, "at most 88 are allowed"),
]


@pytest.mark.parametrize(("bad", "needle"), MALFORMED)
async def test_malformed_ids_are_invalid_argument_everywhere(meta: MetaServer, bad: str, needle: str) -> None:
    for aw in (
        meta.fetch(bad),
        meta.stub.Exists(meta_pb2.ExistsRequest(id=bad)),
        meta.stub.Stat(meta_pb2.StatRequest(id=bad)),
        meta.stub.GetRecord(meta_pb2.GetRecordRequest(id=bad), metadata=meta.auth),
    ):
        err = await rpc_error(aw)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.details()


async def test_malformed_id_touches_no_storage(start_meta: Any, data_dir: Any) -> None:
    meta: MetaServer = await start_meta()
    shutil.rmtree(data_dir / "meta")  # any storage access would now fail with UNAVAILABLE
    err = await rpc_error(meta.fetch("zz" + "a" * 54))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await rpc_error(meta.fetch(fake_id()))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_unknown_ids(meta: MetaServer) -> None:
    await meta.store(b"something stored")
    for unknown in (fake_id(0), fake_id(0x63), fake_id(0xFFFFFFFF, ".jpg")):
        key = unknown.split(".")[0]
        err = await rpc_error(meta.fetch(unknown))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"no file with id {key}"
        err = await rpc_error(meta.stub.Stat(meta_pb2.StatRequest(id=unknown)))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"no file with id {key}"
        reply = await meta.stub.Exists(meta_pb2.ExistsRequest(id=unknown))
        assert not reply.exists
        assert reply.id == ""


async def test_hash_part_must_match_the_record(meta: MetaServer) -> None:
    file_id = await meta.store(b"the real content", ext=".txt")
    key = file_id.split(".")[0]
    forged = os.urandom(24).hex() + key[48:]  # same metadata id, another hash
    err = await rpc_error(meta.fetch(forged))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == f"no file with id {forged}"
    assert not (await meta.stub.Exists(meta_pb2.ExistsRequest(id=forged))).exists
    err = await rpc_error(meta.stub.Stat(meta_pb2.StatRequest(id=forged)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    one_off = key[:47] + ("0" if key[47] != "0" else "1") + key[48:]
    err = await rpc_error(meta.fetch(one_off))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_extension_variants(meta: MetaServer) -> None:
    data = os.urandom(70_000)
    file_id = await meta.store(data, ext=".tar.gz")
    key = file_id.removesuffix(".tar.gz")
    assert file_id == key + ".tar.gz"
    for variant in (file_id, key, key + ".gz", key + ".html"):
        got = await meta.fetch(variant)
        assert got.data == data
        # The type always follows the stored extension: a link cannot make a file render as something else.
        assert got.messages[0].content_type == "application/gzip"
        assert "content-security-policy" not in got.headers
        assert (await meta.stub.Exists(meta_pb2.ExistsRequest(id=variant))).id == file_id
        assert (await meta.stub.Stat(meta_pb2.StatRequest(id=variant))).info.id == file_id


@pytest.mark.parametrize(
    ("ext", "given", "expected"),
    [
        (".jpg", "", "image/jpeg"),
        (".mp4", "", "video/mp4"),
        (".txt", "", "text/plain"),
        ("", "", "application/octet-stream"),
        (".weird", "", "application/octet-stream"),
        (".jpg", "image/png", "image/png"),  # the type given at upload wins
        (".jpg", "not a type\r\nx-evil: 1", "image/jpeg"),  # unless it is not a type
        ("", "text/plain; charset=utf-8", "text/plain; charset=utf-8"),
    ],
)
async def test_content_type(meta: MetaServer, ext: str, given: str, expected: str) -> None:
    file_id = await meta.store(b"x" * 10, ext=ext, content_type=given)
    got = await meta.fetch(file_id)
    assert got.messages[0].content_type == expected
    assert got.headers["x-content-type-options"] == "nosniff"
    assert (await meta.stub.Stat(meta_pb2.StatRequest(id=file_id))).info.content_type == expected


async def test_active_content_is_sandboxed(meta: MetaServer) -> None:
    file_id = await meta.store(b"<script>alert(1)</script>", ext=".html")
    got = await meta.fetch(file_id)
    assert got.messages[0].content_type == "text/html"
    assert got.headers["content-security-policy"] == "sandbox"


async def test_content_disposition(meta: MetaServer) -> None:
    file_id = await meta.store(b"hello", ext=".txt")
    got = await meta.fetch(file_id, attachment=True)
    assert got.headers["content-disposition"] == f'attachment; filename="{file_id}"'
    got = await meta.fetch(file_id, filename="report 2024.txt")
    assert got.headers["content-disposition"] == 'inline; filename="report 2024.txt"'
    got = await meta.fetch(file_id, filename='../../etc/p"ässwd\r\n.txt', attachment=True)
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"p_asswd.txt\"; filename*=UTF-8''p%22%C3%A4sswd.txt"
    )
    got = await meta.fetch(file_id, filename="/..")
    assert got.headers["content-disposition"] == f'inline; filename="{file_id}"'


async def test_exists_and_stat(meta: MetaServer) -> None:
    data = os.urandom(3 * CHUNK + 5)
    file_id = await meta.store(data, ext=".jpg")
    key = file_id.split(".")[0]
    reply = await meta.stub.Exists(meta_pb2.ExistsRequest(id=key))
    assert reply.exists
    assert reply.id == file_id
    info = (await meta.stub.Stat(meta_pb2.StatRequest(id=file_id))).info
    assert info.id == file_id
    assert info.size == len(data)
    assert info.hash == key[:48]
    assert info.ext == ".jpg"
    assert info.content_type == "image/jpeg"
    assert info.created > 0
    assert info.meta_id == int(key[48:], 16)
    assert (info.k, info.m) == (16, 4)
    assert info.chunk_size == CHUNK
    assert info.chunks == 4


async def test_public_methods_need_no_token(start_meta: Any) -> None:
    meta: MetaServer = await start_meta(mode="secret", secret="s" * 20)
    file_id = await meta.store(b"public by capability")
    assert (await meta.fetch(file_id)).data == b"public by capability"
    assert (await meta.stub.Exists(meta_pb2.ExistsRequest(id=file_id))).exists
    assert (await meta.stub.Stat(meta_pb2.StatRequest(id=file_id))).info.size == 20


async def test_lost_backends(meta: MetaServer, data_dir: Any) -> None:
    data = os.urandom(2 * MiB + 777)
    file_id = await meta.store(data, ext=".bin")
    for i in range(4):  # m = 4: any four may go
        shutil.rmtree(data_dir / "backends" / f"b{i:02d}")
    got = await meta.fetch(file_id)
    assert got.data == data
    assert (await meta.fetch(file_id, MiB - 5, 10)).data == data[MiB - 5 : MiB + 5]
    shutil.rmtree(data_dir / "backends" / "b17")
    call = meta.stub.Download(meta_pb2.DownloadRequest(id=file_id))
    err = await rpc_error(call.read())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "chunk 0 has 15 good shards of 20, needs 16" in err.details()
    assert "x-gridstor-size" not in dict(await call.initial_metadata())  # refused before the stream started
    # The metadata is intact: the file is still known, just not readable.
    assert (await meta.stub.Exists(meta_pb2.ExistsRequest(id=file_id))).exists
    assert (await meta.stub.Stat(meta_pb2.StatRequest(id=file_id))).info.size == len(data)


async def test_download_metrics(meta: MetaServer) -> None:
    data = os.urandom(MiB + 10)
    file_id = await meta.store(data)
    await meta.fetch(file_id)
    await meta.fetch(file_id, 10, 100)
    await rpc_error(meta.fetch(fake_id()))
    await rpc_error(meta.fetch("nope"))
    reg = meta.registry
    assert reg.counter("meta_downloads_total", "").value() == 2
    assert reg.counter("meta_download_bytes_total", "").value() == len(data) + 100
    errors = reg.counter("meta_errors_total", "")
    assert errors.value(method="Download", code="NOT_FOUND") == 1
    assert errors.value(method="Download", code="INVALID_ARGUMENT") == 1
    assert "gridstor_meta_downloads_total 2" in reg.render()


async def test_failure_mid_stream_ends_with_the_status(meta: MetaServer) -> None:
    data = os.urandom(3 * MiB)
    file_id = await meta.store(data)
    record = (await meta.stub.GetRecord(meta_pb2.GetRecordRequest(id=file_id), metadata=meta.auth)).record
    for shard in range(5):  # five of 20 shards of chunk 9 (in the third MiB) corrupt: m = 4 cannot cover it
        await corrupt_shard(meta.engine, record, 9, shard)
    call = meta.stub.Download(meta_pb2.DownloadRequest(id=file_id))
    received = b""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in call:
            received += message.data
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "chunk 9 has 15 good shards of 20" in (info.value.details() or "")
    # What arrived is a correct prefix, and x-gridstor-size tells the client it is short.
    assert 0 < len(received) < len(data)
    assert data.startswith(received)
    assert dict(await call.initial_metadata())["x-gridstor-size"] == str(len(data))


async def test_client_cancel_mid_stream(meta: MetaServer) -> None:
    data = os.urandom(4 * MiB)
    file_id = await meta.store(data)
    for _ in range(3):
        call = meta.stub.Download(meta_pb2.DownloadRequest(id=file_id))
        first = await call.read()
        assert isinstance(first, httpbody_pb2.HttpBody)
        assert first.data == data[:MiB]
        call.cancel()
    # The server is unharmed and the next download is whole.
    assert (await meta.fetch(file_id)).data == data


# -- REST downloads (what Envoy's transcoder passes as metadata) ----------------------------------------


async def rest(meta: MetaServer, file_id: str, method: str = "GET", **headers: str) -> Any:
    """Download as the transcoder calls it: the HTTP method and headers as metadata; (metadata, body)."""
    metadata = [("x-envoy-original-method", method), *((k.replace("_", "-"), v) for k, v in headers.items())]
    call = meta.stub.Download(meta_pb2.DownloadRequest(id=file_id), metadata=metadata)
    messages = [m async for m in call]
    return dict(await call.initial_metadata()), messages


async def test_rest_head_and_304_read_no_file_bytes(meta: MetaServer) -> None:
    data = os.urandom(3 * MiB)
    file_id = await meta.store(data, ext=".bin")
    sent = meta.registry.counter("meta_download_bytes_total", "")
    headers, messages = await rest(meta, file_id, "HEAD")
    assert headers["x-gridstor-content-length"] == str(len(data)) and "x-gridstor-http-status" not in headers
    assert headers["etag"] == f'"{file_id[:56]}"' and headers["accept-ranges"] == "bytes"
    assert [m.data for m in messages] == [b""] and messages[0].content_type == "application/octet-stream"
    headers, messages = await rest(meta, file_id, if_none_match=headers["etag"])
    assert headers["x-gridstor-http-status"] == "304" and "x-gridstor-content-length" not in headers
    assert [m.data for m in messages] == [b""]
    assert sent.value() == 0  # neither read the file
    http = meta.registry.counter("meta_http_downloads_total", "")
    assert http.value(method="HEAD", status="200") == 1 and http.value(method="GET", status="304") == 1


async def test_rest_range_reads_only_its_part(meta: MetaServer) -> None:
    data = os.urandom(3 * MiB + 5)
    file_id = await meta.store(data)
    headers, messages = await rest(meta, file_id, range="bytes=-10")
    assert headers["x-gridstor-http-status"] == "206"
    assert headers["content-range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
    assert b"".join(m.data for m in messages) == data[-10:]
    assert meta.registry.counter("meta_download_bytes_total", "").value() == 10
    headers, messages = await rest(meta, file_id, range=f"bytes={len(data)}-")
    assert headers["x-gridstor-http-status"] == "416" and headers["content-range"] == f"bytes */{len(data)}"
    assert messages[0].content_type == "application/json"
    assert headers["x-gridstor-content-length"] == str(len(messages[0].data))
    err = await rpc_error(
        meta.stub.Download(
            meta_pb2.DownloadRequest(id=file_id, offset=1),
            metadata=[("x-envoy-original-method", "GET"), ("range", "bytes=0-1")],
        ).read()
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "Range" in err.details()


async def test_add_extension_selects_the_type_per_id(meta: MetaServer) -> None:
    data = os.urandom(1000)
    file_id = await meta.store(data, ext=".bin")
    key = file_id[:56]

    async def add(ext: str, content_type: str = "") -> str:
        request = meta_pb2.AddExtensionRequest(id=file_id, ext=ext, content_type=content_type)
        return (await meta.stub.AddExtension(request, metadata=meta.auth)).file_id

    assert await add(".png") == key + ".png"
    assert await add(".png", "text/plain") == key + ".png"  # the first type given stays
    assert await add(".txt", "text/markdown") == key + ".txt"
    assert await add(".bin") == key + ".bin" and await add("") == key + ".bin"
    assert (await meta.fetch(key + ".png")).messages[0].content_type == "image/png"
    assert (await meta.fetch(key + ".txt")).messages[0].content_type == "text/markdown"
    for plain in (key, key + ".bin", key + ".gif"):  # .gif: no upload gave it
        assert (await meta.fetch(plain)).messages[0].content_type == "application/octet-stream", plain
    assert (await meta.fetch(key + ".png")).headers["content-disposition"] == f'inline; filename="{key}.png"'
    assert (await meta.fetch(key + ".gif")).headers["content-disposition"] == f'inline; filename="{key}.bin"'
    # Exists and Stat name the canonical id; maint's records carry the extensions along.
    assert (await meta.stub.Exists(meta_pb2.ExistsRequest(id=key + ".png"))).id == file_id
    record = (await meta.stub.GetRecord(meta_pb2.GetRecordRequest(id=key), metadata=meta.auth)).record
    assert dict(record.other_types) == {".png": "image/png", ".txt": "text/markdown"}
    err = await rpc_error(
        meta.stub.AddExtension(meta_pb2.AddExtensionRequest(id=file_id, ext=".t@r"), metadata=meta.auth)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await rpc_error(meta.stub.AddExtension(meta_pb2.AddExtensionRequest(id=file_id, ext=".png")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # internal: a service token only


async def test_add_extension_stops_at_the_cap(meta: MetaServer) -> None:
    file_id = await meta.store(os.urandom(10), ext=".bin")
    for i in range(MAX_OTHER_EXTS):
        request = meta_pb2.AddExtensionRequest(id=file_id, ext=f".e{i}")
        assert (await meta.stub.AddExtension(request, metadata=meta.auth)).file_id.endswith(f".e{i}")
    request = meta_pb2.AddExtensionRequest(id=file_id, ext=".more")
    assert (await meta.stub.AddExtension(request, metadata=meta.auth)).file_id == file_id  # the stored one


# -- a process's cap on concurrent downloads ---------------------------------------------------------


async def test_downloads_past_the_process_cap_wait_then_get_busy(
    start_meta: Callable[..., Awaitable[MetaServer]],
) -> None:
    """One slot: a second download waits for it (backpressure), a third that waits too long gets Busy."""
    meta = await start_meta(limits={"downloads_per_process": 1, "busy_wait": 3.0})
    data = os.urandom(4 * MiB)
    file_id = await meta.store(data)
    # A reader that takes one message and stops (a small receive window, so the server cannot run ahead).
    slow = grpc.aio.insecure_channel(f"127.0.0.1:{meta.port}", options=[("grpc.http2.bdp_probe", 0)])
    try:
        first = aiter(meta_pb2_grpc.MetaServiceStub(slow).Download(meta_pb2.DownloadRequest(id=file_id)))
        head = (await anext(first)).data  # the first holds the only slot while it is not read to the end

        refused = await rpc_error(meta.fetch(file_id))  # waits for the slot, past busy_wait: Busy
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details().startswith(
            "the gateway is at its limit of 1 concurrent downloads in this meta process"
        )
        trailers = refused.trailers()
        assert trailers["gridstor-error"] == "Busy" and trailers["retry-after"] == "1"

        waiting = asyncio.ensure_future(meta.fetch(file_id))  # waits for the slot ...
        rest = b"".join([m.data async for m in first])  # ... which the first frees as it ends
        assert head + rest == data
        assert (await asyncio.wait_for(waiting, 30)).data == data
    finally:
        await slow.close(None)
