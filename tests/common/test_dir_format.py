"""The dir backend's on-disk format 1 stays what existing folders hold.

``fixtures/dir_format1/`` was written by ``write_recipe`` with the format-1 code as it
stood before the backend was split into modules (commit 2e4ff5e,
``services/common/backends/dirstore.py``). The code of today must open and
read it, and must write the very same bytes for the same writes. Compaction is the
exception: it works segment by segment since issue 13 (relocation records appended,
not a whole new index), so the seq folder's layout after ``compact`` differs, while
every byte it writes is still format 1 and the contents are the same.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

from services.common.backends.base import Mode, seq_id, seq_key
from services.common.backends.dirstore import DirBackend
from services.common.backends.uri import DirURI

FIXTURE = Path(__file__).parent / "fixtures" / "dir_format1"

# The documented layout, spelled out here on purpose rather than imported.
HEADER = struct.Struct("<8s16sQIQI")  # magic, backend id, generation, first segment, next id, crc32
RECORD = struct.Struct("<IBBIQIQ")  # crc32, kind, key length, segment, offset, length, order

LONG_KEY = b"k" * 255


def _seq_value(i: int) -> bytes:
    return (b"seq value %d;" % i) * (i % 3 + 1)


async def write_recipe(cls: Any, root: Path) -> None:
    """The writes behind the fixture; ``cls`` is a DirBackend class (today's or the old one); ``root`` exists."""
    seq = await cls.open(DirURI(str(root / "seq")), Mode.SEQ, fsync="never", segment_size=64)
    keys = [await seq.put(_seq_value(i)) for i in range(10)]
    keys.append(await seq.put(b""))
    await seq.set(keys[3], b"updated three")
    await seq.delete(keys[5])
    await seq.compact()
    keys.append(await seq.put(b"after compaction"))
    keys.append(await seq.put(b"and one more"))
    await seq.delete(keys[1])
    await seq.close()

    user = await cls.open(DirURI(str(root / "user")), Mode.USER, fsync="never", segment_size=64)
    for key, value in ((b"alpha", b"first alpha"), (b"beta", b"b" * 100), (LONG_KEY, b"long key"), (b"gamma", b"g")):
        await user.set(key, value)
    await user.set(b"alpha", b"second alpha")
    await user.delete(b"beta")
    await user.set(b"empty", b"")
    await user.close()


SEQ_EXPECTED = {
    seq_key(i): v
    for i, v in [
        (0, _seq_value(0)),
        (2, _seq_value(2)),
        (3, b"updated three"),
        (4, _seq_value(4)),
        *[(i, _seq_value(i)) for i in range(6, 10)],
        (10, b""),
        (11, b"after compaction"),
        (12, b"and one more"),
    ]
}
USER_EXPECTED = {LONG_KEY: b"long key", b"gamma": b"g", b"alpha": b"second alpha", b"empty": b""}  # last-write order


async def _contents(backend: DirBackend) -> dict[bytes, bytes | None]:
    return {key: await backend.get(key) async for key in backend.scan()}


def _copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    return root


async def test_old_folders_open_and_read(tmp_path: Path) -> None:
    root = _copy_fixture(tmp_path)
    seq = await DirBackend.open(DirURI(str(root / "seq")), Mode.SEQ, fsync="never")
    assert list((await _contents(seq)).items()) == list(SEQ_EXPECTED.items())
    assert await seq.get(seq_key(5)) is None
    assert seq_id(await seq.put(b"new")) == 13  # ids go on where the old code stopped
    await seq.close()

    user = await DirBackend.open(DirURI(str(root / "user")), Mode.USER, fsync="never")
    assert list((await _contents(user)).items()) == list(USER_EXPECTED.items())
    assert await user.get(b"beta") is None
    info = await user.info()
    assert (info.entries, info.used_bytes) == (4, sum(map(len, USER_EXPECTED.values())))
    await user.close()


async def test_old_folder_with_a_torn_tail(tmp_path: Path) -> None:
    root = _copy_fixture(tmp_path)
    index = root / "seq" / "index.log"
    whole = index.read_bytes()
    last = whole[-(RECORD.size + 8) :]  # the last record: a delete of an 8-byte key
    index.write_bytes(whole + last[:20])  # a crash cut the next append short
    reader = await DirBackend.open(DirURI(str(root / "seq")), Mode.SEQ, fsync="never")
    assert list((await _contents(reader)).items()) == list(SEQ_EXPECTED.items())
    key = await reader.put(b"after the crash")  # the writer cuts the torn record off
    assert index.read_bytes()[: len(whole)] == whole
    assert await reader.get(key) == b"after the crash"
    await reader.close()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(index: bytes) -> list[tuple[int, bytes, int, int, int, int]]:
    """Every record of an index.log, parsed by the documented layout; fails on a bad CRC or a stray byte."""
    out = []
    pos = HEADER.size
    while pos < len(index):
        crc, kind, klen, seg, off, length, order = RECORD.unpack_from(index, pos)
        end = pos + RECORD.size + klen
        assert end <= len(index) and zlib.crc32(index[pos + 4 : end]) == crc, f"bad record at {pos}"
        out.append((kind, index[pos + RECORD.size : end], seg, off, length, order))
        pos = end
    return out


async def test_new_writes_are_byte_identical(tmp_path: Path) -> None:
    await write_recipe(DirBackend, tmp_path)
    # seq: compacted segment by segment now; still format 1 throughout, and the same contents.
    assert all(kind in (1, 2) for kind, *_ in _records((tmp_path / "seq" / "index.log").read_bytes()))
    seq = await DirBackend.open(DirURI(str(tmp_path / "seq")), Mode.SEQ, fsync="never")
    assert list((await _contents(seq)).items()) == list(SEQ_EXPECTED.items())
    await seq.close()
    for name in ("user",):
        old, new = _files(FIXTURE / name), _files(tmp_path / name)
        assert sorted(old) == sorted(new)
        for rel, data in old.items():
            if rel == "meta.json":
                old_meta, new_meta = json.loads(data), json.loads(new[rel])
                assert sorted(old_meta) == sorted(new_meta)
                for field in ("format", "kind", "mode"):
                    assert old_meta[field] == new_meta[field]
            elif rel == "index.log":
                old_head, new_head = HEADER.unpack_from(data), HEADER.unpack_from(new[rel])
                # everything but the random backend id and the header's crc over it
                assert old_head[0] == new_head[0] == b"GSDIRIX1"
                assert old_head[2:5] == new_head[2:5]
                assert data[HEADER.size :] == new[rel][HEADER.size :], f"{name}: index records differ"
            else:
                assert data == new[rel], f"{name}/{rel} differs"
