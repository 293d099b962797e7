"""Downloads and uploads through the real Envoy behave like a web server's: curl, wget and http.client.

HEAD, every Range form, 416, conditional requests (304, 412, If-Range), interrupted downloads resumed
by ``curl -C -`` and ``wget -c``, multipart/form-data uploads, extensions per upload, no grpc-* headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from gridstor.v1 import meta_pb2, meta_pb2_grpc
from services.meta.web import CACHE_CONTROL, http_date
from tests.edge.conftest import Edge, MiB, Response, upload, wait_done
from tests.gateway import curl
from tests.helpers import wait_until

WGET = shutil.which("wget")
SIZE = 3 * MiB + 12345  # several 1 MiB chunks and a short last one
BIG = 24 * MiB + 777
needs_wget = pytest.mark.skipif(WGET is None, reason="wget not installed (Debian package wget; make test installs it)")


@pytest.fixture(scope="module")
def stored(edge: Edge) -> tuple[bytes, str]:
    """A random file uploaded through Envoy: its bytes and file id."""
    data = os.urandom(SIZE)
    reply = upload(edge, data, "sample.bin")
    return data, wait_done(edge, reply["job"])["file_id"]


@pytest.fixture(scope="module")
def big(edge: Edge) -> tuple[bytes, str]:
    """A file bigger than every buffer between Envoy and a client (socket buffers grow to a few MB on
    loopback), so a rate-limited download of it is surely unfinished when it is cut."""
    data = os.urandom(BIG)
    reply = upload(edge, data, "big.bin")
    return data, wait_done(edge, reply["job"])["file_id"]


def url(edge: Edge, file_id: str) -> str:
    return f"{edge.base}/v1/files/{file_id}"


def get(edge: Edge, file_id: str, method: str = "GET", **headers: str) -> Response:
    return edge.request(method, f"/v1/files/{file_id}", headers={k.replace("_", "-"): v for k, v in headers.items()})


def no_grpc_headers(headers: dict[str, str]) -> None:
    leaked = {k for k in headers if k.startswith(("grpc-", "x-gridstor-http-status", "x-gridstor-content-length"))}
    assert not leaked, leaked


# -- headers and HEAD ----------------------------------------------------------------------------------


def test_get_has_length_validators_and_cache_headers(edge: Edge, stored: tuple[bytes, str]) -> None:
    data, file_id = stored
    got = curl(url(edge, file_id))
    assert got.rc == 0 and got.status == 200, got.stderr
    assert got.body == data
    h = got.headers
    assert h["content-length"] == str(SIZE)
    assert "transfer-encoding" not in h
    assert h["accept-ranges"] == "bytes"
    assert h["etag"] == '"' + file_id.split(".")[0] + '"'
    assert h["last-modified"].endswith(" GMT")
    assert h["cache-control"] == CACHE_CONTROL == "public, max-age=31536000, immutable"
    assert h["content-type"] == "application/octet-stream"
    assert h["content-disposition"] == f'inline; filename="{file_id}"'
    no_grpc_headers(h)


def test_head_answers_the_same_headers_without_a_body(edge: Edge, stored: tuple[bytes, str]) -> None:
    _, file_id = stored
    full = curl(url(edge, file_id))
    head = curl("-I", url(edge, file_id))
    assert head.rc == 0 and head.status == 200, head.stderr
    assert head.body.endswith(b"\r\n\r\n")  # curl -I writes the headers as its output: nothing follows
    for key in ("content-length", "accept-ranges", "etag", "last-modified", "cache-control", "content-type"):
        assert head.headers[key] == full.headers[key], key
    no_grpc_headers(head.headers)
    assert get(edge, file_id, "HEAD").body == b""
    # HEAD of an unknown file is a 404 like GET, not a 404 for the method.
    unknown = "0" * 56
    assert curl("-I", url(edge, unknown)).status == 404
    assert get(edge, unknown).status == 404


def test_head_sends_no_body_bytes(edge: Edge, stored: tuple[bytes, str]) -> None:
    _, file_id = stored
    head = get(edge, file_id, "HEAD")
    assert head.status == 200 and head.headers["content-length"] == str(SIZE)
    assert edge.gw.envoy_log is not None

    def logged() -> dict[str, object] | None:
        assert edge.gw.envoy_log is not None
        for line in reversed(edge.gw.envoy_log.read_text().splitlines()):
            if line.startswith("{") and '"method":"HEAD"' in line and file_id in line:
                return dict(json.loads(line))
        return None

    wait_until(lambda: logged() is not None, "the HEAD in Envoy's access log")
    entry = logged()
    assert entry is not None and entry["status"] == 200 and entry["bytes_out"] == 0, entry


# -- ranges --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("0-99", 0, 100),
        (f"{MiB - 10}-{MiB + 10}", MiB - 10, MiB + 11),  # across a chunk boundary
        (f"{SIZE - 5}-", SIZE - 5, SIZE),
        ("-1000", SIZE - 1000, SIZE),
        (f"-{SIZE + 100}", 0, SIZE),  # a suffix longer than the file is the whole file
        (f"100-{SIZE + 100}", 100, SIZE),  # the end is clipped to the file
        (f"{SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE),
    ],
)
def test_range_forms_answer_206(edge: Edge, stored: tuple[bytes, str], spec: str, start: int, end: int) -> None:
    data, file_id = stored
    got = curl("-r", spec, url(edge, file_id))
    assert got.rc == 0 and got.status == 206, (got.status, got.body[:200], got.stderr)
    assert got.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert got.headers["content-length"] == str(end - start)
    assert got.body == data[start:end]
    no_grpc_headers(got.headers)


@pytest.mark.parametrize("spec", [f"{SIZE}-", f"{SIZE + 10}-{SIZE + 20}", "-0"])
def test_unsatisfiable_range_is_416(edge: Edge, stored: tuple[bytes, str], spec: str) -> None:
    _, file_id = stored
    got = curl("-H", f"range: bytes={spec}", url(edge, file_id))
    assert got.status == 416, (got.status, got.body)
    assert got.headers["content-range"] == f"bytes */{SIZE}"
    assert json.loads(got.body)["code"] == grpc.StatusCode.OUT_OF_RANGE.value[0]
    assert got.headers["content-length"] == str(len(got.body))
    no_grpc_headers(got.headers)


@pytest.mark.parametrize("value", ["bytes=0-1,5-6", "bytes=5-1", "items=0-1", "bytes=x-y"])
def test_several_or_invalid_ranges_get_the_whole_file(edge: Edge, stored: tuple[bytes, str], value: str) -> None:
    data, file_id = stored
    got = get(edge, file_id, range=value)
    assert got.status == 200 and got.body == data
    assert "content-range" not in got.headers


def test_a_file_stored_as_grpc_still_gets_http_answers(edge: Edge) -> None:
    """REST is told by the request, not the reply's Content-Type: an upload may call itself application/grpc."""
    data = os.urandom(1000)
    # As a Content-Type the request itself would be gRPC to Envoy: the type goes as the content_type field.
    file_id = wait_done(edge, upload(edge, data, "odd.bin&content_type=application/grpc")["job"])["file_id"]
    got = get(edge, file_id, range="bytes=0-9")
    assert (got.status, got.body, got.headers["content-type"]) == (206, data[:10], "application/grpc")
    assert get(edge, file_id, if_none_match=got.headers["etag"]).status == 304
    no_grpc_headers(got.headers)


