"""Downloads: check everything a request names before the first byte goes out, then re-cut the stream.

Through Envoy's transcoder a stream that fails after its first message reaches
an HTTP client as a 200 with a silently truncated body, so ``plan`` resolves
the record and validates the range up front, and the servicer pulls the first
piece of plaintext (the first chunk's shards) before it sends anything.
A call through the transcoder also gets HTTP's answers (services/meta/web.py):
validators, conditional requests, byte ranges and HEAD.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from services.common.errors import InvalidInput, OutOfRange
from services.common.ids import FileId, parse_file_id
from services.common.mime import content_disposition, content_type_for, is_active, safe_filename
from services.meta import web
from services.meta.catalog import Catalog, Entry

MESSAGE_SIZE = 1024 * 1024  # measured fastest for downloads when the design was made


@dataclass(frozen=True)
class Plan:
    """A validated download: what to read and the headers to send first.

    ``body`` set: send it (one message) instead of the file, e.g. nothing for
    HEAD or a 304, the JSON error of a 412 or 416.
    """

    entry: Entry
    offset: int
    end: int  # exclusive
    content_type: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None = None
    status: int = 200  # what a REST client is answered (web.Answer); 200 for gRPC

    @property
    def length(self) -> int:
        return self.end - self.offset


async def plan(
    catalog: Catalog,
    file_id: str,
    offset: int,
    length: int,
    *,
    filename: str = "",
    attachment: bool = False,
    http: web.Request | None = None,
) -> Plan:
    """Validate a download request and resolve its record; nothing is read from storage for a bad request.

    InvalidFileId (bad grammar) and InvalidInput (negative numbers, a Range
    header with offset/length) come before any storage access; NotFound when
    no record matches the id; OutOfRange when ``offset`` is past the end.
    ``length`` 0 means through the end. ``http``: the REST request behind the
    call (services/meta/web.py), whose headers may make it a 206, 304, 412,
    416 or a HEAD.
    """
    fid = parse_file_id(file_id)
    if offset < 0:
        raise InvalidInput(f"offset must not be negative, got {offset}")
    if length < 0:
        raise InvalidInput(f"length must not be negative (0 = through the end), got {length}")
    if http is not None and "range" in http.headers and (offset or length):
        raise InvalidInput("a Range header cannot be combined with offset/length: use one of them")
    entry = await catalog.resolve(fid)
    size = entry.record.size
    if offset > size:
        raise OutOfRange(f"offset {offset} is beyond the end of the file ({size} bytes)")
    end = size if length == 0 else min(size, offset + length)
    known = fid.ext if fid.ext in entry.record.other_types else entry.record.ext
    content_type = content_type_for_id(entry, fid.ext)
    name = safe_filename(filename, default=str(FileId(fid.hash, fid.meta_id, known)))
    disposition = ("content-disposition", content_disposition(name, attachment=attachment))
    if http is None:
        return Plan(entry, offset, end, content_type, _file_headers(disposition, size, offset, end, content_type))
    tag = web.etag(fid.key)
    answer = web.evaluate(http, size, tag, entry.record.created, offset, end)
    extra = web.response_headers(answer, size, tag, entry.record.created)
    if answer.status == 304:
        return Plan(entry, 0, 0, content_type, (disposition, *extra), b"", 304)
    if not answer.sends_file:  # 412, 416: a JSON error like the transcoder's
        return Plan(entry, 0, 0, "application/json", tuple(extra), web.error_body(answer), answer.status)
    headers = (*_file_headers(disposition, size, answer.start, answer.end, content_type), *extra)
    return Plan(entry, answer.start, answer.end, content_type, headers, b"" if http.head else None, answer.status)


def content_type_for_id(entry: Entry, ext: str) -> str:
    """The type a download is served with: that of an upload under the id's extension, else the first upload's.

    The same content uploaded as ``x.bin`` and later as ``photo.png`` has one
    record; ``<id>.png`` is served as image/png and ``<id>.bin`` (or ``<id>``)
    as the first upload said. An extension no upload gave changes nothing, so
    a link cannot make a file render as a type nobody uploaded it as.
    """
    record = entry.record
    if ext and ext != record.ext and ext in record.other_types:
        return content_type_for(record.other_types[ext], ext)
    return content_type_for(record.content_type, record.ext)


def _file_headers(
    disposition: tuple[str, str], size: int, offset: int, end: int, content_type: str
) -> tuple[tuple[str, str], ...]:
    headers = [
        disposition,
        ("x-gridstor-size", str(size)),
        ("x-gridstor-offset", str(offset)),
        ("x-gridstor-length", str(end - offset)),
        ("x-content-type-options", "nosniff"),
    ]
    if is_active(content_type):
        # Shown inline from the gateway's origin, an uploaded page must not run script there.
        headers.append(("content-security-policy", "sandbox"))
    return tuple(headers)


async def reslice(pieces: AsyncIterator[bytes], size: int = MESSAGE_SIZE) -> AsyncGenerator[bytes, None]:
    """Re-cut ``pieces`` into messages of exactly ``size`` bytes (the last may be shorter).

    Pieces are sliced as memoryviews and each message is materialized once
    (``bytes`` of one slice or ``join`` of several), so every byte is copied
    once; a piece that is already one whole message passes through uncopied.
    ``pieces`` is closed when this generator is, so its read-ahead stops.
    """
    parts: list[memoryview] = []
    have = 0
    try:
        async for piece in pieces:
            if not have and len(piece) == size:
                yield piece
                continue
            view = memoryview(piece)
            while view:
                take = min(size - have, len(view))
                if not have and take == size:
                    yield bytes(view[:take])
                else:
                    parts.append(view[:take])
                    have += take
                    if have == size:
                        yield b"".join(parts)
                        parts, have = [], 0
                view = view[take:]
        if have:
            yield b"".join(parts)
    finally:
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()
