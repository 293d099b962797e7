"""multipart/form-data uploads (an HTML form, ``curl -F``): the one file part's bytes, parsed as they arrive.

A form upload holds exactly one part, a file (its Content-Disposition has a
``filename``): its bytes are the upload, its filename and Content-Type the
upload's name and type. Anything else is refused with InvalidInput saying
what was found: a second part (another file or a field), a field that is not
a file, no file chosen, a missing or malformed boundary, a body that ends
before its closing boundary. The parser holds one part's headers (at most
MAX_HEADERS bytes) and less than a delimiter of file bytes; everything else
passes straight through to the spool.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from services.common.errors import InvalidInput

FORM_TYPE = "multipart/form-data"
MAX_HEADERS = 16 * 1024  # one part's header block
MAX_PREAMBLE = 64 * 1024  # bytes before the first boundary
# A browser (or curl) calls a file of unknown type this; the extension then says better.
UNKNOWN_TYPE = "application/octet-stream"

_BOUNDARY = re.compile(r'(?:^|;)\s*boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')
_PREAMBLE, _HEADERS, _BODY, _AFTER, _END = range(5)


def is_form(content_type: str) -> bool:
    """Whether a request's Content-Type is multipart/form-data."""
    return content_type.split(";", 1)[0].strip().lower() == FORM_TYPE


class FormFile:
    """Feed a multipart/form-data body in pieces; get the file part's bytes back. See the module docstring."""

    def __init__(self, content_type: str) -> None:
        m = _BOUNDARY.search(content_type.split(";", 1)[1] if ";" in content_type else "")
        if m is None:
            raise InvalidInput("the multipart/form-data upload has no boundary parameter in its Content-Type")
        boundary = (m.group(1) or m.group(2)).encode()
        self._delimiter = b"\r\n--" + boundary
        self._state = _PREAMBLE
        self._buf = b"\r\n"  # the first boundary may open the body, without a CRLF before it
        self._seen = 0
        self.filename = ""
        self.content_type = ""
        self.field = ""
        self.ready = False  # the file part's headers are parsed; its bytes follow

    def feed(self, data: bytes) -> list[bytes]:
        """The file bytes in ``data`` (possibly none yet); InvalidInput when the form is not one file."""
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._state == _PREAMBLE:
                if not self._skip_to_delimiter():
                    return out
            elif self._state == _AFTER:
                if not self._after_delimiter():
                    return out
            elif self._state == _HEADERS:
                if not self._headers():
                    return out
            elif self._state == _BODY:
                done = self._body(out)
                if not done:
                    return out
            else:  # _END: an epilogue is ignored
                self._buf = b""
                return out

    def finish(self) -> None:
        """The body is complete: InvalidInput unless it held its file and ended with the closing boundary."""
        if not self.ready:
            raise InvalidInput("the multipart/form-data upload holds no file part")
        if self._state != _END:
            raise InvalidInput("the multipart/form-data upload ended before its closing boundary (truncated?)")

    def _skip_to_delimiter(self) -> bool:
        at = self._buf.find(self._delimiter)
        if at < 0:
            self._seen += max(0, len(self._buf) - len(self._delimiter))
            if self._seen > MAX_PREAMBLE:
                raise InvalidInput("the multipart/form-data upload has no boundary line where its body starts")
            self._buf = self._buf[-len(self._delimiter) :]
            return False
        self._buf = self._buf[at + len(self._delimiter) :]
        self._state = _AFTER
        return True

    def _after_delimiter(self) -> bool:
        """After a delimiter: ``--`` closes the body, else the line ends and a part's headers follow."""
        if len(self._buf) < 2:
            return False
        if self._buf.startswith(b"--"):
            self._state = _END
            return True
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > 256:
                raise InvalidInput("the multipart/form-data upload has a malformed boundary line")
            return False
        if self._buf[:end].strip(b" \t"):
            raise InvalidInput("the multipart/form-data upload has a malformed boundary line")
        self._buf = self._buf[end + 2 :]
        self._state = _HEADERS
        return True

    def _headers(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if self._buf.startswith(b"\r\n"):  # a part without headers
            end = -2
        elif end < 0:
            if len(self._buf) > MAX_HEADERS:
                raise InvalidInput(f"a part of the multipart/form-data upload has over {MAX_HEADERS} bytes of headers")
            return False
        block, self._buf = self._buf[: max(end, 0)], self._buf[end + 4 :]
        self._start_part(_parse_headers(block))
        self._state = _BODY
        return True

    def _start_part(self, headers: dict[str, str]) -> None:
        disposition = headers.get("content-disposition", "")
        params = _params(disposition)
        name = params.get("name", "")
        if self.ready:
            what = f"a second file {params['filename']!r}" if params.get("filename") else f"a field {name!r}"
            raise InvalidInput(
                f"the multipart/form-data upload holds {what} after the file {self.filename!r}: send one file per"
                " upload, with no other fields"
            )
        if not disposition.lower().startswith("form-data"):
            raise InvalidInput("a part of the multipart/form-data upload has no Content-Disposition: form-data")
        if "filename" not in params:
            raise InvalidInput(
                f"the multipart/form-data upload holds a field {name!r} that is not a file: send one file per upload,"
                " with no other fields"
            )
        if not params["filename"]:
            raise InvalidInput(f"no file was chosen in the form's field {name!r}")
        kind = headers.get("content-type", "").strip()
        self.filename = params["filename"]
        self.content_type = "" if kind.lower() == UNKNOWN_TYPE else kind
        self.field = name
        self.ready = True

    def _body(self, out: list[bytes]) -> bool:
        """Pass on the part's bytes up to the next delimiter; True once it is found."""
        at = self._buf.find(self._delimiter)
        if at < 0:
            keep = len(self._delimiter) - 1  # the start of a delimiter split across two pieces
            if len(self._buf) > keep:
                out.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
            return False
        if at:
            out.append(self._buf[:at])
        self._buf = self._buf[at + len(self._delimiter) :]
        self._state = _AFTER
        return True


def _parse_headers(block: bytes) -> dict[str, str]:
    """A part's header lines, names lowercased (browsers send file names as raw UTF-8)."""
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", errors="replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


def _params(disposition: str) -> dict[str, str]:
    """Content-Disposition parameters; ``filename*`` (RFC 5987) wins over ``filename``."""
    out: dict[str, str] = {}
    for m in _PARAM.finditer(disposition):
        key = m.group(1).lower()
        value = re.sub(r"\\(.)", r"\1", m.group(2)) if m.group(2) is not None else m.group(3)
        if key == "filename*":
            charset, _, rest = value.partition("'")
            _, _, encoded = rest.partition("'")
            out["filename"] = unquote(encoded, encoding=charset or "utf-8", errors="replace")
        elif key not in out:
            out[key] = value
    return out
