"""multipart/form-data parsing (services/ingest/form.py): the one file part, wherever the pieces split."""

from __future__ import annotations

import os

import pytest
from google.api import httpbody_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from gridstor.v1 import common_pb2, ingest_pb2
from services.common.errors import InvalidInput
from services.ingest.form import MAX_HEADERS, FormFile, is_form
from tests.ingest.conftest import SuiteFactory

BOUNDARY = "----gridstorBoundary7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(disposition: str, data: bytes, content_type: str | None = None) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + data + b"\r\n"


def form(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    return preamble + b"".join(parts) + f"--{BOUNDARY}--\r\n".encode() + epilogue


def parse(body: bytes, cuts: list[int] | None = None, content_type: str = CONTENT_TYPE) -> tuple[FormFile, bytes]:
    """Feed ``body`` cut at ``cuts`` (default: one piece); the parser and the file bytes it gave."""
    parser = FormFile(content_type)
    out = b""
    start = 0
    for end in [*sorted(cuts or []), len(body)]:
        out += b"".join(parser.feed(body[start:end]))
        start = max(start, end)
    parser.finish()
    return parser, out


# Bytes that look like the start of a delimiter, and CR/LF runs, inside the file.
tricky = st.lists(
    st.sampled_from([b"\r\n", b"\r\n--", b"--", f"\r\n--{BOUNDARY[:-1]}".encode(), b"x", os.urandom(7)]),
    max_size=30,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(data=tricky, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_file_bytes_come_through_however_the_body_is_cut(data: bytes, cuts: list[int]) -> None:
    body = form(part('form-data; name="file"; filename="a.bin"', data, "application/x-thing"), preamble=b"ignored\r\n")
    parser, out = parse(body, cuts)
    assert out == data
    assert (parser.filename, parser.content_type, parser.field) == ("a.bin", "application/x-thing", "file")


def test_names_and_types_from_the_part_headers() -> None:
    body = form(part('form-data; name="f"; filename="caf\\u00e9.txt"; filename*=UTF-8\'\'caf%C3%A9.txt', b"x"))
    assert parse(body)[0].filename == "café.txt"
    raw = form(part('form-data; name="f"; filename="na\xc3\xafve.txt"'.encode("latin-1").decode("latin-1"), b"x"))
    assert parse(raw)[0].filename.endswith(".txt")
    unknown = form(part('form-data; name="f"; filename="x.mp4"', b"x", "application/octet-stream"))
    assert parse(unknown)[0].content_type == ""  # the extension's type is better than "unknown"
    quoted = form(part('form-data; name="f"; filename="a \\"b\\".png"', b"x"))
    assert parse(quoted)[0].filename == 'a "b".png'
    assert parse(form(part('form-data; name="f"; filename="e"', b"")))[1] == b""
    q = f'multipart/form-data; charset=utf-8; boundary="{BOUNDARY}"'
    assert parse(form(part('form-data; name="f"; filename="q"', b"data")), content_type=q)[1] == b"data"
    assert is_form("Multipart/Form-Data; boundary=x") and not is_form("multipart/mixed; boundary=x")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (form(part('form-data; name="a"; filename="1.txt"', b"1"), part('form-data; name="b"; filename="2.txt"', b"2")),
         "a second file '2.txt' after the file '1.txt'"),
        (form(part('form-data; name="a"; filename="1.txt"', b"1"), part('form-data; name="note"', b"hi")),
         "a field 'note' after the file"),
        (form(part('form-data; name="note"', b"hi"), part('form-data; name="a"; filename="1.txt"', b"1")),
         "a field 'note' that is not a file"),
        (form(part('form-data; name="a"; filename=""', b"")), "no file was chosen in the form's field 'a'"),
        (form(part('attachment; filename="x"', b"1")), "no Content-Disposition: form-data"),
        (form(), "holds no file part"),
        (form(part('form-data; name="a"; filename="1.txt"', b"12345"))[:-30], "ended before its closing boundary"),
        (b"no boundary anywhere" * 5000, "no boundary line where its body starts"),
        (f"--{BOUNDARY}junk\r\n".encode(), "malformed boundary line"),
        (f"--{BOUNDARY}\r\nX: {'y' * MAX_HEADERS}".encode(), "bytes of headers"),
    ],
)  # fmt: skip
def test_anything_but_one_file_is_refused_with_a_reason(body: bytes, why: str) -> None:
    with pytest.raises(InvalidInput, match=why.replace("(", r"\(")):
        parse(body)


def test_a_content_type_without_boundary_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no boundary parameter"):
        FormFile("multipart/form-data")


async def test_a_form_upload_stores_its_file(suite_factory: SuiteFactory) -> None:
    suite = await suite_factory()
    data = os.urandom(300_000)
    body = form(part('form-data; name="upload"; filename="Report.PDF"', data, "application/pdf"))
    step = 64 * 1024
    messages = [
        ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=body[i : i + step])) for i in range(0, len(body), step)
    ]
    messages[0].body.content_type = CONTENT_TYPE
    reply = await suite.ingest.Upload(iter(messages))
    assert (reply.name, reply.ext, reply.size) == ("Report.PDF", ".pdf", len(data))
    done = await suite.wait(reply.job)
    assert done.state == common_pb2.JOB_STATE_DONE and done.file_id.endswith(".pdf")
    assert await suite.download(done.file_id) == data
    bad = [ingest_pb2.UploadRequest(body=httpbody_pb2.HttpBody(data=form(), content_type=CONTENT_TYPE))]
    with pytest.raises(Exception, match="holds no file part"):
        await suite.ingest.Upload(iter(bad))
    assert suite.spool_files == []
