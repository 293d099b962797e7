"""Content types and content-disposition headers for downloads.

Types come from Python's built-in table only (a private ``MimeTypes``, not the
host's /etc/mime.types), so every gateway answers the same for an extension.
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from urllib.parse import quote

DEFAULT_TYPE = "application/octet-stream"
MAX_FILENAME = 200
MAX_CONTENT_TYPE = 255

_TYPES = mimetypes.MimeTypes()
# A compressed file is served as the compressed bytes (no Content-Encoding), so its type is the container's.
_ENCODING_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}
# type/subtype[; parameters], printable ASCII: what can go into a header unchanged.
_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}(\s*;[ -~]*)?$")
# Types a browser would run script in if shown inline from the gateway's origin.
_ACTIVE = frozenset(
    {
        "text/html",
        "application/xhtml+xml",
        "image/svg+xml",
        "text/xml",
        "application/xml",
        "text/javascript",
        "application/javascript",
        "application/ecmascript",
        "text/ecmascript",
    }
)
_ASCII_SAFE = re.compile(r"[^A-Za-z0-9 ._()+,=@~\[\]!#$&'^{}-]")


def type_for_ext(ext: str) -> str:
    """The MIME type of an extension like ``.jpg`` or ``.tar.gz``; octet-stream when unknown."""
    if not ext:
        return DEFAULT_TYPE
    kind, encoding = _TYPES.guess_type("f" + ext, strict=False)
    if encoding:
        return _ENCODING_TYPES.get(encoding, DEFAULT_TYPE)
    return kind or DEFAULT_TYPE


def content_type_for(stored: str, ext: str) -> str:
    """The type given at upload when it is a well-formed MIME type, else the one of the extension."""
    stored = stored.strip()
    if stored and len(stored) <= MAX_CONTENT_TYPE and _MIME.match(stored):
        return stored
    return type_for_ext(ext)


def is_active(content_type: str) -> bool:
    """Whether a browser would execute script in a document of this type."""
    return content_type.split(";", 1)[0].strip().lower() in _ACTIVE


def safe_filename(name: str, default: str) -> str:
    """``name`` reduced to a plain file name (no folders, control characters or leading dots); else ``default``."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C")
    base = base.strip().lstrip(".").strip()
    if len(base) > MAX_FILENAME:
        stem, dot, ext = base.rpartition(".")
        keep = f".{ext}" if dot and 0 < len(ext) <= 16 else ""
        base = (stem if keep else base)[: MAX_FILENAME - len(keep)] + keep
    return base or default


def content_disposition(filename: str, *, attachment: bool) -> str:
    """A content-disposition value: an ASCII ``filename`` plus RFC 5987 ``filename*`` when needed."""
    kind = "attachment" if attachment else "inline"
    fallback = "".join(_ascii_char(c) for c in filename).strip() or "download"
    value = f'{kind}; filename="{fallback}"'
    if fallback != filename:
        value += "; filename*=UTF-8''" + quote(filename, safe="!#$&+-.^_`|~")
    return value


def _ascii_char(c: str) -> str:
    """``c`` if it is safe in a quoted header value, its accent-less letter (é -> e), else ``_``."""
    if not _ASCII_SAFE.match(c):
        return c
    base = unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode()
    return base if base and not _ASCII_SAFE.search(base) else "_"