def test_range_with_offset_query_is_refused(edge: Edge, stored: tuple[bytes, str]) -> None:
    _, file_id = stored
    got = edge.request("GET", f"/v1/files/{file_id}?offset=5", headers={"range": "bytes=0-9"})
    assert got.status == 400
    assert "Range" in got.json()["message"]


def test_grpc_download_ignores_http_headers(edge: Edge, stored: tuple[bytes, str]) -> None:
    """A gRPC client's metadata named like HTTP headers changes nothing: offset/length are gRPC's range."""
    data, file_id = stored

    async def call() -> tuple[bytes, dict[str, str]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
            stub = meta_pb2_grpc.MetaServiceStub(channel)
            metadata = (("range", "bytes=0-9"), ("if-none-match", "*"), ("x-envoy-original-method", "HEAD"))
            stream = stub.Download(meta_pb2.DownloadRequest(id=file_id, offset=7), metadata=metadata)
            body = b"".join([m.data async for m in stream])
            return body, {k: str(v) for k, v in await stream.initial_metadata()}

    body, headers = asyncio.run(call())
    assert body == data[7:]
    assert "x-gridstor-http-status" not in headers and "etag" not in headers


# -- conditional requests ------------------------------------------------------------------------------


def test_if_none_match_and_if_modified_since_answer_304(edge: Edge, stored: tuple[bytes, str]) -> None:
    _, file_id = stored
    first = get(edge, file_id)
    tag, modified = first.headers["etag"], first.headers["last-modified"]
    for headers in (
        {"if_none_match": tag},
        {"if_none_match": f'"nope", W/{tag}'},  # weak comparison
        {"if_none_match": "*"},
        {"if_modified_since": modified},
        {"if_modified_since": http_date(2_000_000_000)},
    ):
        got = get(edge, file_id, **headers)
        assert got.status == 304, headers
        assert got.body == b""
        assert got.headers["etag"] == tag and got.headers["cache-control"] == CACHE_CONTROL
        no_grpc_headers(got.headers)
    assert get(edge, file_id, "HEAD", if_none_match=tag).status == 304
    # Not matching: the whole file. If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    assert get(edge, file_id, if_none_match='"other"').status == 200
    assert get(edge, file_id, if_modified_since=http_date(1_000_000_000)).status == 200
    assert get(edge, file_id, if_none_match='"other"', if_modified_since=modified).status == 200
    assert get(edge, file_id, if_modified_since="not a date").status == 200


def test_if_range_and_if_match(edge: Edge, stored: tuple[bytes, str]) -> None:
    data, file_id = stored
    first = get(edge, file_id, "HEAD")
    tag, modified = first.headers["etag"], first.headers["last-modified"]
    same = get(edge, file_id, range="bytes=10-19", if_range=tag)
    assert same.status == 206 and same.body == data[10:20]
    assert get(edge, file_id, range="bytes=10-19", if_range=modified).status == 206
    changed = get(edge, file_id, range="bytes=10-19", if_range='"another"')
    assert changed.status == 200 and changed.body == data
    assert get(edge, file_id, range="bytes=10-19", if_range=f"W/{tag}").status == 200  # If-Range is strong
    assert get(edge, file_id, range="bytes=0-0", if_match=tag).status == 206
    refused = get(edge, file_id, if_match='"another"')
    assert refused.status == 412 and "If-Match" in refused.json()["message"]
    assert get(edge, file_id, if_unmodified_since=http_date(1_000_000_000)).status == 412


# -- interrupted downloads resumed ---------------------------------------------------------------------


def interrupted(argv: list[str], out: Path, at_least: int) -> None:
    """Run a rate-limited download of ``big`` and SIGKILL it once ``out`` holds ``at_least`` bytes (not all)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(
            lambda: out.exists() and out.stat().st_size >= at_least,
            f"{argv[0]} to write {at_least} bytes",
            within=60,
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert at_least <= out.stat().st_size < BIG, out.stat().st_size


def test_curl_resumes_an_interrupted_download(edge: Edge, big: tuple[bytes, str], tmp_path: Path) -> None:
    data, file_id = big
    out = tmp_path / "curl.bin"
    # curl's rate limit reads a burst (what the buffers hold), then pauses: it is stopped in between.
    interrupted(["curl", "-sS", "--limit-rate", "100K", "-o", str(out), url(edge, file_id)], out, 600_000)
    done = subprocess.run(
        ["curl", "-sS", "--fail", "-C", "-", "-o", str(out), url(edge, file_id)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


@needs_wget
def test_wget_resumes_an_interrupted_download(edge: Edge, big: tuple[bytes, str], tmp_path: Path) -> None:
    data, file_id = big
    out = tmp_path / "wget.bin"
    interrupted([str(WGET), "-q", "--limit-rate=512k", "-O", str(out), url(edge, file_id)], out, 600_000)
    done = subprocess.run(
        [str(WGET), "-c", "-S", "-O", str(out), url(edge, file_id)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "206 Partial Content" in done.stderr  # wget -S prints the response headers
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    again = subprocess.run(
        [str(WGET), "-c", "-O", str(out), url(edge, file_id)], capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 0, again.stderr  # complete already: wget's range past the end gets a 416
    assert out.stat().st_size == BIG


@needs_wget
def test_wget_spider_sees_the_file(edge: Edge, stored: tuple[bytes, str]) -> None:
    """Tools that probe with HEAD (wget --spider) find the file and its length."""
    _, file_id = stored
    done = subprocess.run(
        [str(WGET), "--spider", "-S", url(edge, file_id)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"content-length: {SIZE}" in done.stderr.lower()
    assert f"Length: {SIZE} " in done.stderr


# -- uploads: forms, names, extensions -----------------------------------------------------------------


def curl_form(edge: Edge, *fields: str, query: str = "") -> tuple[int, dict[str, str]]:
    args: list[str] = []
    for f in fields:
        args += ["-F", f]
    got = curl("-H", f"authorization: Bearer {edge.token}", *args, f"{edge.base}/v1/files{query}")
    assert got.rc == 0, got.stderr
    return got.status, json.loads(got.body)


def test_curl_form_upload_stores_the_file_with_its_name_and_type(edge: Edge, tmp_path: Path) -> None:
    photo = tmp_path / "Holiday Photo.PNG"
    data = os.urandom(200_000) + b"\r\n--not-a-boundary\r\n" + os.urandom(1000)
    photo.write_bytes(data)
    status, reply = curl_form(edge, f"file=@{photo};type=image/png")
    assert status == 200, reply
    assert reply["name"] == "Holiday Photo.PNG" and reply["ext"] == ".png" and reply["note"] == ""
    assert reply["size"] == str(len(data))  # int64 is a JSON string (the protobuf JSON mapping)
    file_id = wait_done(edge, reply["job"])["file_id"]
    assert file_id.endswith(".png")
    got = get(edge, file_id)
    assert got.body == data and got.headers["content-type"] == "image/png"
    assert reply["hash"] == file_id[:48]


def test_form_with_more_than_one_file_or_a_field_is_refused(edge: Edge, tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    status, reply = curl_form(edge, f"file=@{a}", f"other=@{b}")
    assert status == 400 and "a second file 'b.txt'" in reply["message"], reply
    status, reply = curl_form(edge, "comment=hello", f"file=@{a}")
    assert status == 400 and "field 'comment' that is not a file" in reply["message"], reply
    status, reply = curl_form(edge, f"file=@{a}", "comment=hello")
    assert status == 400 and "a field 'comment'" in reply["message"], reply
    assert not edge.gw.spool_files()  # nothing kept


def test_each_upload_keeps_its_own_extension(edge: Edge) -> None:
    data = os.urandom(5000)
    first = wait_done(edge, upload(edge, data, "x.bin")["job"])["file_id"]
    reply = upload(edge, data, "photo.png", content_type="image/png")
    assert reply["ext"] == ".png"
    second = wait_done(edge, reply["job"])
    assert second["deduplicated"] is True
    key = first.split(".")[0]
    assert first == key + ".bin" and second["file_id"] == key + ".png"
    assert get(edge, key + ".png").headers["content-type"] == "image/png"
    assert get(edge, key + ".bin").headers["content-type"] == "application/octet-stream"
    assert get(edge, key).headers["content-type"] == "application/octet-stream"
    # An extension nobody uploaded the content as changes nothing.
    html = get(edge, key + ".html")
    assert html.headers["content-type"] == "application/octet-stream" and html.body == data
    assert get(edge, key + ".png").headers["content-disposition"] == f'inline; filename="{key}.png"'


@pytest.mark.parametrize(
    ("name", "ext", "note"),
    [
        ("y.t@r", "", "'.t@r' cannot be part of a file id"),
        ("a." + "x" * 100, "", "cannot be part of a file id"),
        ("foo.a.b.c.d", ".b.c.d", ""),
        ("archive.TAR.GZ", ".tar.gz", ""),
    ],
)
def test_extensions_a_file_id_cannot_carry_are_reported(edge: Edge, name: str, ext: str, note: str) -> None:
    reply = upload(edge, os.urandom(100), name)
    assert reply["ext"] == ext
    assert note in reply["note"] and bool(reply["note"]) == bool(note)
    file_id = wait_done(edge, reply["job"])["file_id"]
    assert file_id == reply["hash"] + file_id[48:56] + ext


def test_rest_replies_carry_no_grpc_headers(edge: Edge) -> None:
    for reply in (
        edge.request("GET", "/v1/pubkey"),
        edge.request("GET", "/v1/files/" + "0" * 56),
        edge.request("GET", "/v1/files/nope"),
        edge.request("POST", "/v1/files?name=a", b"x", {"content-type": "text/plain"}),  # 401
    ):
        no_grpc_headers(reply.headers)


def test_upload_page_is_served_at_the_root(edge: Edge) -> None:
    page = edge.request("GET", "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert b'data-mode="secret"' in page.body  # the edge fixture runs in secret mode
    script = edge.request("GET", "/upload.js")
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    assert b"/v1/files" in script.body
    assert edge.request("GET", "/upload.css").status == 200
    assert edge.request("HEAD", "/").status == 200
    assert edge.request("GET", "/nothing-here").status == 404
