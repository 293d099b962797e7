"""What a REST download answers (RFC 9110): validators, conditional requests, byte ranges, HEAD.

Envoy's transcoder calls Download with the HTTP request's headers as metadata
(``range``, ``if-none-match``, ...) and ``x-envoy-original-method`` (GET or
HEAD), and turns the initial metadata Download sends into response headers.
It cannot set the status or Content-Length itself, so Download also sends
``x-gridstor-http-status`` (206, 304, 412, 416; absent for 200) and
``x-gridstor-content-length``, which the edge's Lua filter (parts
apply_http_status and apply_content_length in services/edge/envoy.py) turns
into ``:status`` and ``content-length``.
A gRPC client never carries ``x-envoy-original-method`` (the Lua filter drops
one sent by any client), so none of this applies to it: offset and length
stay the whole of gRPC's Download.

The order of the checks is RFC 9110 section 13.2.2: If-Match, else
If-Unmodified-Since (412); If-None-Match, else If-Modified-Since (304, GET and
HEAD); then Range for GET, guarded by If-Range. One range of the forms
``bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` answers 206 with Content-Range;
a range past the end answers 416 with ``Content-Range: bytes */size``. A
header that does not parse is ignored, as are several ranges and any range of
an empty file: those answer 200 with the whole file, which the RFC allows.
This module imports no grpc.
"""

from __future__ import annotations

import calendar
import email.utils
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

CACHE_CONTROL = "public, max-age=31536000, immutable"
STATUS_HEADER = "x-gridstor-http-status"  # rpc.HTTP_STATUS_TRAILER: the edge's Lua filter applies it
LENGTH_HEADER = "x-gridstor-content-length"
METHOD_HEADER = "x-envoy-original-method"  # set by Envoy's transcoder on every call it makes
REQUEST_HEADERS = ("range", "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since")
MAX_HEADER = 4096  # longer values are ignored, not parsed

_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_OBSOLETE_DATES = ("%A, %d-%b-%y %H:%M:%S GMT", "%a %b %d %H:%M:%S %Y")  # RFC 850, asctime


@dataclass(frozen=True)
class Request:
    """The HTTP side of a REST download: its method and the headers that change the answer."""

    method: str  # GET or HEAD
    headers: dict[str, str]

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]]) -> Request | None:
        """The HTTP request behind a transcoded call; None for a gRPC client (no transcoder method)."""
        method = None
        headers: dict[str, str] = {}
        for key, value in metadata:
            if isinstance(value, bytes):
                continue
            if key == METHOD_HEADER:
                method = value.upper()  # the last one: Envoy's transcoder appends its own
            elif key in REQUEST_HEADERS and len(value) <= MAX_HEADER:
                # Several headers of one name are one comma-separated list (RFC 9110 5.3).
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if method is None:
            return None
        return cls(method, headers)

    @property
    def head(self) -> bool:
        return self.method == "HEAD"


@dataclass(frozen=True)
class Answer:
    """The status of a REST download and the bytes of the file it sends (``start`` to ``end``, exclusive)."""

    status: int
    start: int = 0
    end: int = 0
    message: str = ""  # 412 / 416: why; sent as the transcoder's JSON error body

    @property
    def sends_file(self) -> bool:
        return self.status in (200, 206)


def etag(key: str) -> str:
    """The strong ETag of a file: its id without extension names immutable content."""
    return f'"{key}"'


