"""Format 1 of a dir backend folder, byte for byte: file names, the index header and its records.

Nothing here touches the disk; ``folder`` and ``backend`` read and write these bytes.

An index record is ``crc32 u32 | kind u8 | key length u8 | segment u32 |
offset u64 | length u32 | order u64 | key``, little-endian; the CRC covers
everything after itself. The header is ``magic | backend id (16 bytes) |
generation u64 | first usable segment u32 | next free id u64 | crc32``, the CRC
covering everything before it. ``tests/common/fixtures/dir_format1`` pins it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Final, NamedTuple

from services.common.backends.base import MAX_VALUE_SIZE, SEQ_KEY_SIZE, seq_id

FORMAT_VERSION: Final = 1

META: Final = "meta.json"
INDEX: Final = "index.log"
LOCK: Final = "lock"
DATA: Final = "data"
SEG_SUFFIX: Final = ".seg"
TMP_MARK: Final = ".tmp-"
OWN_NAMES: Final = frozenset({META, INDEX, LOCK, DATA, "lost+found"})  # a fresh ext4 disk has lost+found

MAGIC: Final = b"GSDIRIX1"
# magic, backend id, generation, first usable segment, next free id, crc32
HEADER: Final = struct.Struct("<8s16sQIQI")
# crc32, kind, key length, segment, offset, length, order
REC: Final = struct.Struct("<IBBIQIQ")
SET: Final = 1
DEL: Final = 2

#: ``apply(kind, key, segment, offset, length, order)`` for each record read.
ApplyRecord = Callable[[int, bytes, int, int, int, int], None]


class Header(NamedTuple):
    """The fields of index.log's header (after the magic, before the CRC)."""

    backend_id: bytes
    generation: int
    base_seg: int
    next_id: int


def seg_name(n: int) -> str:
    """The file name of segment ``n`` in the data folder."""
    return f"{n:08d}{SEG_SUFFIX}"


def pack_header(backend_id: bytes, generation: int, base_seg: int, next_id: int) -> bytes:
    """index.log's header, CRC included."""
    body = HEADER.pack(MAGIC, backend_id, generation, base_seg, next_id, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_header(raw: bytes) -> Header:
    """Parse a header; ValueError (worded to follow the file's path) when it is short or damaged."""
    if len(raw) != HEADER.size:
        raise ValueError("is shorter than its header")
    magic, backend_id, generation, base_seg, next_id, crc = HEADER.unpack(raw)
    if magic != MAGIC or crc != zlib.crc32(raw[:-4]):
        raise ValueError("has a damaged header")
    return Header(backend_id, generation, base_seg, next_id)


def pack_record(kind: int, key: bytes, seg: int, off: int, length: int, order: int) -> bytes:
    """One index record, CRC included."""
    body = REC.pack(0, kind, len(key), seg, off, length, order)[4:] + key
    return struct.pack("<I", zlib.crc32(body)) + body


def apply_records(buf: bytes, apply: ApplyRecord) -> tuple[int, bool]:
    """Call ``apply`` for each whole, valid record in ``buf``.

    Returns (bytes used, False if an invalid record stopped it). A record cut
    short at the end is left unused with True: more bytes may complete it.
    """
    view = memoryview(buf)
    size = len(buf)
    p = 0
    head = REC.size
    unpack, crc32 = REC.unpack_from, zlib.crc32
    while size - p >= head:
        crc, kind, klen, seg, off, length, order = unpack(buf, p)
        if kind not in (SET, DEL) or klen == 0 or length > MAX_VALUE_SIZE:
            return p, False
        end = p + head + klen
        if end > size:
            break
        if crc32(view[p + 4 : end]) != crc:
            return p, False
        apply(kind, buf[p + head : end], seg, off, length, order)
        p = end
    return p, True


def describe_key(key: bytes) -> str:
    """A key as error messages name it."""
    if len(key) == SEQ_KEY_SIZE:
        return f"key {key.hex()} (id {seq_id(key)})"
    return f"key {key[:32]!r}{'...' if len(key) > 32 else ''}"
