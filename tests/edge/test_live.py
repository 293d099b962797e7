"""Real requests through a running Envoy to real auth, ingest and meta servers."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest
import redis

from gridstor.v1 import ingest_pb2, ingest_pb2_grpc, meta_pb2, meta_pb2_grpc
from services.common import jobs
from services.edge import probe
from tests.edge.conftest import MAX_UPLOAD, Edge, MiB, upload, wait_done

CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def big_file(edge: Edge, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """50 MiB uploaded through Envoy with curl (or http.client without curl); its path and file id."""
    path = tmp_path_factory.mktemp("big") / "big.bin"
    path.write_bytes(os.urandom(50 * MiB))
    if CURL:
        out = subprocess.run(
            [CURL, "-sS", "--fail-with-body", "-X", "POST", "--data-binary", f"@{path}",
             "-H", "content-type: application/octet-stream", "-H", f"authorization: Bearer {edge.token}",
             f"{edge.base}/v1/files?name=big.bin"],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        reply = json.loads(out.stdout)
    else:
        reply = upload(edge, path.read_bytes(), "big.bin")
    assert int(reply["size"]) == 50 * MiB
    status = wait_done(edge, reply["job"])
    assert status["file_id"].endswith(".bin")
    return path, status["file_id"]


def test_upload_and_download_50_mib_byte_identical(edge: Edge, big_file: tuple[Path, str]) -> None:
    path, file_id = big_file
    reply = edge.request("GET", f"/v1/files/{file_id}", timeout=120)
    assert reply.status == 200, reply.body[:300]
    assert hashlib.sha256(reply.body).digest() == hashlib.sha256(path.read_bytes()).digest()
    assert reply.headers["x-gridstor-size"] == str(50 * MiB)
    assert "content-disposition" in reply.headers


def test_range_by_offset_and_length(edge: Edge, big_file: tuple[Path, str]) -> None:
    path, file_id = big_file
    data = path.read_bytes()
    offset, length = 3 * MiB + 12345, 2 * MiB + 7
    reply = edge.request("GET", f"/v1/files/{file_id}?offset={offset}&length={length}")
    assert reply.status == 200
    assert reply.body == data[offset : offset + length]


def test_small_file_content_type_and_errors(edge: Edge) -> None:
    body = b"hello through envoy\n"
    reply = upload(edge, body, "note.txt", content_type="text/plain")
    file_id = wait_done(edge, reply["job"])["file_id"]
    got = edge.request("GET", f"/v1/files/{file_id}")
    assert got.status == 200 and got.body == body
    assert got.headers["content-type"].startswith("text/plain")
    stat = edge.request("GET", f"/v1/files/{file_id}/stat")
    assert stat.status == 200 and stat.json()["info"]["size"] == str(len(body))
    exists = edge.request("GET", f"/v1/files/{file_id}/exists")
    assert exists.json() == {"exists": True, "id": file_id}


def test_malformed_id_is_400_with_json(edge: Edge) -> None:
    reply = edge.request("GET", "/v1/files/not-an-id")
    assert reply.status == 400
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.json()["message"]


def test_unknown_id_is_404(edge: Edge) -> None:
    reply = edge.request("GET", "/v1/files/" + "ab" * 24 + "0000ffff.bin")
    assert reply.status == 404
    assert reply.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_unknown_path_and_unknown_query_parameter(edge: Edge) -> None:
    assert edge.request("GET", "/v1/nothing/here").status == 404
    assert edge.request("GET", "/index.html").status == 404  # "/" is the upload page (test_http.py)
    reply = edge.request("GET", "/v1/files/" + "ab" * 28 + "?bogus=1")
    assert reply.status == 400


def test_upload_without_token_is_401(edge: Edge) -> None:
    reply = edge.request("POST", "/v1/files?name=x.bin", b"abc", {"content-type": "application/octet-stream"})
    assert reply.status == 401
    assert reply.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


def oversize_upload(edge: Edge, header: tuple[str, str], body: Iterable[bytes] = ()) -> tuple[int, bytes]:
    """POST a huge upload with the length ``header`` and ``body`` (sent until Envoy closes); (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/files?name=huge.bin")
        conn.putheader(*header)
        conn.putheader("authorization", f"Bearer {edge.token}")
        conn.endheaders()
        try:
            for piece in body:
                conn.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # Envoy may close the connection once the answer is out
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_declared_oversize_upload_is_413_before_the_body(edge: Edge) -> None:
    """Content-Length over max_upload: Envoy answers at once, with the limit, never 429 (clients retry that)."""
    status, body = oversize_upload(edge, ("content-length", str(MAX_UPLOAD + 1)))  # not one body byte is sent
    assert status == 413, body
    assert json.loads(body) == {
        "code": 3,
        "message": f"the upload is {MAX_UPLOAD + 1} bytes, over the gateway's upload limit of {MAX_UPLOAD} bytes",
        "details": [],
    }


def test_streamed_oversize_upload_is_413(edge: Edge) -> None:
    """No Content-Length (chunked): ingest cuts the stream at max_upload (errors.TooLarge) and the edge says 413."""
    chunk = b"%x\r\n%s\r\n" % (MiB, b"\0" * MiB)
    status, body = oversize_upload(
        edge, ("transfer-encoding", "chunked"), [chunk] * (MAX_UPLOAD // MiB + 8) + [b"0\r\n\r\n"]
    )
    assert status == 413, body
    reply = json.loads(body)
    message = f"the upload is over the upload limit of {MAX_UPLOAD} bytes"
    assert (reply["code"], reply["message"]) == (3, message)
    assert reply["details"][1] == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "TOO_LARGE",
        "domain": "gridstor",
        "metadata": {"limit_bytes": str(MAX_UPLOAD)},
    }


def test_long_poll_answers_timeout_with_200(edge: Edge) -> None:
    """Status(wait) through Envoy on a job that stays ACTIVE: the server's own timeout answers TIMEOUT
    with 200 (the route allows status_max_wait + a margin, beyond Envoy's 15 s default; see test_config)."""
    job = "0123456789abcdef" * 2
    client = redis.Redis.from_url(edge.cfg.redis_url)
    try:
        client.hset(jobs.job_key(job), mapping={"state": jobs.ACTIVE, "name": "slow.bin", "created": "1"})
        reply = edge.request("GET", f"/v1/jobs/{job}?wait=true&timeout_seconds=2", timeout=60)
    finally:
        client.delete(jobs.job_key(job))
        client.close()
    assert reply.status == 200, reply.body
    assert reply.json()["state"] == "JOB_STATE_TIMEOUT"
    assert reply.json()["result"] == "TIMEOUT"


def test_grpc_through_envoy(edge: Edge, big_file: tuple[Path, str]) -> None:
    _, file_id = big_file

    async def calls() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
            meta = meta_pb2_grpc.MetaServiceStub(channel)
            exists = await meta.Exists(meta_pb2.ExistsRequest(id=file_id))
            assert exists.exists and exists.id == file_id
            ingest = ingest_pb2_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ingest.Status(ingest_pb2.StatusRequest(job="zz"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            parts = [m.data async for m in meta.Download(meta_pb2.DownloadRequest(id=file_id, offset=5, length=10))]
            assert len(b"".join(parts)) == 10
            for method in ("PutRecord", "FindByHash", "GetRecord", "UpdateRecord"):
                call = channel.unary_unary(
                    f"/gridstor.v1.MetaService/{method}", request_serializer=bytes, response_deserializer=bytes
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"")
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
                assert "internal" in (info.value.details() or "")
            # Spellings that might slip past an exact-path rule reach no internal handler either.
            for path in (
                "/gridstor.v1.MetaService//PutRecord",
                "/gridstor.v1.MetaService/Put%52ecord",
                "/gridstor.v1.MetaService/./PutRecord",
                "/gridstor.v1.MetaService/putrecord",
                "/gridstor.v1.MetaService/PutRecord/",
            ):
                call = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"")
                assert info.value.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNIMPLEMENTED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ), (path, info.value.code())

    asyncio.run(calls())


def test_internal_method_as_json_is_refused(edge: Edge) -> None:
    reply = edge.request(
        "POST", "/gridstor.v1.MetaService/GetRecord", b'{"id":"x"}', {"content-type": "application/json"}
    )
    assert reply.status in (403, 404), reply.status


def test_put_upload_and_public_key(edge: Edge) -> None:
    """curl -T style: PUT with no Content-Type; and the unary GET /v1/pubkey."""
    reply = edge.request("PUT", "/v1/files?name=put.dat", b"put body", edge.auth_headers())
    assert reply.status == 200, reply.body
    file_id = wait_done(edge, reply.json()["job"])["file_id"]
    assert edge.request("GET", f"/v1/files/{file_id}").body == b"put body"
    key = edge.request("GET", "/v1/pubkey")
    assert key.status == 200 and key.json()["algorithm"] == "ed25519"


def test_health_probes(edge: Edge) -> None:
    """What the compose health checks run: gRPC health of a service, Envoy's /ready."""
    assert probe.grpc_ok(f"127.0.0.1:{edge.cfg.ports['meta']}")[0]
    assert probe.grpc_ok(f"127.0.0.1:{edge.cfg.ports['ingest']}", "gridstor.v1.IngestService")[0]
    ok, why = probe.grpc_ok(f"127.0.0.1:{edge.cfg.ports['maint']}", timeout=1)  # nothing listens there
    assert not ok and "UNAVAILABLE" in why
    assert probe.http_ok(f"http://127.0.0.1:{edge.admin_port}/ready")[0]
    assert probe.main(["http", f"http://127.0.0.1:{edge.admin_port}/nope"]) == 1


@pytest.mark.skipif(CURL is None, reason="curl not installed (Debian package curl)")
def test_download_over_h2c_with_curl(edge: Edge, big_file: tuple[Path, str], tmp_path: Path) -> None:
    """HTTP/2 without TLS (prior knowledge), as gRPC-era clients do; trailers end the stream cleanly."""
    path, file_id = big_file
    out = tmp_path / "h2.bin"
    done = subprocess.run(
        [str(CURL), "-sS", "--fail", "--http2-prior-knowledge", "-o", str(out), f"{edge.base}/v1/files/{file_id}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