def http_date(seconds: int) -> str:
    """An IMF-fixdate, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return email.utils.formatdate(seconds, usegmt=True)


def parse_http_date(text: str) -> int | None:
    """Seconds since the epoch of an HTTP date in any of its three forms; None if it is not one."""
    text = text.strip()
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        parsed = None
    if parsed is not None and parsed.tzinfo is not None:
        return int(parsed.timestamp())
    for form in _OBSOLETE_DATES:
        try:
            t = time.strptime(text, form)
        except ValueError:
            continue
        return calendar.timegm(t)
    return None


def etags(value: str) -> list[tuple[bool, str]] | None:
    """An If-Match / If-None-Match list as (weak, opaque tag); [] for ``*``; None if it does not parse."""
    if value.strip() == "*":
        return []
    found: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        if not value[pos:].strip(" \t,"):
            break
        m = _ETAG.match(value, pos)
        if m is None:
            return None
        found.append((bool(m.group(1)), m.group(2)))
        pos = m.end()
    return found or None


def _matches(header: str, tag: str, *, weak: bool) -> bool | None:
    """Whether a tag list names ``tag`` (``*`` names any); weak or strong comparison; None if unparsable."""
    tags = etags(header)
    if tags is None:
        return None
    if not tags:  # "*": the file exists
        return True
    return any(t == tag and (weak or not is_weak) for is_weak, t in tags)


def byte_range(value: str, size: int) -> tuple[int, int] | str | None:
    """One range of ``bytes=a-b``, ``a-`` or ``-n`` as (start, end exclusive).

    None when the header is to be ignored (not one valid byte range, or an
    empty file); a message (str) when the range lies past the end (416).
    """
    m = _RANGE.match(value)
    if m is None or size == 0:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            return f"range {value.strip()} asks for no bytes"
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None  # invalid, so ignored (RFC 9110 14.1.1)
    if start >= size:
        return f"range {value.strip()} starts past the end of the file ({size} bytes)"
    end = size if not last else min(size, int(last) + 1)
    return start, end


def _if_range_holds(value: str, tag: str, modified: int) -> bool:
    """If-Range: the Range applies only while the file is the one named (strong ETag or exact date)."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        return _matches(value, tag, weak=False) is True
    return parse_http_date(value) == modified


def evaluate(req: Request, size: int, tag: str, modified: int, offset: int = 0, end: int | None = None) -> Answer:
    """The answer to ``req`` for a file of ``size`` bytes; ``offset``/``end``: the part asked by the query.

    A Range header selects within the whole file; the caller refuses it together with offset/length.
    """
    end = size if end is None else end
    h = req.headers
    if "if-match" in h:
        if not _matches(h["if-match"], tag, weak=False):
            return Answer(412, message=f"If-Match does not name this file (its ETag is {tag})")
    elif "if-unmodified-since" in h:
        since = parse_http_date(h["if-unmodified-since"])
        if since is not None and modified > since:
            return Answer(412, message=f"the file was stored after If-Unmodified-Since ({http_date(modified)})")
    if "if-none-match" in h:
        if _matches(h["if-none-match"], tag, weak=True):
            return Answer(304)
    elif "if-modified-since" in h:
        since = parse_http_date(h["if-modified-since"])
        if since is not None and modified <= since:
            return Answer(304)
    if req.head or "range" not in h:
        return Answer(200, offset, end)
    if "if-range" in h and not _if_range_holds(h["if-range"], tag, modified):
        return Answer(200, offset, end)
    chosen = byte_range(h["range"], size)
    if chosen is None:
        return Answer(200, offset, end)
    if isinstance(chosen, str):
        return Answer(416, message=chosen)
    return Answer(206, *chosen)


def response_headers(answer: Answer, size: int, tag: str, modified: int) -> list[tuple[str, str]]:
    """The headers a REST answer adds to the download's own (status and length hints for the edge)."""
    validators = [("etag", tag), ("last-modified", http_date(modified)), ("cache-control", CACHE_CONTROL)]
    if answer.status == 304:
        return [(STATUS_HEADER, "304"), *validators]
    if not answer.sends_file:
        return [
            (STATUS_HEADER, str(answer.status)),
            *([("content-range", f"bytes */{size}")] if answer.status == 416 else []),
            (LENGTH_HEADER, str(len(error_body(answer)))),
        ]
    out = [("accept-ranges", "bytes"), *validators, (LENGTH_HEADER, str(answer.end - answer.start))]
    if answer.status == 206:
        out += [(STATUS_HEADER, "206"), ("content-range", f"bytes {answer.start}-{answer.end - 1}/{size}")]
    return out


def error_body(answer: Answer) -> bytes:
    """The JSON body of a 412 or 416, shaped like the transcoder's errors (FAILED_PRECONDITION, OUT_OF_RANGE)."""
    code = 9 if answer.status == 412 else 11
    return json.dumps({"code": code, "message": answer.message, "details": []}, separators=(",", ":")).encode()
