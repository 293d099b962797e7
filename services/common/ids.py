"""File ids: ``<blake3-192 hex, 48><metadata id hex, 8>[.ext]``.

The hash part names the content; the last 8 hex digits are the 0-db
sequential id of the metadata record, written as the value (not the bytes).
An extension is optional: one to three dot-separated lowercase parts of
letters and digits (``.jpg``, ``.tar.gz``). Anything else is refused with
``InvalidFileId`` before storage is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.errors import InvalidFileId, InvalidInput

HASH_BYTES = 24
HASH_HEX = HASH_BYTES * 2
META_HEX = 8
ID_HEX = HASH_HEX + META_HEX
MAX_META_ID = 16**META_HEX - 1
MAX_EXT_LEN = 32

_EXT = re.compile(r"^(\.[a-z0-9]{1,16}){1,3}$")
_HEX = re.compile(r"^[0-9a-f]*$")


@dataclass(frozen=True)
class FileId:
    """A parsed file id."""

    hash: bytes
    meta_id: int
    ext: str = ""

    def __post_init__(self) -> None:
        if len(self.hash) != HASH_BYTES:
            raise InvalidFileId(f"file hash must be {HASH_BYTES} bytes, got {len(self.hash)}")
        if not 0 <= self.meta_id <= MAX_META_ID:
            raise InvalidFileId(f"metadata id {self.meta_id} does not fit {META_HEX} hex digits")
        if self.ext:
            check_ext(self.ext)

    @property
    def key(self) -> str:
        """The 56-hex id without extension."""
        return f"{self.hash.hex()}{self.meta_id:0{META_HEX}x}"

    def __str__(self) -> str:
        return self.key + self.ext


def parse_file_id(text: str) -> FileId:
    """Parse ``text`` or raise InvalidFileId saying exactly what is wrong."""
    if not isinstance(text, str):
        raise InvalidFileId("file id must be a string")
    if not text:
        raise InvalidFileId("file id is empty")
    if len(text) > ID_HEX + MAX_EXT_LEN:
        raise InvalidFileId(f"file id is {len(text)} characters; at most {ID_HEX + MAX_EXT_LEN} are allowed")
    head, dot, tail = text.partition(".")
    if len(head) != ID_HEX:
        raise InvalidFileId(f"file id must start with {ID_HEX} hex characters, got {len(head)} before the extension")
    if not _HEX.match(head):
        raise InvalidFileId("file id must be lowercase hex (0-9, a-f) before the extension")
    ext = ""
    if dot:
        ext = "." + tail
        try:
            check_ext(ext)
        except InvalidInput as exc:
            raise InvalidFileId(f"file id has a bad extension: {exc}") from None
    return FileId(hash=bytes.fromhex(head[:HASH_HEX]), meta_id=int(head[HASH_HEX:], 16), ext=ext)


def check_ext(ext: str) -> str:
    """Validate a normalized extension (with leading dot) and return it."""
    if len(ext) > MAX_EXT_LEN or not _EXT.match(ext):
        raise InvalidInput(
            f"extension {ext[:40]!r} is not valid: use up to 3 parts of 1-16 lowercase letters or digits,"
            " like .jpg or .tar.gz"
        )
    return ext


def ext_from_name(name: str) -> str:
    """Derive a normalized extension from an uploaded file name (or an extension).

    The rule: of the name's last path component, lowercased, the longest
    suffix of at most three dot-separated parts that is a valid extension
    (``check_ext``); parts that would not be valid are dropped from the left.
    ``photo.JPG`` -> ``.jpg``; ``backup.tar.gz`` -> ``.tar.gz``;
    ``foo.a.b.c.d`` -> ``.b.c.d``; ``my.holiday photos.zip`` -> ``.zip``;
    ``README`` -> ``""``; ``y.t@r`` -> ``""`` (see ``dropped_ext``). Never raises.
    """
    parts = _name_parts(name)[-3:]
    while parts:
        ext = "." + ".".join(parts)
        if len(ext) <= MAX_EXT_LEN and _EXT.match(ext):
            return ext
        parts = parts[1:]
    return ""


def dropped_ext(name: str) -> str:
    """Why a name's extension cannot be part of a file id (its last part is not valid); "" when it can or has none."""
    parts = _name_parts(name)
    if not parts or not parts[-1] or ext_from_name(name):
        return ""
    shown = "." + parts[-1][:40] + ("..." if len(parts[-1]) > 40 else "")
    return (
        f"the extension {shown!r} cannot be part of a file id (up to 3 parts of 1-16 lowercase"
        " letters or digits, like .jpg or .tar.gz); the file is stored without one"
    )


def _name_parts(name: str) -> list[str]:
    """The dot-separated parts after the first of a name's last path component, lowercased."""
    return name.replace("\\", "/").rsplit("/", 1)[-1].lower().split(".")[1:]
